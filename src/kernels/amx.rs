//! Intel AMX (Advanced Matrix Extensions): the tile registers and `tdpbf16ps`, which multiplies a
//! 16×32 bf16 tile by a 32×16 one into a 16×16 f32 tile in one instruction. On the Xeons that
//! have it (Sapphire Rapids and later), bf16 products run several times faster than the AVX-512
//! `vdpbf16ps` or f32 FMA loops; PyTorch's bf16 training takes them through oneDNN. Finch's
//! `--precision bf16` products take them through [`crate::kernels::bf16`], which packs the
//! operands exactly as for its `vdpbf16ps` tiles (activation pairs by rows, weight panels of
//! `k`-pairs × 32 columns) and calls [`block`] for each 32×32 block of the output.
//!
//! Written as inline assembly: Rust's AMX intrinsics are not stable (1.95), while stable `asm!`
//! assembles the instructions. The tile registers are named in the assembly; the compiler never
//! allocates them, so nothing else touches them between [`Tiles::configure`] and its drop.
//!
//! Linux hands the tile state to a process only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once, and reports no AMX where the kernel refuses.

#![allow(unsafe_code)]

use std::arch::asm;
use std::sync::OnceLock;

/// Output rows and columns of one [`block`]: 2×2 tiles of 16×16.
pub(crate) const BLOCK: usize = 32;
/// `k`-pairs one tile step multiplies (a tile row is 64 bytes: 16 pairs of bf16).
pub(crate) const PAIRS: usize = 16;

/// Whether this process can run AMX bf16 tiles: the CPU reports AMX-TILE and AMX-BF16 (CPUID
/// leaf 7), and Linux granted the tile state. Decided on the first call.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && request_tile_state())
}

fn cpu_has_amx() -> bool {
    // `__cpuid` is a safe function from Rust 1.87, `unsafe` in the crate's `rust-version`.
    // SAFETY: CPUID is present on every x86-64 CPU; leaf 7 exists where the maximum leaf allows.
    #[allow(unused_unsafe)]
    let (max, sub) = unsafe {
        (
            std::arch::x86_64::__cpuid(0).eax,
            std::arch::x86_64::__cpuid_count(7, 0),
        )
    };
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    max >= 7 && sub.edx & AMX_BF16 != 0 && sub.edx & AMX_TILE != 0
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it changes only which register state
    // the kernel saves for this process.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration `ldtilecfg` loads: palette 1, all eight tiles 16 rows × 64 bytes.
/// tmm0–3 hold the output block's four 16×16 f32 tiles, tmm4–5 two 16-row slices of
/// activation pairs, tmm6–7 two 16-column slices of a weight panel.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tiles configured on this thread; dropping it releases them (`tilerelease`), so the
/// thread's saved state shrinks back.
pub(crate) struct Tiles(());

impl Tiles {
    /// Safety: [`available`] returned true.
    pub(crate) unsafe fn configure() -> Tiles {
        // SAFETY: AMX is available (the caller's contract); `CONFIG` is a valid palette-1
        // configuration, 64 bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack, readonly)) };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only constructed by `configure`, so AMX is available.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32×32 block of the output: `c[r, j] (+)= Σ_p ⟨a[r, p], panel[p, j]⟩` for `r < rows`,
/// `j < cols`, over `len` pairs, where `⟨·,·⟩` multiplies a pair of bf16 values by a pair and
/// sums in f32 (the `vdpbf16ps` sum, sixteen pairs per instruction).
///
/// Safety: the calling thread holds [`Tiles`]; `a` holds 32 rows of `len` pairs at stride `lda`
/// (pairs), `panel` `len` rows of 32 pairs, with `len` a multiple of [`PAIRS`] (rows past the
/// products' end zero in both); `c` holds `rows ≤ 32` rows of `cols ≤ 32` values at stride
/// `ldc`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block(
    a: *const u32,
    lda: usize,
    panel: *const u32,
    len: usize,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
) {
    debug_assert!(len % PAIRS == 0 && rows <= BLOCK && cols <= BLOCK);
    if rows < BLOCK || cols < BLOCK {
        // A partial block goes through a full one on the stack (only then: zeroing it for every
        // block was 9% of a bf16 training step).
        let mut edge = [0f32; BLOCK * BLOCK];
        // SAFETY: `c` holds `rows` rows of `cols` values at stride `ldc` (the caller's
        // contract); `edge` is a full block.
        unsafe {
            if accumulate {
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(c.add(r * ldc), edge.as_mut_ptr().add(r * BLOCK), cols);
                }
            }
            block(a, lda, panel, len, edge.as_mut_ptr(), BLOCK, (BLOCK, BLOCK), accumulate);
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(edge.as_ptr().add(r * BLOCK), c.add(r * ldc), cols);
            }
        }
        return;
    }
    // SAFETY: the pointers cover what the caller's contract says (a full block here); every
    // tile load and store below reads or writes 16 rows of 64 bytes inside those regions.
    unsafe {
        let cs = ldc * 4;
        let (c00, c01, c10, c11) = (c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c00} + {cs}*1]",
                "tileloadd tmm1, [{c01} + {cs}*1]",
                "tileloadd tmm2, [{c10} + {cs}*1]",
                "tileloadd tmm3, [{c11} + {cs}*1]",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, cs = in(reg) cs,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let (sa, sb) = (lda * 4, BLOCK * 4);
        for q in (0..len).step_by(PAIRS) {
            let (a0, a1) = (a.add(q), a.add(16 * lda + q));
            let (b0, b1) = (panel.add(q * BLOCK), panel.add(q * BLOCK + 16));
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, sa = in(reg) sa, sb = in(reg) sb,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c00} + {cs}*1], tmm0",
            "tilestored [{c01} + {cs}*1], tmm1",
            "tilestored [{c10} + {cs}*1], tmm2",
            "tilestored [{c11} + {cs}*1], tmm3",
            c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, cs = in(reg) cs,
            options(nostack),
        );
    }
}
