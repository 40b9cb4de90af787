//! AdamW (Loshchilov & Hutter) with PyTorch's semantics, whose whole state can be saved to and
//! restored from a checkpoint bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

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
