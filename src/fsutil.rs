//! Crash-safe file writes: write a temporary file next to the target, flush it, then rename.
//! A crash at any moment leaves either the old file or the new one, never half of one.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(match path.extension() {
        Some(e) => format!("{}.tmp", e.to_string_lossy()),
        None => "tmp".into(),
    });
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "cannot create", e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, "cannot write", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "cannot flush", e))?;
    }
    rename(&tmp, path)
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(to, format!("cannot move {} into place", from.display()), e))
}
