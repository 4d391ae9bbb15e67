//! Triton's system shared-memory extension, apart from any transport.
//!
//! A same-host client puts a tensor in a POSIX shared-memory object, registers
//! it as a named region, and then names the region (with an offset and a byte
//! size) in place of the tensor's bytes. This module holds the regions. Each
//! one is the client's object mapped into the server once, at registration.
//! Inputs are read in place: a request's tensor is a [`Bytes`] view of the
//! mapping that keeps it alive. Outputs are written straight into the mapping.
//!
//! The client owns the object and can shrink it at any time, even while a
//! request reads it. Touching a page past the end of a shrunken object raises
//! `SIGBUS`, which would kill the server. Two things prevent that:
//! - every use first checks the object's current size against the region;
//! - for a shrink that lands in the middle of a use, the [`guard`] catches the
//!   fault. It puts a zero page where the lost one was and marks the region
//!   damaged, and the request then fails with an error that names the region.
//!
//! Removing the object (`shm_unlink`) does not matter: the mapping keeps its
//! pages until the region is unregistered.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

use crate::error::Error;
use crate::tensor::Tensor;

/// The parameter names, as Triton's clients send them.
pub const REGION_PARAMETER: &str = "shared_memory_region";
pub const BYTE_SIZE_PARAMETER: &str = "shared_memory_byte_size";
pub const OFFSET_PARAMETER: &str = "shared_memory_offset";

/// What CUDA shared-memory calls answer until the server runs on a GPU.
pub const CUDA_UNIMPLEMENTED: &str = "CUDA shared memory is not supported by this server yet: it needs the CUDA execution path, which has not run on a GPU; use system shared memory (SystemSharedMemoryRegister) or send the tensors in the request";

/// The regions registered now, by name.
#[derive(Default)]
pub struct SharedMemory {
    regions: Mutex<BTreeMap<String, Arc<Region>>>,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory")
            .field("regions", &self.regions.lock().len())
            .finish()
    }
}

/// One region as Status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl SharedMemory {
    /// Maps `byte_size` bytes of the shared-memory object `key`, from
    /// `offset` on, as the region `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "shared memory region: field 'name' is empty".into(),
            ));
        }
        if self.regions.lock().contains_key(name) {
            return Err(Error::Conflict(format!(
                "shared memory region '{name}' is already registered; unregister it first"
            )));
        }
        let region = Region::map(name, key, offset, byte_size)?;
        let mut regions = self.regions.lock();
        if regions.contains_key(name) {
            return Err(Error::Conflict(format!(
                "shared memory region '{name}' is already registered; unregister it first"
            )));
        }
        regions.insert(name.to_owned(), Arc::new(region));
        tracing::debug!(
            region = name,
            key,
            offset,
            byte_size,
            "shared memory registered"
        );
        Ok(())
    }

    /// Forgets the region `name`, or every region for `None`. A region is
    /// unmapped once the requests using it now have finished. Unknown names
    /// are not an error (as Triton).
    pub fn unregister(&self, name: Option<&str>) {
        let mut regions = self.regions.lock();
        match name {
            Some(name) => {
                regions.remove(name);
            }
            None => regions.clear(),
        }
    }

    /// The region `name`, or every region for `None`.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, Error> {
        let regions = self.regions.lock();
        match name {
            Some(name) => regions
                .get(name)
                .map(|region| vec![region.status()])
                .ok_or_else(|| unknown(name)),
            None => Ok(regions.values().map(|region| region.status()).collect()),
        }
    }

    /// Where a tensor named in a request lives: `region` at `offset`, for
    /// `byte_size` bytes, checked against the region's bounds.
    pub fn place(
        &self,
        owner: &str,
        region: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<Placement, Error> {
        let region = self
            .regions
            .lock()
            .get(region)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("{owner}: {}", unknown(region))))?;
        let range = region.span(owner, offset, byte_size)?;
        Ok(Placement { region, range })
    }

    /// The request parameters naming a region, as both edges read them:
    /// `None` when the tensor is not in shared memory.
    pub fn placement(
        &self,
        owner: &str,
        region: Option<&str>,
        byte_size: Option<u64>,
        offset: Option<u64>,
    ) -> Result<Option<Placement>, Error> {
        match (region, byte_size) {
            (None, None) if offset.is_none() => Ok(None),
            (None, _) => Err(Error::InvalidArgument(format!(
                "{owner}: parameters '{BYTE_SIZE_PARAMETER}' and '{OFFSET_PARAMETER}' need '{REGION_PARAMETER}'"
            ))),
            (Some(_), None) => Err(Error::InvalidArgument(format!(
                "{owner}: parameter '{REGION_PARAMETER}' needs '{BYTE_SIZE_PARAMETER}'"
            ))),
            (Some(region), Some(byte_size)) => self
                .place(owner, region, offset.unwrap_or(0), byte_size)
                .map(Some),
        }
    }
}

