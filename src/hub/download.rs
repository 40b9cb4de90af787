//! Downloading a model into the cache: plan the files, fetch each missing blob into
//! `<blob>.incomplete` (resuming with a range request when a partial file exists), verify its size
//! and hash against the Hub's etag, move it into `blobs/`, and link it into the snapshot.
//! Progress is reported as events; the caller decides whether a bar or a GUI listens.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha1::Digest as _;

use super::api::{Client, Ctx, FileMeta};
use super::cache::Cache;
use super::files::{self, Weights, SAFETENSORS_INDEX};
use super::{check_revision, is_commit_hash, HubError, HubOptions, RepoId, Result, DEFAULT_REVISION};

const CHUNK_BYTES: usize = 256 * 1024;
/// Byte events are at most this frequent (plus one at the end of every file), so a GUI channel
/// is not flooded.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRequest {
    pub id: String,
    /// Branch, tag or commit; `main` by default.
    pub revision: String,
    /// For repos with GGUF files: which one (path in the repo, file name, or a quantisation such
    /// as `Q4_K_M`). When unset, a
    /// safetensors repo downloads safetensors, and a GGUF-only repo gets the first quantisation in
    /// [`super::GGUF_QUANT_PREFERENCE`].
    pub gguf_file: Option<String>,
}

impl DownloadRequest {
    pub fn new(id: impl Into<String>) -> Self {
        DownloadRequest {
            id: id.into(),
            revision: DEFAULT_REVISION.to_string(),
            gguf_file: None,
        }
    }

    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    pub fn with_gguf_file(mut self, gguf_file: Option<String>) -> Self {
        self.gguf_file = gguf_file;
        self
    }
}

/// One file of a download plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFile {
    pub name: String,
    pub size_bytes: u64,
    /// Already complete in the cache; nothing to transfer.
    pub cached: bool,
    /// Bytes of a partial download that will be resumed.
    pub resume_from_bytes: u64,
}

/// Events of one download, in order: `Planned`, then per transferred file `FileStarted`,
/// `Bytes`…, `Verifying`, `FileDone`, and finally `Finished`. `done_bytes` never decreases except
/// when a server ignores a resume request and a file restarts from zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadProgress {
    Planned {
        id: String,
        commit: String,
        files: Vec<PlannedFile>,
        /// All planned files, cached ones included.
        total_bytes: u64,
        /// Cached files plus partial downloads to be resumed.
        done_bytes: u64,
    },
    FileStarted {
        file: String,
        size_bytes: u64,
        resume_from_bytes: u64,
    },
    Bytes {
        file: String,
        file_done_bytes: u64,
        file_size_bytes: u64,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Another process (Finch or Python) is downloading the same file; waiting for it.
    WaitingForLock {
        file: String,
        lock_path: PathBuf,
    },
    Verifying {
        file: String,
    },
    FileDone {
        file: String,
    },
    Finished {
        snapshot: PathBuf,
        total_bytes: u64,
    },
}

pub(crate) fn download(
    client: &Client,
    options: &HubOptions,
    request: &DownloadRequest,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    let repo = RepoId::parse(&request.id)?;
    check_revision(repo.as_str(), &request.revision)?;
    let cache = options.cache();
    if options.offline {
        return cache
            .find_snapshot(&repo, &request.revision)
            .map(|snap| snap.path)
            .ok_or_else(|| HubError::Offline {
                id: repo.to_string(),
                revision: request.revision.clone(),
                cache_dir: options.cache_dir.clone(),
            });
    }
    download_online(client, &cache, &repo, request, progress, cancel).map_err(|err| match err {
        // A plain network failure offers the cached copy, if there is one.
        HubError::Network {
            endpoint,
            reason,
            cached: None,
            ..
        } => HubError::network(&endpoint, reason, cache.any_usable_snapshot(&repo, &request.revision)),
        other => other,
    })
}

