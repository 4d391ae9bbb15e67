//! Where compiled plugins are kept, and when they are trusted.
//!
//! A compiled artifact (`<hash>.cwasm`) is native code: wasmtime loads it
//! with `deserialize_file`, which trusts its contents. So whoever can write
//! the cache runs native code in the host, outside the sandbox. The plugin
//! directory is written by people who should only get sandboxed code (a
//! shared volume, a ConfigMap writer), so the cache is kept apart from it:
//!
//! - by default in the user's cache directory
//!   (`$XDG_CACHE_HOME/plinth/plugins/<key>`, else `~/.cache/...`, else
//!   `<temp dir>/plinth-<uid>/plugins/<key>`), one per plugin directory;
//! - created with mode 0700;
//! - used only while it, and each artifact in it, is owned by this user
//!   and not writable by group or others. Anything else is refused: the
//!   plugins are then compiled from their `.wasm` files (and not cached).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// The default cache of the plugins in `plugin_dir`: outside it, per user,
/// keyed by the directory's canonical path.
pub fn default_dir(plugin_dir: &Path) -> PathBuf {
    let canonical = plugin_dir
        .canonicalize()
        .unwrap_or_else(|_| plugin_dir.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })
        .map(|cache| cache.join("plinth"))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("plinth-{}", euid())));
    base.join("plugins").join(key)
}

/// Why `meta` (of `path`) may not be trusted, if it may not.
fn untrusted(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Some(format!(
            "{} is owned by uid {}, not by this user (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "{} is writable by {} (mode {:o})",
            path.display(),
            if meta.mode() & 0o002 != 0 {
                "others"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Creates `dir` (mode 0700) if it is missing, then checks that only this
/// user (or root) can write it. The error says why it is refused.
pub fn prepare(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    check_dir(dir)
}

/// Whether `dir` may hold artifacts that are loaded as native code.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    match untrusted(dir, &meta) {
        Some(why) => Err(format!("plugin cache refused: {why}")),
        None => Ok(()),
    }
}

/// Whether the artifact at `path` may be loaded: a regular file (not a
/// link) that only this user (or root) can write.
pub fn check_artifact(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::symlink_metadata(path).map_err(|err| format!("{}: {err}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    match untrusted(path, &meta) {
        Some(why) => Err(format!("compiled plugin refused: {why}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_default_is_outside_the_plugin_directory_and_per_directory() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let da = default_dir(a.path());
        assert!(!da.starts_with(a.path()), "{}", da.display());
        assert_ne!(da, default_dir(b.path()));
        assert_eq!(da, default_dir(a.path()));
    }

    #[test]
    fn a_cache_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        prepare(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "created {mode:o}");
        for (mode, who) in [(0o777, "others"), (0o770, "its group"), (0o1777, "others")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = check_dir(&dir).unwrap_err();
            assert!(err.contains(&format!("writable by {who}")), "{err}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_dir(&dir).unwrap();
        let artifact = dir.join("x.cwasm");
        std::fs::write(&artifact, b"native code").unwrap();
        std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            check_artifact(&artifact)
                .unwrap_err()
                .contains("writable by others")
        );
        std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_artifact(&artifact).unwrap();
        let link = dir.join("y.cwasm");
        std::os::unix::fs::symlink(&artifact, &link).unwrap();
        assert!(
            check_artifact(&link)
                .unwrap_err()
                .contains("not a regular file")
        );
    }

    /// Another user's directory: only root can make one here.
    #[test]
    fn a_cache_owned_by_another_user_is_refused() {
        if euid() != 0 {
            println!("SKIPPED: only root can give a directory to another user");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        prepare(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let err = check_dir(&dir).unwrap_err();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }
}
