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
CMAKE_ARGS="-DGGML_NATIVE=OFF" python -m pip install -q torch==2.13.0 -e ".[test,lite,gguf,plot,serve]"
# the serve tests drive Debian's chromium with Playwright (never `playwright install`: no browser download)
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ "${FLEXSELECT_SKIP_CPP:-0}" != 1 ]; then
  if ! dpkg -s libavformat-dev libavcodec-dev libswscale-dev libavutil-dev >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      libavformat-dev libavcodec-dev libswscale-dev libavutil-dev pkg-config >/dev/null
  fi
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DFLEXSELECT_SANITIZE=ON -DPython3_EXECUTABLE="$root/.venv/bin/python" >/dev/null
  cmake --build build -j2
fi

python -m pytest -q -p no:cacheprovider tests
if [ "${FLEXSELECT_SKIP_CPP:-0}" != 1 ]; then
  ctest --test-dir build --output-on-failure
fi
