//! Watch-fed copies of the objects the claim reconciler consults on every pass (StorageClasses,
//! CSIStorageCapacities, Nodes, Volumes, PersistentVolumes), so a pass costs only its writes.
//! With 100 claims arriving at once, the GETs and LISTs each pass used to make (every Volume,
//! for placement) were most of the API server's work and most of a claim's wait.
//!
//! Invariants:
//! - A cache may lag the API server; every use tolerates that. A miss for an object that must
//!   exist (a class, a node) falls back to a GET. A miss for an object plinth may be about to
//!   make (a Volume, a PV) leads to a create that answers 409 when it exists, and the stored
//!   object is read then.
//! - Volumes and PVs reach their cache through the same stream that triggers the reconcilers
//!   (`reflect` before the trigger), so a reconcile woken by a Volume's change sees that change.
//! - Placement counts Volumes this controller created but its cache has not seen yet
//!   (`placed`), so a burst of claims spreads over the nodes instead of piling onto one.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{SinkExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::crd::Volume;

/// How long a Volume this process created counts as on its way to the cache. Watch events
/// arrive within a second even under a burst; a Volume created and deleted again before its
/// watch event would otherwise be counted for ever. By then its node has published capacity
/// that includes it.
const UNSEEN_FOR: Duration = Duration::from_secs(30);

/// The stores' writing ends, taken once by the reconcilers that feed them.
pub struct Writers {
    pub classes: Writer<StorageClass>,
    pub capacities: Writer<CSIStorageCapacity>,
    pub nodes: Writer<Node>,
    pub volumes: Writer<Volume>,
    pub pvs: Writer<PersistentVolume>,
}

pub struct Caches {
    pub classes: Store<StorageClass>,
    pub capacities: Store<CSIStorageCapacity>,
    pub nodes: Store<Node>,
    pub volumes: Store<Volume>,
    pub pvs: Store<PersistentVolume>,
    /// Volumes created by this process: name → (node, bytes, when), until the cache has them or
    /// [`UNSEEN_FOR`] has passed.
    placed: Mutex<HashMap<String, (String, i64, Instant)>>,
    writers: Mutex<Option<Writers>>,
}

impl Default for Caches {
    fn default() -> Self {
        let (classes, classes_w) = reflector::store();
        let (capacities, capacities_w) = reflector::store();
        let (nodes, nodes_w) = reflector::store();
        let (volumes, volumes_w) = reflector::store();
        let (pvs, pvs_w) = reflector::store();
        let writers =
            Writers { classes: classes_w, capacities: capacities_w, nodes: nodes_w, volumes: volumes_w, pvs: pvs_w };
        Self { classes, capacities, nodes, volumes, pvs, placed: Mutex::default(), writers: Mutex::new(Some(writers)) }
    }
}

impl Caches {
    /// The writers; `None` after the first call (one set of reconcilers feeds the caches).
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The StorageClass named `name`: cached, else read (a class made a moment ago).
    pub async fn class(&self, client: &kube::Client, name: &str) -> kube::Result<Option<StorageClass>> {
        cached_or_get(&self.classes, Api::all(client.clone()), name).await
    }

    /// The Node named `name`: cached, else read.
    pub async fn node(&self, client: &kube::Client, name: &str) -> kube::Result<Option<Node>> {
        cached_or_get(&self.nodes, Api::all(client.clone()), name).await
    }

    /// The Volume named `name` as last seen; `None` may mean "not seen yet" (see the invariants).
    pub fn volume(&self, name: &str) -> Option<Volume> {
        self.volumes.get(&ObjectRef::new(name)).map(|v| (*v).clone())
    }

    /// The PV named `name` as last seen; `None` may mean "not seen yet".
    pub fn pv(&self, name: &str) -> Option<PersistentVolume> {
        self.pvs.get(&ObjectRef::new(name)).map(|v| (*v).clone())
    }

