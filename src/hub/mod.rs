//! The Hugging Face Hub: model search, downloads into the shared Hugging Face cache, listing and
//! removing cached models, access tokens, and turning a Hub id such as
//! `HuggingFaceTB/SmolLM2-135M-Instruct` into a local model folder.
//!
//! The cache is the one Python's `huggingface_hub` uses (`models--org--name/{blobs,snapshots,refs}`),
//! so a model downloaded by either tool is found by the other. Everything here takes its settings
//! (endpoint, token, cache folder, offline mode) as explicit [`HubOptions`]; only
//! [`HubOptions::from_env`] reads environment variables, so tests and the GUI stay in control.
//!
//! Why not the `hf-hub` crate: `hf-hub` 0.5 (sync API) does write this same cache, reports byte
//! progress and resumes a partial file, but it has no way to cancel a download (the studio's
//! Cancel button and Ctrl-C must stop it between chunks and keep the partial file), does not
//! verify a file against its sha256/etag, and has no model search, no offline listing of the cache
//! and no removal of a cached model. Those are most of this module; what would remain to share is
//! a few HTTP requests. So we talk to the Hub's HTTP API with `ureq` directly and keep the cache
//! layout byte-compatible with `huggingface_hub` (tests check both directions).

mod api;
pub mod cache;
mod download;
mod files;
pub mod search;
pub mod token;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub use cache::{Cache, CachedModel, CachedRevision, CachedSnapshot};
pub use download::{DownloadProgress, DownloadRequest, PlannedFile};
pub use files::GGUF_QUANT_PREFERENCE;
pub use search::{ModelSummary, SearchQuery, SearchSort, MAX_TUNABLE_PARAMETERS};
pub use token::{Token, TokenSource};

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch downloaded when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

/// Where and how to reach the Hub. Construct explicitly (tests, GUI) or with [`HubOptions::from_env`].
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Base URL of a Hub-compatible server, without a trailing slash.
    pub endpoint: String,
    /// Access token for gated or private models; its `Debug` output is redacted.
    pub token: Option<Token>,
    /// The hub cache folder (the one holding `models--org--name` folders).
    pub cache_dir: PathBuf,
    /// Use the cache only; never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// Options for the public Hub with the given cache folder, no token, online.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            cache_dir: cache_dir.into(),
            offline: false,
        }
    }

    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Reads the settings Python's `huggingface_hub` reads: `HF_ENDPOINT`, `HF_HUB_CACHE` /
    /// `HF_HOME`, `HF_HUB_OFFLINE`, and the token from `HF_TOKEN`, the `huggingface-cli login`
    /// token file, or the one saved by `finch hub login`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubOptions::from_env`] with a custom variable lookup, so the rules can be tested without
    /// touching the process environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
            .unwrap_or(false);
        let token = token::find_token(&var).map(|(token, _source)| token);
        HubOptions::new(hub_cache_dir(&var))
            .with_endpoint(endpoint)
            .with_token(token)
            .with_offline(offline)
    }

    pub(crate) fn cache(&self) -> Cache {
        Cache::new(&self.cache_dir)
    }
}

/// `$HF_HOME`, defaulting to `$XDG_CACHE_HOME/huggingface` and then `~/.cache/huggingface`.
pub(crate) fn hf_home(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(home) = var("HF_HOME") {
        return PathBuf::from(home);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Path::new(&xdg).join("huggingface");
    }
    home_dir(var).join(".cache").join("huggingface")
}

/// `$HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), defaulting to `$HF_HOME/hub`.
pub(crate) fn hub_cache_dir(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home(var).join("hub"))
}

