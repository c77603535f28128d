#!/usr/bin/env bash
# The CPU backend table (README, "CPU backends by numbers"): builds the CNN training
# benchmark with every CPU backend burn 0.22.1 offers that builds offline here, and runs it
# next to PyTorch on the same machine in the same run.
#
#   bash scripts/cpu-backends.sh
#
# - PyTorch 2.9.0 (the version burn-tch 0.22.1's tch/torch-sys 0.22 are written for) goes
#   into a virtual environment (default target/torch-venv; FLOTILLA_TORCH_VENV to change),
#   from the Python package registry. burn-tch builds against that PyTorch's LibTorch
#   (LIBTORCH_USE_PYTORCH=1) and loads its shared libraries at run time.
# - CubeCL's CPU backend compiles its kernels with LLVM: scripts/offline-llvm.sh provides
#   Debian's LLVM 22 in place of the LLVM 23 its build script would download.
# - FLOTILLA_BENCH_N / FLOTILLA_BENCH_REPEATS: examples per epoch (500) and timed epochs (3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOTILLA_TORCH_VENV:-$PWD/target/torch-venv}
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.9.0")' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.9.0 numpy
fi
TORCH_LIB=$("$VENV/bin/python" -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent / "lib")')
sh scripts/offline-llvm.sh
export PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLOTILLA_TORCH_PYTHON="$VENV/bin/python"
cargo bench -p flotilla-client --bench cpu_backends --features ndarray,tch,cubecl-cpu
