//! Atomic file replacement: every file CoordGen writes (datastores, n-gram caches,
//! calibration caches, replay traces) goes to a temporary file beside the target, is synced,
//! and is renamed over it, so an interrupted write (a crash, a full disk, Ctrl-C) leaves
//! either the old file or the new one, never a torn one that a later run misreads.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (creating its directory). On error, nothing at
/// `path` changed and the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temporary name beside `path`, unique to this process and call (so concurrent writers
/// of the same file never share one).
fn temp_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_nothing_behind_on_failure() {
        let dir = std::env::temp_dir().join(format!("cg-atomic-{}", std::process::id()));
        let p = dir.join("sub").join("f.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second version").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second version");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temporary files left: {names:?}");
        // A target whose directory is a file: an error, and the old file untouched.
        let blocked = p.join("inside-a-file");
        assert!(write_atomic(&blocked, b"x").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"second version");
        std::fs::remove_dir_all(&dir).ok();
    }
}
