//! What the CPU offers Finch's kernels, decided once per process: the instruction-set family
//! (by default the fastest, except AVX2 on AMD Zen 4: see [`preferred`];
//! `FINCH_CPU=avx512|avx2|portable` forces one, so the AVX2 laptop path can be measured on an
//! AVX-512 machine), where Finch's own register tiles run ([`tiles`];
//! `FINCH_TILES=on|off`), whether bf16 products run Intel AMX tiles ([`amx`], `FINCH_AMX=on|off`),
//! the thread count, the CPU model and the transparent-huge-page mode.
//!
//! Everything here reads the environment or system files at most once: these values are asked
//! for on every matrix product, and `num_cpus::get_physical` (behind candle's thread count)
//! parses `/proc/cpuinfo` on each call — 6,505 opens in a 16-token decode before this module.

use std::sync::OnceLock;

/// A kernel family: which vector instructions Finch's own kernels (and its gemm calls) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Plain Rust that the compiler vectorizes for the baseline target (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA + F16C (x86-64-v3: most laptops, Intel consumer CPUs since 12th gen).
    Avx2,
    /// AVX-512 F/BW on top of AVX2 (x86-64-v4).
    Avx512,
    /// aarch64 NEON (every aarch64 CPU has it); only the quantized kernels have a NEON path.
    Neon,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Portable => "portable",
            Family::Avx2 => "avx2",
            Family::Avx512 => "avx512",
            Family::Neon => "neon",
        }
    }

    fn parse(s: &str) -> Option<Family> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(Family::Portable),
            "avx2" => Some(Family::Avx2),
            "avx512" => Some(Family::Avx512),
            "neon" => Some(Family::Neon),
            _ => None,
        }
    }

    /// Every family this CPU runs, slowest first.
    pub fn available() -> Vec<Family> {
        #[allow(unused_mut)]
        let mut out = vec![Family::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                out.push(Family::Avx2);
                if has!("avx512f") && has!("avx512bw") {
                    out.push(Family::Avx512);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        out.push(Family::Neon);
        out
    }
}

/// The family from `FINCH_CPU`, or why it cannot be used.
fn from_env() -> Result<Option<Family>, String> {
    let Some(value) = std::env::var_os("FINCH_CPU") else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    if value.trim().is_empty() {
        return Ok(None);
    }
    let available = Family::available();
    let names = available.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
    match Family::parse(&value) {
        None => Err(format!(
            "FINCH_CPU={value} is not a kernel family; use one of: avx512, avx2, portable (this CPU runs {names})"
        )),
        Some(f) if !available.contains(&f) => Err(format!(
            "FINCH_CPU={value}: this CPU lacks the {} instructions (it runs {names})",
            f.name()
        )),
        Some(f) => Ok(Some(f)),
    }
}

/// The family Finch's kernels use: `FINCH_CPU`'s when it names one this CPU runs, otherwise
/// [`preferred`]. Decided on the first call.
pub fn family() -> Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    *FAMILY.get_or_init(|| from_env().ok().flatten().unwrap_or_else(preferred))
}

/// The family Finch picks by itself: the fastest available, except on AMD Zen 4 (family 19h
/// with AVX-512), which executes 512-bit instructions as two 256-bit halves. There the AVX2
/// kernels measured faster (2-core AMD EPYC, alternating runs, medians of 2): f32 prefill 590
/// vs 395 tokens/s (gemm's 64-row AVX-512 microkernel on prompt-sized products), f32 decode 47
/// vs 41, Q4_1 prefill 413 vs 354; training (253/230 vs 245/242) and Q4_1 decode (131/141 vs
/// 149/121) equal within noise. `FINCH_CPU=avx512` still forces AVX-512. The quantized block
/// kernels, measured since with VNNI, keep AVX-512 there: [`quantized_family`]; so do the bf16
/// and f32 register tiles of tall frozen-weight products (`kernels::bf16`, `kernels::panel`),
/// which replaced gemm's kernels for those products.
pub fn preferred() -> Family {
    let best = best();
    if best == Family::Avx512 && on_zen4() {
        return Family::Avx2;
    }
    best
}

