//! Weights from a Hugging Face folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped, so loading costs no copy until a
//! tensor is converted to the training dtype.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::weights::WeightSource;

pub struct SafetensorsWeights {
    folder: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the weights of the model folder `folder`.
    pub fn open(folder: &Path) -> Result<Self> {
        let single = folder.join("model.safetensors");
        let index = folder.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, "cannot read", e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::invalid(&index, "JSON", e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::invalid(&index, "field `weight_map`", "is missing or not an object"))?;
            let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| folder.join(s)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            let hint = if folder.join("pytorch_model.bin").is_file() {
                "only pytorch_model.bin (pickle) is present; Finch never unpickles: use a safetensors or GGUF version"
            } else {
                "expected model.safetensors, or sharded model-0000x-of-0000y.safetensors with model.safetensors.index.json"
            };
            return Err(Error::MissingFile {
                path: folder.to_path_buf(),
                file: "model.safetensors".into(),
                hint: hint.into(),
            });
        };
        let mut files = vec![];
        let mut routing = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: folder.to_path_buf(),
                    file: p
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    hint: "listed in model.safetensors.index.json".into(),
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap user we rely on it not being
            // truncated while Finch runs (model files are not edited in place).
            let st = unsafe { MmapedSafetensors::new(&p) }
                .map_err(|e| Error::invalid(&p, "safetensors file", crate::error::candle_message(&e)))?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((p, st));
        }
        Ok(SafetensorsWeights {
            folder: folder.to_path_buf(),
            files,
            routing,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&i) = self.routing.get(name) else {
            let hint = if self.files.len() > 1 { " in any shard" } else { "" };
            return Err(Error::MissingTensor {
                path: self
                    .files
                    .first()
                    .map(|f| f.0.clone())
                    .unwrap_or_else(|| self.folder.clone()),
                tensor: name.to_string(),
                hint: hint.to_string(),
            });
        };
        let (path, st) = &self.files[i];
        let view = st
            .get(name)
            .map_err(|e| Error::invalid(path, format!("tensor `{name}`"), crate::error::candle_message(&e)))?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::F32 | S::F16 | S::BF16 | S::F64) {
            return Err(Error::UnsupportedDType {
                path: path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::invalid(path, format!("tensor `{name}`"), crate::error::candle_message(&e)))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn origin(&self) -> &Path {
        &self.folder
    }
}