pub(crate) fn home_dir(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    var("HOME")
        .or_else(|| var("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Errors from the Hub client and the cache. Messages say what to do next; none contains a token.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{id}` is not a valid Hub model id: {reason} (expected `organisation/name`)")]
    InvalidId { id: String, reason: String },

    #[error("`{revision}` is not a valid revision of `{id}` (expected a branch, tag or commit hash)")]
    InvalidRevision { id: String, revision: String },

    #[error(
        "`{id}` is gated or private (HTTP {status}){token_note}. To get access, open {endpoint}/{id} while logged in \
         and accept its licence (or ask its owners for access), then create a read token at \
         {endpoint}/settings/tokens and set HF_TOKEN or run `finch hub login`"
    )]
    Gated {
        id: String,
        status: u16,
        endpoint: String,
        /// Empty, or a sentence saying the token that was sent was refused.
        token_note: String,
    },

    #[error("model `{id}` was not found on {endpoint} (check the spelling; a private model also needs a token)")]
    NotFound { id: String, endpoint: String },

    #[error("model `{id}` has no revision `{revision}` on {endpoint}")]
    RevisionNotFound {
        id: String,
        revision: String,
        endpoint: String,
    },

    #[error("model `{id}` has no file `{file}` at revision `{revision}`")]
    FileNotFound { id: String, revision: String, file: String },

    #[error("cannot reach {endpoint}: {reason}{cached_note}")]
    Network {
        endpoint: String,
        reason: String,
        /// A usable cached copy, offered in the message.
        cached: Option<CachedSnapshot>,
        cached_note: String,
    },

    #[error(
        "{file}: the transfer stopped after {done_bytes} of {size_bytes} bytes ({reason}); run the download again \
         to resume from there"
    )]
    Interrupted {
        file: String,
        done_bytes: u64,
        size_bytes: u64,
        reason: String,
    },

    #[error("{url}: HTTP {status}{message}")]
    Http { url: String, status: u16, message: String },

    #[error("{url}: unexpected response: {reason}")]
    BadResponse { url: String, reason: String },

    #[error(
        "HF_HUB_OFFLINE is set and `{id}` (revision `{revision}`) is not in the cache {cache_dir}; \
         unset HF_HUB_OFFLINE to download it"
    )]
    Offline {
        id: String,
        revision: String,
        cache_dir: PathBuf,
    },

    #[error("`{id}` is not in the cache {cache_dir}")]
    NotCached { id: String, cache_dir: PathBuf },

    #[error(
        "`{id}` only has PyTorch pickle weights ({files}); Finch never unpickles, because loading a pickle can run \
         arbitrary code. Look for a safetensors or GGUF version of this model"
    )]
    PickleOnly { id: String, files: String },

    #[error("`{id}` has no weights Finch can load (model.safetensors, a safetensors index, or a .gguf file)")]
    NoWeights { id: String },

    #[error("`{id}` is missing `{file}`, which Finch needs next to {weights}")]
    MissingFile { id: String, file: String, weights: String },

    #[error("`{id}` has no GGUF file `{wanted}`; available: {available}")]
    GgufNotFound {
        id: String,
        wanted: String,
        available: String,
    },

    #[error("{file}: {algorithm} is {found}, expected {expected}; the corrupt download was deleted, run it again")]
    Checksum {
        file: String,
        algorithm: String,
        expected: String,
        found: String,
    },

    #[error("{file}: received {found_bytes} bytes, expected {expected_bytes}{hint}")]
    SizeMismatch {
        file: String,
        expected_bytes: u64,
        found_bytes: u64,
        hint: String,
    },

    #[error(
        "{path}: not enough disk space: the download needs {needed_bytes} more bytes, {available_bytes} are free; \
         free some space or point HF_HUB_CACHE at another disk"
    )]
    NotEnoughSpace {
        path: PathBuf,
        needed_bytes: u64,
        available_bytes: u64,
    },

    #[error("download of `{id}` cancelled; run it again to resume")]
    Cancelled { id: String },

    #[error("{path}: {reason}: {source}")]
    Io {
        path: PathBuf,
        reason: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, HubError>;

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, reason: impl Into<String>, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            reason: reason.into(),
            source,
        }
    }

    pub(crate) fn network(endpoint: &str, reason: impl Into<String>, cached: Option<CachedSnapshot>) -> Self {
        let cached_note = match &cached {
            Some(snap) => format!(
                ". A cached copy exists (revision {} in {}): set HF_HUB_OFFLINE=1 to use it, or pass that folder",
                snap.commit,
                snap.path.display()
            ),
            None => String::new(),
        };
        HubError::Network {
            endpoint: endpoint.to_string(),
            reason: reason.into(),
            cached,
            cached_note,
        }
    }

    /// The cached copy a network error offers, if any.
    pub fn cached_alternative(&self) -> Option<&CachedSnapshot> {
        match self {
            HubError::Network { cached, .. } => cached.as_ref(),
            _ => None,
        }
    }
}