fn unknown(name: &str) -> Error {
    Error::NotFound(format!("shared memory region '{name}' is not registered"))
}

/// The file a POSIX shared-memory name opens (what glibc's `shm_open` does:
/// leading slashes dropped, then a plain name under `/dev/shm`).
fn object_path(key: &str) -> Result<String, Error> {
    let name = key.trim_start_matches('/');
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!(
            "shared memory key {key:?} is not a POSIX shared-memory name (expected \"/name\" with no other '/')"
        )));
    }
    Ok(format!("/dev/shm/{name}"))
}

/// One registered region: the client's object, mapped.
pub struct Region {
    name: String,
    key: String,
    offset: u64,
    byte_size: usize,
    /// Dropped before `map`, so the guard stops answering for the range
    /// before it is unmapped.
    watched: guard::Watched,
    map: MmapRaw,
    /// Kept open to read the object's current size before every use.
    file: File,
}

impl Region {
    fn map(name: &str, key: &str, offset: u64, byte_size: u64) -> Result<Region, Error> {
        let refuse = |why: String| {
            Error::InvalidArgument(format!(
                "shared memory region '{name}' (key {key:?}): {why}"
            ))
        };
        let path = object_path(key)?;
        if byte_size == 0 {
            return Err(refuse("byte_size is 0".into()));
        }
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| refuse("offset + byte_size overflows".into()))?;
        let size = usize::try_from(byte_size)
            .map_err(|_| refuse(format!("byte_size {byte_size} does not fit in memory")))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| refuse(format!("cannot open it: {err}")))?;
        let held = file
            .metadata()
            .map_err(|err| refuse(format!("cannot read its size: {err}")))?
            .len();
        if held < end {
            return Err(refuse(format!(
                "the object holds {held} bytes; offset {offset} + byte_size {byte_size} runs past its end"
            )));
        }
        let map = MmapOptions::new()
            .offset(offset)
            .len(size)
            .map_raw(&file)
            .map_err(|err| refuse(format!("cannot map it: {err}")))?;
        let watched = guard::Watched::new(map.as_ptr(), size).ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "shared memory region '{name}': {} regions are registered, the most this server holds",
                guard::SLOTS
            ))
        })?;
        Ok(Region {
            name: name.to_owned(),
            key: key.to_owned(),
            offset,
            byte_size: size,
            watched,
            map,
            file,
        })
    }

    fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            key: self.key.clone(),
            offset: self.offset,
            byte_size: self.byte_size as u64,
        }
    }

    /// The bytes `[offset, offset + byte_size)` of the region, or why not.
    fn span(&self, owner: &str, offset: u64, byte_size: u64) -> Result<Range<usize>, Error> {
        let end = offset.checked_add(byte_size);
        match end {
            Some(end) if end <= self.byte_size as u64 => Ok(offset as usize..end as usize),
            _ => Err(Error::InvalidArgument(format!(
                "{owner}: shared memory region '{}' holds {} bytes; offset {offset} + byte size {byte_size} runs past its end",
                self.name, self.byte_size
            ))),
        }
    }

    /// Fails if the object has shrunk below the region, or shrank while a
    /// request used it.
    pub fn check(&self) -> Result<(), Error> {
        if self.watched.damaged() {
            return Err(Error::FailedPrecondition(format!(
                "shared memory region '{}' (key {:?}) shrank while the server used it; unregister it and register it again",
                self.name, self.key
            )));
        }
        let held = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let end = self.offset + self.byte_size as u64;
        if held < end {
            return Err(Error::FailedPrecondition(format!(
                "shared memory region '{}' (key {:?}): the object holds {held} bytes now, fewer than the {end} it was registered with",
                self.name, self.key
            )));
        }
        Ok(())
    }
}

