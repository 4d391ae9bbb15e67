//! Watches files whose content matters (tokens, certificates, keys, plugin
//! components) and says when that content changes, however it was changed:
//! [`FileWatch`] for a fixed set of files, [`DirWatch`] for the entries of
//! a directory.
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

use notify_debouncer_mini::notify::{Event, EventHandler, EventKind, Watcher, WatcherKind};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer_opt, notify};
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
    /// Reads `path` (following links) and digests it. Only regular files
    /// are read: a named pipe would block the watcher.
    pub fn read(path: &Path) -> Content {
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Content::Unreadable("not a regular file".into()),
            Err(err) => return Content::Unreadable(err.kind().to_string()),
            Ok(_) => {}
        }
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

/// What one look at the watched things found: each thing's content, and
/// the directories to watch so that a change to any of them is seen.
struct Look<K> {
    contents: BTreeMap<K, Content>,
    dirs: BTreeSet<PathBuf>,
}

/// The platform's watcher without the events of files being only opened
/// or read. inotify reports every open and read-only close; a look reads
/// each watched file to digest it, so with them the watch set itself off
/// again after every look, and re-read and re-hashed every watched file
/// once per debounce period, forever (found by profiling a server: an
/// 18 MB Python plugin would have cost most of a core at rest). A write
/// that finishes (`Close(Write)`) and every other change still count.
pub struct ChangeWatcher(notify::RecommendedWatcher);

/// Whether an event may be a change of content or of a directory entry.
fn is_change(event: &Event) -> bool {
    !matches!(
        event.kind,
        EventKind::Access(
            notify::event::AccessKind::Open(_)
                | notify::event::AccessKind::Read
                | notify::event::AccessKind::Close(notify::event::AccessMode::Read)
                | notify::event::AccessKind::Close(notify::event::AccessMode::Execute)
        )
    )
}

impl Watcher for ChangeWatcher {
    fn new<F: EventHandler>(mut event_handler: F, config: notify::Config) -> notify::Result<Self> {
        let filtered = move |event: notify::Result<Event>| {
            if event.as_ref().map_or(true, is_change) {
                event_handler.handle_event(event);
            }
        };
        notify::RecommendedWatcher::new(filtered, config).map(ChangeWatcher)
    }

    fn watch(&mut self, path: &Path, recursive_mode: notify::RecursiveMode) -> notify::Result<()> {
        self.0.watch(path, recursive_mode)
    }

    fn unwatch(&mut self, path: &Path) -> notify::Result<()> {
        self.0.unwatch(path)
    }

    fn configure(&mut self, option: notify::Config) -> notify::Result<bool> {
        self.0.configure(option)
    }

    fn kind() -> WatcherKind {
        notify::RecommendedWatcher::kind()
    }
}

type Debounced = Arc<Mutex<Debouncer<ChangeWatcher>>>;

/// The machinery both watches share: a debounced notify watcher over a set
/// of directories that follows what `look` says, and a thread that, after
/// each burst of events, looks again and reports the keys whose content
/// changed (appeared and vanished included).
struct Core {
    debouncer: Debounced,
    watching: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl Core {
    fn start<K>(
        debounce: Duration,
        look: impl Fn() -> Look<K> + Send + 'static,
        mut on_change: impl FnMut(Vec<K>) + Send + 'static,
    ) -> notify::Result<Core>
    where
        K: Ord + Clone + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<()>();
        let config = notify_debouncer_mini::Config::default().with_timeout(debounce);
        let debouncer = new_debouncer_opt::<_, ChangeWatcher>(
            config,
            move |res: DebounceEventResult| match res {
                Ok(_) => {
                    let _ = tx.send(());
                }
                Err(err) => tracing::warn!(%err, "file watch error"),
            },
        )?;
        let core = Core {
            debouncer: Arc::new(Mutex::new(debouncer)),
            watching: Arc::new(Mutex::new(BTreeSet::new())),
        };
        let first = look();
        rewatch(
            &Arc::downgrade(&core.debouncer),
            &core.watching,
            &first.dirs,
        )?;
        let mut seen = first.contents;
        let weak = Arc::downgrade(&core.debouncer);
        let watching = Arc::clone(&core.watching);
        std::thread::Builder::new()
            .name("plinth-file-watch".into())
            .spawn(move || {
                // Ends when the debouncer (and with it the sender) is dropped.
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    let now = look();
                    if let Err(err) = rewatch(&weak, &watching, &now.dirs) {
                        tracing::warn!(%err, "file watch: following the links again");
                    }
                    let keys: BTreeSet<&K> = seen.keys().chain(now.contents.keys()).collect();
                    let changed: Vec<K> = keys
                        .into_iter()
                        .filter(|k| seen.get(*k) != now.contents.get(*k))
                        .cloned()
                        .collect();
                    seen = now.contents;
                    if !changed.is_empty() {
                        on_change(changed);
                    }
                }
            })?;
        Ok(core)
    }
}

