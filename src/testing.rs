//! Helpers shared by Finch's own tests (unit and integration). Not part of the stable API.

use candle_core::Tensor;

/// Largest absolute elementwise difference of two tensors of the same shape.
///
/// # Panics
/// When the shapes differ or the tensors are not f32: only for use in tests.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap_or_else(|e| panic!("max_abs_diff: {e}"))
}
