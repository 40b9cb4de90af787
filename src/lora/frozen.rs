//! `y = x · Wᵀ` for a frozen weight `W`, with a backward pass that computes only the gradient of
//! `x`. candle's own matmul backward also computes `∂L/∂W` even when `W` is not trained, which
//! for LoRA is a third of all matmul work thrown away.

#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

pub(crate) struct FrozenMatmul;

/// `x: [.., in]`, `w: [out, in]` → `[.., out]`. Gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(&w.contiguous()?, FrozenMatmul)
    } else {
        // Other devices and dtypes use candle's matmul (its backward also computes dW,
        // which is wasted but correct).
        x.broadcast_matmul(&w.t()?)
    }
}

fn contiguous_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("frozen_linear: {what} must be contiguous"),
    }
}

/// `dst[m,n] = lhs[m,k] · rhs` where rhs is given by its strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[f32],
    rhs_rs: isize,
    rhs_cs: isize,
) -> Vec<f32> {
    let mut dst = vec![0f32; m * n];
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers come from slices whose lengths cover every index reached with the
    // given sizes and strides (checked by the callers' shape checks); dst is m*n, row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    dst
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_slice(s1, l1, "input")?;
        let w = contiguous_slice(s2, l2, "weight")?;
        let (out, k) = l2.shape().dims2()?;
        let dims = l1.shape().dims();
        let Some((&k_x, lead)) = dims.split_last() else {
            candle_core::bail!("frozen_linear: input is a scalar")
        };
        if k_x != k {
            candle_core::bail!("frozen_linear: input has {k_x} features, weight expects {k}")
        }
        let m: usize = lead.iter().product();
        // rhs = Wᵀ [k, out]: element (kk, j) is w[j * k + kk].
        let dst = sgemm(m, out, k, x, k as isize, 1, w, 1, k as isize);
        let mut shape = lead.to_vec();
        shape.push(out);
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let m = grad.elem_count() / out;
        let g = grad.contiguous()?;
        let gx = g.reshape((m, out))?.matmul(w)?;
        debug_assert_eq!(gx.dims(), &[m, k]);
        Ok((Some(gx.reshape(x.shape())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let y_ref = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = (&y - &y_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "forward differs by {diff}");
        let c = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let gx_ref = g_ref.get(x.as_tensor()).unwrap();
        let diff = (gx - gx_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        assert!(g.get(&w).is_none(), "the frozen weight must get no gradient");
    }
}
