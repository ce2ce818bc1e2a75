//! The cluster controller's reconcilers:
//! - claims of plinth StorageClasses → a `Volume` on a chosen node → once that node's agent reports
//!   it ready, a PersistentVolume pre-bound to the claim (the real PV controller completes binding);
//! - Released PVs with reclaimPolicy Delete → delete the `Volume` (the agent removes the image) →
//!   delete the PV; Retain keeps both;
//! - a claim asking for more → grow the `Volume`, then the PV, then flag the claim for kubelet's
//!   node-side expansion.
//!
//! Names are derived from the claim's UID (`pvc-<uid>`), so a restarted controller finds what it
//! made before and never makes a second Volume or PV.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use plinth_controller::metrics::Metrics;
use plinth_controller::params::ClassParameters;
use plinth_engine::model::FsType;
use plinth_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use serde_json::json;

use crate::crd::{ClaimRef, Phase, Volume, VolumeMode, VolumeSpec};
use crate::keys::{PROVISIONED_BY, SELECTED_NODE};
use crate::volumes;
use crate::{Error, Result};

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(client: kube::Client, instance: &str, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: "plinth-controller".into(), instance: Some(instance.into()) };
        Self { recorder: Recorder::new(client.clone(), reporter), client, metrics }
    }

    async fn event(&self, claim: &PersistentVolumeClaim, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Provision".into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, &claim.object_ref(&())).await {
            tracing::warn!(%error, "recording an event failed");
        }
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
    let capacities = Api::<CSIStorageCapacity>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    let placed = Api::<Volume>::all(ctx.client.clone()).list(&ListParams::default()).await?.items;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut best: Option<(i64, String)> = None;
    for capacity in
        capacities.items.iter().filter(|c| Some(c.storage_class_name.as_str()) == class.metadata.name.as_deref())
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
            .sum();
        let free = published - in_flight;
        if free < bytes || best.as_ref().is_some_and(|(b, _)| *b >= free) {
            continue;
        }
        let Some(node) = nodes.get_opt(node_name).await? else { continue };
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
        }
    }))
}

