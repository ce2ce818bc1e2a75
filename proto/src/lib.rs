//! Generated CSI v1.12.0 messages, clients and servers (package `csi.v1`).

#[allow(clippy::all, clippy::pedantic)]
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub use csi::v1 as csi_v1;

/// kubelet's plugin registration API.
#[allow(clippy::all, clippy::pedantic)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

/// plinth's local API (`plinth.v1.Local`): what the CLI needs beyond CSI.
#[allow(clippy::all, clippy::pedantic)]
pub mod local {
    tonic::include_proto!("plinth.v1");
}

/// The CSI driver name every plinth component reports.
pub const DRIVER_NAME: &str = "plinth.csi.dev";
/// Topology key that pins a volume to the node whose pool holds it.
pub const TOPOLOGY_NODE_KEY: &str = "topology.plinth.csi.dev/node";
