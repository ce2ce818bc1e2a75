//! The cluster controller's reconcilers:
//! - claims of plinth StorageClasses → a `Volume` on a chosen node (for a claim with a data
//!   source: the node holding the source, see `data_source`) → once that node's agent reports it
//!   ready, a PersistentVolume pre-bound to the claim, and the claim's `spec.volumeName` set as
//!   Kubernetes' own binder sets it, so the PV controller completes the bind on that claim event
//!   instead of its periodic resync;
//! - Released PVs with reclaimPolicy Delete → delete the `Volume` (the agent removes the image) →
//!   delete the PV; Retain keeps both;
//! - a claim asking for more → grow the `Volume`, then the PV, then flag the claim for kubelet's
//!   node-side expansion; a claim whose VolumeAttributesClass changes → `modify`.
//!
//! Names are derived from the claim's UID (`pvc-<uid>`), so a restarted controller finds what it
//! made before and never makes a second Volume or PV. Waits are event-driven (Volumes are watched
//! and mapped to their claims and PVs); failures are retried with a per-object backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use plinth_controller::metrics::Metrics;
use plinth_controller::params::ClassParameters;
use plinth_engine::failpoint;
use plinth_engine::model::FsType;
use plinth_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use serde_json::json;

use crate::backoff::Backoff;
use crate::cache::{self, Caches};
use crate::crd::{self, ClaimRef, Phase, Volume, VolumeMode, VolumeSpec};
use crate::data_source::{self, Source};
use crate::event_queue::{Activity, EventQueue};
use crate::keys::{PROVISIONED_BY, SELECTED_NODE};
use crate::{Error, Result};
use crate::{modify, volumes};

pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    /// Error retries of claims, PVs and snapshot contents (one history per object).
    pub backoff: Backoff,
    /// What the claim reconciler reads on every pass (see `cache`).
    pub caches: Caches,
    /// Events, written after the claim work they would slow down (see `event_queue`).
    events: EventQueue,
    /// Claim reconciles under way: what events wait for.
    activity: Arc<Activity>,
    /// Permits to request a new Volume (see [`PLACEMENTS_AT_ONCE`]).
    placements: tokio::sync::Semaphore,
}

impl Context {
    pub fn new(client: kube::Client, instance: &str, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: "plinth-controller".into(), instance: Some(instance.into()) };
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let activity = Arc::new(Activity::default());
        let events = EventQueue::start(Recorder::new(client.clone(), reporter), Arc::clone(&activity));
        let placements = tokio::sync::Semaphore::new(PLACEMENTS_AT_ONCE);
        Self { client, metrics, backoff, caches: Caches::default(), events, activity, placements }
    }

    /// Records an event about `object` (a claim, a snapshot content) in the background: an event
    /// is for people, so the reconcile that reports it does not wait for its write. Failures,
    /// and events dropped from a full queue, are only logged.
    pub fn event<K: Resource<DynamicType = ()>>(&self, object: &K, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Provision".into(), secondary: None };
        self.events.raise(event, object.object_ref(&()));
    }
}

/// `pvc-<claim uid>`: the name of the claim's Volume and PV.
pub fn volume_name(claim: &PersistentVolumeClaim) -> Option<String> {
    claim.uid().map(|uid| format!("pvc-{uid}"))
}

fn parse_quantity(text: &str) -> Result<i64> {
    plinth_engine::size::parse_size(text).map(|b| b as i64).map_err(Error::Invalid)
}

fn requested_bytes(claim: &PersistentVolumeClaim) -> Result<i64> {
    let quantity = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .ok_or_else(|| Error::Invalid("the claim requests no storage".into()))?;
    parse_quantity(&quantity.0)
}

fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `node` satisfies the class's allowedTopologies (no restriction when absent).
fn allowed_by_topology(class: &StorageClass, node: &Node) -> bool {
    let Some(terms) = class.allowed_topologies.as_ref().filter(|t| !t.is_empty()) else { return true };
    let labels = node.labels();
    terms.iter().any(|term| {
        term.match_label_expressions
            .iter()
            .flatten()
            .all(|expr| labels.get(&expr.key).is_some_and(|v| expr.values.contains(v)))
    })
}