/// The family of the quantized block kernels (`kernels::quant`): `FINCH_CPU`'s when it names
/// one this CPU runs, otherwise the fastest this CPU runs, Zen 4 included. [`preferred`]'s
/// exception for Zen 4 was measured on the f32 gemm and gemv; the quantized row kernels gained
/// AVX-512 VNNI (`vpdpwssd`) later. On a 2-core AMD EPYC (Zen 4), alternating in one sitting,
/// Q4_1 decode with the AVX-512 block kernels ran at a median 142.6 tokens/s against the AVX2
/// kernels' 136.6 (5 pairs), and 137.8 against 133.9 as shipped (AVX2 gemm either way; 4
/// pairs), prefill equal within the noise (docs/performance.md, ninth session). Decided on
/// the first call.
pub fn quantized_family() -> Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    *FAMILY.get_or_init(|| from_env().ok().flatten().unwrap_or_else(best))
}

/// Which products with a frozen f32 weight go through Finch's own AVX-512 register tiles
/// (`kernels::panel`'s `vfmadd231ps`) rather than the gemm crate's kernels: [`tiles`]. (bf16
/// weights' `vdpbf16ps` tiles: [`bf16_tiles`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiles {
    /// Every product of enough token rows (AMD Zen 4 by default, or `FINCH_TILES=on`).
    Everywhere,
    /// f32 products of fewer than `kernels::panel::GEMM_FROM_ROWS` token rows (prompt prefill)
    /// only: other AVX-512 CPUs with `FINCH_TILES` unset.
    ShortOnly,
    /// None (no AVX-512 kernel family, or `FINCH_TILES=off`).
    Off,
}

/// Where Finch's own f32 register tiles run, decided on the first call. By default they run
/// everywhere only on AMD Zen 4, the CPU they were written and measured on, where they beat
/// gemm's AVX2 kernels (gemm's AVX-512 ones are slower there still: [`preferred`]) and
/// `vdpbf16ps` runs at twice the f32 FMA rate. Elsewhere the crate's kernels were faster on
/// training's products: on a 2-core Intel Xeon (family 6 model 207, AVX-512 with BF16), one
/// thread, the step's shapes, gemm's AVX-512 kernels ran at 133–142 GFLOP/s against the f32
/// tiles' 82–127; `bench train` alternating, f32 249–281 tokens/s on gemm against 189–277 on
/// the tiles, and bf16 widened for gemm 245–254 against 186–202 on the `vdpbf16ps` tiles
/// (docs/performance.md, seventeenth session). There the f32 tiles keep prefill's shorter
/// products (734–763 against gemm's 592–647 tokens/s on a 143-token prompt). Zen 5 (family 1Ah)
/// gets the Intel choice for f32, as measured there ([`bf16_tiles`]); CPUs measured on none of
/// these (other Intel generations) get it too. `FINCH_TILES=on|off` forces
/// [`Tiles::Everywhere`] or [`Tiles::Off`], for measuring; `FINCH_CPU` below `avx512` turns the
/// tiles off. Decoding's bf16 row loop is not a tile: it runs wherever AVX-512 BF16 is.
pub fn tiles() -> Tiles {
    static TILES: OnceLock<Tiles> = OnceLock::new();
    *TILES.get_or_init(|| {
        if quantized_family() != Family::Avx512 {
            return Tiles::Off;
        }
        match tiles_from_env() {
            Ok(Some(true)) => Tiles::Everywhere,
            Ok(Some(false)) => Tiles::Off,
            _ if on_zen4() => Tiles::Everywhere,
            _ => Tiles::ShortOnly,
        }
    })
}

/// How the f32 register tiles (`kernels::panel`) block a frozen weight: reduction values per
/// packed block, and whether the input-gradient side packs its panels. Decided on the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct F32Blocking {
    /// Reduction values per block of a 32-column panel.
    pub reduction: usize,
    /// Whether the input-gradient side (`dx = g·W`, whose panels are 32 contiguous values of
    /// each weight row) copies its panels out, whole rows at a time, or reads them in place.
    pub pack_plain: bool,
}

