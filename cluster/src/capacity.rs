//! Publishes this node's free capacity as CSIStorageCapacity objects, one per plinth
//! StorageClass, so kube-scheduler (and plinth's controller) never pick a full node.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use plinth_engine::Engine;
use plinth_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use serde_json::json;

use crate::Result;
use crate::keys::{NODE_LABEL, STORAGE_CLASS_LABEL};

const FIELD_MANAGER: &str = "plinth-node";
/// Republished at least this often, and at once after any volume change.
const PERIOD: Duration = Duration::from_secs(10);

pub struct Publisher {
    pub client: kube::Client,
    pub engine: Arc<Engine>,
    pub namespace: String,
    pub changed: Arc<tokio::sync::Notify>,
}

/// A DNS-1123 name for the (node, class) pair.
pub fn object_name(node: &str, class: &str) -> String {
    let clean = |s: &str| {
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect::<String>()
    };
    format!("plinth-{}-{}", clean(node), clean(class)).trim_end_matches('-').to_owned()
}

impl Publisher {
    async fn publish_once(&self) -> Result<()> {
        let node = self.engine.node_id().to_owned();
        let classes: Vec<StorageClass> = Api::<StorageClass>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|c| c.provisioner == DRIVER_NAME)
            .collect();
        let engine = Arc::clone(&self.engine);
        let capacity = tokio::task::spawn_blocking(move || engine.capacity(None)).await??;
        let api: Api<CSIStorageCapacity> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut wanted = BTreeSet::new();
        for class in &classes {
            let name = object_name(&node, &class.name_any());
            wanted.insert(name.clone());
            let object = json!({
                "apiVersion": "storage.k8s.io/v1",
                "kind": "CSIStorageCapacity",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": { NODE_LABEL: node, STORAGE_CLASS_LABEL: class.name_any() },
                },
                "storageClassName": class.name_any(),
                "nodeTopology": { "matchLabels": { TOPOLOGY_NODE_KEY: node } },
                "capacity": capacity.available_bytes.to_string(),
                "maximumVolumeSize": capacity.available_bytes.to_string(),
            });
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await?;
        }
        let mine = api.list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}"))).await?;
        for stale in mine.items.iter().filter(|c| !wanted.contains(&c.name_any())) {
            api.delete(&stale.name_any(), &DeleteParams::default()).await?;
        }
        Ok(())
    }

    pub async fn run(self) {
        loop {
            if let Err(error) = self.publish_once().await {
                tracing::warn!(%error, "publishing capacity failed; retrying");
            }
            let _ = tokio::time::timeout(PERIOD, self.changed.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(object_name("node-a", "plinth"), "plinth-node-a-plinth");
        assert_eq!(object_name("Node_A.example", "plinth-xfs"), "plinth-node-a-example-plinth-xfs");
    }
}