/// Immediate binding: the Ready node with a plinth agent (it publishes capacity), allowed by the
/// class's topology, with room for `bytes` — the least allocated one (most free space) first.
/// Volumes placed since a node last published are subtracted, so a burst of claims spreads out
/// instead of piling onto whichever node looked emptiest a moment ago.
async fn choose_node(ctx: &Context, class: &StorageClass, bytes: i64) -> Result<Option<String>> {
    let capacities = ctx.caches.capacities.state();
    let placed = ctx.caches.volumes.state();
    let unseen = ctx.caches.unseen_placements();
    let mut best: Option<(i64, String)> = None;
    for capacity in capacities.iter().filter(|c| Some(c.storage_class_name.as_str()) == class.metadata.name.as_deref())
    {
        let Some(node_name) = capacity
            .node_topology
            .as_ref()
            .and_then(|t| t.match_labels.as_ref())
            .and_then(|l| l.get(TOPOLOGY_NODE_KEY))
        else {
            continue;
        };
        let published = match capacity.capacity.as_ref().map(|q| parse_quantity(&q.0)) {
            Some(Ok(free)) => free,
            _ => continue,
        };
        let published_at =
            capacity.metadata.managed_fields.iter().flatten().filter_map(|f| f.time.as_ref()).map(|t| t.0).max();
        let in_flight: i64 = placed
            .iter()
            .filter(|v| &v.spec.node == node_name)
            .filter(|v| {
                let created = v.metadata.creation_timestamp.as_ref().map(|t| t.0);
                let not_ready = v.status.as_ref().and_then(|s| s.phase) != Some(Phase::Ready);
                not_ready || published_at.is_none_or(|p| created.is_none_or(|c| c >= p))
            })
            .map(|v| v.spec.size_bytes)
            .sum::<i64>()
            + unseen.iter().filter(|(node, _)| node == node_name).map(|(_, bytes)| bytes).sum::<i64>();
        let free = published - in_flight;
        if free < bytes || best.as_ref().is_some_and(|(b, _)| *b >= free) {
            continue;
        }
        let Some(node) = ctx.caches.node(&ctx.client, node_name).await? else { continue };
        if node_is_ready(&node) && allowed_by_topology(class, &node) {
            best = Some((free, node_name.clone()));
        }
    }
    Ok(best.map(|(_, n)| n))
}

fn persistent_volume(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volume: &Volume,
) -> Result<serde_json::Value> {
    let status = volume.status.as_ref().ok_or_else(|| Error::Invalid("volume has no status".into()))?;
    let volume_id = status.volume_id.clone().ok_or_else(|| Error::Invalid("volume has no ID yet".into()))?;
    let capacity = status.capacity_bytes.unwrap_or(volume.spec.size_bytes);
    let spec = claim.spec.clone().unwrap_or_default();
    let context = volume.volume_context();
    let attributes: BTreeMap<String, String> = context.to_map();
    let mut csi = json!({ "driver": DRIVER_NAME, "volumeHandle": volume_id, "volumeAttributes": attributes });
    if let Some(fs) = context.fs_type {
        csi["fsType"] = json!(fs.as_str());
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume.name_any(),
            "annotations": { PROVISIONED_BY: DRIVER_NAME },
        },
        "spec": {
            "capacity": { "storage": capacity.to_string() },
            "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
            "storageClassName": class.name_any(),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "mountOptions": class.mount_options.clone().unwrap_or_default(),
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(),
                "name": claim.name_any(),
                "uid": claim.uid(),
            },
            "csi": csi,
            "nodeAffinity": { "required": { "nodeSelectorTerms": [ { "matchExpressions": [
                { "key": TOPOLOGY_NODE_KEY, "operator": "In", "values": [volume.spec.node] }
            ] } ] } },
            // The PV controller binds a claim only to a PV of the claim's attributes class.
            "volumeAttributesClassName": spec.volume_attributes_class_name,
        }
    }))
}

