//! Bytes on the wire against the real server stack (tonic → hyper → h2): a HEADERS frame whose
//! `:authority` is a socket path is served through [`plinth_socket::incoming`], and — the reason
//! the adapter exists — reset with PROTOCOL_ERROR without it.

use std::path::Path;
use std::time::Duration;

use plinth_proto::csi_v1::identity_server::{Identity, IdentityServer};
use plinth_proto::csi_v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    ProbeRequest, ProbeResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

struct Named;

#[tonic::async_trait]
impl Identity for Named {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse { name: "wire.test".into(), ..Default::default() }))
    }
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse::default()))
    }
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse::default()))
    }
}

const KUBELET_AUTHORITY: &str = "/var/lib/kubelet/plugins_registry/plinth.csi.dev-reg.sock";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A unary GetPluginInfo call as grpc-go writes it when dialing by path.
fn request_bytes(authority: &str) -> Vec<u8> {
    let mut encoder = loona_hpack::Encoder::new();
    let fields: [(&[u8], &[u8]); 7] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/csi.v1.Identity/GetPluginInfo"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-go/1.72.0"),
        (b"te", b"trailers"),
    ];
    let mut bytes = plinth_socket::authority::PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x4, 1, &encoder.encode(fields))); // HEADERS, END_HEADERS
    bytes.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // empty message, END_STREAM
    bytes
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Served { status: String, grpc_status: String, body: Vec<u8> },
    Reset(u32),
}

/// Reads server frames for stream 1 until the call ends.
async fn exchange(socket: &Path, authority: &str) -> Outcome {
    let mut stream = tokio::net::UnixStream::connect(socket).await.expect("connect");
    stream.write_all(&request_bytes(authority)).await.expect("write request");
    let mut decoder = loona_hpack::Decoder::new();
    let (mut status, mut grpc_status, mut body) = (String::new(), String::new(), Vec::new());
    let read = async {
        loop {
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await.expect("frame header");
            let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0; len];
            stream.read_exact(&mut payload).await.expect("frame payload");
            let (kind, flags) = (header[3], header[4]);
            let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
            match (kind, stream_id) {
                (0x4, 0) if flags & 0x1 == 0 => stream.write_all(&frame(0x4, 0x1, 0, &[])).await.expect("ack"),
                (0x3, 1) => return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap())),
                (0x7, 0) => return Outcome::Reset(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                (0x1, 1) => {
                    for (name, value) in decoder.decode(&payload).expect("server headers decode") {
                        match name.as_slice() {
                            b":status" => status = String::from_utf8(value).unwrap(),
                            b"grpc-status" => grpc_status = String::from_utf8(value).unwrap(),
                            _ => {}
                        }
                    }
                    if flags & 0x1 != 0 {
                        return Outcome::Served { status, grpc_status, body };
                    }
                }
                (0x0, 1) => body.extend_from_slice(&payload),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server answered")
}

async fn serve(socket: &Path, normalized: bool) -> tokio::task::JoinHandle<()> {
    let listener = plinth_socket::bind(socket).expect("bind");
    let router = plinth_socket::server().add_service(IdentityServer::new(Named));
    tokio::spawn(async move {
        if normalized {
            router.serve_with_incoming(plinth_socket::incoming(listener)).await.expect("serve");
        } else {
            let plain = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router.serve_with_incoming(plain).await.expect("serve");
        }
    })
}

#[tokio::test]
async fn a_path_authority_is_served_through_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("normalized.sock");
    let server = serve(&socket, true).await;
    for authority in [KUBELET_AUTHORITY, "", "localhost", "%2Fvar%2Flib%2Fkubelet%2Fcsi.sock"] {
        match exchange(&socket, authority).await {
            Outcome::Served { status, grpc_status, body } => {
                assert_eq!((status.as_str(), grpc_status.as_str()), ("200", "0"), "authority {authority:?}");
                assert!(body.windows(9).any(|w| w == b"wire.test"), "the reply carries the plugin name");
            }
            other => panic!("authority {authority:?}: {other:?}"),
        }
    }
    server.abort();
}

#[tokio::test]
async fn without_the_adapter_h2_resets_a_path_authority() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plain.sock");
    let server = serve(&socket, false).await;
    assert_eq!(exchange(&socket, KUBELET_AUTHORITY).await, Outcome::Reset(1), "PROTOCOL_ERROR");
    assert!(matches!(exchange(&socket, "localhost").await, Outcome::Served { .. }));
    server.abort();
}

async fn flood(socket: &Path, calls: usize) -> Result<(), tonic::Status> {
    use hyper_util::rt::TokioIo;
    use plinth_proto::csi_v1::identity_client::IdentityClient;
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let client = IdentityClient::new(channel);
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_plugin_info(GetPluginInfoRequest {}).await.map(drop) })
        })
        .collect();
    for task in tasks {
        task.await.unwrap()?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_concurrent_streams_pass_through_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.sock");
    let normalized = dir.path().join("normalized.sock");
    let a = serve(&plain, false).await;
    let b = serve(&normalized, true).await;
    flood(&plain, 3000).await.expect("without the adapter");
    flood(&normalized, 3000).await.expect("through the adapter");
    a.abort();
    b.abort();
}
