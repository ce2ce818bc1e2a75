//! Publishes this node's free capacity as CSIStorageCapacity objects, one per plinth
//! StorageClass, so kube-scheduler (and plinth's controller) never pick a full node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use plinth_engine::Engine;
use plinth_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use serde_json::json;

use crate::Result;
use crate::cache;
use crate::keys::{NODE_LABEL, STORAGE_CLASS_LABEL};

const FIELD_MANAGER: &str = "plinth-node";
/// The pool's free space is checked at least this often (other files on its filesystem, and
/// thin volumes filling up, change it without a volume change).
const PERIOD: Duration = Duration::from_secs(10);
/// After a volume change, the publisher waits until changes have stopped for this long, so a
/// burst of creations is published once, after it, not once a second per class while the API
/// server is busiest. (external-provisioner polls capacity once a minute; plinth's placement
/// counts the Volumes placed since a node last published.)
const SETTLE: Duration = Duration::from_secs(1);
/// …but no longer than this after the first change: under a steady stream of changes the
/// scheduler still sees capacity at most this old.
const SETTLE_AT_MOST: Duration = Duration::from_secs(5);

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

/// What this publisher last wrote, per object name: the resourceVersion the API server gave
/// the write, and the bytes written.
type Written = BTreeMap<String, (String, u64)>;

/// Whether `stored` already says what this node would publish for `class`: it is this
/// process's own last write of the same figure (whatever form the API server stored the
/// quantity in — no write loop on a form `up_to_date` cannot read), or it says the same.
fn is_current(
    stored: &CSIStorageCapacity,
    written: Option<&(String, u64)>,
    node: &str,
    class: &str,
    available: u64,
) -> bool {
    let our_last_write = written
        .is_some_and(|(version, bytes)| *bytes == available && stored.resource_version().as_ref() == Some(version));
    our_last_write || up_to_date(stored, node, class, available)
}

/// Whether `stored` says what this node would publish for `class`. Quantities are compared by
/// value: the API server stores them in canonical form ("1048576k" for "1048576000"), and a
/// person editing one may write "1Gi".
fn up_to_date(stored: &CSIStorageCapacity, node: &str, class: &str, available: u64) -> bool {
    let bytes = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        q.and_then(|q| plinth_engine::size::parse_size(&q.0).ok())
    };
    let labels = stored.labels();
    stored.storage_class_name == class
        && bytes(stored.capacity.as_ref()) == Some(available)
        && bytes(stored.maximum_volume_size.as_ref()) == Some(available)
        && stored.node_topology.as_ref().and_then(|t| t.match_labels.as_ref()).and_then(|m| m.get(TOPOLOGY_NODE_KEY))
            == Some(&node.to_owned())
        && labels.get(NODE_LABEL).map(String::as_str) == Some(node)
        && labels.get(STORAGE_CLASS_LABEL).map(String::as_str) == Some(class)
}

