//! CPU kernels shared by the model, LoRA, the loss and generation: the kernel family, thread
//! count and CPU facts decided once per process (`cpu`), gemm wrappers over slices (`gemm`),
//! the decode matrix×vector product (`gemv`), LoRA's rank-side products of ≤ 16 columns (`narrow`), products with frozen weights through packed panels
//! and register tiles (`panel`: the shared machinery and the f32 tiles; `bf16`: bf16 weights, through
//! Intel AMX tiles where the CPU has them: `amx`), fused elementwise ops with their own backward (`ops`),
//! their loops compiled for the CPU's vector width (`simd`), and the integer kernels of
//! the quantized inference path (`quant`). Nothing here knows about models or files; callers
//! pick a kernel and fall back to composite candle ops on devices and dtypes a kernel lacks.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod bf16;
pub(crate) mod buffer;
pub mod cpu;
pub mod gemm;
pub mod gemv;
pub(crate) mod narrow;
pub mod ops;
pub mod panel;
pub mod quant;
pub(crate) mod rowdot;
pub mod simd;
pub mod spin;

mod path;

pub use path::{
    compute_dtype, fused_allowed, kernel_path, kernel_path_from_env, set_kernel_path, with_kernel_path, KernelPath,
};
