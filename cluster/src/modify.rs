//! VolumeAttributesClass (storage.k8s.io/v1). A class of driver plinth.csi.dev carries plinth's
//! mutable parameters (`provisioning`, parsed by the engine's `MutableParameters`, the one parser
//! for every path). At creation the Volume is made with them and the PV names the class (the PV
//! controller binds a claim only to a PV of the claim's class). When a bound claim's class
//! changes, the Volume is modified where it lives — the agent preallocates a thin image that turns
//! thick — and the claim's status follows the Kubernetes contract as external-resizer's modify
//! controller writes it: `modifyVolumeStatus` InProgress (with a ModifyingVolume condition) while
//! the node works, Infeasible for parameters plinth cannot apply, Pending for a class that does
//! not exist; on success the PV names the new class, `currentVolumeAttributesClassName` is it and
//! `modifyVolumeStatus` is cleared. The sidecar path (external-resizer calling
//! ControllerModifyVolume) drives the same `request`.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition};
use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use plinth_controller::rpc::GrpcError;
use plinth_engine::model::{MutableParameters, Provisioning};
use plinth_proto::DRIVER_NAME;
use serde_json::json;
use tonic::Code;

use crate::crd::{Phase, Volume};
use crate::csi_controller::kube_code;
use crate::provisioner::Context;
use crate::volumes::{self, WaitError};
use crate::{Error, Result};

const MODIFYING: &str = "ModifyingVolume";
const MODIFY_ERROR: &str = "ModifyVolumeError";

#[derive(Debug, thiserror::Error)]
pub enum ModifyError {
    #[error("VolumeAttributesClass {0} does not exist")]
    ClassMissing(String),
    #[error("VolumeAttributesClass {class} is for driver {driver}, not {DRIVER_NAME}")]
    OtherDriver { class: String, driver: String },
    #[error(transparent)]
    Parameters(plinth_engine::Error),
    #[error("volume {0} is thick: its blocks are allocated and plinth does not release them")]
    CannotThin(String),
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("node {node} could not modify volume {name}: {why}")]
    NodeFailed { name: String, node: String, why: String },
    #[error(transparent)]
    Wait(WaitError),
    #[error("modifying volume {name} through the Kubernetes API")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl GrpcError for ModifyError {
    fn code(&self) -> Code {
        match self {
            // What no retry changes: the claim's class must change (Infeasible).
            Self::OtherDriver { .. } | Self::CannotThin(_) => Code::InvalidArgument,
            Self::Parameters(e) => e.code(),
            Self::ClassMissing(_) | Self::VolumeNotFound(_) => Code::NotFound,
            // The node may succeed later (room freed): not final.
            Self::NodeFailed { .. } => Code::ResourceExhausted,
            Self::Wait(WaitError::TimedOut { .. }) => Code::Aborted,
            Self::Wait(WaitError::Watch { .. }) => Code::Unavailable,
            Self::Kube { source, .. } => kube_code(source),
        }
    }
}

impl ModifyError {
    /// Infeasible in the claim's status: no retry helps until the claim asks for another class.
    pub fn infeasible(&self) -> bool {
        self.code() == Code::InvalidArgument
    }
}

/// The mutable parameters of the class named `name`, checked for plinth.
pub async fn class_parameters(client: &kube::Client, name: &str) -> Result<MutableParameters, ModifyError> {
    let classes: Api<VolumeAttributesClass> = Api::all(client.clone());
    let class = classes
        .get_opt(name)
        .await
        .map_err(|source| ModifyError::Kube { name: name.to_owned(), source })?
        .ok_or_else(|| ModifyError::ClassMissing(name.to_owned()))?;
    if class.driver_name != DRIVER_NAME {
        return Err(ModifyError::OtherDriver { class: name.to_owned(), driver: class.driver_name });
    }
    MutableParameters::parse(class.parameters.iter().flatten()).map_err(ModifyError::Parameters)
}

/// Where a modification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The node applied it.
    Done,
    /// Asked for; the node's agent has not reported on it yet.
    Pending,
}

/// The Volume's spec with `changes` applied, or why they cannot be.
pub fn apply_to(volume: &Volume, changes: MutableParameters) -> Result<Option<Provisioning>, ModifyError> {
    match (changes.provisioning, volume.spec.provisioning) {
        (Some(Provisioning::Thin), Provisioning::Thick) => Err(ModifyError::CannotThin(volume.name_any())),
        (Some(wanted), current) if wanted != current => Ok(Some(wanted)),
        _ => Ok(None),
    }
}

/// Asks the Volume's node to apply `changes` (the agent preallocates a Volume turned thick) and
/// says whether it has. Idempotent: call it again until Done.
pub async fn request(
    client: &kube::Client,
    volume: &Volume,
    changes: MutableParameters,
) -> Result<Progress, ModifyError> {
    let name = volume.name_any();
    if let Some(provisioning) = apply_to(volume, changes)? {
        let patch = json!({ "spec": { "provisioning": provisioning.as_str() } });
        volumes::api(client)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ModifyError::Kube { name: name.clone(), source })?;
        return Ok(Progress::Pending);
    }
    progress(volume)
}