/// Annotation the PV controller puts on a claim whose binding it has completed.
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";

/// Completes the binding of `claim` to the PV plinth made for it, writing what Kubernetes' PV
/// controller would (in its order: PV phase, claim `spec.volumeName` + bind-completed, claim
/// status). The PV controller then finds the pair bound and writes nothing; left to it, each bind
/// costs it four writes under its client rate limit (20 QPS by default), which is what made 100
/// claims wait ~20 s. Each step is skipped when already done, so a restart resumes anywhere. The
/// claim is checked by UID: one deleted and made again under the same name is not this one.
async fn complete_binding(ctx: &Context, claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Result<()> {
    let pv_name = pv.name_any();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let pv_phase = async {
        if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
            let status = json!({ "status": { "phase": "Bound" } });
            pvs.patch_status(&pv_name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        }
        Ok::<_, Error>(())
    };
    // The PV's phase and the claim's pointer are independent writes: made together, they cost
    // one round trip. The claim's status follows its pointer, as in the PV controller.
    let (pv_phase, pointer) = futures::join!(pv_phase, point_claim(&claims, claim, &pv_name));
    pv_phase?;
    pointer?;
    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        let spec = pv.spec.clone().unwrap_or_default();
        let status = json!({ "status": {
            "phase": "Bound",
            "accessModes": spec.access_modes,
            "capacity": spec.capacity,
            "currentVolumeAttributesClassName": spec.volume_attributes_class_name,
        } });
        claims.patch_status(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await?;
    }
    Ok(())
}

/// Sets the claim's `spec.volumeName` and the bind-completed annotation, unless both are there.
async fn point_claim(claims: &Api<PersistentVolumeClaim>, claim: &PersistentVolumeClaim, pv_name: &str) -> Result<()> {
    let pointed = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).is_some_and(|v| !v.is_empty());
    if pointed && claim.annotations().contains_key(BIND_COMPLETED) {
        return Ok(());
    }
    let mut patch = vec![json!({ "op": "test", "path": "/metadata/uid", "value": claim.uid() })];
    if !pointed {
        patch.push(json!({ "op": "add", "path": "/spec/volumeName", "value": pv_name }));
    }
    patch.push(if claim.metadata.annotations.is_some() {
        json!({ "op": "add", "path": "/metadata/annotations/pv.kubernetes.io~1bind-completed", "value": "yes" })
    } else {
        json!({ "op": "add", "path": "/metadata/annotations", "value": { BIND_COMPLETED: "yes" } })
    });
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(patch)).map_err(|e| Error::Invalid(e.to_string()))?;
    claims.patch(&claim.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(())
}

