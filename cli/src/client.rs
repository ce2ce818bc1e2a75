//! A CSI client over the unix socket, for the CLI verbs.

use anyhow::Context;
use hyper_util::rt::TokioIo;
use plinth_proto::csi_v1::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use plinth_proto::local::local_client::LocalClient;
use tonic::transport::{Channel, Endpoint, Uri};

use plinth_socket::socket_path;

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub local: LocalClient<Channel>,
}

pub async fn connect(endpoint: &str) -> anyhow::Result<Clients> {
    let path = socket_path(endpoint)?;
    let shown = path.display().to_string();
    // The URI is required by tonic but unused: the connector always dials the socket.
    let channel = Endpoint::try_from("http://plinth.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| {
            format!("cannot reach plinth at {shown}: is `plinth standalone` running (and are you root)?")
        })?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        local: LocalClient::new(channel),
    })
}
