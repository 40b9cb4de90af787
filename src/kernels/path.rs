//! The switch between Finch's fused CPU kernels and the composite candle ops that CUDA and Metal
//! run. Every fused op asks [`fused_allowed`] before it runs; `FINCH_FUSED=0` (or
//! [`set_kernel_path`], or [`with_kernel_path`] for one thread) makes the CPU take exactly the
//! path the GPUs take, so that path is tested here.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Which implementation the differentiable ops use on a CPU in f32 (other devices and dtypes
/// always run the composite ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    /// Finch's own CPU kernels, each with its own backward pass.
    Fused,
    /// candle's differentiable ops, as on CUDA and Metal.
    Composite,
}

impl KernelPath {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelPath::Fused => "fused",
            KernelPath::Composite => "composite",
        }
    }
}

/// Process-wide choice: 0 = follow `FINCH_FUSED`, 1 = fused, 2 = composite.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static SCOPED: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

/// `FINCH_FUSED` as a kernel path: unset, empty, `1`, `on`, `true` → fused; `0`, `off`, `false`
/// → composite; anything else is an error naming the variable.
pub fn kernel_path_from_env() -> Result<KernelPath, String> {
    match std::env::var("FINCH_FUSED") {
        Err(_) => Ok(KernelPath::Fused),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "1" | "on" | "true" | "yes" | "fused" => Ok(KernelPath::Fused),
            "0" | "off" | "false" | "no" | "composite" => Ok(KernelPath::Composite),
            other => Err(format!(
                "FINCH_FUSED=`{other}` is not understood: use 1 (fused CPU kernels) or 0 (composite ops)"
            )),
        },
    }
}

fn env_path() -> KernelPath {
    static ENV: OnceLock<KernelPath> = OnceLock::new();
    // An unparsable value is reported by the commands (`device::check_env`); ops keep the default.
    *ENV.get_or_init(|| kernel_path_from_env().unwrap_or(KernelPath::Fused))
}

/// The path ops on this thread take now: a [`with_kernel_path`] scope, else [`set_kernel_path`],
/// else `FINCH_FUSED`.
pub fn kernel_path() -> KernelPath {
    if let Some(p) = SCOPED.with(Cell::get) {
        return p;
    }
    match CHOSEN.load(Ordering::Relaxed) {
        1 => KernelPath::Fused,
        2 => KernelPath::Composite,
        _ => env_path(),
    }
}

/// Sets the path for the whole process (`None`: follow `FINCH_FUSED` again).
pub fn set_kernel_path(path: Option<KernelPath>) {
    let v = match path {
        None => 0,
        Some(KernelPath::Fused) => 1,
        Some(KernelPath::Composite) => 2,
    };
    CHOSEN.store(v, Ordering::Relaxed);
}

/// Runs `f` with `path` on this thread (the choice is made where an op is called, so work that
/// `f` hands to other threads is not affected). Restores the previous scope, even on panic.
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|s| s.replace(Some(path))));
    f()
}

/// The dtype the composite ops compute norms, softmaxes and losses in: f32 for bf16/f16 models
/// (half precision loses the small terms), the model's own dtype otherwise (f64 stays f64).
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Whether a fused CPU f32 kernel may run on `t`: `t` is an f32 CPU tensor and the fused path is
/// chosen. Callers fall back to composite ops otherwise.
pub fn fused_allowed(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && kernel_path() == KernelPath::Fused
}
