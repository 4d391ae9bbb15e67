//! The process-wide compute budget: at most `limit` cores' worth of forward
//! passes run at once, however many models and executors there are.
//!
//! What is computing (and its peak) is counted where the passes run, by the
//! executor's `ThreadCounters`; the budget only limits it.
//!
//! Each executor thread asks for as many cores as it runs intra-op threads
//! before a forward pass and gives them back after it, so N models × M torch
//! threads can no longer oversubscribe the machine: a pass that does not fit
//! waits for one that does to finish.

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
pub struct ComputeBudget {
    limit: usize,
    in_use: Mutex<usize>,
    freed: Condvar,
}

/// Cores held for one forward pass; given back when dropped.
#[derive(Debug)]
#[must_use = "the cores are given back when the guard is dropped"]
pub struct Cores<'a> {
    budget: &'a ComputeBudget,
    n: usize,
}

impl ComputeBudget {
    /// A budget of `limit` cores (at least one).
    pub fn new(limit: usize) -> ComputeBudget {
        ComputeBudget {
            limit: limit.max(1),
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Cores held by running forward passes now.
    pub fn in_use(&self) -> usize {
        *self.in_use.lock()
    }

    /// `requested` clamped into `1..=limit`: what an executor may run.
    pub fn clamp(&self, requested: usize) -> usize {
        requested.clamp(1, self.limit)
    }

    /// Blocks the calling (executor) thread until `n` cores are free, then
    /// holds them. `n` is clamped to the budget, so it always fits eventually.
    pub fn acquire(&self, n: usize) -> Cores<'_> {
        let n = self.clamp(n);
        let mut in_use = self.in_use.lock();
        while *in_use + n > self.limit {
            self.freed.wait(&mut in_use);
        }
        *in_use += n;
        Cores { budget: self, n }
    }
}

impl ComputeBudget {
    /// Holds `n` cores if they are free now; never waits.
    pub fn try_acquire(&self, n: usize) -> Option<Cores<'_>> {
        let n = self.clamp(n);
        let mut in_use = self.in_use.lock();
        if *in_use + n > self.limit {
            return None;
        }
        *in_use += n;
        Some(Cores { budget: self, n })
    }
}

impl Drop for Cores<'_> {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock();
        *in_use -= self.n;
        drop(in_use);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn requests_are_clamped_into_the_budget() {
        let budget = ComputeBudget::new(2);
        let check = |requested: usize, expect: usize| assert_eq!(budget.clamp(requested), expect);
        check(0, 1);
        check(1, 1);
        check(2, 2);
        check(16, 2);
        assert_eq!(ComputeBudget::new(0).limit(), 1);
    }

    #[test]
    fn a_pass_that_does_not_fit_waits_for_cores_to_come_back() {
        let budget = Arc::new(ComputeBudget::new(2));
        let held = budget.acquire(2);
        assert_eq!(budget.in_use(), 2);
        let started = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (budget, started) = (Arc::clone(&budget), Arc::clone(&started));
            std::thread::spawn(move || {
                let _cores = budget.acquire(1);
                started.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot have started: both cores are held.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!started.load(Ordering::SeqCst));
        drop(held);
        waiter.join().unwrap();
        assert!(started.load(Ordering::SeqCst));
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn try_acquire_takes_only_free_cores() {
        let budget = ComputeBudget::new(2);
        let one = budget.try_acquire(1).expect("a free core");
        let two = budget.try_acquire(1).expect("the second core");
        assert!(budget.try_acquire(1).is_none());
        drop(one);
        assert!(budget.try_acquire(2).is_none());
        drop(two);
        assert_eq!(budget.in_use(), 0);
    }
}