/// A validated model id (`org/name`, or a legacy single `name`). Validation keeps ids from
/// escaping the cache folder when they become paths.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoId(String);

impl RepoId {
    pub fn parse(id: &str) -> Result<RepoId> {
        let invalid = |reason: &str| HubError::InvalidId {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let id_trimmed = id.trim();
        if id_trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        let parts: Vec<&str> = id_trimmed.split('/').collect();
        if parts.len() > 2 {
            return Err(invalid("it has more than one `/`"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(invalid("a part is empty"));
            }
            if part.len() > 96 {
                return Err(invalid("a part is longer than 96 characters"));
            }
            if !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(invalid("only letters, digits, `-`, `_` and `.` are allowed"));
            }
            if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
                return Err(invalid("a part starts or ends with `-` or `.`"));
            }
            if part.contains("--") || part.contains("..") {
                return Err(invalid("`--` and `..` are not allowed"));
            }
        }
        Ok(RepoId(id_trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The cache folder name: `models--org--name`.
    pub fn cache_folder_name(&self) -> String {
        format!("models--{}", self.0.replace('/', "--"))
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a revision (branch, tag, `refs/pr/N` or commit) before it becomes part of a path or URL.
pub(crate) fn check_revision(id: &str, revision: &str) -> Result<()> {
    let ok = !revision.is_empty()
        && revision.len() <= 256
        && !revision.starts_with('/')
        && !revision
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        && !revision.contains(['\\', '\0', '\n', '\r']);
    if ok {
        Ok(())
    } else {
        Err(HubError::InvalidRevision {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// True for a full 40-character commit hash.
pub(crate) fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The Hub client. Cheap to create; holds the options and an HTTP agent.
pub struct Hub {
    options: HubOptions,
    client: api::Client,
}

impl Hub {
    pub fn new(options: HubOptions) -> Self {
        let client = api::Client::new(&options);
        Hub { options, client }
    }

    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    /// Searches text-generation models. Unsupported or large models are left out unless
    /// `query.include_unsupported` is set.
    pub fn search(&self, query: &SearchQuery) -> Result<Vec<ModelSummary>> {
        if self.options.offline {
            return Err(HubError::network(
                &self.options.endpoint,
                "HF_HUB_OFFLINE is set, so the Hub cannot be searched",
                None,
            ));
        }
        search::search(&self.client, query)
    }

    /// Downloads the files Finch needs for `request` into the cache and returns the snapshot folder.
    /// Progress events go to `progress`; setting `cancel` stops between chunks, keeping the partial
    /// file so the next call resumes it.
    pub fn download(
        &self,
        request: &DownloadRequest,
        progress: &mut dyn FnMut(DownloadProgress),
        cancel: &AtomicBool,
    ) -> Result<PathBuf> {
        download::download(&self.client, &self.options, request, progress, cancel)
    }

    /// The cached snapshot for `id` at `revision`, if a usable one exists. No network.
    pub fn cached_snapshot(&self, id: &str, revision: &str) -> Result<Option<CachedSnapshot>> {
        let repo = RepoId::parse(id)?;
        check_revision(id, revision)?;
        Ok(self.options.cache().find_snapshot(&repo, revision))
    }

    /// Cache first; downloads only when nothing usable is cached (and not offline).
    pub fn resolve(
        &self,
        spec: &str,
        progress: &mut dyn FnMut(DownloadProgress),
        cancel: &AtomicBool,
    ) -> Result<PathBuf> {
        let (id, revision) = split_spec(spec);
        if let Some(snapshot) = self.cached_snapshot(id, revision)? {
            return Ok(snapshot.path);
        }
        if self.options.offline {
            return Err(HubError::Offline {
                id: id.to_string(),
                revision: revision.to_string(),
                cache_dir: self.options.cache_dir.clone(),
            });
        }
        let request = DownloadRequest::new(id).with_revision(revision);
        self.download(&request, progress, cancel)
    }

    /// Checks a token against the Hub and returns the account name it belongs to.
    pub fn whoami(&self, token: &Token) -> Result<String> {
        self.client.whoami(token)
    }

    pub fn list_cached(&self) -> Result<Vec<CachedModel>> {
        self.options.cache().list()
    }

    /// Deletes a cached model; returns the bytes freed.
    pub fn remove(&self, id: &str) -> Result<u64> {
        self.options.cache().remove(&RepoId::parse(id)?)
    }
}

/// Splits `org/name@revision` into id and revision (default `main`).
pub fn split_spec(spec: &str) -> (&str, &str) {
    match spec.rsplit_once('@') {
        Some((id, revision)) if !revision.is_empty() => (id, revision),
        _ => (spec.trim_end_matches('@'), DEFAULT_REVISION),
    }
}

/// `org/name` (or `org/name@revision`) that is not a local path.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or(spec);
    let mut parts = id.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name) && !spec.ends_with(".gguf")
}

/// Opens a model given as a local folder, a `.gguf` file or a Hub id (`org/name[@revision]`,
/// from the cache first, then downloaded). The one place a model spec meets the Hub: the model
/// module itself only reads local files.
pub fn open_model(spec: &str) -> crate::Result<crate::model::ModelFiles> {
    let path = Path::new(spec);
    if !path.exists() && looks_like_hub_id(spec) {
        let dir = resolve_model(spec)?;
        return crate::model::ModelFiles::open_path(spec, &dir);
    }
    crate::model::ModelFiles::open(spec)
}

/// Turns a Hub id (optionally `id@revision`) into a local snapshot folder using the environment's
/// settings: the cache first, a download only if nothing usable is cached. An existing local path
/// is returned unchanged. Prints nothing; see `finch::cli::hub::resolve_model_with_progress` for
/// a version that draws a progress bar.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_with(spec, &HubOptions::from_env(), &mut |_| {}, &AtomicBool::new(false))
}

/// [`resolve_model`] with explicit options, progress and cancellation.
pub fn resolve_model_with(
    spec: &str,
    options: &HubOptions,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    Hub::new(options.clone()).resolve(spec, progress, cancel)
}

/// Searches the Hub (see [`Hub::search`]).
pub fn search(options: &HubOptions, query: &SearchQuery) -> Result<Vec<ModelSummary>> {
    Hub::new(options.clone()).search(query)
}

/// Downloads a model (see [`Hub::download`]).
pub fn download(
    options: &HubOptions,
    request: &DownloadRequest,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    Hub::new(options.clone()).download(request, progress, cancel)
}

/// Lists the models in a hub cache folder.
pub fn list_cached(cache_dir: &Path) -> Result<Vec<CachedModel>> {
    Cache::new(cache_dir).list()
}

/// Deletes a model from a hub cache folder; returns the bytes freed.
pub fn remove(cache_dir: &Path, id: &str) -> Result<u64> {
    Cache::new(cache_dir).remove(&RepoId::parse(id)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn repo_ids_that_could_escape_the_cache_are_rejected() {
        for bad in [
            "",
            "../etc",
            "a/b/c",
            "org/..",
            "org/na me",
            "/abs",
            "org/",
            "a--b/c",
            "org/-x",
        ] {
            assert!(RepoId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let id = RepoId::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(id.cache_folder_name(), "models--HuggingFaceTB--SmolLM2-135M-Instruct");
        assert_eq!(RepoId::parse("gpt2").unwrap().cache_folder_name(), "models--gpt2");
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_rules() {
        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline);
        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u"), ("HF_HOME", "/data/hf")]));
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        let o = HubOptions::from_vars(vars(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/fast/hub")]));
        assert_eq!(o.cache_dir, PathBuf::from("/fast/hub"));
        let o = HubOptions::from_vars(vars(&[("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        let o = HubOptions::from_vars(vars(&[("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", "http://mirror:8080/")]));
        assert!(o.offline);
        assert_eq!(o.endpoint, "http://mirror:8080");
    }

    #[test]
    fn spec_splits_revision() {
        assert_eq!(split_spec("org/name"), ("org/name", "main"));
        assert_eq!(split_spec("org/name@v1.0"), ("org/name", "v1.0"));
        assert_eq!(split_spec("org/name@"), ("org/name", "main"));
    }

    #[test]
    fn revisions_cannot_climb_out_of_refs() {
        assert!(check_revision("a/b", "main").is_ok());
        assert!(check_revision("a/b", "refs/pr/1").is_ok());
        for bad in ["", "../x", "refs/../../x", "/abs", "a//b"] {
            assert!(check_revision("a/b", bad).is_err(), "{bad:?}");
        }
    }
}
