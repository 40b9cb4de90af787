//! Finch builds candle-core with one change to `Tensor::backward` (vendor/candle-core/FINCH.md):
//! a tensor's first gradient contribution is stored as it is instead of being added to a
//! zero-filled tensor. These tests hold the gradients to their analytic values where a tensor
//! gets one contribution, several, a first one that is a strided view, a subtracted one, and
//! contributions through broadcasts, narrows and an index gather.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use candle_core::{DType, Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
}

fn ramp(n: usize, scale: f32, shift: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale + shift).collect()
}

#[test]
fn several_contributions_add_up_whatever_comes_first() {
    let dev = Device::Cpu;
    let x = Var::from_vec(ramp(6, 0.5, -1.0), (2, 3), &dev).unwrap();
    let a = Tensor::from_vec(ramp(6, 0.25, 1.0), (2, 3), &dev).unwrap();
    let c = Tensor::from_vec(ramp(6, -0.75, 2.0), (3, 2), &dev).unwrap();
    // First contribution through a transpose (a strided gradient), then a product, then a
    // subtraction: d/dx = cᵀ + a − 1.
    let y = (x.as_tensor().t().unwrap() * &c).unwrap().sum_all().unwrap();
    let y = (y + (x.as_tensor() * &a).unwrap().sum_all().unwrap()).unwrap();
    let y = (y - x.as_tensor().sum_all().unwrap()).unwrap();
    let g = y.backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap();
    let want: Vec<f32> = values(&c.t().unwrap())
        .iter()
        .zip(values(&a))
        .map(|(ct, a)| ct + a - 1.0)
        .collect();
    close(&values(gx), &want);
    assert!(gx.is_contiguous(), "a stored gradient is contiguous");
}

#[test]
fn a_lone_subtracted_contribution_is_negated() {
    let dev = Device::Cpu;
    let x = Var::from_vec(ramp(4, 1.0, 0.0), 4, &dev).unwrap();
    let c = Tensor::from_vec(ramp(4, 2.0, 1.0), 4, &dev).unwrap();
    let y = (&c - x.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    // d/dx (c − x)² = −2(c − x).
    let want: Vec<f32> = values(&c)
        .iter()
        .zip(values(x.as_tensor()))
        .map(|(c, x)| -2.0 * (c - x))
        .collect();
    close(&values(g.get(x.as_tensor()).unwrap()), &want);
}

#[test]
fn broadcasts_narrows_and_gathers_accumulate() {
    let dev = Device::Cpu;
    // A bias broadcast over 3 rows: its gradient is the column sums of the upstream gradient.
    let b = Var::from_vec(ramp(4, 0.5, 0.0), 4, &dev).unwrap();
    let h = Tensor::from_vec(ramp(12, 0.1, -0.3), (3, 4), &dev).unwrap();
    let w = Tensor::from_vec(ramp(12, -0.2, 1.0), (3, 4), &dev).unwrap();
    let y = (h.broadcast_add(b.as_tensor()).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    // Two overlapping narrows of the same bias add their parts.
    let y = (y + b.as_tensor().narrow(0, 0, 3).unwrap().sum_all().unwrap()).unwrap();
    let y = (y
        + (b.as_tensor().narrow(0, 1, 3).unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let g = y.backward().unwrap();
    let wv = values(&w);
    let want: Vec<f32> = (0..4)
        .map(|j| {
            let col: f32 = (0..3).map(|r| wv[r * 4 + j]).sum();
            col + if j < 3 { 1.0 } else { 0.0 } + if j >= 1 { 3.0 } else { 0.0 }
        })
        .collect();
    close(&values(g.get(b.as_tensor()).unwrap()), &want);

    // Rows gathered by index (an embedding lookup, repeated ids): its backward adds into a
    // zero table (index_add), which must start from real zeros.
    let table = Var::from_vec(ramp(8, 1.0, 0.0), (4, 2), &dev).unwrap();
    let ids = Tensor::new(&[1u32, 3, 1, 0], &dev).unwrap();
    let up = Tensor::from_vec(ramp(8, 0.5, 0.5), (4, 2), &dev).unwrap();
    let y = (table.as_tensor().index_select(&ids, 0).unwrap() * &up)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let u = values(&up);
    let want = vec![u[6], u[7], u[0] + u[4], u[1] + u[5], 0.0, 0.0, u[2], u[3]];
    close(&values(g.get(table.as_tensor()).unwrap()), &want);
}

#[test]
fn gradients_keep_their_dtype() {
    let dev = Device::Cpu;
    let x = Var::from_vec(ramp(4, 1.0, 1.0), 4, &dev).unwrap();
    let y = (x.as_tensor().to_dtype(DType::BF16).unwrap() * 2.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap();
    assert_eq!(gx.dtype(), DType::F32);
    close(&values(gx), &[2.0; 4]);
}
