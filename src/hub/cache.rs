//! The shared Hugging Face cache layout, read and written exactly as Python's `huggingface_hub`
//! does, so either tool reuses the other's downloads:
//!
//! ```text
//! <cache>/models--org--name/
//!     blobs/<etag>                      file contents; etag = sha256 (LFS) or git blob sha1
//!     blobs/<etag>.incomplete           a partial download, resumed with an HTTP range request
//!     snapshots/<commit>/<file>         relative symlink to ../../blobs/<etag> (or a plain file)
//!     refs/<branch or tag>              the commit the name pointed to when last downloaded
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{is_commit_hash, HubError, RepoId, Result};
use crate::fsutil::AtomicFile;

/// A usable snapshot folder of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachedSnapshot {
    pub commit: String,
    pub path: PathBuf,
}

/// One snapshot of a cached model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachedRevision {
    pub commit: String,
    /// Branch or tag names (`refs/…`) that point at this commit.
    pub refs: Vec<String>,
    pub path: PathBuf,
    /// Files in the snapshot, relative to it, sorted.
    pub files: Vec<String>,
    /// Whether Finch can load it (config and complete weights present).
    pub usable: bool,
}

/// A model in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachedModel {
    pub id: String,
    pub revisions: Vec<CachedRevision>,
    /// Disk use: blobs, partial downloads and plain (non-symlink) snapshot files.
    pub size_bytes: u64,
    pub path: PathBuf,
}

/// A hub cache folder (the one holding `models--org--name` folders).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn repo_dir(&self, id: &RepoId) -> PathBuf {
        self.root.join(id.cache_folder_name())
    }

    pub fn blobs_dir(&self, id: &RepoId) -> PathBuf {
        self.repo_dir(id).join("blobs")
    }

    pub fn snapshot_dir(&self, id: &RepoId, commit: &str) -> PathBuf {
        self.repo_dir(id).join("snapshots").join(commit)
    }

    /// The commit a branch or tag pointed to at the last download, if recorded.
    pub fn read_ref(&self, id: &RepoId, revision: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.repo_dir(id).join("refs").join(revision)).ok()?;
        let commit = text.trim().to_string();
        is_commit_hash(&commit).then_some(commit)
    }

    /// Records that `revision` points at `commit` (no trailing newline, like `huggingface_hub`).
    pub fn write_ref(&self, id: &RepoId, revision: &str, commit: &str) -> Result<()> {
        let path = self.repo_dir(id).join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, "cannot create folder", e))?;
        }
        let mut file = AtomicFile::create(&path).map_err(|e| HubError::io(&path, "cannot write ref", e))?;
        file.file_mut()
            .write_all(commit.as_bytes())
            .map_err(|e| HubError::io(&path, "cannot write ref", e))?;
        file.commit()
            .map_err(|e| HubError::io(&path, "cannot move ref into place", e))
    }

    /// The snapshot for `revision` (a commit hash, or a branch/tag resolved through `refs/`), if it
    /// is complete enough for Finch to load.
    pub fn find_snapshot(&self, id: &RepoId, revision: &str) -> Option<CachedSnapshot> {
        let commit = if is_commit_hash(revision) {
            revision.to_string()
        } else {
            self.read_ref(id, revision)?
        };
        let path = self.snapshot_dir(id, &commit);
        snapshot_is_usable(&path).then_some(CachedSnapshot { commit, path })
    }

    /// The usable snapshot of `revision`, else the most recently modified usable snapshot of any
    /// revision: what a network error offers instead.
    pub fn any_usable_snapshot(&self, id: &RepoId, revision: &str) -> Option<CachedSnapshot> {
        if let Some(snap) = self.find_snapshot(id, revision) {
            return Some(snap);
        }
        let snapshots = self.repo_dir(id).join("snapshots");
        let mut best: Option<(std::time::SystemTime, CachedSnapshot)> = None;
        for entry in std::fs::read_dir(&snapshots).ok()?.flatten() {
            let path = entry.path();
            let commit = entry.file_name().to_string_lossy().to_string();
            if !snapshot_is_usable(&path) {
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, CachedSnapshot { commit, path }));
            }
        }
        best.map(|(_, snap)| snap)
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative symlink (a copy where
    /// symlinks are unavailable), replacing whatever was there.
    pub fn link_file(&self, id: &RepoId, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let link = self.snapshot_dir(id, commit).join(file);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, "cannot create snapshot folder", e))?;
        }
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link).map_err(|e| HubError::io(&link, "cannot replace old file", e))?;
        }
        // snapshots/<commit>/a/b.json needs one extra `..` per folder level inside the snapshot.
        let depth = file.split('/').count() - 1;
        let target = format!("{}blobs/{etag}", "../".repeat(depth + 2));
        make_link(&target, &self.blobs_dir(id).join(etag), &link)?;
        Ok(link)
    }

    /// All cached models, sorted by id. Folders that are not models (`datasets--…`, `.locks`) are skipped.
    pub fn list(&self) -> Result<Vec<CachedModel>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HubError::io(&self.root, "cannot read cache folder", e)),
        };
        let mut models = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix("models--") else {
                continue;
            };
            let path = entry.path();
            if !path.is_dir() || rest.is_empty() {
                continue;
            }
            // `huggingface_hub` turns the first `--` back into `/` (ids cannot contain `--`).
            let id = rest.replacen("--", "/", 1);
            models.push(read_model(id, path));
        }
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(models)
    }

    /// Deletes a model's folder; returns the bytes freed.
    pub fn remove(&self, id: &RepoId) -> Result<u64> {
        let dir = self.repo_dir(id);
        if !dir.is_dir() {
            return Err(HubError::NotCached {
                id: id.to_string(),
                cache_dir: self.root.clone(),
            });
        }
        let freed_bytes = model_disk_usage(&dir);
        std::fs::remove_dir_all(&dir).map_err(|e| HubError::io(&dir, "cannot delete cached model", e))?;
        // Lock files `huggingface_hub` may have left; harmless if absent.
        let _ = std::fs::remove_dir_all(self.root.join(".locks").join(id.cache_folder_name()));
        Ok(freed_bytes)
    }
}

