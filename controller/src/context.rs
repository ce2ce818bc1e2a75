//! The volume context: what plinth tells the CO about a volume at creation (CreateVolume's
//! `volume_context`, a PV's `csi.volumeAttributes`) and reads back later (NodeStage, the CLI).
//! One serde type for every path, so the local controller, the cluster reconciler, the sidecar
//! controller and the CLI cannot drift apart on keys or values.

use plinth_engine::model::{FsType, Layout, Provisioning, VolumeRecord};
use serde::{Deserialize, Serialize};

/// Context key carrying the CSI name the volume was created with.
pub const CONTEXT_NAME: &str = "plinth.csi.dev/name";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeContext {
    /// The CSI name (for the cluster paths, the `Volume` object's name).
    #[serde(rename = "plinth.csi.dev/name")]
    pub name: String,
    /// The filesystem; `None` for a block volume.
    #[serde(rename = "fsType", default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<FsType>,
    #[serde(default)]
    pub provisioning: Provisioning,
}

#[derive(Debug, thiserror::Error)]
#[error("volume context is not plinth's: {0}")]
pub struct ContextError(#[source] serde_json::Error);

impl VolumeContext {
    pub fn for_record(record: &VolumeRecord) -> Self {
        Self { name: record.name.clone(), fs_type: record.layout.fs_type(), provisioning: record.provisioning }
    }

    pub fn layout(&self) -> Layout {
        match self.fs_type {
            Some(fs_type) => Layout::Filesystem { fs_type },
            None => Layout::Block,
        }
    }

    /// As string pairs — a `HashMap` for CSI messages, a `BTreeMap` for Kubernetes objects —
    /// written by the serde derive above, the one definition of the keys.
    pub fn to_map<M: FromIterator<(String, String)>>(&self) -> M {
        let object = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => unreachable!("a struct of strings serializes to a JSON object"),
        };
        object
            .into_iter()
            .filter_map(|(key, value)| match value {
                serde_json::Value::String(text) => Some((key, text)),
                _ => None,
            })
            .collect()
    }

    /// Reads a context back. Keys plinth does not set (kubelet adds `csi.storage.k8s.io/pod.*`
    /// on publish) are ignored; a missing or malformed plinth key is an error.
    pub fn from_map<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, ContextError> {
        let object: serde_json::Map<String, serde_json::Value> =
            pairs.into_iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        serde_json::from_value(serde_json::Value::Object(object)).map_err(ContextError)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn filesystem() -> VolumeContext {
        VolumeContext { name: "pvc-1".into(), fs_type: Some(FsType::Xfs), provisioning: Provisioning::Thick }
    }

    #[test]
    fn round_trips_with_fixed_keys() {
        let map: BTreeMap<String, String> = filesystem().to_map();
        let expected: BTreeMap<String, String> =
            [("plinth.csi.dev/name", "pvc-1"), ("fsType", "xfs"), ("provisioning", "thick")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(map, expected);
        assert_eq!(VolumeContext::from_map(&map).unwrap(), filesystem());

        let block = VolumeContext { fs_type: None, provisioning: Provisioning::Thin, ..filesystem() };
        let map: HashMap<String, String> = block.to_map();
        assert!(!map.contains_key("fsType"), "a block volume has no fsType: {map:?}");
        assert_eq!(map["provisioning"], "thin", "provisioning is always present");
        assert_eq!(VolumeContext::from_map(&map).unwrap().layout(), Layout::Block);
    }

    #[test]
    fn ignores_what_others_add_and_refuses_what_is_not_plinths() {
        let mut map: HashMap<String, String> = filesystem().to_map();
        map.insert("csi.storage.k8s.io/pod.name".into(), "web-0".into());
        assert_eq!(VolumeContext::from_map(&map).unwrap(), filesystem());
        map.insert("fsType".into(), "ntfs".into());
        assert!(VolumeContext::from_map(&map).is_err());
        let empty: HashMap<String, String> = HashMap::new();
        assert!(VolumeContext::from_map(&empty).is_err(), "the name is required");
        let old = HashMap::from([("plinth.csi.dev/name".to_owned(), "pvc-2".to_owned())]);
        let read = VolumeContext::from_map(&old).unwrap();
        assert_eq!(read.provisioning, Provisioning::Thin, "contexts without provisioning read as thin");
    }

    #[test]
    fn describes_a_record() {
        let record = VolumeRecord {
            id: plinth_engine::VolumeId::for_name("pvc-1"),
            name: "pvc-1".into(),
            capacity_bytes: 1 << 20,
            layout: Layout::Filesystem { fs_type: FsType::Xfs },
            provisioning: Provisioning::Thick,
            created_at: 0,
            staged: None,
            published: Default::default(),
            content_source: None,
            filesystem_bytes: 0,
            mkfs_options: Vec::new(),
            loop_block_size: Some(4096),
            filesystem_usable_bytes: None,
            phase: Default::default(),
        };
        assert_eq!(VolumeContext::for_record(&record), filesystem());
    }
}
