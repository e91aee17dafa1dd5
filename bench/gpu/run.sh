#!/usr/bin/env bash
# The GPU benchmark in one command (see bench/gpu/README.md): installs the carried wheels (transformers 5.23.0 and
# what it needs beyond the machine's image) into /tmp/site, then runs bench/gpu/bench.py from the repository.
#   bash bench/gpu/run.sh                     # on the lent GPU: $OUT/gpu_bench.{json,png}, $OUT/gpu_bench.log
#   bash bench/gpu/run.sh --dry-run --out DIR # here, on CPU, tiny shapes (what tests/test_bench_gpu.py runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}  # the GPU image's python3 holds its torch; tests pass their own interpreter
if [ -d .whl ] && [[ " $* " != *" --dry-run "* ]]; then
  # our code pins transformers 5.23.0; the image has 5.17: the wheels go in front of the image's packages
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=python:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-}
for ((i = 1; i <= $#; i++)); do if [ "${!i}" = --out ]; then j=$((i + 1)); out=${!j}; fi; done
if [ -n "$out" ]; then
  if [ -e "$out" ] && [ ! -d "$out" ]; then echo "--out $out is a file: give a folder" >&2; exit 2; fi
  mkdir -p "$out"
  set -o pipefail
  "$py" bench/gpu/bench.py "$@" 2>&1 | tee "$out/gpu_bench.log"
else
  exec "$py" bench/gpu/bench.py "$@"
fi