async fn reconcile_claim(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action> {
    let result = reconcile_claim_inner(&claim, &ctx).await;
    ctx.metrics.record_reconcile("claims", result.is_ok());
    result
}

async fn reconcile_claim_inner(claim: &PersistentVolumeClaim, ctx: &Context) -> Result<Action> {
    let Some(class_name) = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone()) else {
        return Ok(Action::await_change());
    };
    let Some(class) = Api::<StorageClass>::all(ctx.client.clone()).get_opt(&class_name).await? else {
        return Ok(Action::await_change());
    };
    if class.provisioner != DRIVER_NAME || claim.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(name) = volume_name(claim) else { return Ok(Action::await_change()) };
    let bound_to = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|v| !v.is_empty());
    if let Some(pv_name) = bound_to {
        return expand(claim, &class, &pv_name, ctx).await;
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if pvs.get_opt(&name).await?.is_some() {
        // Made already; the PV controller binds it.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let bytes = requested_bytes(claim)?;
    let wait_for_consumer = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    let volume = match volumes::api(&ctx.client).get_opt(&name).await? {
        Some(volume) => volume,
        None => {
            let node = if wait_for_consumer {
                match claim.annotations().get(SELECTED_NODE) {
                    Some(node) => node.clone(),
                    None => return Ok(Action::await_change()),
                }
            } else {
                match choose_node(ctx, &class, bytes).await? {
                    Some(node) => node,
                    None => {
                        ctx.event(claim, EventType::Warning, "ProvisioningFailed", format!(
                            "no Ready node with the plinth agent has {bytes} bytes free for class {class_name}; retrying"
                        ))
                        .await;
                        return Ok(Action::requeue(Duration::from_secs(5)));
                    }
                }
            };
            let parameters = match ClassParameters::parse(class.parameters.iter().flatten()) {
                Ok(parameters) => parameters,
                Err(error) => {
                    let note = format!("StorageClass {class_name} has parameters plinth cannot use: {error}");
                    ctx.event(claim, EventType::Warning, "ProvisioningFailed", note).await;
                    return Ok(Action::requeue(Duration::from_secs(60)));
                }
            };
            let block = claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block");
            let spec = VolumeSpec {
                node: node.clone(),
                size_bytes: bytes,
                volume_mode: if block { VolumeMode::Block } else { VolumeMode::Filesystem },
                fs_type: (!block).then(|| parameters.fs_type.unwrap_or(FsType::Ext4)),
                provisioning: parameters.provisioning,
                mkfs_options: parameters.mkfs_options,
                claim_ref: Some(ClaimRef {
                    namespace: claim.namespace().unwrap_or_default(),
                    name: claim.name_any(),
                    uid: claim.uid().unwrap_or_default(),
                }),
            };
            let (volume, created) = volumes::ensure(&ctx.client, &name, spec).await?;
            if created {
                let note = format!("creating volume {name} on node {node}");
                ctx.event(claim, EventType::Normal, "Provisioning", note).await;
            }
            volume
        }
    };
    match volume.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Ready) => {
            let pv = persistent_volume(claim, &class, &volume)?;
            match pvs
                .create(&PostParams::default(), &serde_json::from_value(pv).map_err(|e| Error::Invalid(e.to_string()))?)
                .await
            {
                Ok(_) => {
                    ctx.event(
                        claim,
                        EventType::Normal,
                        "ProvisioningSucceeded",
                        format!("provisioned volume {name} on node {}", volume.spec.node),
                    )
                    .await;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        Some(Phase::Failed) => {
            let why = volume.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            ctx.event(
                claim,
                EventType::Warning,
                "ProvisioningFailed",
                format!("node {} could not create the volume: {why}", volume.spec.node),
            )
            .await;
            if !wait_for_consumer {
                // Let another node be chosen; the agent drops the finalizer once nothing is left.
                volumes::delete(&ctx.client, &name).await?;
            }
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        _ => Ok(Action::requeue(Duration::from_secs(2))),
    }
}

/// Claim grew: Volume first (the agent grows the image), then the PV, then the claim is flagged
/// for kubelet's NodeExpandVolume.
async fn expand(claim: &PersistentVolumeClaim, class: &StorageClass, pv_name: &str, ctx: &Context) -> Result<Action> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = pvs.get_opt(pv_name).await? else { return Ok(Action::await_change()) };
    if pv.annotations().get(PROVISIONED_BY).map(String::as_str) != Some(DRIVER_NAME) {
        return Ok(Action::await_change());
    }
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
        return Ok(Action::await_change());
    }
    if class.allow_volume_expansion != Some(true) {
        ctx.event(
            claim,
            EventType::Warning,
            "ExpansionFailed",
            format!("class {} does not allow expansion", class.name_any()),
        )
        .await;
        return Ok(Action::await_change());
    }
    let Some(volume) = volumes::api(&ctx.client).get_opt(pv_name).await? else {
        return Ok(Action::await_change());
    };
    if volume.spec.size_bytes < requested {
        volumes::request_growth(&ctx.client, pv_name, requested).await?;
        ctx.event(claim, EventType::Normal, "Resizing", format!("growing volume {pv_name} to {requested} bytes")).await;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let grown = volume.status.as_ref().and_then(|s| s.capacity_bytes).unwrap_or(0);
    if grown < requested {
        let failed = volume.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Failed));
        if failed {
            let why = volume.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            ctx.event(claim, EventType::Warning, "ExpansionFailed", why).await;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let patch = json!({ "spec": { "capacity": { "storage": grown.to_string() } } });
    pvs.patch(pv_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
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
    )
    .await;
    Ok(Action::await_change())
}

async fn reconcile_volume_release(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action> {
    let result = reconcile_release_inner(&pv, &ctx).await;
    ctx.metrics.record_reconcile("reclaim", result.is_ok());
    result
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
        // The agent removes the image, then the finalizer; the Volume watch brings us back.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    match Api::<PersistentVolume>::all(ctx.client.clone()).delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(pv = %name, "released volume deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

fn error_policy<K: ResourceExt>(object: Arc<K>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(object = %object.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

/// Runs both reconcilers until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let claims = Controller::new(Api::<PersistentVolumeClaim>::all(client.clone()), watcher::Config::default())
        .watches(Api::<Volume>::all(client.clone()), watcher::Config::default(), |volume: Volume| {
            volume.spec.claim_ref.map(|c| ObjectRef::new(&c.name).within(&c.namespace))
        })
        .run(reconcile_claim, error_policy, Arc::clone(&ctx))
        .for_each(|_| async {});
    let releases = Controller::new(Api::<PersistentVolume>::all(client.clone()), watcher::Config::default())
        .watches(Api::<Volume>::all(client), watcher::Config::default(), |volume: Volume| {
            Some(ObjectRef::<PersistentVolume>::new(&volume.name_any()))
        })
        .run(reconcile_volume_release, error_policy, ctx)
        .for_each(|_| async {});
    futures::join!(claims, releases);
}