    /// Counts a Volume about to be created on `node` for placement, until the cache has it or,
    /// if it is not created after all, until the returned guard drops without `created`.
    /// Counted before the create: concurrent reconciles choosing at once must see each other.
    pub fn place(&self, name: &str, node: &str, bytes: i64) -> Placed<'_> {
        let entry = (node.to_owned(), bytes, Instant::now());
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), entry);
        Placed { caches: self, name: name.to_owned(), created: false }
    }

    /// Volumes created by this process that the cache has not seen yet: (node, bytes).
    pub fn unseen_placements(&self) -> Vec<(String, i64)> {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed
            .retain(|name, (_, _, at)| self.volumes.get(&ObjectRef::new(name)).is_none() && at.elapsed() < UNSEEN_FOR);
        placed.values().map(|(node, bytes, _)| (node.clone(), *bytes)).collect()
    }

    /// The Volume stream delivered `name` (made, changed or deleted): it is no longer on its way.
    /// Without this, a Volume seen and deleted between two looks at the store would count as
    /// still coming.
    pub fn saw_volume(&self, name: &str) {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// For a Volume this process created and its cache has not seen yet: how much longer to wait
    /// for it before asking the API server. A claim woken meanwhile (by another writer of the
    /// claim) then waits for the Volume's watch event instead of creating it again.
    pub fn unseen_volume(&self, name: &str) -> Option<Duration> {
        if self.volumes.get(&ObjectRef::new(name)).is_some() {
            return None;
        }
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.get(name).and_then(|(_, _, at)| UNSEEN_FOR.checked_sub(at.elapsed())).filter(|left| !left.is_zero())
    }

    /// Waits until the class, capacity and node caches hold a first full list.
    pub async fn wait_until_ready(&self) {
        let (classes, capacities, nodes) = futures::join!(
            self.classes.wait_until_ready(),
            self.capacities.wait_until_ready(),
            self.nodes.wait_until_ready()
        );
        if let Err(error) = classes.and(capacities).and(nodes) {
            tracing::warn!(%error, "a cache's feed ended before its first list");
        }
    }
}

/// See `Caches::place`.
pub struct Placed<'a> {
    caches: &'a Caches,
    name: String,
    created: bool,
}

impl Placed<'_> {
    /// The Volume exists now: keep counting it until the cache has it.
    pub fn created(mut self) {
        self.created = true;
    }
}

impl Drop for Placed<'_> {
    fn drop(&mut self) {
        if !self.created {
            self.caches.placed.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
        }
    }
}

async fn cached_or_get<K>(store: &Store<K>, api: Api<K>, name: &str) -> kube::Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match store.get(&ObjectRef::new(name)) {
        Some(object) => Ok(Some((*object).clone())),
        None => api.get_opt(name).await,
    }
}

/// Watches `api` into `writer`, yielding what changed (deletions included) for a reconciler's
/// trigger; the store is updated before each object is yielded. `strip` drops what no reader uses.
pub fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    strip: fn(&mut K),
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, watcher::Config::default()).default_backoff().modify(strip).reflect(writer).touched_objects()
}

/// Hands every object `stream` yields to two consumers, so two reconcilers triggered by the same
/// kind share one watch: the API server sends each change once, and it is decoded once. The
/// returned future drives the stream (run it beside both consumers); watch errors, which the
/// watcher retries itself, are logged there. The halves are bounded: a consumer that stopped
/// polling would hold the other back, and kube-runtime's controllers poll their triggers all the
/// time.
pub fn split<K, S>(
    stream: S,
) -> (
    impl Future<Output = ()> + Send,
    impl Stream<Item = Result<K, watcher::Error>>,
    impl Stream<Item = Result<K, watcher::Error>>,
)
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
    S: Stream<Item = Result<K, watcher::Error>> + Send,
{
    let (mut first_tx, first) = futures::channel::mpsc::channel::<K>(SPLIT_BUFFER);
    let (mut second_tx, second) = futures::channel::mpsc::channel::<K>(SPLIT_BUFFER);
    let drive = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // A consumer that is gone (shutdown) no longer needs the objects.
                Ok(object) => {
                    let _ = first_tx.send(object.clone()).await;
                    let _ = second_tx.send(object).await;
                }
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying"),
            }
        }
    };
    (drive, first.map(Ok), second.map(Ok))
}

