#!/usr/bin/env bash
# The GPU check (`flotilla-sim gpu-check`), run from a release binary on a machine that has an
# NVIDIA GPU but no cargo and no network.
#
# Here (the build machine):
#   bash scripts/gpu-check.sh pack      # builds flotilla-sim --features cuda (release),
#                                       # strips and compresses it into gpu-kit/ with the
#                                       # preset and MNIST (from ../shared/data or $MNIST_DIR)
# Copy gpu-kit/ to the GPU machine, then there:
#   bash gpu-kit/gpu-check.sh run [OUT]  # prints the device, samples/s, the CPU-vs-CUDA
#                                       # rounds and the time to 99 %; logs to OUT
# Without a GPU, `run` prints the CPU throughput only (the CUDA fallback path).
set -euo pipefail
mode=${1:-run}
here=$(cd "$(dirname "$0")" && pwd)
case "$mode" in
pack)
  cd "$here/.."
  sh scripts/offline-llvm.sh
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -p flotilla-sim --features cuda
  bin=${CARGO_TARGET_DIR:-target}/release/flotilla-sim
  kit=gpu-kit
  rm -rf "$kit"; mkdir -p "$kit/mnist" "$kit/experiments"
  strip -o "$kit/flotilla-sim" "$bin"
  # Shared libraries the binary needs beyond glibc's own (LLVM's system libraries: z3, zstd,
  # xml2, ...) travel with it; the GPU machine's image may not have them.
  mkdir -p "$kit/lib"
  ldd "$kit/flotilla-sim" | awk '/=> \//{print $3}' | while read -r so; do
    case "$(basename "$so")" in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libgcc_s.so*) ;;
      *) cp -L "$so" "$kit/lib/" ;;
    esac
  done
  xz -T0 -6 -f "$kit/flotilla-sim"
  cp scripts/gpu-check.sh scripts/torch_cnn_bench.py "$kit/"
  cp experiments/mcmahan-cnn-iid.toml "$kit/experiments/"
  src=${MNIST_DIR:-../shared/data/mnist}
  cp "$src"/*-ubyte.gz "$kit/mnist/"
  du -sh "$kit" "$kit"/*
  ;;
run)
  out=${2:-${OUT:-out/gpu-check}}
  mkdir -p "$out"
  cd "$here"
  [ -x flotilla-sim ] || xz -dkf flotilla-sim.xz
  chmod +x flotilla-sim
  export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The CUDA runtime compiler (NVRTC) is loaded at run time: add where the toolkit keeps it.
  nvrtc=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt -name 'libnvrtc.so*' 2>/dev/null | head -1 || true)
  [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$nvrtc")"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.txt" || true
  # Throughput first (short), then PyTorch on the same machine for reference (if it has
  # PyTorch), then the preset runs (long).
  ./flotilla-sim gpu-check --throughput-only ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu-check.txt"
  if python3 -c 'import torch' 2>/dev/null; then
    python3 torch_cnn_bench.py cuda 5000 3 2>&1 | tee -a "$out/gpu-check.txt" || true
    python3 torch_cnn_bench.py cpu 1000 3 2>&1 | tee -a "$out/gpu-check.txt" || true
  fi
  ./flotilla-sim gpu-check --no-throughput --data mnist --preset experiments/mcmahan-cnn-iid.toml \
    --out "$out/runs" ${GPU_CHECK_ARGS:-} 2>&1 | tee -a "$out/gpu-check.txt"
  ;;
*)
  echo "usage: $0 pack | run [OUT]" >&2; exit 2 ;;
esac
