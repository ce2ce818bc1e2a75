//! Per-object exponential backoff for the reconcilers' error retries: the first retry of an
//! object comes quickly, each further failure of the same object doubles the wait up to a cap,
//! and a successful reconcile starts it over. A failing object then costs the API server (and
//! the node) little, while an object that fails once — a lost write race, a node agent that
//! restarted — is retried at once. kube-runtime's `error_policy` gets the error and the object
//! but keeps no history, so the history lives here, keyed by the object's reference.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, failures: Mutex::new(HashMap::new()) }
    }

    /// The delay after the `n`th consecutive failure (n ≥ 1): base · 2ⁿ⁻¹, at most the cap.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
        ObjectRef::from_obj(object).to_string()
    }

    /// Records one more failure of `object`; returns how long to wait before the next attempt.
    pub fn failed<K: Resource<DynamicType = ()>>(&self, object: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(Self::key(object)).or_insert(0);
        *count = count.saturating_add(1);
        self.delay(*count)
    }

    /// The requeue for a failed reconcile of `object`.
    pub fn requeue<K: Resource<DynamicType = ()>>(&self, object: &K) -> Action {
        Action::requeue(self.failed(object))
    }

    /// `object` reconciled: its next failure waits the base delay again.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, object: &K) {
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.remove(&Self::key(object));
    }

    /// Clears the history of `object` on success and returns the result unchanged.
    pub fn observe<K: Resource<DynamicType = ()>, T, E>(&self, object: &K, result: Result<T, E>) -> Result<T, E> {
        if result.is_ok() {
            self.succeeded(object);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;

    use super::*;

    fn claim(name: &str) -> PersistentVolumeClaim {
        let mut claim = PersistentVolumeClaim::default();
        claim.metadata.name = Some(name.into());
        claim.metadata.namespace = Some("default".into());
        claim
    }

    #[test]
    fn doubles_per_object_up_to_the_cap_and_resets_on_success() {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let (a, b) = (claim("a"), claim("b"));
        let delays: Vec<u128> = (0..9).map(|_| backoff.failed(&a).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(backoff.failed(&b), Duration::from_millis(500), "another object has its own history");
        backoff.succeeded(&a);
        assert_eq!(backoff.failed(&a), Duration::from_millis(500), "success starts over");
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(30), "never overflows");
    }
}
