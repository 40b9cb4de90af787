#!/usr/bin/env bash
# CI's ARM check (issue 11, item 5): cross-compiles Finch for aarch64-unknown-linux-gnu and runs
# the kernel and model-parity tests under qemu-aarch64, so that the portable and NEON code paths
# are at least correct. Installs what it needs (as root: apt and rustup), then builds and runs;
# exits non-zero when a build or a test fails. `.ci/run` calls it last; it runs alone too
# (`scripts/ci-aarch64.sh`, from any directory).
#
# What runs under qemu (a subset, to keep CI's time down; qemu emulates ~10-30x slower):
#   - the library's unit tests of the kernels and the quantized path:
#       kernels::            gemm wrappers, fused ops (rms_norm, rope, softmax, swiglu) against
#                            composite candle ops; quantized block kernels (scalar and NEON)
#                            against an f64 reference and against each other
#       model::quantized::   the quantized model's own unit tests
#       generate::tests::    generation and the quantized path's parity with the f32 model
#                            (tiny models; the real-model tests there skip without
#                            FINCH_REAL_MODEL, which this script unsets: too slow under qemu)
#   - tests/model.rs:        Llama and Qwen2 logits against candle-transformers at every
#                            position, LoRA merge and finite-difference gradients.
# Not run here: the UI tests (tests/ui*.rs render through wgpu/Mesa, which would need an
# aarch64 Mesa under qemu), the CLI/hub/data/train integration tests and the other unit
# tests (nothing architecture-specific; the host's `cargo test` runs them).
#
# The library, its test binary and tests/model.rs all link the UI crates (eframe, and
# egui_kittest/wgpu as dev-dependencies); they cross-compile without any aarch64 system
# libraries (the GUI libraries are loaded at run time, and never by these tests).
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

# ---- installs (skipped when already there)
need=()
for pkg in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx "$TRIPLE" || rustup target add "$TRIPLE"
fi
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found after the installs" >&2; exit 1; }
done

# ---- cross toolchain (also in .cargo/config.toml; set here so the script does not depend on it)
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
export QEMU_LD_PREFIX=$SYSROOT
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export CARGO_INCREMENTAL=0
# The real-model tests would take many minutes under qemu.
unset FINCH_REAL_MODEL
# Build artifacts go to target/aarch64-unknown-linux-gnu/ (cargo's layout for --target), beside
# and separate from the host build.

# No separate `cargo build --lib` first: a plain build resolves features without the
# dev-dependencies, so it compiled ~40 crates and the library a second time (~6 min on 2 cores)
# for nothing the tests use.
start=$SECONDS
echo "== aarch64: cargo test --target $TRIPLE --no-run (lib unit tests, tests/model.rs)"
cargo test --target "$TRIPLE" --lib --test model --no-run
echo "== aarch64: built in $((SECONDS - start)) s"

start=$SECONDS
echo "== aarch64 under qemu: lib unit tests kernels:: model::quantized:: generate::tests::"
cargo test --target "$TRIPLE" --lib -- kernels:: model::quantized:: generate::tests::
echo "== aarch64 under qemu: tests/model.rs"
cargo test --target "$TRIPLE" --test model
echo "== aarch64: tests ran in $((SECONDS - start)) s"