fn download_online(
    client: &Client,
    cache: &Cache,
    repo: &RepoId,
    request: &DownloadRequest,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    let id = repo.as_str();
    let revision = request.revision.as_str();
    let info = client.model_info(Ctx {
        id,
        revision,
        file: None,
    })?;
    let commit = match info.sha {
        Some(sha) if is_commit_hash(&sha) => sha,
        _ if is_commit_hash(revision) => revision.to_string(),
        _ => {
            return Err(HubError::BadResponse {
                url: format!("{}/api/models/{id}/revision/{revision}", client.endpoint),
                reason: "no commit hash (`sha`) in the model info".to_string(),
            })
        }
    };
    let siblings: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let selection = files::select(id, &siblings, request.gguf_file.as_deref())?;
    let snapshot = cache.snapshot_dir(repo, &commit);
    let mut wanted = selection.files.clone();
    if selection.weights == Weights::Sharded {
        // The shard list is inside the index, so the (small) index comes first, without events.
        let index_path = snapshot.join(SAFETENSORS_INDEX);
        if !index_path.is_file() {
            let meta = client.file_meta(Ctx {
                id,
                revision: &commit,
                file: Some(SAFETENSORS_INDEX),
            })?;
            fetch_blob(
                client,
                cache,
                repo,
                &commit,
                SAFETENSORS_INDEX,
                &meta,
                0,
                &mut Tally::quiet(),
                cancel,
            )?;
            cache.link_file(repo, &commit, SAFETENSORS_INDEX, &meta.etag)?;
        }
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| HubError::io(&index_path, "cannot read safetensors index", e))?;
        let shards = files::index_shards(&text).map_err(|reason| HubError::BadResponse {
            url: client.file_url(id, &commit, SAFETENSORS_INDEX),
            reason,
        })?;
        for shard in shards {
            if !siblings.contains(&shard) {
                return Err(HubError::FileNotFound {
                    id: id.to_string(),
                    revision: commit.clone(),
                    file: shard,
                });
            }
            wanted.push(shard);
        }
    }

    // Files already in this commit's snapshot need no request: a commit's files never change.
    let mut planned = Vec::with_capacity(wanted.len());
    let mut transfers: Vec<(String, FileMeta, u64)> = Vec::new();
    for file in &wanted {
        let local = snapshot.join(file);
        if local.is_file() {
            let size_bytes = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
            planned.push(PlannedFile {
                name: file.clone(),
                size_bytes,
                cached: true,
                resume_from_bytes: 0,
            });
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(HubError::Cancelled { id: id.to_string() });
        }
        let meta = client.file_meta(Ctx {
            id,
            revision: &commit,
            file: Some(file),
        })?;
        let blob = cache.blobs_dir(repo).join(&meta.etag);
        let blob_complete = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size_bytes);
        if blob_complete {
            // Same contents under another commit or file name: link, no transfer.
            cache.link_file(repo, &commit, file, &meta.etag)?;
        }
        let resume_from_bytes = if blob_complete {
            0
        } else {
            partial_len(&partial_path(&blob))
                .filter(|n| *n <= meta.size_bytes)
                .unwrap_or(0)
        };
        planned.push(PlannedFile {
            name: file.clone(),
            size_bytes: meta.size_bytes,
            cached: blob_complete,
            resume_from_bytes,
        });
        if !blob_complete {
            transfers.push((file.clone(), meta, resume_from_bytes));
        }
    }

    let total_bytes: u64 = planned.iter().map(|f| f.size_bytes).sum();
    let done_bytes: u64 = planned
        .iter()
        .map(|f| if f.cached { f.size_bytes } else { f.resume_from_bytes })
        .sum();
    check_free_space(cache, repo, total_bytes - done_bytes)?;
    progress(DownloadProgress::Planned {
        id: id.to_string(),
        commit: commit.clone(),
        files: planned.clone(),
        total_bytes,
        done_bytes,
    });

    let mut tally = Tally {
        progress: Some(progress),
        total_bytes,
        done_bytes,
        last_event: None,
    };
    for (file, meta, resume_from_bytes) in &transfers {
        if cancel.load(Ordering::Relaxed) {
            return Err(HubError::Cancelled { id: id.to_string() });
        }
        fetch_blob(
            client,
            cache,
            repo,
            &commit,
            file,
            meta,
            *resume_from_bytes,
            &mut tally,
            cancel,
        )?;
        cache.link_file(repo, &commit, file, &meta.etag)?;
        tally.emit(DownloadProgress::FileDone { file: file.clone() });
    }
    if revision != commit {
        cache.write_ref(repo, revision, &commit)?;
    }
    tally.emit(DownloadProgress::Finished {
        snapshot: snapshot.clone(),
        total_bytes,
    });
    Ok(snapshot)
}

