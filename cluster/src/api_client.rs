//! The Kubernetes API client: kube-rs's request stack, spoken over one multiplexed HTTP/2
//! connection.
//!
//! kube-rs's own client offers only HTTP/1.1, so every request in flight holds a TLS connection
//! of its own. In a burst of 100 claims plinth's five processes opened about 70 connections to
//! the API server (one controller alone 44), and each is a handshake the API server pays for
//! while it is the machine's bottleneck. Go clients (kubelet, kube-controller-manager, kubectl)
//! multiplex on one HTTP/2 connection; this client does the same, and the server may still
//! answer ALPN with HTTP/1.1.
//!
//! One connection then carries every watch, so a dead one must be noticed: like client-go, the
//! client pings the server while idle and drops the connection when a ping goes unanswered; the
//! watches and requests on it fail and are retried on a new one.

use std::time::Duration;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// How long the connection may stay silent before the client pings (client-go: 30 s).
const PING_AFTER_SILENCE: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection counts as dead (client-go: 15 s).
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for `config` with kube-rs's layers (base URI, retries of throttled requests,
/// authentication, extra headers) over an HTTP/2-capable connection pool.
pub fn connect(config: kube::Config) -> Result<kube::Client, kube::Error> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(config.connect_timeout);
    let tls =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config.rustls_client_config()?).https_or_http();
    let tls = match &config.tls_server_name {
        Some(name) => {
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|e| kube::Error::Service(format!("tls-server-name {name:?}: {e}").into()))?;
            tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => tls,
    };
    let https = tls.enable_http1().enable_http2().wrap_connector(tcp);
    let pool = HyperClient::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_AFTER_SILENCE)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(pool);
    Ok(kube::Client::new(service, config.default_namespace))
}