/// Objects a consumer of [`split`] may lag behind the watch (it blocks the other beyond that).
const SPLIT_BUFFER: usize = 1024;

/// Runs a feed that only fills its store, until the watch ends (it retries errors itself).
pub async fn feed<K>(api: Api<K>, writer: Writer<K>, strip: fn(&mut K))
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut events = std::pin::pin!(reflect(api, writer, strip));
    while let Some(event) = events.next().await {
        if let Err(error) = event {
            tracing::warn!(%error, kind = %K::kind(&()), "watch for a cache failed; retrying");
        }
    }
}

/// Drops managed fields: nothing reads them, and they are most of a small object's size.
pub fn strip_managed_fields<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Keeps what placement reads of a Node (labels, conditions); its image list is large.
pub fn strip_node(node: &mut Node) {
    strip_managed_fields(node);
    if let Some(status) = node.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus { conditions: status.conditions.take(), ..Default::default() };
    }
}

/// Capacities keep their managed fields: their times tell when a node last published.
pub fn keep_all<K>(_: &mut K) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(name: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn both_halves_of_a_split_watch_get_every_object_in_order() {
        let events =
            futures::stream::iter(vec![Ok(pv("a")), Err(watcher::Error::NoResourceVersion), Ok(pv("b")), Ok(pv("c"))]);
        let (drive, first, second) = split(events);
        let names = |half: Vec<Result<PersistentVolume, watcher::Error>>| -> Vec<String> {
            half.into_iter().map(|event| event.expect("only objects reach a half").name_any()).collect()
        };
        let ((), first, second) = futures::join!(drive, first.collect::<Vec<_>>(), second.collect::<Vec<_>>());
        assert_eq!(names(first), ["a", "b", "c"]);
        assert_eq!(names(second), ["a", "b", "c"]);
    }

    #[test]
    fn a_created_volume_is_awaited_until_the_cache_has_it() {
        let caches = Caches::default();
        caches.place("pvc-1", "node-a", 8).created();
        let left = caches.unseen_volume("pvc-1").expect("created and not yet seen");
        assert!(left <= UNSEEN_FOR && left > UNSEEN_FOR - Duration::from_secs(5), "{left:?}");
        assert_eq!(caches.unseen_placements(), vec![("node-a".to_owned(), 8)]);
        assert_eq!(caches.unseen_volume("pvc-2"), None, "never requested");
    }

    #[test]
    fn a_volume_the_stream_delivered_is_no_longer_awaited() {
        let caches = Caches::default();
        caches.place("pvc-1", "node-a", 8).created();
        // Seen and deleted again before anyone looked: the store does not have it, the stream did.
        caches.saw_volume("pvc-1");
        assert_eq!(caches.unseen_volume("pvc-1"), None, "a claim whose Volume was deleted is placed again at once");
        assert!(caches.unseen_placements().is_empty());
    }

    #[test]
    fn a_placement_that_was_not_created_is_forgotten() {
        let caches = Caches::default();
        drop(caches.place("pvc-1", "node-a", 8));
        assert_eq!(caches.unseen_volume("pvc-1"), None);
        assert!(caches.unseen_placements().is_empty());
    }

    #[test]
    fn an_unseen_volume_stops_counting_after_a_while() {
        let caches = Caches::default();
        caches.place("pvc-1", "node-a", 8).created();
        let long_ago = Instant::now().checked_sub(UNSEEN_FOR).expect("monotonic clock well past its start");
        caches.placed.lock().unwrap().get_mut("pvc-1").unwrap().2 = long_ago;
        assert_eq!(caches.unseen_volume("pvc-1"), None, "ask the API server again");
        assert!(caches.unseen_placements().is_empty(), "no longer held against node-a's capacity");
    }
}
