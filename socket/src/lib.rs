//! gRPC on unix sockets, for every socket plinth serves (CSI, kubelet plugin registration, the
//! cluster controller's sidecar socket):
//! - [`bind`]: the socket exists with mode 0600 before anyone can connect; a stale socket is
//!   replaced only when it is a socket nobody answers on.
//! - [`incoming`]: accepted connections whose HTTP/2 `:authority` is normalised (see
//!   [`authority`]), so clients that dial by path — kubelet's plugin watcher, gRPC C-core — are
//!   served instead of reset.

pub mod authority;
mod bind;
mod stream;

pub use bind::{BindError, bind, socket_path};
pub use stream::NormalizedStream;

use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};

/// The connections of `listener`, ready for `tonic::transport::Server::serve_with_incoming*`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl Stream<Item = std::io::Result<NormalizedStream<tokio::net::UnixStream>>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(NormalizedStream::new))
}
