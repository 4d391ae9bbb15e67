//! Fiber stacks for the orchestrators' async calls, kept for reuse.
//!
//! With the on-demand instance allocator, every async call into a guest
//! maps a fresh native stack and unmaps it when the call ends: two system
//! calls and the page faults of a new mapping, on every orchestrated
//! request. [`StackCache`] hands wasmtime stacks from a free list instead;
//! a stack whose call has ended goes back on the list (up to [`KEPT`]), and
//! only stacks beyond that are unmapped.
//!
//! A reused stack holds the host frames of an earlier call. Guests cannot
//! read native stacks (that is the sandbox), so nothing crosses between
//! plugins; when wasmtime asks for a zeroed stack (`async_stack_zeroing`),
//! the stack is zeroed before it is handed out.

use std::ops::Range;
use std::sync::Arc;

use memmap2::MmapMut;
use parking_lot::Mutex;
use wasmtime::{StackCreator, StackMemory};

/// Stacks kept for reuse; more are unmapped when their call ends.
pub const KEPT: usize = 64;

/// One mapping: a guard page at the bottom, then the stack.
struct Mapped {
    map: MmapMut,
    guard: usize,
}

impl Mapped {
    fn new(size: usize, guard: usize) -> wasmtime::Result<Mapped> {
        let mut map = MmapMut::map_anon(size + guard)?;
        // SAFETY: the first `guard` bytes are inside this fresh anonymous
        // mapping, which nothing else references yet; making them
        // inaccessible turns a stack overflow into a fault that wasmtime
        // reports, rather than a write into other memory.
        let protected = unsafe { libc::mprotect(map.as_mut_ptr().cast(), guard, libc::PROT_NONE) };
        if protected != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Mapped { map, guard })
    }

    fn size(&self) -> usize {
        self.map.len() - self.guard
    }
}

/// The creator wasmtime's config holds (`Config::with_host_stack`).
pub struct StackCache {
    free: Arc<Mutex<Vec<Mapped>>>,
    page: usize,
}

impl StackCache {
    pub fn new() -> StackCache {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        StackCache {
            free: Arc::new(Mutex::new(Vec::new())),
            page: usize::try_from(page).unwrap_or(4096),
        }
    }

    /// Stacks waiting for reuse now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free.lock().len()
    }
}

// SAFETY: every stack handed out is a page-aligned anonymous mapping of
// whole pages, with an inaccessible guard page below it, owned by the
// returned `Cached` alone until wasmtime drops it (only then does it go
// back on the free list, so no two calls ever share a stack).
unsafe impl StackCreator for StackCache {
    fn new_stack(&self, size: usize, zeroed: bool) -> wasmtime::Result<Box<dyn StackMemory>> {
        let size = size.div_ceil(self.page) * self.page;
        let reused = {
            let mut free = self.free.lock();
            let at = free.iter().rposition(|m| m.size() == size);
            at.map(|at| free.swap_remove(at))
        };
        let mut mapped = match reused {
            Some(mapped) => mapped,
            None => Mapped::new(size, self.page)?,
        };
        if zeroed {
            let guard = mapped.guard;
            mapped.map[guard..].fill(0);
        }
        Ok(Box::new(Cached {
            mapped: Some(mapped),
            free: Arc::clone(&self.free),
        }))
    }
}

/// A stack in use; back on the free list when wasmtime drops it.
struct Cached {
    mapped: Option<Mapped>,
    free: Arc<Mutex<Vec<Mapped>>>,
}

impl Cached {
    fn mapped(&self) -> &Mapped {
        self.mapped.as_ref().expect("present until dropped")
    }
}

impl Drop for Cached {
    fn drop(&mut self) {
        if let Some(mapped) = self.mapped.take() {
            let mut free = self.free.lock();
            if free.len() < KEPT {
                free.push(mapped);
            }
        }
    }
}

// SAFETY: the addresses are those of the mapping this value owns, which
// lives (mapped, never moved: an mmap does not move) until it is dropped.
unsafe impl StackMemory for Cached {
    fn top(&self) -> *mut u8 {
        let map = &self.mapped().map;
        // One past the end of the mapping: the stack grows down from here.
        map.as_ptr().wrapping_add(map.len()).cast_mut()
    }

    fn range(&self) -> Range<usize> {
        let mapped = self.mapped();
        let base = mapped.map.as_ptr() as usize;
        base + mapped.guard..base + mapped.map.len()
    }

    fn guard_range(&self) -> Range<*mut u8> {
        let mapped = self.mapped();
        let base = mapped.map.as_ptr().cast_mut();
        base..base.wrapping_add(mapped.guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_whose_call_ended_is_handed_out_again() {
        let cache = StackCache::new();
        let first = cache.new_stack(64 * 1024, false).unwrap();
        let top = first.top();
        let range = first.range();
        assert_eq!(range.len(), 64 * 1024);
        assert_eq!(first.guard_range().end as usize, range.start);
        drop(first);
        assert_eq!(cache.kept(), 1);
        let again = cache.new_stack(64 * 1024, true).unwrap();
        assert_eq!(again.top(), top, "the same mapping, reused");
        assert_eq!(cache.kept(), 0);
        // Two calls at once get two stacks.
        let other = cache.new_stack(64 * 1024, false).unwrap();
        assert_ne!(other.top(), again.top());
        drop((again, other));
        assert_eq!(cache.kept(), 2);
    }
}
