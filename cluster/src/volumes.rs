//! The `Volume` API in one place: how a Volume is made (labels, finalizer), found by its CSI
//! volume ID, grown, deleted, and waited for. The claim reconciler, the sidecar controller and
//! the node agent all go through here.
//!
//! Waits watch the one object (kube-runtime's `await_condition`) rather than polling it, and a
//! Volume is found by its `plinth.csi.dev/volume-id` label rather than by listing them all.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use plinth_engine::VolumeId;
use serde_json::json;

use crate::crd::{Volume, VolumeSpec, VolumeStatus};
use crate::keys::{IMAGE_FINALIZER, NODE_LABEL, VOLUME_ID_LABEL};

pub fn api(client: &kube::Client) -> Api<Volume> {
    Api::all(client.clone())
}

/// The CSI volume ID the node will give the Volume named `name` (the engine derives it from the
/// name, so it is known before the image exists).
pub fn volume_id_for(name: &str) -> VolumeId {
    VolumeId::for_name(name)
}

/// A Volume as plinth creates it: labelled with its node (the agent's selector) and its volume
/// ID (lookups), and carrying the image finalizer from the start, so deleting it always waits
/// for the node to remove the image.
pub fn new_volume(name: &str, spec: VolumeSpec) -> Volume {
    let labels = BTreeMap::from([
        (NODE_LABEL.to_owned(), spec.node.clone()),
        (VOLUME_ID_LABEL.to_owned(), volume_id_for(name).to_string()),
    ]);
    let mut volume = Volume::new(name, spec);
    volume.metadata.labels = Some(labels);
    volume.metadata.finalizers = Some(vec![IMAGE_FINALIZER.to_owned()]);
    volume
}

/// Creates the Volume named `name` unless it exists; returns it and whether this call made it.
pub async fn ensure(client: &kube::Client, name: &str, spec: VolumeSpec) -> kube::Result<(Volume, bool)> {
    let volumes = api(client);
    if let Some(existing) = volumes.get_opt(name).await? {
        return Ok((existing, false));
    }
    create(client, name, spec).await
}

/// Creates the Volume named `name`, or reads the one that exists (409); returns it and whether
/// this call made it. For callers that looked in a cache first: one write, no read, when new.
pub async fn create(client: &kube::Client, name: &str, spec: VolumeSpec) -> kube::Result<(Volume, bool)> {
    let volumes = api(client);
    match volumes.create(&PostParams::default(), &new_volume(name, spec)).await {
        Ok(created) => Ok((created, true)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok((volumes.get(name).await?, false)),
        Err(e) => Err(e),
    }
}

/// Asks for a Volume of at least `bytes`; the agent grows the image.
pub async fn request_growth(client: &kube::Client, name: &str, bytes: i64) -> kube::Result<()> {
    let patch = json!({ "spec": { "sizeBytes": bytes } });
    api(client).patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The Volume whose CSI volume ID is `id`, found by label. A malformed ID names no Volume.
/// (Volumes made before the label existed get it from their node's agent.)
pub async fn by_volume_id(client: &kube::Client, id: &str) -> kube::Result<Option<Volume>> {
    let Some(id) = VolumeId::parse(id) else { return Ok(None) };
    let selector = format!("{VOLUME_ID_LABEL}={id}");
    let found = api(client).list(&ListParams::default().labels(&selector)).await?;
    Ok(found.items.into_iter().find(|v| volume_id_for(&v.name_any()) == id))
}

/// Deletes the Volume (the agent then removes the image and the finalizer). Already gone is done.
pub async fn delete(client: &kube::Client, name: &str) -> kube::Result<()> {
    match api(client).delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Replaces the status (merge patch of the status subresource).
pub async fn set_status(client: &kube::Client, name: &str, status: &VolumeStatus) -> kube::Result<()> {
    let patch = json!({ "status": status_patch(status) });
    api(client).patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// `status` as a merge patch: an absent message or reason is written as null, so a Volume that
/// recovers (Failed, then Ready) does not keep the old failure's words.
fn status_patch(status: &VolumeStatus) -> serde_json::Value {
    let mut patch = json!(status);
    if let Some(fields) = patch.as_object_mut() {
        for field in ["message", "reason"] {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    patch
}

/// Adds the volume-ID label to a Volume made before plinth set it at creation.
pub async fn ensure_volume_id_label(client: &kube::Client, volume: &Volume) -> kube::Result<()> {
    let name = volume.name_any();
    let id = volume_id_for(&name).to_string();
    if volume.labels().get(VOLUME_ID_LABEL) == Some(&id) {
        return Ok(());
    }
    let patch = json!({ "metadata": { "labels": { VOLUME_ID_LABEL: id } } });
    api(client).patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("watching {kind} {name}")]
    Watch {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
    #[error("{kind} {name} is still being prepared on its node after {}s; retry", within.as_secs())]
    TimedOut { kind: &'static str, name: String, within: Duration },
}

/// Watches the Volume named `name` until `condition` holds (it is given `None` once the object
/// is gone) or `within` passes. Returns the object as it was when the condition held.
pub async fn wait_for(
    client: &kube::Client,
    name: &str,
    within: Duration,
    condition: impl Condition<Volume>,
) -> Result<Option<Volume>, WaitError> {
    wait_on(api(client), "volume", name, within, condition).await
}

/// `wait_for` for any of plinth's objects (`kind` names it in errors).
pub async fn wait_on<K>(
    api: Api<K>,
    kind: &'static str,
    name: &str,
    within: Duration,
    condition: impl Condition<K>,
) -> Result<Option<K>, WaitError>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    match tokio::time::timeout(within, await_condition(api, name, condition)).await {
        Ok(Ok(object)) => Ok(object),
        Ok(Err(source)) => Err(WaitError::Watch { kind, name: name.to_owned(), source }),
        Err(_) => Err(WaitError::TimedOut { kind, name: name.to_owned(), within }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VolumeMode;

    #[test]
    fn a_status_without_a_failure_clears_the_old_one() {
        let ready = VolumeStatus { phase: Some(crate::crd::Phase::Ready), ..Default::default() };
        let patch = status_patch(&ready);
        assert_eq!(patch["phase"], "Ready");
        assert!(patch["message"].is_null() && patch.as_object().unwrap().contains_key("message"));
        assert!(patch["reason"].is_null() && patch.as_object().unwrap().contains_key("reason"));
        assert!(!patch.as_object().unwrap().contains_key("volumeId"), "other fields are left as they are");
        let failed = VolumeStatus {
            phase: Some(crate::crd::Phase::Failed),
            message: Some("no room".into()),
            reason: Some(crate::crd::reason::RESOURCE_EXHAUSTED.into()),
            ..Default::default()
        };
        assert_eq!(status_patch(&failed)["reason"], "ResourceExhausted");
    }

    #[test]
    fn new_volumes_carry_their_labels_and_finalizer() {
        let spec = VolumeSpec {
            node: "node-a".into(),
            size_bytes: 1 << 30,
            volume_mode: VolumeMode::Block,
            fs_type: None,
            provisioning: Default::default(),
            mkfs_options: None,
            claim_ref: None,
            content_source: None,
        };
        let volume = new_volume("pvc-1", spec);
        assert_eq!(volume.labels()[NODE_LABEL], "node-a");
        assert_eq!(volume.labels()[VOLUME_ID_LABEL], VolumeId::for_name("pvc-1").as_str());
        assert!(VolumeId::parse(&volume.labels()[VOLUME_ID_LABEL]).is_some());
        assert_eq!(volume.finalizers(), [IMAGE_FINALIZER]);
    }
}
