//! AdamW (torch's, decoupled weight decay) over named candle `Var`s, with moments that can be
//! saved and restored for an exact resume; the learning-rate schedule; global-norm clipping.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

fn err(e: candle_core::Error) -> Error {
    Error::runtime("optimizer", e)
}

pub struct AdamW {
    /// (name, parameter, decayed?) in a fixed order.
    pub params: Vec<(String, Var, bool)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (bias correction).
    pub t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// Weight decay on matrices and embeddings (2-D and up), none on biases and norms (nanoGPT).
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let params: Vec<(String, Var, bool)> = params.into_iter().map(|(n, v)| { let d = v.rank() >= 2; (n, v, d) }).collect();
        let m = params.iter().map(|(_, v, _)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>().map_err(err)?;
        let v = params.iter().map(|(_, v, _)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>().map_err(err)?;
        Ok(Self { params, m, v, t: 0, beta1, beta2, eps, weight_decay })
    }

    /// One update with `grads[i]` for `params[i]` (None: no gradient, parameter untouched).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, p, decay)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            // Moments and gradients are detached, so no step keeps the graph of the previous one.
            let g = g.detach();
            let g = &g;
            let run = || -> candle_core::Result<(Tensor, Tensor)> {
                let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
                let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let mut w = p.as_tensor().clone();
                if *decay && self.weight_decay > 0.0 {
                    w = (&w * (1.0 - lr * self.weight_decay))?;
                }
                let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
                let upd = ((&m / bc1)? / denom)?;
                let w = (w - (upd * lr)?)?;
                p.set(&w)?;
                Ok((m.detach(), v.detach()))
            };
            let (m, v) = run().map_err(err)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments (`m.<name>`, `v.<name>`) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (i, (n, _, _)) in self.params.iter().enumerate() {
            tensors.push((format!("m.{n}"), self.m[i].to_device(&Device::Cpu).map_err(err)?));
            tensors.push((format!("v.{n}"), self.v[i].to_device(&Device::Cpu).map_err(err)?));
        }
        safetensors::serialize_to_file(tensors, None, path).map_err(|e| Error::bundle(path, format!("cannot write: {e}")))
    }

    /// Restores the moments written by [`Self::save`] and the update count.
    pub fn load(&mut self, path: &Path, t: u64) -> Result<()> {
        let dev = self.params.first().map(|(_, v, _)| v.device().clone()).unwrap_or(Device::Cpu);
        let mut saved: HashMap<String, Tensor> = candle_core::safetensors::load(path, &dev).map_err(|e| Error::bundle(path, format!("cannot read optimizer state: {e}")))?;
        for (i, (n, p, _)) in self.params.iter().enumerate() {
            let (Some(m), Some(v)) = (saved.remove(&format!("m.{n}")), saved.remove(&format!("v.{n}"))) else {
                return Err(Error::bundle(path, format!("no optimizer state for {n}: the checkpoint is of another model or trained other parameters (--freeze-encoder?)")));
            };
            if m.dims() != p.dims() || v.dims() != p.dims() {
                return Err(Error::bundle(path, format!("optimizer state for {n} has shape {:?}, the parameter {:?}", m.dims(), p.dims())));
            }
            self.m[i] = m.to_dtype(DType::F32).map_err(err)?;
            self.v[i] = v.to_dtype(DType::F32).map_err(err)?;
        }
        self.t = t;
        Ok(())
    }
}

/// The learning-rate schedule: linear warmup from 0, then linear or cosine decay to `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub cosine: bool,
}

impl Schedule {
    /// The rate of update number `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let frac = if self.cosine { 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) } else { 1.0 - progress };
        self.min_lr + (self.lr - self.min_lr) * frac
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g.sqr().and_then(|s| s.sum_all()).and_then(|s| s.to_dtype(DType::F64)).and_then(|s| s.to_scalar::<f64>()).map_err(err)?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale).map_err(err)?;
        }
    }
    Ok(norm)
}