fn read_model(id: String, path: PathBuf) -> CachedModel {
    let mut refs_by_commit: Vec<(String, String)> = Vec::new();
    let refs_dir = path.join("refs");
    for (name, file, meta) in walk(&refs_dir) {
        if meta.is_file() {
            if let Ok(text) = std::fs::read_to_string(&file) {
                refs_by_commit.push((text.trim().to_string(), name));
            }
        }
    }
    let mut revisions = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path.join("snapshots")) {
        for entry in entries.flatten() {
            let snap = entry.path();
            if !snap.is_dir() {
                continue;
            }
            let commit = entry.file_name().to_string_lossy().to_string();
            let mut files: Vec<String> = walk(&snap)
                .into_iter()
                .filter(|(_, _, meta)| !meta.is_dir())
                .map(|(name, _, _)| name)
                .collect();
            files.sort();
            let mut refs: Vec<String> = refs_by_commit
                .iter()
                .filter(|(c, _)| *c == commit)
                .map(|(_, name)| name.clone())
                .collect();
            refs.sort();
            revisions.push(CachedRevision {
                usable: snapshot_is_usable(&snap),
                commit,
                refs,
                path: snap,
                files,
            });
        }
    }
    revisions.sort_by(|a, b| b.refs.len().cmp(&a.refs.len()).then(a.commit.cmp(&b.commit)));
    CachedModel {
        id,
        revisions,
        size_bytes: model_disk_usage(&path),
        path,
    }
}

/// Bytes a model's files use: blobs (partial downloads included) and plain files in snapshots.
/// Symlinks are not followed, so each blob counts once; refs and markers are bookkeeping.
fn model_disk_usage(repo_dir: &Path) -> u64 {
    let file_bytes = |dir: &Path| -> u64 {
        walk(dir)
            .iter()
            .filter(|(_, _, meta)| meta.is_file())
            .map(|(_, _, meta)| meta.len())
            .sum()
    };
    file_bytes(&repo_dir.join("blobs")) + file_bytes(&repo_dir.join("snapshots"))
}

/// Every entry under `dir` as (relative path with `/`, full path, `symlink_metadata`), without
/// following symlinks. Bounded depth keeps a pathological tree from recursing forever.
fn walk(dir: &Path) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    fn go(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<(String, PathBuf, std::fs::Metadata)>) {
        if depth > 16 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if meta.is_dir() {
                go(&path, &format!("{name}/"), depth + 1, out);
            }
            out.push((name, path, meta));
        }
    }
    let mut out = Vec::new();
    go(dir, "", 0, &mut out);
    out
}

/// Whether a snapshot holds loadable weights: a GGUF file, or `config.json` plus
/// `model.safetensors` or a safetensors index whose shards are all present. Broken symlinks
/// count as missing.
pub fn snapshot_is_usable(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let has_gguf = walk(dir)
        .iter()
        .any(|(name, path, _)| name.to_ascii_lowercase().ends_with(".gguf") && path.is_file());
    if has_gguf {
        return true;
    }
    if !dir.join("config.json").is_file() {
        return false;
    }
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    let index = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return false;
    };
    match super::files::index_shards(&text) {
        Ok(shards) => !shards.is_empty() && shards.iter().all(|s| dir.join(s).is_file()),
        Err(_) => false,
    }
}

#[cfg(unix)]
fn make_link(target: &str, _blob: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| HubError::io(link, "cannot create snapshot symlink", e))
}

#[cfg(not(unix))]
fn make_link(target: &str, blob: &Path, link: &Path) -> Result<()> {
    // Windows needs developer mode for symlinks; `huggingface_hub` falls back to copies too.
    #[cfg(windows)]
    {
        if std::os::windows::fs::symlink_file(target.replace('/', "\\"), link).is_ok() {
            return Ok(());
        }
    }
    let _ = target;
    std::fs::copy(blob, link)
        .map(|_| ())
        .map_err(|e| HubError::io(link, "cannot copy blob into snapshot", e))
}
