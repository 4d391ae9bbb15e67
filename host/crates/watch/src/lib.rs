//! Watches files whose content matters (tokens, certificates, keys) and says
//! when that content changes, however it was changed.
//!
//! Editing a file in place is the simple case. Kubernetes does not do that:
//! it mounts a Secret or ConfigMap as a directory of symlinks
//! (`token -> ..data/token`) and updates it by writing a new timestamped
//! directory and renaming a fresh `..data` symlink over the old one. The
//! file's own directory entry never changes, so a watch on the file alone
//! sees nothing. A [`FileWatch`] therefore follows each file's chain of
//! symlinks, watches (non-recursively) every directory that holds a link of
//! the chain or the final file, and after any event there compares the
//! files' contents (SHA-256) with what it saw last. The callback runs only
//! when some watched file's content really changed, with the paths that did.
//! The chains are followed again after each event, so a swap that points a
//! link into a new directory moves the watch with it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak, mpsc};
use std::time::Duration;

use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer, notify};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// What a file held when last read: its SHA-256, or the error that reading
/// it gave (a missing file is a state too; its return is a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Digest([u8; 32]),
    Unreadable(String),
}

impl Content {
    /// Reads `path` (following links) and digests it.
    pub fn read(path: &Path) -> Content {
        match std::fs::read(path) {
            Ok(bytes) => Content::Digest(Sha256::digest(&bytes).into()),
            Err(err) => Content::Unreadable(err.kind().to_string()),
        }
    }
}

/// The directories to watch for `path`: the one holding `path` itself and,
/// link by link, the one holding each target, up to the final file.
/// Relative link targets resolve against the link's directory. Stops after
/// 40 links, as the kernel does.
pub fn watched_dirs(path: &Path) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    let mut current = absolute(path);
    for _ in 0..40 {
        let dir = current
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        dirs.insert(dir.clone());
        match std::fs::read_link(&current) {
            Ok(target) => current = absolute(&dir.join(target)),
            Err(_) => break,
        }
    }
    dirs
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

type Callback = Box<dyn FnMut(&[PathBuf]) + Send>;

struct State {
    contents: BTreeMap<PathBuf, Content>,
    watching: BTreeSet<PathBuf>,
}

/// Watches a set of files; stops when dropped.
pub struct FileWatch {
    debouncer: Arc<Mutex<Debouncer<notify::RecommendedWatcher>>>,
    state: Arc<Mutex<State>>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl FileWatch {
    /// Starts watching `files`. Their current contents are the baseline:
    /// `on_change` runs (on the watcher's own thread) with the files whose
    /// content differs from the last seen, once events have been quiet for
    /// `debounce`. Every directory on each file's link chain must exist.
    pub fn start(
        files: impl IntoIterator<Item = PathBuf>,
        debounce: Duration,
        on_change: impl FnMut(&[PathBuf]) + Send + 'static,
    ) -> notify::Result<FileWatch> {
        let files: Vec<PathBuf> = files.into_iter().map(|f| absolute(&f)).collect();
        let contents = files
            .iter()
            .map(|file| (file.clone(), Content::read(file)))
            .collect();
        let state = Arc::new(Mutex::new(State {
            contents,
            watching: BTreeSet::new(),
        }));
        let (tx, rx) = mpsc::channel::<()>();
        let debouncer = new_debouncer(debounce, move |res: DebounceEventResult| match res {
            Ok(_) => {
                let _ = tx.send(());
            }
            Err(err) => tracing::warn!(%err, "file watch error"),
        })?;
        let debouncer = Arc::new(Mutex::new(debouncer));
        let watch = FileWatch {
            debouncer: Arc::clone(&debouncer),
            state: Arc::clone(&state),
            files: files.clone(),
        };
        watch.rewatch()?;
        let weak = Arc::downgrade(&debouncer);
        let mut on_change: Callback = Box::new(on_change);
        std::thread::Builder::new()
            .name("plinth-file-watch".into())
            .spawn(move || {
                // Ends when the debouncer (and with it the sender) is dropped.
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    let changed = refresh(&files, &state);
                    if let Err(err) = rewatch_with(&weak, &files, &state) {
                        tracing::warn!(%err, "file watch: following the links again");
                    }
                    if !changed.is_empty() {
                        on_change(&changed);
                    }
                }
            })?;
        Ok(watch)
    }

    /// The files watched, as absolute paths.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The directories now watched.
    pub fn directories(&self) -> BTreeSet<PathBuf> {
        self.state.lock().watching.clone()
    }

    fn rewatch(&self) -> notify::Result<()> {
        rewatch_with(&Arc::downgrade(&self.debouncer), &self.files, &self.state)
    }
}

/// Re-reads every file; returns those whose content changed, and records
/// the new contents.
fn refresh(files: &[PathBuf], state: &Mutex<State>) -> Vec<PathBuf> {
    let mut state = state.lock();
    let mut changed = Vec::new();
    for file in files {
        let now = Content::read(file);
        if state.contents.get(file) != Some(&now) {
            state.contents.insert(file.clone(), now);
            changed.push(file.clone());
        }
    }
    changed
}

