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
#       model::cached_attention::  decode attention over a KV cache against candle's composite
#                            ops (ARM runs its portable loop; the AVX2 test skips there)
#       generate::tests::    generation and the quantized path's parity with the f32 model
#                            (tiny models; the real-model tests there skip without
#                            FINCH_REAL_MODEL, which this script unsets: too slow under qemu)
#   - tests/composite.rs:    the model-parity check here: every fused kernel (and attention, the
#                            linear cross-entropy, LoRA linears) against the composite candle
#                            ops, values and gradients, and a tiny model trained end to end
#                            along the same loss curve on both paths (f32 and a bf16 base);
#                            composite LoRA gradients against finite differences. Its two tests
#                            that start the `finch` binary are skipped (a child aarch64 process
#                            needs binfmt_misc, which CI's container lacks; they test the CLI).
#   - tests/model.rs:        LoRA identities and merge, finite-difference LoRA gradients for
#                            every family, broken-folder messages. Its two logits-vs-
#                            candle-transformers tests are compiled out here (below), so
#                            composite.rs above carries the parity check on ARM; the host's
#                            `cargo test` still runs them.
# Not run here: the UI tests (the build has no studio), the CLI/hub/data/train integration tests
# and the other unit tests (nothing architecture-specific; the host's `cargo test` runs them).
#
# A lean build: no `studio` feature (`--no-default-features --features parquet`: no eframe,
# winit, wayland, x11rb, glow, ...), and `--cfg finch_qemu` (RUSTFLAGS, for the aarch64 units
# only: with `--target`, host build scripts and proc-macros do not see it) turns off the
# dev-dependencies no test here uses: candle-transformers and egui_kittest (wgpu, naga);
# Cargo.toml's `[target.'cfg(not(finch_qemu))'.dev-dependencies]`. Measured on the 2-core Xeon
# from a clean target dir: 285 units, 1149 s of CPU (was 478 units, 2000 s of CPU and 1027 s
# wall); 422 s wall on 2 free cores (`.ci/run` on a fresh clone, 2026-11-29). The tests under
# qemu: 137 s there (lib 103 s, composite.rs 21 s, model.rs 12 s).
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
export RUSTFLAGS="--cfg finch_qemu"
FEATURES=(--no-default-features --features parquet)
start=$SECONDS
echo "== aarch64: cargo test --target $TRIPLE ${FEATURES[*]} --no-run (lib unit tests, tests/composite.rs, tests/model.rs)"
cargo test --target "$TRIPLE" "${FEATURES[@]}" --lib --test composite --test model --no-run
echo "== aarch64: built in $((SECONDS - start)) s"

start=$SECONDS
echo "== aarch64 under qemu: lib unit tests kernels:: model::quantized:: model::cached_attention:: generate::tests::"
cargo test --target "$TRIPLE" "${FEATURES[@]}" --lib -- kernels:: model::quantized:: model::cached_attention:: generate::tests::
echo "== aarch64 under qemu: tests/composite.rs (fused vs composite, end to end through the model)"
cargo test --target "$TRIPLE" "${FEATURES[@]}" --test composite -- \
  --skip bench_train_reports_its_path_and_device --skip every_model_command_takes_a_device
echo "== aarch64 under qemu: tests/model.rs"
cargo test --target "$TRIPLE" "${FEATURES[@]}" --test model
echo "== aarch64: tests ran in $((SECONDS - start)) s"