/// Done once the agent reported Ready for the Volume's current spec; Failed says why.
pub fn progress(volume: &Volume) -> Result<Progress, ModifyError> {
    let Some(status) = volume.status.as_ref() else { return Ok(Progress::Pending) };
    if status.observed_generation.is_none() || status.observed_generation < volume.metadata.generation {
        return Ok(Progress::Pending);
    }
    match status.phase {
        Some(Phase::Ready) => Ok(Progress::Done),
        Some(Phase::Failed) => Err(ModifyError::NodeFailed {
            name: volume.name_any(),
            node: volume.spec.node.clone(),
            why: status.message.clone().unwrap_or_default(),
        }),
        _ => Ok(Progress::Pending),
    }
}

fn conditions_without_modify(claim: &PersistentVolumeClaim) -> Vec<PersistentVolumeClaimCondition> {
    let conditions = claim.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    conditions.into_iter().filter(|c| c.type_ != MODIFYING && c.type_ != MODIFY_ERROR).collect()
}

fn condition(type_: &str, reason: Option<String>, message: String) -> PersistentVolumeClaimCondition {
    PersistentVolumeClaimCondition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason,
        message: Some(message),
        last_probe_time: Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
        ),
        ..Default::default()
    }
}

async fn patch_claim_status(ctx: &Context, claim: &PersistentVolumeClaim, status: serde_json::Value) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    claims
        .patch_status(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
        .await?;
    Ok(())
}

