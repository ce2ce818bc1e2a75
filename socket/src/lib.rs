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

/// Concurrent streams one connection may open (hyper's default).
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// The connection-level HTTP/2 flow-control window. Besides throughput, h2 derives its budget for
/// small unread DATA frames from it (half the window; a DoS guard): with the 64 KiB default, a
/// client with a few hundred small calls in flight on one connection could trip that guard and
/// be disconnected (ENHANCE_YOUR_CALM) while the services catch up.
pub const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

/// The gRPC server every plinth socket uses: the HTTP/2 settings above; messages above tonic's
/// 4 MiB default are refused per call.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
}

/// The connections of `listener`, ready for `tonic::transport::Server::serve_with_incoming*`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl Stream<Item = std::io::Result<NormalizedStream<tokio::net::UnixStream>>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(NormalizedStream::new))
}
