//! Opening a model given by the user: a Hugging Face folder (safetensors) or a GGUF file (or a
//! folder holding one). Produces the configuration, the tokenizer, the chat-template source and
//! a weight source, with errors that name the missing or broken file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgufModel;
use crate::model::safetensors::SafetensorsWeights;
use crate::model::transformer::Transformer;
use crate::model::weights::WeightSource;

/// Where a chat template comes from.
#[derive(Debug, Clone)]
pub enum TemplateSource {
    /// A `tokenizer_config.json` to read `chat_template`, `bos_token`, `eos_token` from.
    TokenizerConfig(PathBuf),
    /// A template embedded in GGUF metadata, with its bos/eos token strings.
    Embedded {
        template: String,
        bos: Option<String>,
        eos: Option<String>,
    },
    None,
}

/// An opened (not yet loaded) model.
pub struct ModelFiles {
    /// What the user gave, for `base_model_name_or_path` and messages.
    pub spec: String,
    /// The folder or file the model was read from.
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: TemplateSource,
    pub weights: Box<dyn WeightSource>,
}

fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::invalid(path, "tokenizer", e.to_string()))
}

impl ModelFiles {
    /// Opens a local model folder or GGUF file. A Hub id is resolved to a folder by the
    /// caller first ([`crate::hub::open_model`] does both).
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_path(spec, Path::new(spec))
    }

    /// Opens the folder or file at `path`; `spec` is what the user gave (a path or a Hub id).
    pub fn open_path(spec: &str, path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.clone(),
                file: path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                hint: "no such file or folder (a Hub id looks like `HuggingFaceTB/SmolLM2-135M-Instruct`)".into(),
            });
        }
        if path.is_dir() && path.join("config.json").is_file() && !has_only_gguf_weights(&path) {
            return Self::open_folder(spec, &path);
        }
        if path.is_dir() && !has_gguf(&path) {
            return Err(Error::MissingFile {
                path: path.clone(),
                file: "config.json".into(),
                hint: "a model folder needs config.json with model.safetensors, or a .gguf file".into(),
            });
        }
        Self::open_gguf(spec, &path)
    }

    fn open_folder(spec: &str, dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                file: "tokenizer.json".into(),
                hint: "Finch needs the fast-tokenizer file; tokenizer.model alone is not supported".into(),
            });
        }
        let tokenizer = read_tokenizer(&tok_path)?;
        let weights = SafetensorsWeights::open(dir)?;
        let tc = dir.join("tokenizer_config.json");
        Ok(ModelFiles {
            spec: spec.to_string(),
            path: dir.to_path_buf(),
            config,
            tokenizer,
            template: if tc.is_file() {
                TemplateSource::TokenizerConfig(tc)
            } else {
                TemplateSource::None
            },
            weights: Box::new(weights),
        })
    }

    /// A GGUF file (or a folder holding one). `config.json`, `tokenizer.json` and
    /// `tokenizer_config.json` beside it take precedence over the GGUF metadata.
    fn open_gguf(spec: &str, path: &Path) -> Result<Self> {
        let gguf = GgufModel::open(path)?;
        let dir = gguf.path().parent().map(Path::to_path_buf).unwrap_or_default();
        let config = if dir.join("config.json").is_file() {
            ModelConfig::from_file(&dir.join("config.json"))?
        } else {
            ModelConfig::from_json(&gguf.config_json()?, gguf.path())?
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            read_tokenizer(&tok_path)?
        } else {
            gguf.tokenizer()?
        };
        let tc = dir.join("tokenizer_config.json");
        let template = if tc.is_file() {
            TemplateSource::TokenizerConfig(tc)
        } else if let Some(template) = gguf.chat_template() {
            let (bos, eos) = gguf.special_tokens();
            TemplateSource::Embedded { template, bos, eos }
        } else {
            TemplateSource::None
        };
        Ok(ModelFiles {
            spec: spec.to_string(),
            path: gguf.path().to_path_buf(),
            config,
            tokenizer,
            template,
            weights: Box::new(gguf),
        })
    }

    /// The model's own chat template, if it has one.
    pub fn chat_template(&self) -> Result<Option<crate::template::ChatTemplate>> {
        match &self.template {
            TemplateSource::TokenizerConfig(p) => crate::template::ChatTemplate::from_tokenizer_config(p),
            TemplateSource::Embedded { template, bos, eos } => {
                crate::template::ChatTemplate::new(template, bos.clone(), eos.clone()).map(Some)
            }
            TemplateSource::None => Ok(None),
        }
    }

    /// Loads the base weights into a trainable transformer.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Transformer> {
        Transformer::load(&self.config, self.weights.as_ref(), dtype, device)
    }

    /// [`ModelFiles::load`] with the projections kept in `base` blocks (a quantized frozen base).
    pub fn load_with_base(
        &self,
        dtype: DType,
        base: Option<crate::kernels::quant::QType>,
        device: &Device,
    ) -> Result<Transformer> {
        Transformer::load_with_base(&self.config, self.weights.as_ref(), dtype, base, device)
    }
}

fn has_gguf(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
        })
        .unwrap_or(false)
}

/// A folder with a `.gguf` and a `config.json` but no safetensors (like `shared/models/...`)
/// is a GGUF model whose config and tokenizer sit beside it.
fn has_only_gguf_weights(dir: &Path) -> bool {
    has_gguf(dir) && !dir.join("model.safetensors").is_file() && !dir.join("model.safetensors.index.json").is_file()
}
