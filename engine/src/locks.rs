//! Per-volume operation locks: one operation per volume at a time; a second one is told ABORTED
//! at once (CSI's "operation pending"), and different volumes never wait on each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Debug, Default, Clone)]
pub struct OperationLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct OperationGuard {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OperationLocks {
    pub fn try_lock(&self, key: &str) -> Result<OperationGuard> {
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !held.insert(key.to_owned()) {
            return Err(Error::Aborted(format!("an operation on {key} is already in progress; retry later")));
        }
        Ok(OperationGuard { held: Arc::clone(&self.held), key: key.to_owned() })
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        held.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_release() {
        let locks = OperationLocks::default();
        let guard = locks.try_lock("vol-a").unwrap();
        assert!(matches!(locks.try_lock("vol-a"), Err(Error::Aborted(_))));
        let other = locks.try_lock("vol-b").unwrap();
        drop(guard);
        let _again = locks.try_lock("vol-a").unwrap();
        drop(other);
    }
}
