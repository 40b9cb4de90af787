//! Crash-safe file writes: write a uniquely named temporary file next to the target, flush it,
//! then rename it over the target (`tempfile::NamedTempFile::persist`). A crash at any moment
//! leaves either the old file or the new one, never half of one, and two writers of the same file
//! never share a temporary file: the last rename wins with a whole file.
//!
//! This module only uses `std::io` errors in [`AtomicFile`] so that every part of Finch (the Hub
//! client has its own error type) can use it; [`write_atomic`] is the one-call form for the engine.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A file being written that replaces `target` only when [`AtomicFile::commit`] succeeds. Dropped
/// without a commit, the temporary file is removed and `target` is untouched.
#[derive(Debug)]
pub struct AtomicFile {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target` with the permissions a plain `File::create` would give (0666 less
    /// the umask on Unix).
    pub fn create(target: &Path) -> std::io::Result<Self> {
        Self::create_with_mode(target, 0o666)
    }

    /// Starts writing `target` readable and writable by the user only (0600 on Unix): for secrets,
    /// which must never be readable by others, not even while being written.
    pub fn create_private(target: &Path) -> std::io::Result<Self> {
        Self::create_with_mode(target, 0o600)
    }

    fn create_with_mode(target: &Path, mode: u32) -> std::io::Result<Self> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let mut builder = tempfile::Builder::new();
        // A hidden name that says whose it is: `.adapter_config.json.Ab12Cd.tmp`.
        let prefix = format!(".{name}.");
        builder.prefix(&prefix).suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(mode));
        }
        #[cfg(not(unix))]
        let _ = mode;
        let temp = builder.tempfile_in(dir)?;
        Ok(AtomicFile {
            temp,
            target: target.to_path_buf(),
        })
    }

    /// The open temporary file, to write into.
    pub fn file_mut(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// The temporary file's path, for writers that insist on opening a path themselves.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// The file this one will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes the contents to disk and renames the temporary file over the target.
    pub fn commit(self) -> std::io::Result<()> {
        self.temp.as_file().sync_all()?;
        self.temp.persist(&self.target).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically (see the module comment).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Writes `path` atomically with whatever `write` puts into the (temporary) file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let mut file =
        AtomicFile::create(path).map_err(|e| Error::io(path, "cannot create a temporary file beside it", e))?;
    write(file.file_mut()).map_err(|e| Error::io(path, "cannot write", e))?;
    file.commit()
        .map_err(|e| Error::io(path, "cannot move the written file into place", e))
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(to, format!("cannot move {} into place", from.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["config.toml"]);
    }

    #[test]
    fn two_writers_at_once_do_not_clash() {
        // With one fixed `config.toml.tmp` name, one writer's rename moved the other's half-written
        // file into place or failed with "not found". Each writer here writes a whole, distinct
        // content many times; every write must succeed and the file must always be one of them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let contents: Vec<Vec<u8>> = (0..4u8).map(|i| vec![b'a' + i; 64 * 1024]).collect();
        std::thread::scope(|s| {
            for content in &contents {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_atomic(path, content).unwrap();
                        let now = std::fs::read(path).unwrap();
                        assert!(contents_is_whole(&now), "a torn file of {} bytes", now.len());
                    }
                });
            }
        });
        assert!(contents.contains(&std::fs::read(&path).unwrap()));
        assert_eq!(names(dir.path()), ["config.toml"]);

        fn contents_is_whole(bytes: &[u8]) -> bool {
            bytes.len() == 64 * 1024 && bytes.iter().all(|&b| b == bytes[0])
        }
    }

    #[test]
    fn a_failed_writer_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_private_and_others_are_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        let mut f = AtomicFile::create_private(&secret).unwrap();
        f.file_mut().write_all(b"hf_x").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
        // Everything else gets what `std::fs::write` gives (0666 less the umask), not a bare
        // NamedTempFile's 0600: run folders are shared with other users and tools.
        let plain = dir.path().join("adapter_config.json");
        write_atomic(&plain, b"{}").unwrap();
        let reference = dir.path().join("reference.json");
        std::fs::write(&reference, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&plain), mode(&reference));
    }
}
