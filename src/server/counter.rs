//! Counts of things in progress (connections open, requests in flight),
//! each held by a [`Registration`] guard, so no path can forget to give
//! it back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A number of things in progress.
#[derive(Debug, Default)]
pub struct Counter(AtomicUsize);

impl Counter {
    /// How many right now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one more until the guard is dropped.
    pub fn register(self: &Arc<Counter>) -> Registration {
        self.0.fetch_add(1, Ordering::SeqCst);
        Registration(self.clone())
    }
}

/// One counted thing; dropping it counts it out.
#[derive(Debug)]
pub struct Registration(Arc<Counter>);

impl Drop for Registration {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a lock even if a thread panicked while holding it: what the
/// server locks (counters, the current connection) is always left
/// consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_count_in_and_out() {
        let c = Arc::new(Counter::default());
        let a = c.register();
        let b = c.register();
        assert_eq!(c.get(), 2);
        drop(a);
        assert_eq!(c.get(), 1);
        drop(b);
        assert_eq!(c.get(), 0);
    }
}