impl Publisher {
    /// Writes what differs from the objects this node has published (as its watch of them last
    /// saw them) and deletes those of classes that are gone. Nothing differs: no API call.
    async fn publish_once(
        &self,
        classes: &Store<StorageClass>,
        mine: &Store<CSIStorageCapacity>,
        written: &mut Written,
    ) -> Result<()> {
        let node = self.engine.node_id().to_owned();
        let classes: Vec<String> =
            classes.state().iter().filter(|c| c.provisioner == DRIVER_NAME).map(|c| c.name_any()).collect();
        let engine = Arc::clone(&self.engine);
        let capacity = tokio::task::spawn_blocking(move || engine.capacity(None)).await??;
        let available = capacity.available_bytes;
        let api: Api<CSIStorageCapacity> = Api::namespaced(self.client.clone(), &self.namespace);
        let stored: BTreeMap<String, Arc<CSIStorageCapacity>> =
            mine.state().into_iter().map(|object| (object.name_any(), object)).collect();
        for class in &classes {
            let name = object_name(&node, class);
            if stored.get(&name).is_some_and(|object| is_current(object, written.get(&name), &node, class, available)) {
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
                "capacity": available.to_string(),
                "maximumVolumeSize": available.to_string(),
            });
            let applied = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await?;
            written.insert(name, (applied.resource_version().unwrap_or_default(), available));
        }
        let wanted: BTreeSet<String> = classes.iter().map(|class| object_name(&node, class)).collect();
        for stale in stored.keys().filter(|name| !wanted.contains(*name)) {
            match api.delete(stale, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        written.retain(|name, _| wanted.contains(name));
        Ok(())
    }

    /// Publishes now, after each volume change (settled), whenever one of this node's objects
    /// changes or goes (a hand edit is put back), and checks the pool's free space every
    /// `PERIOD`. Writes only what differs: an idle cluster costs its API server nothing here
    /// (it used to re-apply every object every `PERIOD`: 30 requests a second at 100 nodes and
    /// three classes).
    pub async fn run(self) {
        let node = self.engine.node_id().to_owned();
        let (classes, class_writer) = reflector::store();
        // A new plinth class is published at once: until it is, the scheduler sees no room for
        // its WaitForFirstConsumer claims on this node.
        let class_feed = wake_on_change(
            cache::reflect(Api::<StorageClass>::all(self.client.clone()), class_writer, cache::strip_managed_fields),
            Arc::clone(&self.changed),
        );
        let (mine, mine_writer) = reflector::store();
        let own = Api::<CSIStorageCapacity>::namespaced(self.client.clone(), &self.namespace);
        let own_feed = wake_on_change(
            watcher(own, watcher::Config::default().labels(&format!("{NODE_LABEL}={node}")))
                .default_backoff()
                .modify(cache::strip_managed_fields)
                .reflect(mine_writer)
                .touched_objects(),
            Arc::clone(&self.changed),
        );
        let publishing = async {
            if let Err(error) = classes.wait_until_ready().await {
                tracing::warn!(%error, "the StorageClass watch ended before its first list");
                return;
            }
            if let Err(error) = mine.wait_until_ready().await {
                tracing::warn!(%error, "the CSIStorageCapacity watch ended before its first list");
                return;
            }
            let mut written = Written::new();
            loop {
                if let Err(error) = self.publish_once(&classes, &mine, &mut written).await {
                    tracing::warn!(%error, "publishing capacity failed; retrying");
                }
                if tokio::time::timeout(PERIOD, self.changed.notified()).await.is_ok() {
                    settle(&self.changed, SETTLE, SETTLE_AT_MOST).await;
                }
            }
        };
        futures::join!(class_feed, own_feed, publishing);
    }
}

/// Returns once `changed` has been quiet for `quiet`, or `at_most` after it was called.
async fn settle(changed: &tokio::sync::Notify, quiet: Duration, at_most: Duration) {
    let deadline = tokio::time::Instant::now() + at_most;
    loop {
        let until = (tokio::time::Instant::now() + quiet).min(deadline);
        if tokio::time::timeout_at(until, changed.notified()).await.is_err() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// Runs a reflector's stream (it fills the store) and wakes the publisher on each change.
async fn wake_on_change<K: kube::Resource>(
    events: impl futures::Stream<Item = std::result::Result<K, watcher::Error>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let Err(error) = event {
            tracing::warn!(%error, kind = %std::any::type_name::<K>(), "capacity watch failed; retrying");
        }
        changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settling_waits_for_quiet_but_not_forever() {
        let changed = Arc::new(tokio::sync::Notify::new());
        let start = tokio::time::Instant::now();
        settle(&changed, Duration::from_secs(1), Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1), "no change: one quiet second");

        // A change every 300 ms for 2 s: published 1 s after the last one.
        let start = tokio::time::Instant::now();
        let burst = tokio::spawn({
            let changed = Arc::clone(&changed);
            async move {
                for _ in 0..7 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    changed.notify_one();
                }
            }
        });
        settle(&changed, Duration::from_secs(1), Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(3100));
        burst.await.unwrap();

        // Changes that never stop: published at the cap.
        let start = tokio::time::Instant::now();
        let endless = tokio::spawn({
            let changed = Arc::clone(&changed);
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    changed.notify_one();
                }
            }
        });
        settle(&changed, Duration::from_secs(1), Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        endless.abort();
    }

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(object_name("node-a", "plinth"), "plinth-node-a-plinth");
        assert_eq!(object_name("Node_A.example", "plinth-xfs"), "plinth-node-a-example-plinth-xfs");
    }

    fn stored(capacity: &str, node: &str, class: &str) -> CSIStorageCapacity {
        serde_json::from_value(json!({
            "metadata": {"name": object_name(node, class), "namespace": "plinth-system",
                         "labels": {NODE_LABEL: node, STORAGE_CLASS_LABEL: class}},
            "storageClassName": class,
            "nodeTopology": {"matchLabels": {TOPOLOGY_NODE_KEY: node}},
            "capacity": capacity,
            "maximumVolumeSize": capacity,
        }))
        .unwrap()
    }

    #[test]
    fn an_object_is_up_to_date_when_it_says_the_same_in_canonical_form() {
        assert!(up_to_date(&stored("1073741824", "a", "plinth"), "a", "plinth", 1 << 30));
        assert!(up_to_date(&stored("1Gi", "a", "plinth"), "a", "plinth", 1 << 30));
        assert!(up_to_date(&stored("1048576k", "a", "plinth"), "a", "plinth", 1000 << 20));
    }

    #[test]
    fn our_own_last_write_is_current_whatever_form_the_server_stored_it_in() {
        let mut ours = stored("1.0737e9", "a", "plinth");
        ours.metadata.resource_version = Some("42".into());
        let written = ("42".to_owned(), 1u64 << 30);
        assert!(is_current(&ours, Some(&written), "a", "plinth", 1 << 30));
        assert!(!is_current(&ours, Some(&written), "a", "plinth", (1 << 30) + 4096), "the figure changed since");
        ours.metadata.resource_version = Some("43".into());
        assert!(!is_current(&ours, Some(&written), "a", "plinth", 1 << 30), "someone wrote it since");
        assert!(!is_current(&ours, None, "a", "plinth", 1 << 30), "not written by this process");
    }

    #[test]
    fn an_object_is_rewritten_when_its_capacity_class_or_node_differ() {
        assert!(!up_to_date(&stored("1Gi", "a", "plinth"), "a", "plinth", (1 << 30) - 4096));
        assert!(!up_to_date(&stored("1Gi", "a", "plinth"), "a", "plinth-xfs", 1 << 30));
        assert!(!up_to_date(&stored("1Gi", "b", "plinth"), "a", "plinth", 1 << 30));
        let mut edited = stored("1Gi", "a", "plinth");
        edited.maximum_volume_size = None;
        assert!(!up_to_date(&edited, "a", "plinth", 1 << 30));
        let mut unreadable = stored("1Gi", "a", "plinth");
        unreadable.capacity = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity("1.0737e9".into()));
        assert!(!up_to_date(&unreadable, "a", "plinth", 1 << 30));
        let mut relabelled = stored("1Gi", "a", "plinth");
        relabelled.metadata.labels.as_mut().unwrap().remove(NODE_LABEL);
        assert!(!up_to_date(&relabelled, "a", "plinth", 1 << 30));
    }
}