/// A tensor's place in a region, bounds-checked.
#[derive(Clone)]
pub struct Placement {
    region: Arc<Region>,
    range: Range<usize>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{:?}]", self.region.name, self.range)
    }
}

impl PartialEq for Placement {
    fn eq(&self, other: &Placement) -> bool {
        Arc::ptr_eq(&self.region, &other.region) && self.range == other.range
    }
}

impl Placement {
    pub fn region(&self) -> &str {
        &self.region.name
    }

    /// The bytes in place: no copy, and the mapping lives while they do.
    pub fn read(&self) -> Result<Bytes, Error> {
        self.region.check()?;
        Ok(Bytes::from_owner(View(self.clone())))
    }

    /// Writes an output's bytes at the start of its place.
    pub fn write(&self, tensor: &Tensor) -> Result<(), Error> {
        let data = tensor.data();
        if data.len() > self.range.len() {
            return Err(Error::InvalidArgument(format!(
                "output '{}': needs {} bytes, but its shared memory byte size in region '{}' is {}",
                tensor.name(),
                data.len(),
                self.region.name,
                self.range.len()
            )));
        }
        self.region.check()?;
        // SAFETY: `range` was checked against the mapping's length when the
        // placement was made, and `data.len()` fits in it (checked above), so
        // every byte written is inside the mapping, which `self.region` keeps
        // mapped. The mapping is MAP_SHARED and writable; another process may
        // write the same bytes at the same time, which gives the client torn
        // values, never the server a fault, and `data` is the server's own
        // memory, so the two cannot overlap. A page lost to a concurrent
        // shrink is replaced by the guard, and `check` below reports it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.region.map.as_mut_ptr().add(self.range.start),
                data.len(),
            );
        }
        self.region.check()
    }

    /// After a request: fails if its region shrank while it was in use.
    pub fn check(&self) -> Result<(), Error> {
        self.region.check()
    }
}

/// A placement's bytes, owned by the region's mapping.
struct View(Placement);

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        let Placement { region, range } = &self.0;
        // SAFETY: `range` lies inside the mapping (checked when the placement
        // was made) and the mapping stays until the last `Arc<Region>`, held
        // here, is dropped. The bytes are shared with the client process,
        // which may change them while the server reads: the protocol makes
        // that the client's contract (it must not touch a region while a
        // request using it runs), and a client that breaks it gets wrong
        // answers, never a server fault. A page lost to a shrink reads as
        // zeros (the guard) and the request fails afterwards.
        unsafe { std::slice::from_raw_parts(region.map.as_ptr().add(range.start), range.len()) }
    }
}