async fn reconcile_claim(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action> {
    let _working = ctx.activity.begin();
    let result = reconcile_claim_inner(&claim, &ctx).await;
    ctx.metrics.record_reconcile("claims", result.is_ok());
    ctx.backoff.observe(claim.as_ref(), result)
}

/// What the claim's Volume is made from and where, or why not yet (the claim has been told).
enum Placement {
    On { node: String, source: Option<Source> },
    Wait(Action),
}

/// The node for a new Volume: the source's node when the claim has a data source (node-local data
/// cannot move), the scheduler's choice for WaitForFirstConsumer, the best node for Immediate.
async fn place(ctx: &Context, claim: &PersistentVolumeClaim, class: &StorageClass, bytes: i64) -> Result<Placement> {
    let wait_for_consumer = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    let selected = claim.annotations().get(SELECTED_NODE).cloned();
    if wait_for_consumer && selected.is_none() {
        // The scheduler has not chosen yet; its annotation brings the claim back.
        return Ok(Placement::Wait(Action::await_change()));
    }
    let source = match data_source::resolve(&ctx.client, claim).await {
        Ok(source) => source,
        Err(error) => {
            let note =
                format!("cannot provision from the claim's data source: {}", plinth_controller::rpc::chain(&error));
            if error.may_resolve() {
                ctx.event(claim, EventType::Normal, "Provisioning", note.clone());
                return Err(Error::Waiting(note));
            }
            ctx.event(claim, EventType::Warning, "ProvisioningFailed", note);
            return Ok(Placement::Wait(Action::await_change()));
        }
    };
    if let Some(source) = source {
        if let Some(selected) = selected.filter(|_| wait_for_consumer)
            && selected != source.node
        {
            // What external-provisioner does for a node that cannot host the volume: say why and
            // hand the claim back to the scheduler.
            let note = format!(
                "{} holds its data on node {}, but the scheduler selected node {selected}: plinth volumes are \
                 node-local, so the claim must be used on node {}; asking the scheduler to choose again",
                source.describe, source.node, source.node
            );
            ctx.event(claim, EventType::Warning, "ProvisioningFailed", note);
            clear_selected_node(ctx, claim).await?;
            return Ok(Placement::Wait(Action::await_change()));
        }
        return Ok(Placement::On { node: source.node.clone(), source: Some(source) });
    }
    if let Some(node) = selected.filter(|_| wait_for_consumer) {
        return Ok(Placement::On { node, source: None });
    }
    match choose_node(ctx, class, bytes).await? {
        Some(node) => Ok(Placement::On { node, source: None }),
        None => {
            let class_name = class.name_any();
            let note =
                format!("no Ready node with the plinth agent has {bytes} bytes free for class {class_name}; retrying");
            ctx.event(claim, EventType::Warning, "ProvisioningFailed", note.clone());
            Err(Error::Waiting(note))
        }
    }
}

/// Removes the scheduler's selected-node annotation (the scheduler then picks again).
async fn clear_selected_node(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let patch = json!({ "metadata": { "annotations": { SELECTED_NODE: null } } });
    claims.patch(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The Volume spec for a claim, or why none can be made (the claim has been told).
async fn volume_spec(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: String,
    bytes: i64,
    source: Option<Source>,
) -> Result<std::result::Result<VolumeSpec, Action>> {
    let class_name = class.name_any();
    let parameters = match ClassParameters::parse(class.parameters.iter().flatten()) {
        Ok(parameters) => parameters,
        Err(error) => {
            let note = format!("StorageClass {class_name} has parameters plinth cannot use: {error}");
            ctx.event(claim, EventType::Warning, "ProvisioningFailed", note);
            return Ok(Err(Action::await_change()));
        }
    };
    let mut provisioning = parameters.provisioning;
    if let Some(vac) =
        claim.spec.as_ref().and_then(|s| s.volume_attributes_class_name.clone()).filter(|c| !c.is_empty())
    {
        // A class set at creation applies at creation.
        match modify::class_parameters(&ctx.client, &vac).await {
            Ok(changes) => provisioning = changes.provisioning.unwrap_or(provisioning),
            Err(error) => {
                let note = format!("VolumeAttributesClass {vac}: {}", plinth_controller::rpc::chain(&error));
                ctx.event(claim, EventType::Warning, "ProvisioningFailed", note.clone());
                if matches!(error, modify::ModifyError::ClassMissing(_)) {
                    return Err(Error::Waiting(note));
                }
                return Ok(Err(Action::await_change()));
            }
        }
    }
    let block = claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    Ok(Ok(VolumeSpec {
        node,
        size_bytes: volume_bytes(bytes, source.as_ref()),
        volume_mode: if block { VolumeMode::Block } else { VolumeMode::Filesystem },
        fs_type: (!block).then(|| parameters.fs_type.unwrap_or(FsType::Ext4)),
        provisioning,
        mkfs_options: parameters.mkfs_options,
        claim_ref: Some(ClaimRef {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            uid: claim.uid().unwrap_or_default(),
        }),
        content_source: source.map(|s| s.content),
    }))
}

/// The size of the claim's Volume: what it asks for, and for a copy at least its source's size.
fn volume_bytes(requested: i64, source: Option<&Source>) -> i64 {
    requested.max(source.map_or(0, |s| s.size_bytes))
}

async fn reconcile_claim_inner(claim: &PersistentVolumeClaim, ctx: &Context) -> Result<Action> {
    let Some(class_name) = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone()) else {
        return Ok(Action::await_change());
    };
    let Some(class) = ctx.caches.class(&ctx.client, &class_name).await? else {
        return Ok(Action::await_change());
    };
    if class.provisioner != DRIVER_NAME || claim.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(name) = volume_name(claim) else { return Ok(Action::await_change()) };
    let bound_to = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|v| !v.is_empty());
    if let Some(pv_name) = bound_to {
        return bound(claim, &class, &pv_name, ctx).await;
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if let Some(pv) = ctx.caches.pv(&name) {
        // Made already (an earlier attempt stopped before the claim was bound to it). A PV the
        // cache has not seen yet is found below, when creating it answers 409.
        complete_binding(ctx, claim, &pv).await?;
        return Ok(Action::await_change());
    }
    let bytes = requested_bytes(claim)?;
    let volume = match ctx.caches.volume(&name) {
        Some(volume) => volume,
        None => {
            if let Some(wait) = ctx.caches.unseen_volume(&name) {
                // Requested a moment ago; its watch event brings the claim back.
                return Ok(Action::requeue(wait));
            }
            let _permit = ctx.placements.acquire().await.map_err(|e| Error::Invalid(e.to_string()))?;
            let (node, source) = match place(ctx, claim, &class, bytes).await? {
                Placement::On { node, source } => (node, source),
                Placement::Wait(action) => return Ok(action),
            };
            let placed = ctx.caches.place(&name, &node, volume_bytes(bytes, source.as_ref()));
            let described = source.as_ref().map(|s| format!(" from {}", s.describe)).unwrap_or_default();
            let spec = match volume_spec(ctx, claim, &class, node.clone(), bytes, source).await? {
                Ok(spec) => spec,
                Err(action) => return Ok(action),
            };
            let (volume, created) = volumes::create(&ctx.client, &name, spec).await?;
            if created {
                placed.created();
            }
            failpoint::check("provision.volume_requested")?;
            // A copy can take a while; a blank image is reported once, by ProvisioningSucceeded
            // (an event per step would be a fifth of a burst's API writes).
            if created && !described.is_empty() {
                let note = format!("creating volume {name} on node {node}{described}");
                ctx.event(claim, EventType::Normal, "Provisioning", note);
            }
            volume
        }
    };
    match volume.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Ready) => {
            let pv: PersistentVolume = serde_json::from_value(persistent_volume(claim, &class, &volume)?)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let pv = match pvs.create(&PostParams::default(), &pv).await {
                Ok(pv) => {
                    ctx.event(
                        claim,
                        EventType::Normal,
                        "ProvisioningSucceeded",
                        format!("provisioned volume {name} on node {}", volume.spec.node),
                    );
                    pv
                }
                // Made by an earlier attempt: bind to what is stored, not to what was asked.
                Err(kube::Error::Api(e)) if e.code == 409 => pvs.get(&name).await?,
                Err(e) => return Err(e.into()),
            };
            failpoint::check("provision.pv_made")?;
            complete_binding(ctx, claim, &pv).await?;
            Ok(Action::await_change())
        }
        Some(Phase::Failed) => {
            let status = volume.status.as_ref();
            let why = status.and_then(|s| s.message.clone()).unwrap_or_default();
            let node = &volume.spec.node;
            if volume.metadata.deletion_timestamp.is_some() {
                // Given up on already; a new Volume is placed once the agent has let this one go.
                return Err(Error::Waiting(format!("the failed volume on node {node} is being removed")));
            }
            let wait_for_consumer = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
            let no_room = status.and_then(|s| s.reason.as_deref()) == Some(crd::reason::RESOURCE_EXHAUSTED);
            let selected = claim.annotations().get(SELECTED_NODE);
            if wait_for_consumer && no_room && volume.spec.content_source.is_none() && selected == Some(node) {
                // The scheduler chose a node that has no room (its capacity figure was older than
                // the last volumes made there): hand the claim back, as external-provisioner does on
                // RESOURCE_EXHAUSTED, rather than wait on that node until space is freed.
                let note = format!(
                    "node {node} has no room for the volume ({why}); asking the scheduler to choose another node"
                );
                ctx.event(claim, EventType::Warning, "ProvisioningFailed", note);
                volumes::delete(&ctx.client, &name).await?;
                clear_selected_node(ctx, claim).await?;
                return Ok(Action::await_change());
            }
            let note = format!("node {node} could not create the volume: {why}");
            ctx.event(claim, EventType::Warning, "ProvisioningFailed", note.clone());
            if !wait_for_consumer && volume.spec.content_source.is_none() {
                // Let another node be chosen; the agent drops the finalizer once nothing is left.
                volumes::delete(&ctx.client, &name).await?;
            }
            Err(Error::Waiting(note))
        }
        // The agent's report brings the claim back (Volumes are watched and mapped to claims).
        _ => Ok(Action::await_change()),
    }
}

