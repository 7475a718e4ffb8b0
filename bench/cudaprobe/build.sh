#!/usr/bin/env bash
# Build the probe (libllama + ggml CPU [+ CUDA]) from src.tar.xz. Run from anywhere:
#   bash bench/cudaprobe/build.sh                 # CUDA build for sm_90 (H100), -j16
#   CUDAPROBE_CUDA=OFF JOBS=2 bash bench/cudaprobe/build.sh   # CPU-only check build
# CUDAPROBE_CMAKE_ARGS adds cmake -D options (word-split); CUDAPROBE_WORK moves the work dir (default /tmp/cudaprobe).
# Resumable: a second run reuses the unpacked source and the build dir (ninja picks up where it stopped).
# Prints the probe's path as its last line: "PROBE_BIN=/path".
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CUDA=${CUDAPROBE_CUDA:-ON}
WORK=${CUDAPROBE_WORK:-/tmp/cudaprobe}
JOBS=${JOBS:-16}
BUILD=$WORK/build-cuda-$CUDA
T0=$(date +%s)
elapsed() { echo "build.sh: $1 after $(( $(date +%s) - T0 )) s"; }
trap 'echo "build.sh: FAILED (line $LINENO) after $(( $(date +%s) - T0 )) s" >&2' ERR

for t in cmake ninja cc c++ tar xz; do command -v $t >/dev/null || { echo "build.sh: $t not found" >&2; exit 1; }; done
CUDA_ARGS=(-DGGML_CUDA=OFF)
if [ "$CUDA" = ON ]; then
    if ! command -v nvcc >/dev/null; then
        for d in /usr/local/cuda/bin /usr/local/cuda-13*/bin /opt/cuda/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
    fi
    command -v nvcc >/dev/null || { echo "build.sh: nvcc not found" >&2; exit 1; }
    nvcc --version | tail -2
    # sm_90 SASS only (90-real: no PTX copy in the fatbin; it is not loaded on an sm_90 GPU anyway); FA kept (vec kernels only for the K=V types we measure: f16, q8_0, q4_0; no bf16, no mixed);
    # no NCCL; no fatbin compression (saves a little per object; irrelevant to VRAM with lazy module loading).
    CUDA_ARGS=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDAPROBE_ARCH:-90-real} -DCMAKE_CUDA_COMPILER="$(command -v nvcc)"
               -DGGML_CUDA_FA=ON -DGGML_CUDA_FA_ALL_QUANTS=OFF "-DGGML_CUDA_FA_QUANTS=f16-f16;q8_0-q8_0;q4_0-q4_0"
               -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=none)
fi
echo "build.sh: cuda=$CUDA jobs=$JOBS nproc=$(nproc) work=$WORK $(cmake --version | head -1) ninja $(ninja --version)"

mkdir -p "$WORK"
if [ ! -f "$WORK/src/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    tar -xJf "$HERE/src.tar.xz" -C "$WORK/src"
fi
cp "$HERE/probe.c" "$HERE/CMakeLists.txt" "$WORK/src/"

if [ ! -f "$BUILD/build.ninja" ]; then
    cmake -S "$WORK/src" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_SRC="$WORK/src/llama.cpp" \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF \
        -DGGML_BLAS=OFF -DGGML_RPC=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENMP=ON -DGGML_CCACHE=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_MTMD=OFF \
        "${CUDA_ARGS[@]}" ${CUDAPROBE_CMAKE_ARGS:-} > "$WORK/configure-$CUDA.log" 2>&1 \
        || { tail -60 "$WORK/configure-$CUDA.log" >&2; rm -f "$BUILD/build.ninja"; exit 1; }
    grep -E "CUDA|Including|CMAKE_BUILD_TYPE|x86|OpenMP" "$WORK/configure-$CUDA.log" | head -20 || true
    elapsed configured
fi
# Longest-first is what ninja does anyway once the graph is known; -k 0 would hide the first error, so no -k.
cmake --build "$BUILD" --target probe -j "$JOBS"
test -x "$BUILD/bin/probe"
if ldd "$BUILD/bin/probe" | grep "not found"; then echo "build.sh: unresolved libraries (above)" >&2; exit 1; fi
ldd "$BUILD/bin/probe" | grep -E "cuda|cublas" || true
elapsed built
echo "PROBE_BIN=$BUILD/bin/probe"