/// The f32 tiles' blocking for this CPU. On AMD Zen 4, where the tiles were written: 640-value
/// blocks (80 KB, read from L2) and the input-gradient side read in place, as measured there
/// (docs/performance.md, fifteenth session). Elsewhere, from an Intel Xeon (family 6 model 207):
/// 256-value blocks, so that a panel (32 KB) stays in the 48 KB L1 while six token rows stream
/// past it, and the input-gradient side packed from whole weight rows: read in place, each
/// panel walks 256 weight rows 2.3–6 KB apart, a new page every row, and in a training step
/// the weight comes from memory (docs/performance.md, nineteenth session).
pub(crate) fn f32_blocking() -> F32Blocking {
    static BLOCKING: OnceLock<F32Blocking> = OnceLock::new();
    *BLOCKING.get_or_init(|| {
        if on_zen4() {
            F32Blocking {
                reduction: 640,
                pack_plain: false,
            }
        } else {
            F32Blocking {
                reduction: 256,
                pack_plain: true,
            }
        }
    })
}

/// Whether products of a frozen bf16 weight with more than two token rows (training, prefill)
/// run `kernels::bf16`'s `vdpbf16ps` tiles rather than widening the weight to f32 for gemm's
/// kernels, decided on the first call (the caller also needs AVX-512 BF16). `FINCH_TILES=on|off`
/// forces it; by default AMD Zen 4 and Zen 5 (families 19h and 1Ah) take the tiles, other CPUs
/// widen. Zen 4: [`tiles`]. On a 2-core AMD EPYC, family 26 (Zen 5), `bench train --precision
/// bf16` alternating: tiles 651.9, 700.6 tokens/s against widened 428.7, 433.0; there the f32
/// tiles stayed behind gemm's AVX-512 kernels (444.0, 407.3 against 483.1, 473.2), so [`tiles`]
/// keeps Zen 5 on the Intel choice for f32 (docs/performance.md, twenty-first session). On the
/// Intel Xeon (family 6 model 207) widening was 25–30% faster.
///
/// Derived from [`tiles`], so `FINCH_TILES` and the AVX-512 check are read in one place:
/// everywhere (Zen 4, or forced on) → on; off → off; short products only → on for Zen 5 alone.
pub fn bf16_tiles() -> bool {
    static BF16_TILES: OnceLock<bool> = OnceLock::new();
    *BF16_TILES.get_or_init(|| match tiles() {
        Tiles::Everywhere => true,
        Tiles::Off => false,
        Tiles::ShortOnly => on_zen5(),
    })
}

/// Whether products of a frozen bf16 weight with more than two token rows run Intel AMX tiles
/// (`kernels::amx`) rather than [`bf16_tiles`] or widening, decided on the first call (the caller
/// also needs AVX-512 BF16). By default wherever the CPU has AMX-BF16 and Linux grants the tile
/// state (Intel Xeon, Sapphire Rapids and later); `FINCH_AMX=off` turns them off for measuring,
/// and so does `FINCH_CPU` below `avx512`. On a 2-core Intel Xeon (family 6 model 167), where
/// PyTorch's bf16 training runs AMX through oneDNN: docs/performance.md, twenty-fifth session.
pub fn amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| quantized_family() == Family::Avx512 && amx_available() && amx_from_env() != Ok(Some(false)))
}

fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `FINCH_AMX` (`on`, `off`, or `auto`/unset), or why it cannot be used.
fn amx_from_env() -> Result<Option<bool>, String> {
    switch_from_env(
        "FINCH_AMX",
        quantized_family() == Family::Avx512 && amx_available(),
        |value| {
            format!(
                "FINCH_AMX={value}: this CPU (or FINCH_CPU={}) gives no AMX bf16 tiles",
                quantized_family().name()
            )
        },
    )
}