/// A claim pointing at a PV: grow it if it asks for more, modify it if its attributes class
/// changed.
async fn bound(claim: &PersistentVolumeClaim, class: &StorageClass, pv_name: &str, ctx: &Context) -> Result<Action> {
    let status = claim.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Bound") {
        // Binding is being completed; its last step (the claim's status) brings the claim back.
        return Ok(Action::await_change());
    }
    let has = status.capacity.as_ref().and_then(|c| c.get("storage")).map(|q| parse_quantity(&q.0)).transpose()?;
    let wanted_class = claim.spec.as_ref().and_then(|s| s.volume_attributes_class_name.clone()).unwrap_or_default();
    let modify_idle = status.modify_volume_status.is_none()
        && wanted_class == status.current_volume_attributes_class_name.clone().unwrap_or_default();
    if has.is_some_and(|has| requested_bytes(claim).is_ok_and(|wants| wants <= has)) && modify_idle {
        // Nothing to grow or modify: the common case, answered without the PV.
        return Ok(Action::await_change());
    }
    let pv = match ctx.caches.pv(pv_name) {
        Some(pv) => pv,
        None => match Api::<PersistentVolume>::all(ctx.client.clone()).get_opt(pv_name).await? {
            Some(pv) => pv,
            None => return Ok(Action::await_change()),
        },
    };
    if pv.annotations().get(PROVISIONED_BY).map(String::as_str) != Some(DRIVER_NAME) {
        return Ok(Action::await_change());
    }
    if let Some(action) = expand(claim, class, &pv, ctx).await? {
        return Ok(action);
    }
    modify::reconcile_claim(ctx, claim, &pv).await
}