/// Watches the directories the files' link chains now pass through, and
/// stops watching those they no longer do.
fn rewatch_with(
    debouncer: &Weak<Mutex<Debouncer<notify::RecommendedWatcher>>>,
    files: &[PathBuf],
    state: &Mutex<State>,
) -> notify::Result<()> {
    let Some(debouncer) = debouncer.upgrade() else {
        return Ok(());
    };
    let wanted: BTreeSet<PathBuf> = files.iter().flat_map(|f| watched_dirs(f)).collect();
    let mut state = state.lock();
    let mut debouncer = debouncer.lock();
    let watcher = debouncer.watcher();
    let mut result = Ok(());
    for dir in wanted.difference(&state.watching) {
        if let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            result = Err(err);
        }
    }
    for dir in state.watching.difference(&wanted) {
        let _ = watcher.unwatch(dir);
    }
    // A directory that could not be watched is tried again next time.
    state.watching = wanted.into_iter().filter(|dir| dir.is_dir()).collect();
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::mpsc::{Receiver, RecvTimeoutError};

    use super::*;

    const DEBOUNCE: Duration = Duration::from_millis(50);
    /// How long a test waits for a change it expects to be reported.
    const PATIENCE: Duration = Duration::from_secs(20);

    fn watch(files: &[PathBuf]) -> (FileWatch, Receiver<Vec<PathBuf>>) {
        let (tx, rx) = mpsc::channel();
        let watch = FileWatch::start(files.to_vec(), DEBOUNCE, move |changed| {
            let _ = tx.send(changed.to_vec());
        })
        .expect("watch starts");
        (watch, rx)
    }

    fn next(rx: &Receiver<Vec<PathBuf>>) -> Vec<PathBuf> {
        rx.recv_timeout(PATIENCE)
            .unwrap_or_else(|err| panic!("no change reported within {PATIENCE:?}: {err}"))
    }

    /// Writes the way Kubernetes' atomic writer does: a new timestamped
    /// directory, a `..data_tmp` link to it renamed over `..data`.
    fn kubernetes_update(dir: &Path, generation: u32, files: &[(&str, &str)]) {
        let data = dir.join(format!("..2026_11_30_{generation}"));
        std::fs::create_dir(&data).unwrap();
        for (name, text) in files {
            std::fs::write(data.join(name), text).unwrap();
        }
        let tmp = dir.join("..data_tmp");
        symlink(data.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link).unwrap();
            }
        }
    }

    #[test]
    fn an_edit_in_place_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let other = dir.path().join("other");
        std::fs::write(&token, "one").unwrap();
        std::fs::write(&other, "x").unwrap();
        let (_watch, rx) = watch(&[token.clone(), other.clone()]);
        std::fs::write(&token, "two").unwrap();
        assert_eq!(next(&rx), vec![absolute(&token)]);
    }

    #[test]
    fn a_kubernetes_symlink_swap_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        kubernetes_update(dir.path(), 1, &[("token", "one"), ("cert", "c1")]);
        let token = dir.path().join("token");
        let cert = dir.path().join("cert");
        let (_watch, rx) = watch(&[token.clone(), cert.clone()]);
        kubernetes_update(dir.path(), 2, &[("token", "two"), ("cert", "c1")]);
        assert_eq!(next(&rx), vec![absolute(&token)]);
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "two");
        kubernetes_update(dir.path(), 3, &[("token", "two"), ("cert", "c2")]);
        assert_eq!(next(&rx), vec![absolute(&cert)]);
    }

    #[test]
    fn a_link_into_another_directory_is_followed_there_and_moved_with() {
        let mount = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        std::fs::write(mount.path().join("key"), "k1").unwrap();
        std::fs::write(elsewhere.path().join("key"), "k9").unwrap();
        let link = config.path().join("key.pem");
        symlink(mount.path().join("key"), &link).unwrap();
        let (watch, rx) = watch(std::slice::from_ref(&link));
        assert!(
            watch.directories().contains(&absolute(mount.path())),
            "the link's target directory is watched: {:?}",
            watch.directories()
        );
        // A change in the target's directory, not the link's.
        std::fs::write(mount.path().join("key"), "k2").unwrap();
        assert_eq!(next(&rx), vec![absolute(&link)]);
        // The link is repointed: the watch follows it to the new directory.
        let tmp = config.path().join("key.pem.tmp");
        symlink(elsewhere.path().join("key"), &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert_eq!(next(&rx), vec![absolute(&link)]);
        std::fs::write(elsewhere.path().join("key"), "k10").unwrap();
        assert_eq!(next(&rx), vec![absolute(&link)]);
        assert!(watch.directories().contains(&absolute(elsewhere.path())));
    }

    #[test]
    fn events_that_change_no_watched_content_report_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "same").unwrap();
        let (_watch, rx) = watch(std::slice::from_ref(&token));
        std::fs::write(dir.path().join("unrelated"), "noise").unwrap();
        std::fs::write(&token, "same").unwrap();
        // Then a real change: the first report must be it, not the noise.
        std::fs::write(&token, "new").unwrap();
        assert_eq!(next(&rx), vec![absolute(&token)]);
        match rx.recv_timeout(DEBOUNCE * 10) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("one change, reported once; then {other:?}"),
        }
    }

    #[test]
    fn a_file_that_disappears_and_returns_is_reported_both_times() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "one").unwrap();
        let (_watch, rx) = watch(std::slice::from_ref(&token));
        std::fs::remove_file(&token).unwrap();
        assert_eq!(next(&rx), vec![absolute(&token)]);
        std::fs::write(&token, "one").unwrap();
        assert_eq!(next(&rx), vec![absolute(&token)]);
    }

    #[test]
    fn the_chain_of_directories_is_every_hop() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("file"), "x").unwrap();
        symlink(b.path().join("file"), a.path().join("hop")).unwrap();
        symlink("hop", a.path().join("start")).unwrap();
        let dirs = watched_dirs(&a.path().join("start"));
        let want: BTreeSet<PathBuf> = [absolute(a.path()), absolute(b.path())].into();
        assert_eq!(dirs, want);
    }
}