/// Keeps a client's shrink of a mapped object from killing the server.
///
/// The handler answers `SIGBUS` faults inside a registered range by mapping
/// a private zero page over the faulting page and marking the region; the
/// faulting access then completes on zeros. Any other `SIGBUS` goes to the
/// handler installed before this one (wasmtime's, say), or to the default
/// action. The ranges live in a fixed table of atomics, which the handler
/// may read; it takes no lock and allocates nothing.
mod guard {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Once, OnceLock};

    /// The most regions registered at once.
    pub const SLOTS: usize = 4096;

    struct Slot {
        claimed: AtomicBool,
        start: AtomicUsize,
        len: AtomicUsize,
        damaged: AtomicBool,
    }

    static TABLE: [Slot; SLOTS] = [const {
        Slot {
            claimed: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            damaged: AtomicBool::new(false),
        }
    }; SLOTS];
    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static INSTALL: Once = Once::new();

    /// A range the handler answers for, until dropped.
    pub struct Watched(usize);

    impl Watched {
        pub fn new(start: *const u8, len: usize) -> Option<Watched> {
            install();
            let idx = TABLE.iter().position(|slot| {
                slot.claimed
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })?;
            let slot = &TABLE[idx];
            slot.damaged.store(false, Ordering::Relaxed);
            slot.len.store(len, Ordering::Release);
            slot.start.store(start as usize, Ordering::Release);
            Some(Watched(idx))
        }

        pub fn damaged(&self) -> bool {
            TABLE[self.0].damaged.load(Ordering::Acquire)
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            let slot = &TABLE[self.0];
            slot.start.store(0, Ordering::Release);
            slot.len.store(0, Ordering::Release);
            slot.claimed.store(false, Ordering::Release);
        }
    }

    fn install() {
        INSTALL.call_once(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if let Ok(page) = usize::try_from(page) {
                PAGE.store(page, Ordering::Relaxed);
            }
            // SAFETY: a zeroed `sigaction` is a valid value of that plain C
            // struct; the fields set are the ones sigaction(2) reads for an
            // SA_SIGINFO handler, and `previous` receives the old action.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                    let _ = PREVIOUS.set(previous);
                } else {
                    tracing::warn!(
                        "shared memory: cannot install the SIGBUS guard; a client that shrinks a registered object can crash the server"
                    );
                }
            }
        });
    }

    extern "C" fn on_sigbus(
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for slot in &TABLE {
            let start = slot.start.load(Ordering::Acquire);
            if start == 0 || addr < start || addr - start >= slot.len.load(Ordering::Acquire) {
                continue;
            }
            let at = addr & !(page - 1);
            // SAFETY: `at` is a page of a mapping this module made and still
            // holds (a slot is cleared before its mapping is unmapped, and
            // the faulting access holds the region alive). MAP_FIXED
            // replaces that one page with a private zero page; nothing else
            // in the address space is touched. mmap is a plain system call.
            let mapped = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                slot.damaged.store(true, Ordering::Release);
                return;
            }
        }
        chain(signal, info, context);
    }

    /// Hands a fault that is not a region's to whoever had SIGBUS before.
    fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
        match PREVIOUS.get() {
            Some(previous)
                if previous.sa_sigaction != libc::SIG_DFL
                    && previous.sa_sigaction != libc::SIG_IGN =>
            {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    // SAFETY: with SA_SIGINFO set, `sa_sigaction` is a
                    // three-argument handler, called as the kernel would.
                    let handler: extern "C" fn(
                        libc::c_int,
                        *mut libc::siginfo_t,
                        *mut libc::c_void,
                    ) = unsafe { std::mem::transmute(previous.sa_sigaction) };
                    handler(signal, info, context);
                } else {
                    // SAFETY: without SA_SIGINFO it is a one-argument handler.
                    let handler: extern "C" fn(libc::c_int) =
                        unsafe { std::mem::transmute(previous.sa_sigaction) };
                    handler(signal);
                }
            }
            _ => {
                // Nobody else's either: restore the default action, which the
                // faulting access meets again when the handler returns.
                // SAFETY: as in `install`; SIG_DFL needs no handler.
                unsafe {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    /// A shared-memory object of `size` bytes, removed when dropped.
    struct Object(String);

    impl Object {
        fn new(tag: &str, size: u64) -> Object {
            let key = format!("/plinth-test-{tag}-{}", std::process::id());
            let file = File::create(object_path(&key).unwrap()).unwrap();
            file.set_len(size).unwrap();
            Object(key)
        }

        fn file(&self) -> File {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(object_path(&self.0).unwrap())
                .unwrap()
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(object_path(&self.0).unwrap());
        }
    }

    #[test]
    fn inputs_are_read_in_place_and_outputs_written_in_place() {
        let object = Object::new("rw", 64);
        std::os::unix::fs::FileExt::write_all_at(&object.file(), &2f32.to_le_bytes(), 8).unwrap();
        let shm = SharedMemory::default();
        shm.register("r", &object.0, 0, 64).unwrap();
        let placed = shm
            .placement("input 'x'", Some("r"), Some(4), Some(8))
            .unwrap()
            .unwrap();
        let bytes = placed.read().unwrap();
        assert_eq!(&bytes[..], &2f32.to_le_bytes());
        let out = shm.place("output 'y'", "r", 16, 8).unwrap();
        let tensor = Tensor::from_f32("y", vec![2], &[5.0, 6.0]).unwrap();
        out.write(&tensor).unwrap();
        let mut back = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&object.file(), &mut back, 16).unwrap();
        assert_eq!(back[..4], 5f32.to_le_bytes());
        assert_eq!(back[4..], 6f32.to_le_bytes());
        // Status, a second register under the same name, unregister.
        assert_eq!(shm.status(None).unwrap()[0].byte_size, 64);
        let again = shm.register("r", &object.0, 0, 64).unwrap_err();
        assert!(matches!(again, Error::Conflict(_)), "{again}");
        shm.unregister(Some("r"));
        assert!(matches!(shm.status(Some("r")), Err(Error::NotFound(_))));
        // The view still reads: the mapping lives while it does.
        assert_eq!(&bytes[..], &2f32.to_le_bytes());
    }

    #[test]
    fn every_place_is_bounds_checked() {
        let object = Object::new("bounds", 4096);
        let shm = SharedMemory::default();
        let past = shm
            .register("r", &object.0, 4000, 200)
            .unwrap_err()
            .to_string();
        assert!(
            past.contains("holds 4096 bytes; offset 4000 + byte_size 200"),
            "{past}"
        );
        let zero = shm.register("r", &object.0, 0, 0).unwrap_err().to_string();
        assert!(zero.contains("byte_size is 0"), "{zero}");
        let key = shm.register("r", "/a/b", 0, 4).unwrap_err().to_string();
        assert!(key.contains("not a POSIX shared-memory name"), "{key}");
        let missing = shm
            .register("r", "/plinth-no-such-object", 0, 4)
            .unwrap_err();
        assert!(missing.to_string().contains("cannot open it"), "{missing}");
        shm.register("r", &object.0, 96, 100).unwrap();
        let over = shm.place("input 'x'", "r", 96, 8).unwrap_err().to_string();
        assert_eq!(
            over,
            "input 'x': shared memory region 'r' holds 100 bytes; offset 96 + byte size 8 runs past its end"
        );
        let wrap = shm.place("input 'x'", "r", u64::MAX, 2).unwrap_err();
        assert!(matches!(wrap, Error::InvalidArgument(_)), "{wrap}");
        let half = shm
            .placement("input 'x'", Some("r"), None, None)
            .unwrap_err();
        assert!(
            half.to_string().contains("needs 'shared_memory_byte_size'"),
            "{half}"
        );
        let nobody = shm.place("input 'x'", "q", 0, 4).unwrap_err().to_string();
        assert_eq!(
            nobody,
            "input 'x': shared memory region 'q' is not registered"
        );
        let small = shm.place("output 'y'", "r", 0, 4).unwrap();
        let tensor = Tensor::new("y", DType::F32, vec![2], Bytes::from(vec![0u8; 8])).unwrap();
        let err = small.write(&tensor).unwrap_err().to_string();
        assert!(
            err.contains("needs 8 bytes") && err.contains("is 4"),
            "{err}"
        );
    }

    #[test]
    fn an_object_that_shrinks_under_the_server_is_an_error_not_a_crash() {
        let page = 4096u64;
        let object = Object::new("shrink", 4 * page);
        let shm = SharedMemory::default();
        shm.register("r", &object.0, 0, 4 * page).unwrap();
        let placed = shm.place("input 'x'", "r", 0, 4 * page).unwrap();
        let view = placed.read().unwrap();
        // The client truncates while the view is held: touching the lost
        // pages would raise SIGBUS; the guard turns them into zeros.
        object.file().set_len(page).unwrap();
        let sum: u64 = view.iter().map(|b| u64::from(*b)).sum();
        assert_eq!(sum, 0);
        let err = placed.check().unwrap_err().to_string();
        assert!(err.contains("shrank while the server used it"), "{err}");
        // Before any use, the size check catches it without a fault.
        let other = Object::new("shrunk", 2 * page);
        shm.register("s", &other.0, 0, 2 * page).unwrap();
        other.file().set_len(page).unwrap();
        let err = shm
            .place("input 'x'", "s", 0, 8)
            .unwrap()
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("holds 4096 bytes now"), "{err}");
    }
}