/// Claim grew: Volume first (the agent grows the image), then the PV, then the claim is flagged
/// for kubelet's NodeExpandVolume. `None`: there is nothing (more) to grow.
async fn expand(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pv: &PersistentVolume,
    ctx: &Context,
) -> Result<Option<Action>> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv_name = pv.name_any();
    let pv_name = pv_name.as_str();
    let requested = requested_bytes(claim)?;
    let current = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| parse_quantity(&q.0))
        .transpose()?
        .unwrap_or(0);
    if requested <= current {
        return Ok(None);
    }
    if class.allow_volume_expansion != Some(true) {
        ctx.event(
            claim,
            EventType::Warning,
            "ExpansionFailed",
            format!("class {} does not allow expansion", class.name_any()),
        );
        return Ok(None);
    }
    let Some(volume) = volumes::api(&ctx.client).get_opt(pv_name).await? else {
        return Ok(None);
    };
    if volume.spec.size_bytes < requested {
        volumes::request_growth(&ctx.client, pv_name, requested).await?;
        failpoint::check("expand.growth_requested")?;
        ctx.event(claim, EventType::Normal, "Resizing", format!("growing volume {pv_name} to {requested} bytes"));
        // The agent's report brings the claim back (Volumes are watched).
        return Ok(Some(Action::await_change()));
    }
    let grown = volume.status.as_ref().and_then(|s| s.capacity_bytes).unwrap_or(0);
    if grown < requested {
        let failed = volume.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Failed));
        if failed {
            let why = volume.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            ctx.event(claim, EventType::Warning, "ExpansionFailed", why.clone());
            return Err(Error::Waiting(format!("room to grow volume {pv_name}: {why}")));
        }
        return Ok(Some(Action::await_change()));
    }
    let patch = json!({ "spec": { "capacity": { "storage": grown.to_string() } } });
    pvs.patch(pv_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    failpoint::check("expand.pv_grown")?;
    // What external-resizer does: record the allocation and hand over to kubelet.
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let status = json!({ "status": {
        "allocatedResources": { "storage": grown.to_string() },
        "allocatedResourceStatuses": { "storage": "NodeResizePending" },
        "conditions": [ {
            "type": "FileSystemResizePending",
            "status": "True",
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
        } ],
    } });
    claims.patch_status(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await?;
    ctx.event(
        claim,
        EventType::Normal,
        "FileSystemResizeRequired",
        format!("volume {pv_name} grew to {grown} bytes; kubelet finishes on the node"),
    );
    Ok(Some(Action::await_change()))
}

async fn reconcile_volume_release(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action> {
    let result = reconcile_release_inner(&pv, &ctx).await;
    ctx.metrics.record_reconcile("reclaim", result.is_ok());
    ctx.backoff.observe(pv.as_ref(), result)
}

async fn reconcile_release_inner(pv: &PersistentVolume, ctx: &Context) -> Result<Action> {
    if pv.annotations().get(PROVISIONED_BY).map(String::as_str) != Some(DRIVER_NAME) {
        return Ok(Action::await_change());
    }
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let delete = pv.spec.as_ref().and_then(|s| s.persistent_volume_reclaim_policy.as_deref()) == Some("Delete");
    if !released || !delete || pv.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = pv.name_any();
    if volumes::api(&ctx.client).get_opt(&name).await?.is_some() {
        volumes::delete(&ctx.client, &name).await?;
        failpoint::check("reclaim.volume_released")?;
        // The agent removes the image, then the finalizer; the Volume watch brings us back.
        return Ok(Action::await_change());
    }
    match Api::<PersistentVolume>::all(ctx.client.clone()).delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(pv = %name, "released volume deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// Requeue for an error: the object's next backoff delay. Waiting is progress, not a failure.
pub fn error_policy<K: Resource<DynamicType = ()>>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(object.as_ref());
    let object = ObjectRef::from_obj(object.as_ref());
    match error {
        Error::Waiting(what) => tracing::info!(%object, %what, retry_in = ?delay, "waiting"),
        _ => tracing::warn!(%object, %error, retry_in = ?delay, "reconcile failed; retrying"),
    }
    Action::requeue(delay)
}

/// Claims reconciled at once: enough that a claim whose Volume is ready never waits behind claims
/// still to be placed (those wait for a placement permit instead). A bound, so that a flood of
/// claims is not a flood of tasks.
const CLAIMS_AT_ONCE: u16 = 512;

/// Claims requesting a new Volume at once. Under a burst the API server is what every claim
/// waits for; few placements at a time leave its time to the claims that are further along, so
/// claims are Bound in the order they came, instead of all advancing step by step together and
/// the first one finishing with the last.
const PLACEMENTS_AT_ONCE: usize = 4;

/// Runs both reconcilers until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let Some(writers) = ctx.caches.take_writers() else {
        tracing::error!("the claim reconcilers are already running in this process");
        return;
    };
    let client = ctx.client.clone();
    let feeds = async {
        futures::join!(
            cache::feed(Api::all(client.clone()), writers.classes, cache::strip_managed_fields),
            cache::feed(Api::all(client.clone()), writers.capacities, cache::keep_all),
            cache::feed(Api::all(client.clone()), writers.nodes, cache::strip_node),
        );
    };
    // Volumes and PVs are cached by the streams that trigger the reconcilers, so a reconcile
    // woken by a change reads that change from the cache.
    let seen = Arc::clone(&ctx);
    let volumes = cache::reflect(Api::<Volume>::all(client.clone()), writers.volumes, cache::strip_managed_fields)
        .inspect(move |event| {
            if let Ok(volume) = event {
                seen.caches.saw_volume(&volume.name_any());
            }
        });
    // One Volume watch triggers both reconcilers.
    let (volume_watch, volumes, volumes_for_releases) = cache::split(volumes);
    let pvs = cache::reflect(Api::<PersistentVolume>::all(client.clone()), writers.pvs, cache::strip_managed_fields);
    let reconcilers = async {
        ctx.caches.wait_until_ready().await;
        tracing::info!("caches filled; reconciling claims");
        let claims = Controller::new(Api::<PersistentVolumeClaim>::all(client.clone()), watcher::Config::default())
            .with_config(controller::Config::default().concurrency(CLAIMS_AT_ONCE))
            .watches_stream(volumes, |volume: Volume| {
                volume.spec.claim_ref.map(|c| ObjectRef::new(&c.name).within(&c.namespace))
            })
            .run(reconcile_claim, error_policy, Arc::clone(&ctx))
            .for_each(|_| async {});
        let releases = Controller::for_stream(pvs, ctx.caches.pvs.clone())
            .watches_stream(volumes_for_releases, |volume: Volume| {
                Some(ObjectRef::<PersistentVolume>::new(&volume.name_any()))
            })
            .run(reconcile_volume_release, error_policy, Arc::clone(&ctx))
            .for_each(|_| async {});
        futures::join!(claims, releases);
    };
    futures::join!(feeds, volume_watch, reconcilers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VolumeStatus;

    #[test]
    fn the_pv_carries_the_claims_attributes_class_and_stays_on_its_node() {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "apps", "uid": "u-1"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "plinth",
                     "volumeAttributesClassName": "plinth-thick", "resources": {"requests": {"storage": "64Mi"}}}
        }))
        .unwrap();
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": "plinth"}, "provisioner": DRIVER_NAME, "reclaimPolicy": "Retain"
        }))
        .unwrap();
        let spec = VolumeSpec {
            node: "node-a".into(),
            size_bytes: 64 << 20,
            volume_mode: VolumeMode::Filesystem,
            fs_type: Some(FsType::Ext4),
            provisioning: plinth_engine::model::Provisioning::Thick,
            mkfs_options: None,
            claim_ref: None,
            content_source: None,
        };
        let mut volume = volumes::new_volume("pvc-u-1", spec);
        volume.status = Some(VolumeStatus {
            phase: Some(Phase::Ready),
            volume_id: Some("vol-1".into()),
            capacity_bytes: Some(64 << 20),
            ..Default::default()
        });
        let pv: PersistentVolume = serde_json::from_value(persistent_volume(&claim, &class, &volume).unwrap()).unwrap();
        let spec = pv.spec.unwrap();
        assert_eq!(
            spec.volume_attributes_class_name.as_deref(),
            Some("plinth-thick"),
            "else the PV controller never binds"
        );
        assert_eq!(spec.claim_ref.unwrap().uid.as_deref(), Some("u-1"));
        assert_eq!(spec.persistent_volume_reclaim_policy.as_deref(), Some("Retain"));
        let terms = spec.node_affinity.unwrap().required.unwrap().node_selector_terms;
        assert_eq!(terms[0].match_expressions.as_ref().unwrap()[0].values.as_deref(), Some(&["node-a".to_owned()][..]));
        let attributes = spec.csi.unwrap().volume_attributes.unwrap();
        assert_eq!(attributes["provisioning"], "thick");
    }
}
