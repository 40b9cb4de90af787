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

    /// An error from candle, shown as one line: candle appends a backtrace to its errors when
    /// `RUST_BACKTRACE` is set, and joins context with newlines (see [`candle_message`]).
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),

    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// A candle error as one clean line: without the backtrace candle captures when `RUST_BACKTRACE`
/// is set (a wall of frames after the real message), with context and path joined by `: ` rather
/// than newlines. Use it wherever a candle error is formatted into a message.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => one_line(&other.to_string()),
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_are_one_line_without_a_backtrace() {
        // What candle builds when RUST_BACKTRACE is set: the message, then the frames.
        let inner = candle_core::Error::Msg("unexpected end of file".into());
        let with_bt = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = Error::from(
            with_bt
                .with_path("/tmp/t.gguf")
                .context("reading tensor `blk.0.attn_q.weight`"),
        );
        let shown = e.to_string();
        assert_eq!(
            shown,
            "reading tensor `blk.0.attn_q.weight`: /tmp/t.gguf: unexpected end of file"
        );
        // No source either, so `{:#}` (anyhow's chain) prints nothing more.
        assert!(std::error::Error::source(&e).is_none());
    }
}
