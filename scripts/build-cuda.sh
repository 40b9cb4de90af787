#!/usr/bin/env bash
# Builds Finch with CUDA on a machine that has no GPU and no CUDA toolkit.
#
#   scripts/build-cuda.sh            # cargo build --release --features cuda  -> target/cuda/release/finch
#   scripts/build-cuda.sh --check    # cargo check --features cuda (compiles candle's CUDA kernels too)
#   scripts/build-cuda.sh --env      # installs the toolkit, prints the build environment (to `eval`)
#   scripts/build-cuda.sh -- ARGS    # extra cargo arguments, e.g. -- --bin finch
#
# What it does: installs nvcc, the CUDA headers and the runtime libraries from PyPI wheels into a
# venv (no system packages), adds the unversioned `.so` links the linker looks for, writes a
# `libcuda.so` stub (the real one comes with the NVIDIA driver; every stub function returns
# CUDA_ERROR_STUB_LIBRARY, so a binary that finds only the stub says "no NVIDIA driver found"),
# and runs cargo with `--features cuda` in its own target folder.
#
# Settings (environment):
#   CUDA_COMPUTE_CAP   GPU generation the kernels are compiled for (default 90: H100/H200;
#                      89: RTX 40xx, 86: RTX 30xx, 80: A100). Kernels built for 90 do not load
#                      on older GPUs; bf16 training needs 80 or newer.
#   FINCH_CUDA_TOOLKIT where the wheels go (default $CARGO_TARGET_DIR/cuda-toolkit, else
#                      target/cuda-toolkit; ~1.2 GB).
#   FINCH_CUDA_TARGET  cargo target folder (default $CARGO_TARGET_DIR/cuda, else target/cuda).
#   PYTHON             Python 3 with venv (default python3).
#
# The binary links libcuda.so.1 (the driver), libcublas.so.13, libcublasLt.so.13, libcurand.so.10
# and libnvrtc.so.13: a GPU machine with a CUDA 13 driver (>= 580) has the first; the others are
# in "$FINCH_CUDA_TOOLKIT/lib" (copy them along and set LD_LIBRARY_PATH if the machine has no
# CUDA 13 runtime). The kernels are PTX from nvcc 13.4: a driver older than CUDA 13.4 cannot
# load them (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

mode=build
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check ;;
    --env) mode=env ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
  esac
  shift
done

base="${CARGO_TARGET_DIR:-$repo/target}"
tk="${FINCH_CUDA_TOOLKIT:-$base/cuda-toolkit}"
target="${FINCH_CUDA_TARGET:-$base/cuda}"
py="${PYTHON:-python3}"
cap="${CUDA_COMPUTE_CAP:-90}"
case "$cap" in
  [0-9][0-9]|[0-9][0-9][0-9]) ;;
  *) echo "build-cuda.sh: CUDA_COMPUTE_CAP=\`$cap\` is not a compute capability like 90, 89 or 86" >&2; exit 2 ;;
esac

# cudarc 0.19 supports CUDA <= 13.4 (nvcc 13.5 makes its build script panic). Exact versions, so
# every build compiles the same kernels.
wheels=(
  "nvidia-cuda-nvcc==13.4.92"
  "nvidia-cuda-crt==13.4.92"
  "nvidia-nvvm==13.4.92"
  "nvidia-cuda-cccl==13.3.5.0.6"
  "nvidia-cuda-runtime==13.4.92"
  "nvidia-cuda-nvrtc==13.4.92"
  "nvidia-cublas==13.4.3.11"
  "nvidia-curand==10.4.5.25"
)

stamp="$tk/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ]; then
  echo "== installing nvcc and the CUDA libraries from PyPI into $tk" >&2
  rm -rf "$tk"
  "$py" -m venv "$tk/venv"
  "$tk/venv/bin/pip" install --quiet --disable-pip-version-check "${wheels[@]}"
  echo "${wheels[*]}" > "$stamp"
fi

cuda="$(ls -d "$tk"/venv/lib/python3*/site-packages/nvidia/cu13 | head -1)"
[ -x "$cuda/bin/nvcc" ] || { echo "build-cuda.sh: no nvcc in $cuda/bin (broken install? remove $tk)" >&2; exit 1; }

# The wheels ship only versioned libraries (libcublas.so.13); `-lcublas` needs libcublas.so.
mkdir -p "$tk/lib" "$tk/stubs"
for so in "$cuda"/lib/lib*.so.*; do
  base="$(basename "$so")"
  ln -sf "$so" "$tk/lib/$base"
  ln -sf "$so" "$tk/lib/${base%%.so.*}.so"
done

# libcuda stub: every `cu*` name cuda.h declares or #defines (the _v2/_v3 variants cudarc calls),
# each returning CUDA_ERROR_STUB_LIBRARY (34). Its soname is the driver's, libcuda.so.1. It is
# kept out of "$tk/lib" so that nothing finds it at run time by accident.
if [ ! -f "$tk/stubs/libcuda.so" ]; then
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$cuda/include/cuda.h" | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$tk/stubs/libcuda_stub.c"
  cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$tk/stubs/libcuda.so" "$tk/stubs/libcuda_stub.c"
  ln -sf libcuda.so "$tk/stubs/libcuda.so.1"
fi

export PATH="$cuda/bin:$PATH"
export NVCC="$cuda/bin/nvcc"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_TOOLKIT_ROOT_DIR="$cuda"
export CUDA_COMPUTE_CAP="$cap"
export CUDARC_CUDA_VERSION=13040
# The linker (cc) searches LIBRARY_PATH for -lcuda, -lcublas, ...
export LIBRARY_PATH="$tk/lib:$tk/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target"

if [ "$mode" = env ]; then
  for v in PATH NVCC CUDA_ROOT CUDA_PATH CUDA_TOOLKIT_ROOT_DIR CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION \
           LIBRARY_PATH CARGO_TARGET_DIR; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  exit 0
fi

echo "== nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $cap, target $target" >&2
if [ "$mode" = check ]; then
  cargo check --features cuda --all-targets "${extra[@]}"
else
  cargo build --release --features cuda "${extra[@]}"
  echo "built $target/release/finch (needs libcuda.so.1 from an NVIDIA driver; CUDA libraries: $tk/lib)" >&2
fi
