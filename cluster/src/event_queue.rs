//! Events the controller raises, written in the background and after the work they describe.
//!
//! An event is for people; a claim's binding is what a workload waits for. Both cost the API
//! server the same, and under a burst of claims the API server is what everything waits for, so
//! events wait while the claim reconciler is busy and are written once it has been idle for
//! [`QUIET`], or when the event has waited [`LONGEST_WAIT`], whichever comes first.
//!
//! Invariants:
//! - Events are written in the order they were raised, at most [`IN_FLIGHT`] at once.
//! - No event waits longer than [`LONGEST_WAIT`] for quiet (a steady stream of claims never
//!   silences them), and none waits at all on an idle controller beyond what [`QUIET`] asks.
//! - Memory is bounded: past [`QUEUED`] waiting events, new ones are dropped and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::time::Instant;

/// Events being written at once.
const IN_FLIGHT: usize = 2;
/// Events waiting beyond those.
const QUEUED: usize = 1024;
/// How long the claim reconciler must have been idle before events are written: longer than the
/// gap between a claim's Volume request and its node's report, so a burst is not split by it.
pub const QUIET: Duration = Duration::from_millis(300);
/// The longest an event waits for quiet.
pub const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// Whether the work events yield to is under way: reconciles running, and when the last ended.
pub struct Activity {
    running: AtomicUsize,
    /// Milliseconds after `epoch` at which the last reconcile ended.
    last_ended_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self { running: AtomicUsize::new(0), last_ended_ms: AtomicU64::new(0), epoch: Instant::now() }
    }
}

/// Held for the length of one reconcile (see [`Activity::begin`]).
pub struct Working<'a>(&'a Activity);

impl Drop for Working<'_> {
    fn drop(&mut self) {
        let activity = self.0;
        let now = activity.epoch.elapsed().as_millis() as u64;
        activity.last_ended_ms.fetch_max(now, Ordering::Relaxed);
        activity.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Marks a reconcile as running until the guard drops.
    pub fn begin(&self) -> Working<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Working(self)
    }

    /// When events may be written if nothing else starts: now while work runs is "not yet".
    fn quiet_from(&self) -> Option<Instant> {
        if self.running.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_ended_ms.load(Ordering::Relaxed)) + QUIET)
    }
}

/// When a raised event should be written: the first moment of quiet, or its deadline.
fn due(activity: &Activity, raised: Instant, now: Instant) -> Option<Instant> {
    let deadline = raised + LONGEST_WAIT;
    match activity.quiet_from() {
        _ if now >= deadline => None,
        Some(quiet) if now >= quiet => None,
        Some(quiet) => Some(quiet.min(deadline)),
        // Work is running: look again shortly (a reconcile ending does not wake the writer).
        None => Some((now + QUIET).min(deadline)),
    }
}

struct Raised {
    event: Event,
    about: ObjectReference,
    at: Instant,
}

/// The sending end: raising an event never waits.
#[derive(Clone)]
pub struct EventQueue {
    queue: tokio::sync::mpsc::Sender<Raised>,
}

impl EventQueue {
    /// Starts the writer task; it ends when every `EventQueue` clone is dropped.
    pub fn start(recorder: Recorder, activity: Arc<Activity>) -> Self {
        let (queue, raised) = tokio::sync::mpsc::channel(QUEUED);
        tokio::spawn(write(recorder, raised, activity));
        Self { queue }
    }

    pub fn raise(&self, event: Event, about: ObjectReference) {
        let reason = event.reason.clone();
        if let Err(error) = self.queue.try_send(Raised { event, about, at: Instant::now() }) {
            tracing::warn!(%reason, %error, "an event was not recorded: too many are waiting");
        }
    }
}

async fn write(recorder: Recorder, mut raised: tokio::sync::mpsc::Receiver<Raised>, activity: Arc<Activity>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(next) = raised.recv().await {
        while let Some(until) = due(&activity, next.at, Instant::now()) {
            tokio::time::sleep_until(until).await;
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { return };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = recorder.publish(&next.event, &next.about).await {
                tracing::warn!(%error, "recording an event failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_controller_writes_at_once() {
        let activity = Activity::default();
        tokio::time::advance(QUIET).await;
        let now = Instant::now();
        assert_eq!(due(&activity, now, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn events_wait_for_quiet_after_work() {
        let activity = Activity::default();
        tokio::time::advance(Duration::from_secs(1)).await;
        let raised = Instant::now();
        let working = activity.begin();
        assert_eq!(due(&activity, raised, raised), Some(raised + QUIET), "work runs: look again later");
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(working);
        let ended = Instant::now();
        let quiet = due(&activity, raised, ended).expect("waits for quiet");
        assert!(quiet >= ended + QUIET - Duration::from_millis(1) && quiet <= ended + QUIET, "{quiet:?}");
        tokio::time::advance(QUIET).await;
        assert_eq!(due(&activity, raised, Instant::now()), None, "quiet now");
    }

    #[tokio::test(start_paused = true)]
    async fn no_event_waits_past_its_deadline() {
        let activity = Activity::default();
        let raised = Instant::now();
        let _working = activity.begin();
        tokio::time::advance(LONGEST_WAIT - Duration::from_millis(100)).await;
        assert_eq!(due(&activity, raised, Instant::now()), Some(raised + LONGEST_WAIT));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(due(&activity, raised, Instant::now()), None, "deadline reached while work still runs");
    }
}
