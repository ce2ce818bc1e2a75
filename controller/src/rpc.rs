//! The RPC boundary: engine calls run on blocking threads (they do syscalls, mkfs, fsync), every
//! outcome is logged once here with its code and duration, and engine errors become CSI status
//! codes through their single mapping. Requests are never logged whole (they can carry secrets).

use std::time::Instant;

use plinth_engine::{Error, Result};
use tonic::Status;

use crate::metrics::METRICS;

pub async fn run<T: Send + 'static>(
    method: &'static str,
    volume_id: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, Status> {
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join_error| Err(Error::internal(format!("{method} worker failed"), join_error)));
    let elapsed = started.elapsed().as_secs_f64();
    let elapsed_ms = elapsed * 1000.0;
    match outcome {
        Ok(value) => {
            METRICS.record_rpc(method, tonic::Code::Ok, elapsed);
            tracing::debug!(method, volume_id, elapsed_ms, "rpc ok");
            Ok(value)
        }
        Err(err) => {
            let status = Status::from(err);
            METRICS.record_rpc(method, status.code(), elapsed);
            match status.code() {
                tonic::Code::Internal => {
                    tracing::error!(method, volume_id, elapsed_ms, code = ?status.code(), error = status.message(), "rpc failed")
                }
                _ => {
                    tracing::info!(method, volume_id, elapsed_ms, code = ?status.code(), error = status.message(), "rpc refused")
                }
            }
            Err(status)
        }
    }
}

/// For checks done before any engine work (missing fields).
pub fn invalid(method: &'static str, message: impl Into<String>) -> Status {
    refused(method, Error::InvalidArgument(message.into()))
}

/// Logs and converts an error found while decoding a request.
pub fn refused(method: &'static str, err: Error) -> Status {
    let status = Status::from(err);
    METRICS.record_rpc(method, status.code(), 0.0);
    tracing::info!(method, code = ?status.code(), error = status.message(), "rpc refused");
    status
}
