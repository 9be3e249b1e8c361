//! The key-value operations ranks use to find each other before they exchange tensors (addresses
//! of the TCP data plane, the NCCL unique id, the request digest every rank must agree on).
//!
//! [`Rendezvous`] is what the communicators need; the TCP store served by rank 0 implements it for
//! processes, [`MemoryStore`] for threads of one process (and tests).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A key-value store shared by every rank of a job. Keys are UTF-8, values bytes.
pub trait Rendezvous: Send + Sync {
    /// Sets `key` (replacing any value) and wakes its waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// The value of `key`, waiting until some rank sets it; an error after `timeout` that names
    /// the key (and, for a remote store, its address).
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    /// Adds `delta` to the counter `key` (absent: 0) and returns the new value, atomically.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
}

/// A [`Rendezvous`] in this process's memory.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    cv: Condvar,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // The map is never left half-updated: a poisoned lock is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Rendezvous for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        self.cv.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut map = self.lock();
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm(format!(
                    "rendezvous: key {key:?} not set within {timeout:?}"
                )));
            }
            map = self
                .cv
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut map = self.lock();
        let cur = match map.get(key) {
            Some(v) => {
                let b: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                    Error::Comm(format!("rendezvous: key {key:?} does not hold a counter"))
                })?;
                i64::from_le_bytes(b)
            }
            None => 0,
        };
        let new = cur + delta;
        map.insert(key.to_string(), new.to_le_bytes().to_vec());
        drop(map);
        self.cv.notify_all();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_waits_counts_and_times_out() {
        let s = MemoryStore::new();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                s.set("a", b"x").unwrap();
            });
            assert_eq!(s.get("a", Duration::from_secs(5)).unwrap(), b"x");
        });
        assert_eq!(s.add("n", 2).unwrap(), 2);
        assert_eq!(s.add("n", 3).unwrap(), 5);
        let e = s.get("missing", Duration::from_millis(20)).unwrap_err();
        assert!(e.to_string().contains("\"missing\""), "{e}");
        assert!(s.add("a", 1).is_err(), "a non-counter value is refused");
    }
}
