//! AdamW (Loshchilov & Hutter) with PyTorch's semantics, whose whole state can be saved to and
//! restored from a checkpoint bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::kernels::buffer::written_whole;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates done so far.
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `vars[i]`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        if self.update_fused(grads, lr, (bc1, bc2))? {
            return Ok(());
        }
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let theta = var.as_tensor();
            let decayed = if p.weight_decay > 0.0 {
                (theta * (1.0 - lr * p.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// [`AdamW::update`] in one pass per parameter (`kernels::ops::adamw_step`), the parameters
    /// shared out over the kernel threads, where every parameter, gradient and moment is an f32
    /// CPU tensor and the fused kernels are allowed (`FINCH_KERNELS`); `false`, changing nothing,
    /// otherwise. The same values as the composite ops, bit for bit. Measured on a short-row
    /// step (2-core Intel Xeon): the composite update was ~4% of the main thread's samples, one
    /// thread working while the other waited.
    fn update_fused(&mut self, grads: &[Tensor], lr: f64, (bc1, bc2): (f64, f64)) -> Result<bool> {
        let fused = |t: &Tensor| crate::kernels::fused_allowed(t) && t.is_contiguous();
        if grads.len() != self.vars.len()
            || !self.vars.iter().enumerate().all(|(i, var)| {
                let same = |t: &Tensor| t.dims() == var.dims() && fused(t);
                fused(var.as_tensor()) && same(&grads[i]) && same(&self.m[i]) && same(&self.v[i])
            })
        {
            return Ok(false);
        }
        let p = self.params;
        let step = crate::kernels::ops::AdamWStep {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            eps: p.eps as f32,
            decay: (p.weight_decay > 0.0).then_some((1.0 - lr * p.weight_decay) as f32),
            lr: lr as f32,
        };
        let moments: Vec<std::sync::Mutex<Option<(Tensor, Tensor)>>> =
            self.vars.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let error = crate::kernels::spin::FirstError::new();
        crate::kernels::spin::run(self.vars.len(), &|i| {
            error.keep((|| -> candle_core::Result<()> {
                let var = &self.vars[i];
                let n = var.elem_count();
                let (mut theta, mut m, mut v) = (written_whole(n), written_whole(n), written_whole(n));
                crate::kernels::gemm::with_slice(var.as_tensor(), |t| {
                    crate::kernels::gemm::with_slice(&grads[i], |g| {
                        crate::kernels::gemm::with_slice(&self.m[i], |m0| {
                            crate::kernels::gemm::with_slice(&self.v[i], |v0| {
                                crate::kernels::ops::adamw_step(step, (t, g, m0, v0), (&mut theta, &mut m, &mut v));
                                Ok(())
                            })
                        })
                    })
                })?;
                let shape = var.shape().clone();
                var.set(&Tensor::from_vec(theta, shape.clone(), var.device())?)?;
                let m = Tensor::from_vec(m, shape.clone(), var.device())?;
                let v = Tensor::from_vec(v, shape, var.device())?;
                *moments[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((m, v));
                Ok(())
            })());
        });
        error.result()?;
        for (i, slot) in moments.into_iter().enumerate() {
            if let Some((m, v)) = slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
                self.m[i] = m;
                self.v[i] = v;
            }
        }
        Ok(true)
    }

    /// Saves the moments (`m.N`, `v.N`) and the step count into one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for i in 0..self.vars.len() {
            map.insert(format!("m.{i}"), self.m[i].to_device(&Device::Cpu)?);
            map.insert(format!("v.{i}"), self.v[i].to_device(&Device::Cpu)?);
        }
        map.insert("step".into(), Tensor::new(&[self.step as u32], &Device::Cpu)?);
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        let map = candle_core::safetensors::load(path, &device)?;
        let get = |k: &str| {
            map.get(k).cloned().ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: k.to_string(),
                hint: " (optimizer state does not match this adapter)".into(),
            })
        };
        for i in 0..self.vars.len() {
            let (m, v) = (get(&format!("m.{i}"))?, get(&format!("v.{i}"))?);
            if m.dims() != self.vars[i].dims() {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    tensor: format!("m.{i}"),
                    expected: self.vars[i].dims().to_vec(),
                    found: m.dims().to_vec(),
                });
            }
            self.m[i] = m;
            self.v[i] = v;
        }
        self.step = get("step")?.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: PyTorch's `torch.optim.AdamW` single-tensor update rule (torch/optim/adamw.py,
    /// `_single_tensor_adamw`), replayed in plain Python because torch is not installable here:
    /// ```python
    /// import math
    /// w=[1.0,-2.0,3.0]; m=[0]*3; v=[0]*3; lr=0.1; b1=0.9; b2=0.999; eps=1e-8; wd=0.1
    /// for t,g in enumerate(([0.5,-1.0,2.0],[0.1,0.2,-0.3],[1.0,1.0,1.0]),1):
    ///     for i in range(3):
    ///         w[i]*=1-lr*wd
    ///         m[i]=b1*m[i]+(1-b1)*g[i]; v[i]=b2*v[i]+(1-b2)*g[i]**2
    ///         denom=math.sqrt(v[i])/math.sqrt(1-b2**t)+eps
    ///         w[i]-=lr/(1-b1**t)*m[i]/denom
    /// print(w)  # [0.7076902253866135, -1.808553278551737, 2.6916264275766792]
    /// ```
    /// The fused update (one pass per parameter, spread over the kernel threads) gives the
    /// composite candle ops' values bit for bit: parameters, both moments, several steps, with
    /// and without weight decay, gradients with zeros and negative zeros among them.
    #[test]
    fn fused_adamw_equals_the_composite_ops() {
        use crate::kernels::{with_kernel_path, KernelPath};
        let mut rng = crate::rng::Rng::new(11);
        let shapes: [&[usize]; 3] = [&[16, 40], &[40, 16], &[7]];
        for weight_decay in [0.0, 0.01] {
            let params = AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            };
            let start: Vec<Vec<f32>> = shapes
                .iter()
                .map(|s| (0..s.iter().product::<usize>()).map(|_| rng.next_f32() - 0.5).collect())
                .collect();
            let steps: Vec<Vec<Vec<f32>>> = (0..4)
                .map(|_| {
                    start
                        .iter()
                        .map(|w| {
                            w.iter()
                                .enumerate()
                                .map(|(j, _)| match j % 7 {
                                    0 => 0.0,
                                    1 => -0.0,
                                    _ => (rng.next_f32() - 0.5) * 1e-2,
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let run = |path: KernelPath| {
                with_kernel_path(path, || {
                    let vars: Vec<Var> = start
                        .iter()
                        .zip(shapes)
                        .map(|(w, s)| Var::from_tensor(&Tensor::from_vec(w.clone(), s, &Device::Cpu).unwrap()).unwrap())
                        .collect();
                    let mut opt = AdamW::new(vars.clone(), params).unwrap();
                    for (k, grads) in steps.iter().enumerate() {
                        let grads: Vec<Tensor> = grads
                            .iter()
                            .zip(shapes)
                            .map(|(g, s)| Tensor::from_vec(g.clone(), s, &Device::Cpu).unwrap())
                            .collect();
                        opt.update(&grads, 1e-3 * (k + 1) as f64).unwrap();
                    }
                    let bits = |t: &Tensor| -> Vec<u32> {
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect()
                    };
                    let all = |ts: &[Tensor]| ts.iter().map(bits).collect::<Vec<_>>();
                    (
                        vars.iter().map(|v| bits(v.as_tensor())).collect::<Vec<_>>(),
                        all(&opt.m),
                        all(&opt.v),
                    )
                })
            };
            let (fused, composite) = (run(KernelPath::Fused), run(KernelPath::Composite));
            assert_eq!(fused.0, composite.0, "parameters (weight decay {weight_decay})");
            assert_eq!(fused.1, composite.1, "first moments (weight decay {weight_decay})");
            assert_eq!(fused.2, composite.2, "second moments (weight decay {weight_decay})");
        }
    }

    #[test]
    fn matches_pytorch_adamw() {
        let var = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let params = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![var.clone()], params).unwrap();
        for g in [[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3], [1.0, 1.0, 1.0]] {
            opt.update(&[Tensor::new(&g, &Device::Cpu).unwrap()], 0.1).unwrap();
        }
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let expected = [0.707_690_2f32, -1.808_553_3, 2.691_626_4];
        for (a, b) in w.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{w:?} vs {expected:?}");
        }
    }
}