/// Watches the directories in `wanted`, and stops watching those no longer
/// wanted. A directory that could not be watched is tried again next time.
fn rewatch(
    debouncer: &Weak<Mutex<Debouncer<ChangeWatcher>>>,
    watching: &Mutex<BTreeSet<PathBuf>>,
    wanted: &BTreeSet<PathBuf>,
) -> notify::Result<()> {
    let Some(debouncer) = debouncer.upgrade() else {
        return Ok(());
    };
    let mut watching = watching.lock();
    let mut debouncer = debouncer.lock();
    let watcher = debouncer.watcher();
    let mut result = Ok(());
    for dir in wanted.difference(&watching) {
        if let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            result = Err(err);
        }
    }
    for dir in watching.difference(wanted) {
        let _ = watcher.unwatch(dir);
    }
    *watching = wanted.iter().filter(|dir| dir.is_dir()).cloned().collect();
    result
}

/// Watches a set of files; stops when dropped.
pub struct FileWatch {
    core: Core,
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
        mut on_change: impl FnMut(&[PathBuf]) + Send + 'static,
    ) -> notify::Result<FileWatch> {
        let files: Vec<PathBuf> = files.into_iter().map(|f| absolute(&f)).collect();
        let watched = files.clone();
        let look = move || Look {
            contents: watched
                .iter()
                .map(|file| (file.clone(), Content::read(file)))
                .collect(),
            dirs: watched.iter().flat_map(|f| watched_dirs(f)).collect(),
        };
        let core = Core::start(debounce, look, move |changed: Vec<PathBuf>| {
            on_change(&changed)
        })?;
        Ok(FileWatch { core, files })
    }

    /// The files watched, as absolute paths.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The directories now watched.
    pub fn directories(&self) -> BTreeSet<PathBuf> {
        self.core.watching.lock().clone()
    }
}