/// `FINCH_TILES` (`on`, `off`, or `auto`/unset), or why it cannot be used.
fn tiles_from_env() -> Result<Option<bool>, String> {
    switch_from_env("FINCH_TILES", quantized_family() == Family::Avx512, |value| {
        format!(
            "FINCH_TILES={value}: the tiles need the avx512 kernel family (this CPU, or FINCH_CPU, gives {})",
            quantized_family().name()
        )
    })
}

/// An `on|off|auto` switch from the environment variable `name`: `None` when unset or `auto`,
/// `Some(false)` for `off`/`0`, `Some(true)` for `on`/`1` where `usable`, otherwise the error
/// `unusable(value)` gives; any other value is an error naming it.
fn switch_from_env(name: &str, usable: bool, unusable: impl FnOnce(&str) -> String) -> Result<Option<bool>, String> {
    let Some(value) = std::env::var_os(name) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "off" | "0" => Ok(Some(false)),
        "on" | "1" if usable => Ok(Some(true)),
        "on" | "1" => Err(unusable(&value)),
        _ => Err(format!("{name}={value} is not a setting; use on, off or auto")),
    }
}

/// Whether this CPU is AMD family 19h, by `/proc/cpuinfo` ([`is_zen4`]).
fn on_zen4() -> bool {
    is_zen4(cpuinfo_field("vendor_id"), cpuinfo_field("cpu family"))
}

/// Whether this CPU is AMD family 1Ah (Zen 5), by `/proc/cpuinfo` ([`is_zen5`]).
fn on_zen5() -> bool {
    is_zen5(cpuinfo_field("vendor_id"), cpuinfo_field("cpu family"))
}

/// AMD family 19h (Zen 3 and Zen 4; of those only Zen 4 has AVX-512, which the caller checks).
fn is_zen4(vendor: Option<&str>, family: Option<&str>) -> bool {
    amd_family(vendor, family) == Some(0x19)
}

/// AMD family 1Ah (Zen 5: AVX-512 with full-width 512-bit units, unlike Zen 4).
fn is_zen5(vendor: Option<&str>, family: Option<&str>) -> bool {
    amd_family(vendor, family) == Some(0x1a)
}

/// The CPU family number of an AMD CPU (`/proc/cpuinfo` writes it in decimal).
fn amd_family(vendor: Option<&str>, family: Option<&str>) -> Option<u32> {
    (vendor == Some("AuthenticAMD")).then(|| family?.parse().ok()).flatten()
}

/// The first value of `key` in `/proc/cpuinfo`, read once; `None` where the OS does not report it.
fn cpuinfo_field(key: &str) -> Option<&'static str> {
    static INFO: OnceLock<String> = OnceLock::new();
    let info = INFO.get_or_init(|| std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The fastest family this CPU runs (what gemm picks by itself), decided on the first call.
pub fn best() -> Family {
    static BEST: OnceLock<Family> = OnceLock::new();
    *BEST.get_or_init(|| Family::available().pop().unwrap_or(Family::Portable))
}

/// `Err` with a one-line explanation when `FINCH_CPU`, `FINCH_TILES` or `FINCH_AMX` is set to something
/// unusable (commands report it instead of silently measuring other kernels).
pub fn check_env() -> Result<(), String> {
    from_env()?;
    tiles_from_env()?;
    amx_from_env().map(|_| ())
}

/// Threads for matrix products: `RAYON_NUM_THREADS`, else candle's choice (physical cores),
/// computed once. candle recomputes it — reading `/proc/cpuinfo` — on every call.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Makes candle's own per-matmul thread query cheap: candle reads `RAYON_NUM_THREADS` before
/// falling back to parsing `/proc/cpuinfo`, so the binary sets it once at start-up (before any
/// thread exists) to the count candle would have chosen. The user's own setting wins.
pub fn pin_thread_count_env() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The CPU's model name (`/proc/cpuinfo`'s first `model name`), read once; `None` where the OS
/// does not report it.
pub fn model_name() -> Option<&'static str> {
    static NAME: OnceLock<Option<String>> = OnceLock::new();
    NAME.get_or_init(|| {
        cpuinfo_field("model name")
            .or_else(|| cpuinfo_field("Model"))
            .map(str::to_string)
    })
    .as_deref()
}