/// Refuses to start a download that cannot fit, rather than filling the disk and failing late.
fn check_free_space(cache: &Cache, repo: &RepoId, needed_bytes: u64) -> Result<()> {
    if needed_bytes == 0 {
        return Ok(());
    }
    let blobs = cache.blobs_dir(repo);
    std::fs::create_dir_all(&blobs).map_err(|e| HubError::io(&blobs, "cannot create cache folder", e))?;
    match fs4::available_space(&blobs) {
        Ok(available_bytes) if available_bytes < needed_bytes => Err(HubError::NotEnoughSpace {
            path: blobs,
            needed_bytes,
            available_bytes,
        }),
        // Unknown free space (an exotic filesystem) is not a reason to refuse.
        _ => Ok(()),
    }
}

/// Running byte counts of a download and the listener they go to.
struct Tally<'a> {
    progress: Option<&'a mut dyn FnMut(DownloadProgress)>,
    total_bytes: u64,
    /// Bytes of finished files plus the current file's bytes so far.
    done_bytes: u64,
    last_event: Option<Instant>,
}

impl Tally<'_> {
    fn quiet() -> Self {
        Tally {
            progress: None,
            total_bytes: 0,
            done_bytes: 0,
            last_event: None,
        }
    }

    fn emit(&mut self, event: DownloadProgress) {
        if let Some(progress) = self.progress.as_mut() {
            progress(event);
        }
    }

    fn bytes(&mut self, file: &str, file_done_bytes: u64, file_size_bytes: u64, force: bool) {
        let due = self.last_event.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if force || due {
            self.last_event = Some(Instant::now());
            let event = DownloadProgress::Bytes {
                file: file.to_string(),
                file_done_bytes,
                file_size_bytes,
                done_bytes: self.done_bytes,
                total_bytes: self.total_bytes,
            };
            self.emit(event);
        }
    }
}

fn partial_path(blob: &Path) -> PathBuf {
    let mut name = blob.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".incomplete");
    blob.with_file_name(name)
}

fn partial_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len())
}

/// Checks a file's contents against its etag: sha256 for LFS files, the git blob sha1 for small
/// files. Other etag shapes (a non-Hub server) are checked by size only.
enum Verifier {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
    SizeOnly,
}

impl Verifier {
    fn for_etag(etag: &str, size_bytes: u64) -> Verifier {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Verifier::Sha256(sha2::Sha256::new()),
            40 if hex => {
                let mut hasher = sha1::Sha1::new();
                hasher.update(format!("blob {size_bytes}\0").as_bytes());
                Verifier::GitSha1(hasher)
            }
            _ => Verifier::SizeOnly,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::GitSha1(h) => h.update(bytes),
            Verifier::SizeOnly => {}
        }
    }

    /// (algorithm name, hex digest), or `None` when only the size is checked.
    fn finish(self) -> Option<(&'static str, String)> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match self {
            Verifier::Sha256(h) => Some(("sha256", hex(&h.finalize()))),
            Verifier::GitSha1(h) => Some(("git blob sha1", hex(&h.finalize()))),
            Verifier::SizeOnly => None,
        }
    }
}

