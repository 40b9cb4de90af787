//! Hub access tokens: where they are found (`HF_TOKEN`, the file `huggingface-cli login` writes,
//! the file `finch hub login` writes), saving one with user-only permissions, and a `Token` type
//! whose `Debug` output never shows the secret (it has no `Display` on purpose).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{hf_home, home_dir, HubError, Result};
use crate::fsutil::AtomicFile;

/// A Hub access token. `Debug` prints `Token(<redacted>)`; use [`Token::secret`] only to build the
/// `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Trims whitespace; `None` for an empty token.
    pub fn new(secret: &str) -> Option<Token> {
        let secret = secret.trim();
        (!secret.is_empty()).then(|| Token(secret.to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Where a token came from (for messages like "using the token from HF_TOKEN").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The `HF_TOKEN` (or legacy `HUGGING_FACE_HUB_TOKEN`) environment variable.
    Env,
    /// The file Python's `huggingface-cli login` writes (`$HF_TOKEN_PATH` or `$HF_HOME/token`).
    HuggingFaceFile(PathBuf),
    /// The file `finch hub login` writes.
    FinchFile(PathBuf),
}

/// `$HF_TOKEN_PATH`, else `$HF_HOME/token`.
pub fn huggingface_token_path(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    var("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home(var).join("token"))
}

/// `$XDG_CONFIG_HOME/finch/hf_token`, else `~/.config/finch/hf_token`.
pub fn finch_token_path(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir(var).join(".config"));
    config.join("finch").join("hf_token")
}

/// The first token found, in the order `HF_TOKEN`, the `huggingface-cli login` file, the
/// `finch hub login` file. Unreadable files are skipped: a missing token is not an error until a
/// gated model asks for one.
pub fn find_token(var: &impl Fn(&str) -> Option<String>) -> Option<(Token, TokenSource)> {
    if let Some(token) = var("HF_TOKEN")
        .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
        .and_then(|t| Token::new(&t))
    {
        return Some((token, TokenSource::Env));
    }
    let hf_file = huggingface_token_path(var);
    if let Some(token) = read_token_file(&hf_file) {
        return Some((token, TokenSource::HuggingFaceFile(hf_file)));
    }
    let finch_file = finch_token_path(var);
    read_token_file(&finch_file).map(|token| (token, TokenSource::FinchFile(finch_file)))
}

fn read_token_file(path: &Path) -> Option<Token> {
    let text = std::fs::read_to_string(path).ok()?;
    Token::new(text.lines().next().unwrap_or(""))
}

/// Writes `token` to `path` readable only by the user (mode 0600 on Unix), creating parent folders.
/// The file is created with restricted permissions before the secret is written, and moved into
/// place atomically.
pub fn save_token(path: &Path, token: &Token) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, "cannot create folder", e))?;
    }
    let mut file = AtomicFile::create_private(path).map_err(|e| HubError::io(path, "cannot create token file", e))?;
    file.file_mut()
        .write_all(token.secret().as_bytes())
        .map_err(|e| HubError::io(path, "cannot write token file", e))?;
    file.commit()
        .map_err(|e| HubError::io(path, "cannot move token file into place", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn debug_never_shows_the_secret() {
        let token = Token::new("  hf_verysecret123 \n").unwrap();
        assert_eq!(token.secret(), "hf_verysecret123");
        let shown = format!("{token:?} {:?}", Some(token.clone()));
        assert!(!shown.contains("verysecret"), "{shown}");
        assert!(Token::new("  ").is_none());
    }

    #[test]
    fn lookup_order_is_env_then_huggingface_file_then_finch_file() {
        let dir = tempfile::tempdir().unwrap();
        let hf_home = dir.path().join("hf");
        let config = dir.path().join("config");
        let mut map: HashMap<&str, String> = HashMap::new();
        map.insert("HF_HOME", hf_home.display().to_string());
        map.insert("XDG_CONFIG_HOME", config.display().to_string());
        let lookup = |map: &HashMap<&str, String>| {
            let map = map.clone();
            find_token(&move |k: &str| map.get(k).cloned())
        };
        assert!(lookup(&map).is_none());

        let finch_file = config.join("finch").join("hf_token");
        save_token(&finch_file, &Token::new("hf_finch").unwrap()).unwrap();
        let (t, src) = lookup(&map).unwrap();
        assert_eq!(
            (t.secret(), src),
            ("hf_finch", TokenSource::FinchFile(finch_file.clone()))
        );

        std::fs::create_dir_all(&hf_home).unwrap();
        std::fs::write(hf_home.join("token"), "hf_python\n").unwrap();
        let (t, src) = lookup(&map).unwrap();
        assert_eq!(
            (t.secret(), src),
            ("hf_python", TokenSource::HuggingFaceFile(hf_home.join("token")))
        );

        map.insert("HF_TOKEN", "hf_env".into());
        let (t, src) = lookup(&map).unwrap();
        assert_eq!((t.secret(), src), ("hf_env", TokenSource::Env));
    }

    #[cfg(unix)]
    #[test]
    fn saved_token_is_private_to_the_user() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("hf_token");
        save_token(&path, &Token::new("hf_one").unwrap()).unwrap();
        save_token(&path, &Token::new("hf_two").unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hf_two");
    }
}