/// The CPU's identity numbers from `/proc/cpuinfo`, read once: `AuthenticAMD family 25 model 17
/// stepping 1` on x86-64, `implementer 0x41 part 0xd0c` on ARM; `None` where the OS reports
/// neither. Why beside [`model_name`]: under a hypervisor the name can be as bare as "AMD EPYC",
/// which covers Zen 2 to Zen 5, whose speed figures differ by 2× (docs/performance.md).
pub fn identity() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| identity_from(&cpuinfo_field)).as_deref()
}

/// [`identity`] from a lookup of `/proc/cpuinfo`'s fields (tests pass their own).
fn identity_from<'a>(field: &dyn Fn(&str) -> Option<&'a str>) -> Option<String> {
    if let Some(family) = field("cpu family") {
        let vendor = field("vendor_id").unwrap_or("unknown vendor");
        let mut id = format!("{vendor} family {family}");
        for key in ["model", "stepping"] {
            if let Some(v) = field(key) {
                id.push_str(&format!(" {key} {v}"));
            }
        }
        return Some(id);
    }
    let implementer = field("CPU implementer")?;
    Some(match field("CPU part") {
        Some(part) => format!("implementer {implementer} part {part}"),
        None => format!("implementer {implementer}"),
    })
}

/// The transparent-huge-page mode (`always`, `madvise` or `never`: the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/enabled`), read once; `None` off Linux.
pub fn thp_mode() -> Option<&'static str> {
    static MODE: OnceLock<Option<String>> = OnceLock::new();
    MODE.get_or_init(|| {
        let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
        let start = s.find('[')? + 1;
        let end = start + s[start..].find(']')?;
        Some(s[start..end].to_string())
    })
    .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_names_x86_family_model_stepping_and_arm_implementer_part() {
        let lookup = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
        };
        let zen4 = lookup(&[
            ("vendor_id", "AuthenticAMD"),
            ("cpu family", "25"),
            ("model", "17"),
            ("model name", "AMD EPYC"),
            ("stepping", "1"),
        ]);
        assert_eq!(
            identity_from(&zen4).as_deref(),
            Some("AuthenticAMD family 25 model 17 stepping 1")
        );
        let arm = lookup(&[("CPU implementer", "0x41"), ("CPU part", "0xd0c")]);
        assert_eq!(identity_from(&arm).as_deref(), Some("implementer 0x41 part 0xd0c"));
        assert_eq!(identity_from(&lookup(&[("model name", "x")])), None);
        // This machine's own answer is one of those shapes, or nothing (not a panic).
        if let Some(id) = identity() {
            assert!(id.contains("family") || id.starts_with("implementer"), "{id}");
        }
    }

    #[test]
    fn family_names_round_trip_and_the_chosen_family_is_available() {
        for f in [Family::Portable, Family::Avx2, Family::Avx512, Family::Neon] {
            assert_eq!(Family::parse(f.name()), Some(f));
        }
        assert_eq!(Family::parse("sse9"), None);
        assert!(Family::available().contains(&preferred()));
        assert!(is_zen4(Some("AuthenticAMD"), Some("25")));
        assert!(
            !is_zen4(Some("AuthenticAMD"), Some("26")),
            "Zen 5 has full-width AVX-512"
        );
        assert!(is_zen5(Some("AuthenticAMD"), Some("26")));
        assert!(!is_zen5(Some("AuthenticAMD"), Some("25")));
        assert!(!is_zen5(Some("GenuineIntel"), Some("26")));
        assert!(!is_zen4(Some("GenuineIntel"), Some("6")));
        assert!(!is_zen4(None, None));
        assert!(Family::available().contains(&family()));
        assert!(Family::available().contains(&quantized_family()));
        assert!(quantized_family() >= family(), "only Zen 4's f32 kernels step down");
        assert!(threads() >= 1);
    }
}
