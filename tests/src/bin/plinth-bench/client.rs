//! CSI clients that report a refused connection instead of panicking (a restarting plinth
//! refuses connections until its start-up reconcile is done, which is what is being timed).

use std::path::Path;

use hyper_util::rt::TokioIo;
use plinth_proto::csi_v1::{
    ProbeRequest, controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use plinth_tests::Clients;
use tonic::transport::{Endpoint, Uri};

pub async fn connect(socket: &Path) -> anyhow::Result<Clients> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://plinth.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

/// Whether plinth answers Probe with ready = true on `socket` right now.
pub async fn ready(socket: &Path) -> bool {
    let Ok(mut clients) = connect(socket).await else { return false };
    clients.identity.probe(ProbeRequest {}).await.is_ok_and(|r| r.into_inner().ready == Some(true))
}