/// Fetches one file into `blobs/<etag>`, resuming `blobs/<etag>.incomplete` if present.
#[allow(clippy::too_many_arguments)]
fn fetch_blob(
    client: &Client,
    cache: &Cache,
    repo: &RepoId,
    commit: &str,
    file: &str,
    meta: &FileMeta,
    planned_resume_bytes: u64,
    tally: &mut Tally<'_>,
    cancel: &AtomicBool,
) -> Result<()> {
    let blobs = cache.blobs_dir(repo);
    std::fs::create_dir_all(&blobs).map_err(|e| HubError::io(&blobs, "cannot create cache folder", e))?;
    let blob = blobs.join(&meta.etag);
    let partial = partial_path(&blob);
    let size_bytes = meta.size_bytes;
    let done_before_file = tally.done_bytes.saturating_sub(planned_resume_bytes);
    // Each file's first chunk is reported at once, so a listener sees every file begin to move.
    tally.last_event = None;

    let _lock = lock_blob(cache, repo, &meta.etag, file, tally, cancel)?;
    if std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size_bytes) {
        // Another download (Finch or Python) finished this blob while we waited.
        tally.done_bytes = done_before_file + size_bytes;
        tally.bytes(file, size_bytes, size_bytes, true);
        return Ok(());
    }
    let mut have_bytes = partial_len(&partial).unwrap_or(0);
    if have_bytes > size_bytes {
        have_bytes = 0;
    }
    tally.emit(DownloadProgress::FileStarted {
        file: file.to_string(),
        size_bytes,
        resume_from_bytes: have_bytes,
    });

    let mut verifier = Verifier::for_etag(&meta.etag, size_bytes);
    if have_bytes > 0 {
        hash_prefix(&partial, have_bytes, &mut verifier)?;
    }
    if have_bytes < size_bytes {
        let ctx = Ctx {
            id: repo.as_str(),
            revision: commit,
            file: Some(file),
        };
        let mut response = client.open_file(ctx, have_bytes)?;
        let status = response.status().as_u16();
        let restart = match status {
            206 => {
                let content_range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !content_range.starts_with(&format!("bytes {have_bytes}-")) {
                    return Err(HubError::BadResponse {
                        url: client.file_url(repo.as_str(), commit, file),
                        reason: format!("asked for bytes {have_bytes}- but got Content-Range `{content_range}`"),
                    });
                }
                false
            }
            // The partial file is no longer valid for the server (416), or the server ignored the
            // range (200): start over.
            416 => {
                let _ = std::fs::remove_file(&partial);
                response = client.open_file(ctx, 0)?;
                true
            }
            _ => have_bytes > 0,
        };
        if restart {
            have_bytes = 0;
            verifier = Verifier::for_etag(&meta.etag, size_bytes);
        }
        tally.done_bytes = done_before_file + have_bytes;

        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(have_bytes > 0)
            .truncate(have_bytes == 0)
            .open(&partial)
            .map_err(|e| HubError::io(&partial, "cannot open partial download", e))?;
        let mut reader = response.into_body().into_reader();
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            if cancel.load(Ordering::Relaxed) {
                let _ = out.flush();
                return Err(HubError::Cancelled { id: repo.to_string() });
            }
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // What arrived stays in the partial file for the next attempt.
                    let _ = out.flush();
                    return Err(HubError::Interrupted {
                        file: file.to_string(),
                        done_bytes: have_bytes,
                        size_bytes,
                        reason: e.to_string(),
                    });
                }
            };
            if have_bytes + n as u64 > size_bytes {
                drop(out);
                let _ = std::fs::remove_file(&partial);
                return Err(HubError::SizeMismatch {
                    file: file.to_string(),
                    expected_bytes: size_bytes,
                    found_bytes: have_bytes + n as u64,
                    hint: "; the download was deleted".to_string(),
                });
            }
            out.write_all(&buffer[..n])
                .map_err(|e| HubError::io(&partial, "cannot write download (disk full?)", e))?;
            verifier.update(&buffer[..n]);
            have_bytes += n as u64;
            tally.done_bytes = done_before_file + have_bytes;
            tally.bytes(file, have_bytes, size_bytes, false);
        }
        out.sync_all()
            .map_err(|e| HubError::io(&partial, "cannot flush download", e))?;
    }
    tally.done_bytes = done_before_file + have_bytes;
    tally.bytes(file, have_bytes, size_bytes, true);
    if have_bytes != size_bytes {
        return Err(HubError::SizeMismatch {
            file: file.to_string(),
            expected_bytes: size_bytes,
            found_bytes: have_bytes,
            hint: "; run the download again to resume".to_string(),
        });
    }

    tally.emit(DownloadProgress::Verifying { file: file.to_string() });
    if let Some((algorithm, found)) = verifier.finish() {
        if !found.eq_ignore_ascii_case(&meta.etag) {
            let _ = std::fs::remove_file(&partial);
            return Err(HubError::Checksum {
                file: file.to_string(),
                algorithm: algorithm.to_string(),
                expected: meta.etag.clone(),
                found,
            });
        }
    }
    std::fs::rename(&partial, &blob).map_err(|e| HubError::io(&blob, "cannot move download into the cache", e))
}

