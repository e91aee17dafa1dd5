#!/usr/bin/env bash
# The builds bench/peer.py compares, all from the one llama.cpp our runtime builds on (the revision vendored in the
# pinned llama-cpp-python sdist, fetched by export/llama_cpp_source.py):
#   build-llama/bin/llama-mtmd-cli          llama.cpp's own video CLI, portable (GGML_NATIVE=OFF, as build/): the peer
#   build-llama-native/bin/llama-mtmd-cli   the same, GGML_NATIVE=ON, shared libraries: its libllama.so / libmtmd.so
#                                           are what llama-cpp-python loads through LLAMA_CPP_LIB_PATH (the native
#                                           Python arm)
#   build-native/bin/flexselect-cli         our C++ runtime with GGML_NATIVE=ON (build/ is the portable one)
# Each is a full llama.cpp compile (minutes on 2 cores; ccache is used where the machine has it).
#
#   bash bench/build_llama_tools.sh [build-llama|build-llama-native|build-native ...]   # default: all three
set -euo pipefail
cd "$(dirname "$0")/.."
llama_dir=$(python export/llama_cpp_source.py "${FLEXSELECT_CACHE:-$HOME/.cache/flexselect}")
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
jobs=$(nproc)

mtmd_cli() {  # dir native shared
  # LLAMA_SUBPROCESS (on by default) is what gives mtmd its ffmpeg-binary video input (MTMD_VIDEO)
  cmake -S "$llama_dir" -B "$1" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$2" -DBUILD_SHARED_LIBS="$3" \
    -DLLAMA_SUBPROCESS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF "${launcher[@]}" >/dev/null
  grep -q "MTMD_VIDEO:BOOL=ON" "$1/CMakeCache.txt" || { echo "$1: mtmd was configured without video" >&2; exit 1; }
  cmake --build "$1" --target llama-mtmd-cli -j "$jobs"
}

builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=(build-llama build-llama-native build-native)
for b in "${builds[@]}"; do
  case "$b" in
    build-llama | build-llama-native | build-native) ;;
    *) echo "unknown build $b: name build-llama, build-llama-native or build-native" >&2; exit 2 ;;
  esac
done
for b in "${builds[@]}"; do
  case "$b" in
    build-llama) mtmd_cli build-llama OFF OFF ;;
    build-llama-native) mtmd_cli build-llama-native ON ON ;;
    build-native)
      cmake -S . -B build-native -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "${launcher[@]}" >/dev/null
      cmake --build build-native --target flexselect-cli -j "$jobs" ;;
  esac
done
