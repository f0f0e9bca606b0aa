//! One policy for a poisoned mutex, used by every lock in the crate.
//!
//! A mutex is poisoned when a thread panicked while holding it. The state
//! behind nixmesh's locks (the peer table, connection caches, memo tables,
//! the prefetch table, idle DB connections) is plain data updated in
//! single statements, so what a panicking holder left is still usable. The
//! agent carries on with it and says so once, loudly: a poisoned peer table
//! must never quietly look empty, and one panic must not take down every
//! request after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

static REPORTED: AtomicBool = AtomicBool::new(false);

/// Locks `mutex`, recovering its data if a panicking thread poisoned it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        if !REPORTED.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "a thread panicked while holding a lock; carrying on with the data it left \
                 (this is a bug: please report it with the log above)"
            );
        }
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_keeps_its_data() {
        let m = std::sync::Arc::new(Mutex::new(vec![1, 2, 3]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            g.push(4);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2, 3, 4]);
        lock(&m).push(5);
        assert_eq!(lock(&m).len(), 5);
    }
}
