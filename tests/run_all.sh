#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (CPU torch pinned), then runs the Python tests,
# and the C++ runtime's ctest suite (plain and under ASan+UBSan). Safe to re-run: installs and builds are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch pinned first: the local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
# llama-cpp-python compiles llama.cpp (~6 min on 2 cores, once; pip caches the wheel); GGML_NATIVE off for portability.
CMAKE_ARGS="-DGGML_NATIVE=OFF" python -m pip install -q torch==2.13.0 -e ".[test,lite,gguf,plot,lint,serve]"

# the serve tests drive Debian's chromium with Playwright (never `playwright install`: no browser download);
# llama.cpp's own video path, the peer in bench/peer.py (tests/test_bench_peer.py), shells out to the ffmpeg binary
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Style first (seconds): ruff lint + format and clang-format over cpp/, with the configs in pyproject.toml and
# .clang-format, so the tree stays formatted.
if ! { ruff check . && ruff format --check . &&
  find cpp \( -name '*.cpp' -o -name '*.h' \) -print0 | xargs -0 clang-format --dry-run -Werror; }; then
  echo "style check failed: run 'ruff check --fix . && ruff format .' and clang-format -i on cpp/" >&2
  exit 1
fi

if [ "${FLEXSELECT_SKIP_CPP:-0}" != 1 ]; then
  if ! dpkg -s libavformat-dev libavcodec-dev libswscale-dev libavutil-dev >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      libavformat-dev libavcodec-dev libswscale-dev libavutil-dev pkg-config >/dev/null
  fi
  # ccache where the machine has it: with paths taken relative to the checkout, a fresh clone reuses the objects
  # of an earlier one (llama.cpp is most of the build: minutes on 2 cores)
  launcher=()
  if command -v ccache >/dev/null; then
    export CCACHE_BASEDIR="$root"
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DFLEXSELECT_SANITIZE=ON -DPython3_EXECUTABLE="$root/.venv/bin/python" \
    "${launcher[@]}" >/dev/null
  cmake --build build -j2
fi

# the ComfyUI tests build their environment from the registry once: a failed setup is a failure here, not a skip.
# tests/test_lmms_eval.py runs below, in the side venv that has lmms-eval.
lmms_ignore=()
if [ "${FLEXSELECT_LMMS:-1}" != 0 ]; then lmms_ignore=(--ignore=tests/test_lmms_eval.py); fi
FLEXSELECT_COMFY_E2E=1 python -m pytest -q -p no:cacheprovider "${lmms_ignore[@]}" tests

# lmms-eval is not a dependency (it pins much of its own): its test runs in a side venv. What lmms-eval needs is
# installed once into a venv under ~/.cache/flexselect, named by a hash of what goes into it (minutes the first time);
# this checkout's .venv-lmms only adds that venv's packages to its path and installs flexselect itself (seconds).
# torch is pinned to the local CPU wheel in the install step; torchvision, which lmms-eval requires, is removed after
# it: the registry's build is a CUDA one that cannot load beside CPU torch, transformers would import it (and then
# fail to import the Qwen2.5-VL classes), and only lmms-eval's own model wrappers, which these tests never load,
# use it. A failed setup is a failure; FLEXSELECT_LMMS=0 skips this step (and says so).
if [ "${FLEXSELECT_LMMS:-1}" = 0 ]; then
  echo "WARNING: tests/test_lmms_eval.py DID NOT RUN (FLEXSELECT_LMMS=0)" >&2
else
  lmms_pins=(torch==2.13.0 transformers==5.23.0 lmms-eval==0.7.3 "setuptools>=77")
  lmms_key=$( {
    echo "${lmms_pins[*]}"
    python3 --version
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(p["dependencies"], p["optional-dependencies"]["test"])'
  } | sha256sum | cut -c1-10)
  lmms_cache="${FLEXSELECT_CACHE:-$HOME/.cache/flexselect}/lmms-eval-0.7.3-$lmms_key"
  mkdir -p "$(dirname "$lmms_cache")"
  (
    flock 9 # one build at a time; a half-built venv (no "ready") is started again
    if [ ! -f "$lmms_cache/ready" ]; then
      rm -rf "$lmms_cache"
      python3 -m venv "$lmms_cache/venv"
      # flexselect's own dependencies come with it (".[test]"); flexselect itself is installed per checkout below
      "$lmms_cache/venv/bin/python" -m pip install -q "${lmms_pins[@]}" ".[test]"
      "$lmms_cache/venv/bin/python" -m pip uninstall -q -y flexselect torchvision
      touch "$lmms_cache/ready"
    fi
  ) 9>"$lmms_cache.lock"
  # anew each run (under a second): no pip or setuptools of its own, so the cached venv's serve it
  rm -rf .venv-lmms && python3 -m venv --without-pip .venv-lmms
  lmms_site=$("$lmms_cache/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own_site=$(.venv-lmms/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$lmms_site')" >"$own_site/zz_flexselect_lmms.pth"
  .venv-lmms/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  .venv-lmms/bin/python -m pytest -q -p no:cacheprovider tests/test_lmms_eval.py
fi
if [ "${FLEXSELECT_SKIP_CPP:-0}" != 1 ]; then
  ctest --test-dir build --output-on-failure
fi