/// Watches the entries of one directory by content: a new entry, a removed
/// one, an entry rewritten in place, and an entry that is a symlink whose
/// target changes (the Kubernetes `..data` swap of a mounted ConfigMap, or a
/// link into another directory) are all reported by name. Stops when dropped.
pub struct DirWatch {
    core: Core,
    dir: PathBuf,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DirWatch {
    /// Starts watching the entries of `dir` whose names pass `wanted`
    /// (hidden entries, such as Kubernetes' `..data`, never do). The
    /// current contents are the baseline; `on_change` runs on the watcher's
    /// thread with the names whose content changed.
    pub fn start(
        dir: impl Into<PathBuf>,
        debounce: Duration,
        wanted: impl Fn(&str) -> bool + Send + 'static,
        mut on_change: impl FnMut(&[String]) + Send + 'static,
    ) -> notify::Result<DirWatch> {
        let dir = absolute(&dir.into());
        let root = dir.clone();
        let look = move || {
            let mut contents = BTreeMap::new();
            let mut dirs = BTreeSet::from([root.clone()]);
            if let Ok(entries) = std::fs::read_dir(&root) {
                for entry in entries.flatten() {
                    let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if name.starts_with('.') || !wanted(&name) {
                        continue;
                    }
                    let path = entry.path();
                    dirs.extend(watched_dirs(&path));
                    contents.insert(name, Content::read(&path));
                }
            }
            Look { contents, dirs }
        };
        let core = Core::start(debounce, look, move |changed: Vec<String>| {
            on_change(&changed)
        })?;
        Ok(DirWatch { core, dir })
    }

    /// The directories now watched: `dir` and those its links lead into.
    pub fn directories(&self) -> BTreeSet<PathBuf> {
        self.core.watching.lock().clone()
    }
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

    /// Looks taken by a watch of `file` whose look reads and digests it, as
    /// the real ones do, counted.
    fn counted_looks(file: &Path) -> (Core, Arc<std::sync::atomic::AtomicUsize>) {
        let looks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counter, path) = (Arc::clone(&looks), file.to_path_buf());
        let core = Core::start(
            DEBOUNCE,
            move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Look {
                    contents: BTreeMap::from([(path.clone(), Content::read(&path))]),
                    dirs: watched_dirs(&path),
                }
            },
            |_: Vec<PathBuf>| {},
        )
        .expect("watch starts");
        (core, looks)
    }

    /// Reading a watched file is not a change, and a look (which reads
    /// every watched file) must not set off the next: once inotify's open
    /// and read-only close events counted, a watch re-read and re-hashed
    /// its files every debounce period for as long as it lived.
    #[test]
    fn reads_are_not_changes_and_a_look_does_not_set_off_another() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plugin.wasm");
        std::fs::write(&file, "v1").unwrap();
        let (_core, looks) = counted_looks(&file);
        let count = || looks.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(count(), 1, "the first look, at start");
        for _ in 0..20 {
            assert_eq!(std::fs::read(&file).unwrap(), b"v1");
            std::thread::sleep(DEBOUNCE / 5);
        }
        std::thread::sleep(DEBOUNCE * 10);
        assert_eq!(
            count(),
            1,
            "reads of the watched file made the watch look again"
        );
        // A real change is looked at, and then the watch rests.
        std::fs::write(&file, "v2").unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        while count() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the write was never looked at"
            );
            std::thread::sleep(DEBOUNCE);
        }
        std::thread::sleep(DEBOUNCE * 10);
        let settled = count();
        std::thread::sleep(DEBOUNCE * 20);
        assert_eq!(
            count(),
            settled,
            "the watch kept looking after the change was seen"
        );
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

    fn watch_dir(dir: &Path) -> (DirWatch, Receiver<Vec<String>>) {
        let (tx, rx) = mpsc::channel();
        let watch = DirWatch::start(
            dir,
            DEBOUNCE,
            |name| name.ends_with(".wasm") || name.ends_with(".toml"),
            move |changed| {
                let _ = tx.send(changed.to_vec());
            },
        )
        .expect("watch starts");
        (watch, rx)
    }

    fn next_names(rx: &Receiver<Vec<String>>) -> Vec<String> {
        rx.recv_timeout(PATIENCE)
            .unwrap_or_else(|err| panic!("no change reported within {PATIENCE:?}: {err}"))
    }

    #[test]
    fn a_directory_reports_entries_added_changed_and_removed_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wasm"), "a1").unwrap();
        let (_watch, rx) = watch_dir(dir.path());
        std::fs::write(dir.path().join("b.toml"), "b1").unwrap();
        assert_eq!(next_names(&rx), vec!["b.toml".to_owned()]);
        std::fs::write(dir.path().join("a.wasm"), "a2").unwrap();
        assert_eq!(next_names(&rx), vec!["a.wasm".to_owned()]);
        std::fs::remove_file(dir.path().join("b.toml")).unwrap();
        assert_eq!(next_names(&rx), vec!["b.toml".to_owned()]);
        // Unwanted names and hidden partial files are not reported.
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join(".a.wasm.partial"), "x").unwrap();
        std::fs::write(dir.path().join("a.wasm"), "a3").unwrap();
        assert_eq!(next_names(&rx), vec!["a.wasm".to_owned()]);
    }

    #[test]
    fn a_configmap_swap_reports_each_entry_whose_content_changed() {
        let dir = tempfile::tempdir().unwrap();
        kubernetes_update(
            dir.path(),
            1,
            &[
                ("router.wasm", "r1"),
                ("router.toml", "t1"),
                ("metrics.wasm", "m1"),
            ],
        );
        let (_watch, rx) = watch_dir(dir.path());
        kubernetes_update(
            dir.path(),
            2,
            &[
                ("router.wasm", "r2"),
                ("router.toml", "t2"),
                ("metrics.wasm", "m1"),
            ],
        );
        assert_eq!(
            next_names(&rx),
            vec!["router.toml".to_owned(), "router.wasm".to_owned()]
        );
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
