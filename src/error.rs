//! The library's error type. Every variant carries what a user needs to fix the problem:
//! the file, the tensor or field, and what was expected versus found.

use std::path::PathBuf;

/// Errors raised by the Finch engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    Io {
        path: PathBuf,
        reason: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: missing file `{file}` ({hint})")]
    MissingFile { path: PathBuf, file: String, hint: String },

    #[error("{path}: invalid {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: String,
        reason: String,
    },

    #[error("{path}: unsupported architecture `{arch}` (Finch supports: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    #[error("{path}: tensor `{tensor}` not found{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },

    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype}")]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("invalid setting `{field}`: {reason}")]
    Config { field: String, reason: String },

    #[error("training diverged at step {step}: loss is {loss}. {advice}")]
    NonFiniteLoss { step: usize, loss: f32, advice: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("data: {0}")]
    Data(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`, with a short description of what was being done.
    pub fn io(path: impl Into<PathBuf>, reason: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            reason: reason.into(),
            source,
        }
    }

    pub fn invalid(path: impl Into<PathBuf>, what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
