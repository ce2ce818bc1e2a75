//! The RPC boundary shared by every CSI service plinth serves — the local controller, the group
//! controller, the node service and the cluster-mode controller for the sidecars. Each outcome is
//! logged once here with method, volume ID, code and duration, and counted in the `Metrics` the
//! boundary was built with. Requests are never logged whole (they can carry secrets).
//!
//! Errors get their gRPC code in one place per error type: its [`GrpcError`] impl (the engine's
//! `Error` maps through `Error::code`, the cluster controller's per-RPC enums through theirs).
//! Nothing else builds a failing `tonic::Status`.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use plinth_engine::Error;
use tonic::{Code, Status};

use crate::metrics::Metrics;

/// An error that knows which gRPC code it is reported with.
pub trait GrpcError: StdError {
    fn code(&self) -> Code;
}

impl GrpcError for Error {
    fn code(&self) -> Code {
        Error::code(self)
    }
}

/// An RPC plinth does not serve (in this mode).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unimplemented(pub String);

impl GrpcError for Unimplemented {
    fn code(&self) -> Code {
        Code::Unimplemented
    }
}

/// The message with its whole cause chain: "attaching vol-…: LOOP_CONFIGURE on /dev/loop3: …".
pub fn chain(error: &dyn StdError) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(err) = cause {
        let text = err.to_string();
        // `#[error(transparent)]`-style wrappers repeat their source; say it once.
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = err.source();
    }
    message
}

/// The status an error is reported with: its code, its cause chain.
pub fn status(error: &dyn GrpcError) -> Status {
    Status::new(error.code(), chain(error))
}

/// The boundary: cheap to clone, one per process (all clones share the metrics).
#[derive(Clone)]
pub struct Rpc {
    metrics: Arc<Metrics>,
}

impl Rpc {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs an RPC's async work (Kubernetes API calls, waits) through the boundary.
    pub async fn run<T, E: GrpcError>(
        &self,
        method: &'static str,
        volume_id: &str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let outcome = work.await;
        self.finish(method, volume_id, started, outcome.map_err(|e| status(&e)))
    }

    /// Runs engine work on a blocking thread (it does syscalls, mkfs, fsync) through the boundary.
    pub async fn blocking<T, E>(
        &self,
        method: &'static str,
        volume_id: &str,
        work: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        E: GrpcError + Send + 'static,
    {
        let started = Instant::now();
        let outcome = match tokio::task::spawn_blocking(work).await {
            Ok(outcome) => outcome.map_err(|e| status(&e)),
            Err(join_error) => Err(status(&Error::internal(format!("{method} worker failed"), join_error))),
        };
        self.finish(method, volume_id, started, outcome)
    }

    /// A request refused before any work (a missing field, a parameter plinth does not take).
    pub fn refuse(&self, method: &'static str, volume_id: &str, error: impl GrpcError) -> Status {
        let status = status(&error);
        self.record(method, volume_id, Instant::now(), Err(&status));
        status
    }

    /// Shorthand for `refuse` with INVALID_ARGUMENT.
    pub fn invalid(&self, method: &'static str, volume_id: &str, message: impl Into<String>) -> Status {
        self.refuse(method, volume_id, Error::InvalidArgument(message.into()))
    }

    fn finish<T>(
        &self,
        method: &'static str,
        volume_id: &str,
        started: Instant,
        outcome: Result<T, Status>,
    ) -> Result<T, Status> {
        self.record(method, volume_id, started, outcome.as_ref().map(|_| ()));
        outcome
    }

    /// Logs and counts one outcome: the only place either happens.
    fn record(&self, method: &'static str, volume_id: &str, started: Instant, outcome: Result<(), &Status>) {
        let elapsed = started.elapsed().as_secs_f64();
        let elapsed_ms = elapsed * 1000.0;
        match outcome {
            Ok(()) => {
                self.metrics.record_rpc(method, Code::Ok, elapsed);
                tracing::debug!(method, volume_id, elapsed_ms, "rpc ok");
            }
            Err(status) => {
                let code = status.code();
                self.metrics.record_rpc(method, code, elapsed);
                if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
                    tracing::error!(method, volume_id, elapsed_ms, ?code, error = status.message(), "rpc failed");
                } else {
                    tracing::info!(method, volume_id, elapsed_ms, ?code, error = status.message(), "rpc refused");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("creating volume pvc-1")]
        Create(#[source] std::io::Error),
        #[error(transparent)]
        Engine(Error),
    }

    impl GrpcError for Outer {
        fn code(&self) -> Code {
            match self {
                Outer::Create(_) => Code::Unavailable,
                Outer::Engine(e) => e.code(),
            }
        }
    }

    #[tokio::test]
    async fn outcomes_are_counted_by_method_and_code() {
        let metrics = Arc::new(Metrics::new());
        let rpc = Rpc::new(Arc::clone(&metrics));
        let ok = rpc.run("CreateVolume", "pvc-1", async { Ok::<_, Outer>(7) }).await;
        assert_eq!(ok.unwrap(), 7);
        let err = rpc
            .run("CreateVolume", "pvc-1", async {
                Err::<(), _>(Outer::Create(std::io::Error::other("connection refused")))
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "creating volume pvc-1: connection refused");
        let err = rpc
            .blocking("DeleteVolume", "vol-1", || Err::<(), _>(Error::FailedPrecondition("staged".into())))
            .await
            .unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "staged"));
        let err = rpc.blocking("DeleteVolume", "vol-1", || -> Result<(), Error> { panic!("boom") }).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        let err = rpc.invalid("ControllerExpandVolume", "", "capacity_range is required");
        assert_eq!(err.code(), Code::InvalidArgument);
        let text = metrics.encode();
        for line in [
            r#"plinth_rpc_requests_total{method="CreateVolume",code="Ok"} 1"#,
            r#"plinth_rpc_requests_total{method="CreateVolume",code="Unavailable"} 1"#,
            r#"plinth_rpc_requests_total{method="DeleteVolume",code="FailedPrecondition"} 1"#,
            r#"plinth_rpc_requests_total{method="DeleteVolume",code="Internal"} 1"#,
            r#"plinth_rpc_requests_total{method="ControllerExpandVolume",code="InvalidArgument"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn transparent_wrappers_keep_their_source_code_and_message() {
        let status = status(&Outer::Engine(Error::OutOfRange("cannot shrink".into())));
        assert_eq!((status.code(), status.message()), (Code::OutOfRange, "cannot shrink"));
    }
}