/// An exclusive lock on `<cache>/.locks/models--org--name/<etag>.lock`, the lock file Python's
/// `huggingface_hub` takes for the same blob, so Finch and Python (or two Finch windows) never
/// write one `.incomplete` file at once. Released when dropped.
struct BlobLock {
    _file: Option<std::fs::File>,
}

const LOCK_POLL: Duration = Duration::from_millis(100);

fn lock_blob(
    cache: &Cache,
    repo: &RepoId,
    etag: &str,
    file: &str,
    tally: &mut Tally<'_>,
    cancel: &AtomicBool,
) -> Result<BlobLock> {
    let dir = cache.root().join(".locks").join(repo.cache_folder_name());
    std::fs::create_dir_all(&dir).map_err(|e| HubError::io(&dir, "cannot create lock folder", e))?;
    let path = dir.join(format!("{etag}.lock"));
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    {
        // Group-writable like `huggingface_hub`'s, for caches shared between users.
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o664);
    }
    let lock_file = options
        .open(&path)
        .map_err(|e| HubError::io(&path, "cannot open lock file", e))?;
    let mut announced = false;
    loop {
        // Called through the trait: since Rust 1.89 `File` has an inherent `try_lock` of its own.
        match fs4::FileExt::try_lock(&lock_file) {
            Ok(()) => return Ok(BlobLock { _file: Some(lock_file) }),
            Err(fs4::TryLockError::WouldBlock) => {
                if !announced {
                    announced = true;
                    tally.emit(DownloadProgress::WaitingForLock {
                        file: file.to_string(),
                        lock_path: path.clone(),
                    });
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(HubError::Cancelled { id: repo.to_string() });
                }
                std::thread::sleep(LOCK_POLL);
            }
            // A filesystem without locks (some network mounts): go on unlocked, as
            // `huggingface_hub` does with its soft-lock fallback.
            Err(_) => return Ok(BlobLock { _file: None }),
        }
    }
}

fn hash_prefix(path: &Path, len_bytes: u64, verifier: &mut Verifier) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| HubError::io(path, "cannot read partial download", e))?;
    let mut reader = std::io::BufReader::new(file).take(len_bytes);
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| HubError::io(path, "cannot read partial download", e))?;
        if n == 0 {
            return Ok(());
        }
        verifier.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let mut v = Verifier::for_etag("ce013625030ba8dba906f756967f9e9ca394464a", 6);
        v.update(b"hello\n");
        assert_eq!(
            v.finish(),
            Some(("git blob sha1", "ce013625030ba8dba906f756967f9e9ca394464a".to_string()))
        );
        // `printf 'hello\n' | sha256sum`
        let etag = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let mut v = Verifier::for_etag(etag, 6);
        v.update(b"hello\n");
        assert_eq!(v.finish(), Some(("sha256", etag.to_string())));
        assert!(Verifier::for_etag("abc-123", 6).finish().is_none());
    }
}
