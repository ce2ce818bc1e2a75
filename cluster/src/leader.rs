//! Leader election on a coordination.k8s.io Lease: only the holder acts; a standby takes over
//! once the holder has not renewed for a whole lease duration. Renewals replace the Lease with
//! its resourceVersion, so two candidates can never both win.
//!
//! As in client-go, the holder gives up at its *renew deadline*, a third shorter than the lease
//! duration, counted from the start of its last successful renewal, whether or not the API
//! answers: every call is bounded by that deadline, so a leader whose connection stalls stops
//! acting before a standby can see the lease expire (the remaining third absorbs clock skew
//! between the two and the time the caller needs to stop).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Proof of leadership: when the winning (or last successful) attempt started.
#[derive(Debug, Clone, Copy)]
pub struct Leadership {
    renewed_at: Instant,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElection {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How long a lease stays valid without renewal (what standbys wait for).
    pub fn lease_duration(&self) -> Duration {
        self.duration
    }

    /// How long after its last successful renewal the leader stops acting: two thirds of the
    /// lease duration (client-go's defaults: 10 s of 15 s).
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Time between attempts (several fit in one renew deadline).
    pub fn retry_period(&self) -> Duration {
        self.duration / 6
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or_else(|| Some(now())),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to become or stay leader. `Ok(true)`: we hold the lease now. Unbounded: the
    /// callers below bound it.
    pub async fn try_acquire_or_renew(&self) -> kube::Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
            let expired = spec.renew_time.as_ref().is_none_or(|t| t.0 + duration < Timestamp::now());
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            self.spec(transitions + 1, None)
        };
        lease.spec = Some(new_spec);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate leads. Each attempt is bounded by the renew deadline, so a
    /// stalled connection only delays the next attempt.
    pub async fn acquire(&self) -> Leadership {
        loop {
            let started = Instant::now();
            match timeout_at(started + self.renew_deadline(), self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                    return Leadership { renewed_at: started };
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "leader election attempt failed"),
                Err(_) => tracing::warn!("leader election attempt timed out"),
            }
            sleep(self.retry_period()).await;
        }
    }

    /// Keeps renewing; returns when leadership is lost: another holder took the lease, or no
    /// renewal succeeded within the renew deadline. It returns at that deadline even when an
    /// API call is still hanging — the caller must stop acting at once.
    pub async fn hold(&self, leadership: Leadership) {
        let mut renewed_at = leadership.renewed_at;
        loop {
            let deadline = renewed_at + self.renew_deadline();
            sleep_until((Instant::now() + self.retry_period()).min(deadline)).await;
            let started = Instant::now();
            match timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed_at = started,
                Ok(Ok(false)) => {
                    tracing::warn!(identity = %self.identity, "another candidate holds the lease now");
                    return;
                }
                Ok(Err(error)) => tracing::warn!(%error, "renewing the lease failed"),
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    identity = %self.identity,
                    renew_deadline_ms = self.renew_deadline().as_millis() as u64,
                    "no successful lease renewal within the renew deadline; stepping down"
                );
                return;
            }
        }
    }

    /// Gives the lease up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&self) {
        let attempt = async {
            if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
                && lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str())
            {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                }
                let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
            }
        };
        let _ = tokio::time::timeout(self.renew_deadline(), attempt).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A fake apiserver for one Lease: GETs are answered from memory; PUTs are answered while
    /// `answer_puts` allows, then hang forever (a stalled connection).
    #[derive(Clone, Default)]
    struct FakeApi {
        lease: Arc<Mutex<Option<serde_json::Value>>>,
        answered_puts: Arc<Mutex<Vec<Instant>>>,
        answer_puts: usize,
    }

    impl FakeApi {
        async fn handle(self, request: http::Request<kube::client::Body>) -> http::Response<kube::client::Body> {
            use http_body_util::BodyExt;
            let method = request.method().clone();
            let body = request.into_body().collect().await.expect("request body").to_bytes();
            let stored = self.lease.lock().unwrap().clone();
            let reply = |status: u16, value: serde_json::Value| {
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap()
            };
            let not_found = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": "leases \"plinth-controller\" not found",
            });
            match method.as_str() {
                "GET" => match stored {
                    Some(lease) => reply(200, lease),
                    None => reply(404, not_found),
                },
                "POST" | "PUT" => {
                    if method == "PUT" && self.answered_puts.lock().unwrap().len() >= self.answer_puts {
                        return std::future::pending().await;
                    }
                    let mut lease: serde_json::Value = serde_json::from_slice(&body).expect("a Lease");
                    lease["metadata"]["resourceVersion"] = serde_json::json!("1");
                    *self.lease.lock().unwrap() = Some(lease.clone());
                    if method == "PUT" {
                        self.answered_puts.lock().unwrap().push(Instant::now());
                    }
                    reply(200, lease)
                }
                other => panic!("unexpected {other}"),
            }
        }

        fn client(&self) -> kube::Client {
            let fake = self.clone();
            let service = tower::service_fn(move |request| {
                let fake = fake.clone();
                async move { Ok::<_, std::convert::Infallible>(fake.handle(request).await) }
            });
            kube::Client::new(service, "plinth-system")
        }
    }

    /// The leader's renewals stop being answered (the connection stalls, nothing errors): it
    /// must step down by its renew deadline — before a standby could take the lease over.
    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_steps_down_before_the_lease_expires() {
        let fake = FakeApi { answer_puts: 2, ..Default::default() };
        let duration = Duration::from_secs(15);
        let election = LeaderElection::new(fake.client(), "plinth-system", "plinth-controller", "a", duration);
        let leadership = election.acquire().await;
        let held = tokio::time::timeout(duration * 4, election.hold(leadership)).await;
        assert!(held.is_ok(), "hold() never returned while its renewals hung: the leader would act on forever");
        let stepped_down = Instant::now();
        let answered = fake.answered_puts.lock().unwrap().clone();
        assert_eq!(answered.len(), 2, "two renewals were answered before the stall");
        let last_renewal = *answered.last().unwrap();
        let leader_for = stepped_down - last_renewal;
        assert!(
            leader_for <= election.renew_deadline(),
            "stepped down {leader_for:?} after the last renewal, past the renew deadline"
        );
        assert!(leader_for < duration, "a standby may take the lease {duration:?} after the last renewal");
    }

    /// Renewals that keep succeeding keep the lease: hold() does not return on its own.
    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_succeed_keeps_leading() {
        let fake = FakeApi { answer_puts: usize::MAX, ..Default::default() };
        let election =
            LeaderElection::new(fake.client(), "plinth-system", "plinth-controller", "a", Duration::from_secs(15));
        let leadership = election.acquire().await;
        let held = tokio::time::timeout(Duration::from_secs(120), election.hold(leadership)).await;
        assert!(held.is_err(), "hold() returned although every renewal succeeded");
        assert!(fake.answered_puts.lock().unwrap().len() >= 120 / 3, "renewed every retry period");
    }
}