/// The claim-side flow for a bound claim of a plinth PV (plinth's own reconciler).
pub async fn reconcile_claim(ctx: &Context, claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Result<Action> {
    let wanted = claim.spec.as_ref().and_then(|s| s.volume_attributes_class_name.clone()).unwrap_or_default();
    let status = claim.status.clone().unwrap_or_default();
    let current = status.current_volume_attributes_class_name.clone().unwrap_or_default();
    let modify_status = status.modify_volume_status.clone();
    if modify_status.is_none() && wanted == current {
        return Ok(Action::await_change());
    }
    let in_progress = modify_status.as_ref().is_some_and(|s| s.status == "InProgress");
    if wanted.is_empty() && !in_progress {
        // Rolled back to no class before anything started.
        if conditions_without_modify(claim).len() != status.conditions.as_ref().map_or(0, Vec::len) {
            patch_claim_status(ctx, claim, json!({ "conditions": conditions_without_modify(claim) })).await?;
            ctx.event(claim, EventType::Normal, "VolumeModifyCanceled", "Cancelled modify.".into());
        }
        return Ok(Action::await_change());
    }
    let target = if wanted.is_empty() {
        modify_status
            .as_ref()
            .map(|s| s.target_volume_attributes_class_name.clone().unwrap_or_default())
            .unwrap_or_default()
    } else {
        wanted
    };
    let infeasible_already = modify_status
        .as_ref()
        .is_some_and(|s| s.status == "Infeasible" && s.target_volume_attributes_class_name.as_deref() == Some(&target));
    if infeasible_already {
        // Reported; nothing changes until the claim asks for another class.
        return Ok(Action::await_change());
    }
    let changes = match class_parameters(&ctx.client, &target).await {
        Ok(changes) => changes,
        Err(ModifyError::ClassMissing(class)) => {
            if modify_status.as_ref().map(|s| s.status.as_str()) != Some("Pending") {
                let pending = json!({ "status": "Pending", "targetVolumeAttributesClassName": target });
                patch_claim_status(ctx, claim, json!({ "modifyVolumeStatus": pending })).await?;
                let note = format!("VAC {class:?} does not exist.");
                ctx.event(claim, EventType::Warning, "VolumeModifyFailed", note);
            }
            return Err(Error::Waiting(format!("VolumeAttributesClass {class} to exist")));
        }
        Err(error) => return fail(ctx, claim, &target, error).await,
    };
    let Some(volume) = volumes::api(&ctx.client).get_opt(&pv.name_any()).await? else {
        return fail(ctx, claim, &target, ModifyError::VolumeNotFound(pv.name_any())).await;
    };
    if !in_progress
        || modify_status.as_ref().and_then(|s| s.target_volume_attributes_class_name.as_deref()) != Some(&target)
    {
        let mut conditions = conditions_without_modify(claim);
        conditions.push(condition(MODIFYING, None, format!("Modifying volume to {target:?} is in progress.")));
        let progress = json!({ "status": "InProgress", "targetVolumeAttributesClassName": target });
        patch_claim_status(ctx, claim, json!({ "modifyVolumeStatus": progress, "conditions": conditions })).await?;
        let note = format!("plinth is modifying volume {} with vac {target}", claim.name_any());
        ctx.event(claim, EventType::Normal, "VolumeModify", note);
    }
    match request(&ctx.client, &volume, changes).await {
        // The agent's status change brings the claim back (Volumes are watched).
        Ok(Progress::Pending) => Ok(Action::await_change()),
        Ok(Progress::Done) => {
            let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
            let patch = json!({ "spec": { "volumeAttributesClassName": target } });
            pvs.patch(&pv.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            let done = json!({
                "currentVolumeAttributesClassName": target,
                "modifyVolumeStatus": null,
                "conditions": conditions_without_modify(claim),
            });
            patch_claim_status(ctx, claim, done).await?;
            let note = format!("plinth modified volume {} with vac {target} successfully", claim.name_any());
            ctx.event(claim, EventType::Normal, "VolumeModifySuccessful", note);
            Ok(Action::await_change())
        }
        Err(error) => fail(ctx, claim, &target, error).await,
    }
}

/// Records a failed modification on the claim: Infeasible when no retry can help (retried only
/// once the claim changes), otherwise still InProgress and retried with backoff.
async fn fail(ctx: &Context, claim: &PersistentVolumeClaim, target: &str, error: ModifyError) -> Result<Action> {
    let message = plinth_controller::rpc::chain(&error);
    let infeasible = error.infeasible();
    let mut conditions = conditions_without_modify(claim);
    let modifying = if infeasible {
        format!("Modifying volume to {target:?} failed. Waiting for retry.")
    } else {
        format!("Modifying volume to {target:?} is still in progress.")
    };
    conditions.push(condition(MODIFYING, None, modifying));
    conditions.push(condition(MODIFY_ERROR, Some(format!("{:?}", error.code())), message.clone()));
    let state = if infeasible { "Infeasible" } else { "InProgress" };
    let status = json!({ "status": state, "targetVolumeAttributesClassName": target });
    patch_claim_status(ctx, claim, json!({ "modifyVolumeStatus": status, "conditions": conditions })).await?;
    ctx.event(claim, EventType::Warning, "VolumeModifyFailed", message.clone());
    if infeasible { Ok(Action::await_change()) } else { Err(Error::Invalid(message)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{VolumeMode, VolumeSpec, VolumeStatus};

    fn volume(provisioning: Provisioning, generation: i64, status: Option<VolumeStatus>) -> Volume {
        let spec = VolumeSpec {
            node: "a".into(),
            size_bytes: 1 << 20,
            volume_mode: VolumeMode::Block,
            fs_type: None,
            provisioning,
            mkfs_options: None,
            claim_ref: None,
            content_source: None,
        };
        let mut volume = volumes::new_volume("pvc-1", spec);
        volume.metadata.generation = Some(generation);
        volume.status = status;
        volume
    }

    #[test]
    fn thin_to_thick_is_asked_for_thick_to_thin_is_infeasible() {
        let thick = MutableParameters { provisioning: Some(Provisioning::Thick) };
        let thin = MutableParameters { provisioning: Some(Provisioning::Thin) };
        assert_eq!(apply_to(&volume(Provisioning::Thin, 1, None), thick).unwrap(), Some(Provisioning::Thick));
        assert_eq!(apply_to(&volume(Provisioning::Thick, 1, None), thick).unwrap(), None, "already thick");
        let refused = apply_to(&volume(Provisioning::Thick, 1, None), thin).unwrap_err();
        assert!(refused.infeasible(), "{refused}");
        assert_eq!(apply_to(&volume(Provisioning::Thin, 1, None), MutableParameters::default()).unwrap(), None);
        let unknown = ModifyError::Parameters(plinth_engine::Error::InvalidArgument("iops".into()));
        assert!(unknown.infeasible());
        let node = ModifyError::NodeFailed { name: "v".into(), node: "a".into(), why: "full".into() };
        assert!(!node.infeasible(), "the node may succeed later");
    }

    #[test]
    fn done_only_when_the_agent_reported_ready_for_the_current_spec() {
        let ready = |generation| VolumeStatus {
            phase: Some(Phase::Ready),
            observed_generation: Some(generation),
            ..Default::default()
        };
        assert_eq!(progress(&volume(Provisioning::Thick, 2, Some(ready(1)))).unwrap(), Progress::Pending);
        assert_eq!(progress(&volume(Provisioning::Thick, 2, Some(ready(2)))).unwrap(), Progress::Done);
        assert_eq!(progress(&volume(Provisioning::Thick, 2, None)).unwrap(), Progress::Pending);
        let failed = VolumeStatus {
            phase: Some(Phase::Failed),
            message: Some("no space".into()),
            observed_generation: Some(2),
            ..Default::default()
        };
        let error = progress(&volume(Provisioning::Thick, 2, Some(failed))).unwrap_err();
        assert!(error.to_string().contains("no space"), "{error}");
    }
}
