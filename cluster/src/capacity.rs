//! Publishes this node's free capacity as CSIStorageCapacity objects, one per plinth
//! StorageClass, so kube-scheduler (and plinth's controller) never pick a full node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use plinth_engine::Engine;
use plinth_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use serde_json::json;

use crate::Result;
use crate::cache;
use crate::keys::{NODE_LABEL, STORAGE_CLASS_LABEL};

const FIELD_MANAGER: &str = "plinth-node";
/// Everything is republished at least this often (an object deleted by hand comes back).
const PERIOD: Duration = Duration::from_secs(10);
/// After a volume change, further changes are awaited this long so a burst of creations costs
/// a few writes, not one per volume per class. (external-provisioner polls capacity once a
/// minute; the scheduler and plinth's placement both allow for what is in flight.)
const SETTLE: Duration = Duration::from_secs(1);

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

/// What this publisher last wrote: object name → capacity. Empty means "write everything and
/// remove objects of classes that are gone".
type Published = BTreeMap<String, String>;

impl Publisher {
    async fn publish_once(&self, classes: &Store<StorageClass>, published: &mut Published) -> Result<()> {
        let node = self.engine.node_id().to_owned();
        let classes: Vec<String> =
            classes.state().iter().filter(|c| c.provisioner == DRIVER_NAME).map(|c| c.name_any()).collect();
        let engine = Arc::clone(&self.engine);
        let capacity = tokio::task::spawn_blocking(move || engine.capacity(None)).await??;
        let available = capacity.available_bytes.to_string();
        let api: Api<CSIStorageCapacity> = Api::namespaced(self.client.clone(), &self.namespace);
        let wanted: BTreeSet<String> = classes.iter().map(|class| object_name(&node, class)).collect();
        let sweep = published.is_empty() || published.keys().any(|name| !wanted.contains(name));
        for class in &classes {
            let name = object_name(&node, class);
            if published.get(&name) == Some(&available) {
                continue;
            }
            let object = json!({
                "apiVersion": "storage.k8s.io/v1",
                "kind": "CSIStorageCapacity",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": { NODE_LABEL: node, STORAGE_CLASS_LABEL: class },
                },
                "storageClassName": class,
                "nodeTopology": { "matchLabels": { TOPOLOGY_NODE_KEY: node } },
                "capacity": available,
                "maximumVolumeSize": available,
            });
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await?;
            published.insert(name, available.clone());
        }
        if sweep {
            let mine = api.list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}"))).await?;
            for stale in mine.items.iter().filter(|c| !wanted.contains(&c.name_any())) {
                api.delete(&stale.name_any(), &DeleteParams::default()).await?;
            }
            published.retain(|name, _| wanted.contains(name));
        }
        Ok(())
    }

    /// Publishes now, after each volume change (settled), and every `PERIOD` in full.
    pub async fn run(self) {
        let (classes, writer) = reflector::store();
        let feed = cache::feed(Api::<StorageClass>::all(self.client.clone()), writer, cache::strip_managed_fields);
        let publishing = async {
            if let Err(error) = classes.wait_until_ready().await {
                tracing::warn!(%error, "the StorageClass watch ended before its first list");
                return;
            }
            let mut published = Published::new();
            loop {
                if let Err(error) = self.publish_once(&classes, &mut published).await {
                    tracing::warn!(%error, "publishing capacity failed; retrying");
                    published.clear();
                }
                match tokio::time::timeout(PERIOD, self.changed.notified()).await {
                    Ok(()) => tokio::time::sleep(SETTLE).await,
                    Err(_) => published.clear(),
                }
            }
        };
        futures::join!(feed, publishing);
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
