//! The engine's error type: every failure is classified by what the caller should do about it,
//! and mapped to a CSI gRPC code in exactly one place (`From<Error> for tonic::Status`).

use std::error::Error as StdError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{context}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl Error {
    pub fn internal(context: impl Into<String>, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Error::Internal { context: context.into(), source: source.into() }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// The message with its whole cause chain: "attaching vol-…: LOOP_CONFIGURE on /dev/loop3: …".
    pub fn chain(&self) -> String {
        let mut message = self.to_string();
        let mut cause = self.source();
        while let Some(err) = cause {
            message.push_str(": ");
            message.push_str(&err.to_string());
            cause = err.source();
        }
        message
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), err.chain())
    }
}

/// Shorthand for wrapping a lower-level error with what plinth was doing.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::internal(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_code_and_cause_chain() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err: Result<()> = Err(io).context(|| "allocating vol-1".to_owned());
        let status = tonic::Status::from(err.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().starts_with("allocating vol-1: "), "{}", status.message());
        assert!(status.message().contains("space"), "{}", status.message());
        let status = tonic::Status::from(Error::Aborted("busy".into()));
        assert_eq!((status.code(), status.message()), (tonic::Code::Aborted, "busy"));
    }
}
