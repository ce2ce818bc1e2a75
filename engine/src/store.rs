//! Durable records: one JSON file per object, replaced atomically (write a temp file, fsync,
//! rename over, fsync the directory), so a crash leaves either the old or the new record.
//!
//! Every record carries the schema it was written with (`"schema": N`; none means 1, what
//! plinth 0.1 wrote). An older record is migrated when read (and written back in the new schema
//! at its next save); a newer one is refused with a clear error rather than misread.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Context, Error, Result};
use crate::ids::RecordId;

/// Where an object is in its life. `Creating` and `Deleting` are intents, saved before the work
/// they announce: a crash in the middle leaves the intent, and the next start finishes it (a
/// creation nobody was told about is undone, a deletion is completed) instead of leaking files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Ready,
    Creating,
    Deleting,
}

impl Phase {
    pub fn is_ready(&self) -> bool {
        *self == Phase::Ready
    }
}

/// Something kept in a [`Store`], keyed by its ID.
pub trait Record: Serialize + DeserializeOwned + Clone {
    type Id: RecordId;
    /// The schema this plinth writes and reads up to.
    const SCHEMA: u32;
    fn id(&self) -> &Self::Id;
    fn phase(&self) -> Phase;
    /// Rewrites a record of schema `from` into schema `from + 1`. The default is for schema steps
    /// that only added fields with defaults.
    fn upgrade(_record: &mut serde_json::Value, _from: u32) {}
}

const SCHEMA_KEY: &str = "schema";

/// Records in a directory, one JSON file each, with a write-through cache of them all: plinth is
/// the only writer (the data dir is locked), so after the first full read every `list`, which
/// capacity accounting does on each create, is served from memory instead of N file reads.
#[derive(Debug)]
pub struct Store<R> {
    dir: PathBuf,
    /// Every record by ID once `list_any` has read the directory; `None` before. Clones share it.
    cache: Arc<Mutex<Option<BTreeMap<String, R>>>>,
}

impl<R> Clone for Store<R> {
    fn clone(&self) -> Self {
        Self { dir: self.dir.clone(), cache: Arc::clone(&self.cache) }
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("record paths have a parent");
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync_dir(dir)
}

impl<R: Record> Store<R> {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Temp files of writes interrupted by a crash.
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Self { dir, cache: Arc::default() })
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Option<BTreeMap<String, R>>> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path(&self, id: &R::Id) -> PathBuf {
        self.dir.join(format!("{}.json", id.as_str()))
    }

    /// The record, if it exists and is [`Phase::Ready`] (an intent is not an object yet/any more).
    pub fn load(&self, id: &R::Id) -> Result<Option<R>> {
        Ok(self.load_any(id)?.filter(|r| r.phase().is_ready()))
    }

    /// The record whatever its phase.
    pub fn load_any(&self, id: &R::Id) -> Result<Option<R>> {
        if let Some(records) = self.cached().as_ref() {
            return Ok(records.get(id.as_str()).cloned());
        }
        self.read(id)
    }

    fn read(&self, id: &R::Id) -> Result<Option<R>> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
        };
        let mut value: serde_json::Value =
            serde_json::from_slice(&bytes).context(|| format!("parsing {}", path.display()))?;
        let schema = match value.get(SCHEMA_KEY) {
            None => 1,
            Some(found) => found
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Error::internal(format!("parsing {}", path.display()), "schema is not a number"))?,
        };
        if schema > R::SCHEMA {
            return Err(Error::FailedPrecondition(format!(
                "{} was written by a newer plinth (record schema {schema}); this plinth reads schema {} and \
                 older: run that newer plinth again (or restore this data dir from before it)",
                path.display(),
                R::SCHEMA
            )));
        }
        for from in schema..R::SCHEMA {
            R::upgrade(&mut value, from);
        }
        if let Some(object) = value.as_object_mut() {
            object.remove(SCHEMA_KEY);
        }
        serde_json::from_value(value).map(Some).context(|| format!("parsing {} (schema {schema})", path.display()))
    }

    pub fn save(&self, record: &R) -> Result<()> {
        crate::failpoint::check("store.save")?;
        let path = self.path(record.id());
        let mut value = serde_json::to_value(record).context(|| format!("encoding {}", record.id()))?;
        if let Some(object) = value.as_object_mut() {
            object.insert(SCHEMA_KEY.to_owned(), R::SCHEMA.into());
        }
        let bytes = serde_json::to_vec_pretty(&value).context(|| format!("encoding {}", record.id()))?;
        // The disk first, then the cache (not under its lock: saves of other records go on
        // meanwhile). A list that fills the cache in between reads the file or is corrected here.
        let written = write_atomic(&path, &bytes).context(|| format!("writing {}", path.display()));
        let mut cache = self.cached();
        match (&written, cache.as_mut()) {
            (Ok(()), Some(records)) => {
                records.insert(record.id().as_str().to_owned(), record.clone());
            }
            // Unknown state on disk: read it again next time.
            (Err(_), Some(_)) => *cache = None,
            _ => {}
        }
        written
    }

    pub fn remove(&self, id: &R::Id) -> Result<()> {
        let path = self.path(id);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir).context(|| format!("syncing {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context(|| format!("removing {}", path.display())),
        };
        let mut cache = self.cached();
        match (&removed, cache.as_mut()) {
            (Ok(()), Some(records)) => {
                records.remove(id.as_str());
            }
            (Err(_), Some(_)) => *cache = None,
            _ => {}
        }
        removed
    }

    /// Every [`Phase::Ready`] record, ordered by ID (the order pagination relies on).
    pub fn list(&self) -> Result<Vec<R>> {
        Ok(self.list_any()?.into_iter().filter(|r| r.phase().is_ready()).collect())
    }

    /// Runs `read` over every [`Phase::Ready`] record, ordered by ID, in place: capacity
    /// accounting runs on every create and needs three fields of each, not N clones. Saves wait
    /// for `read` to finish; keep it short.
    pub fn with_ready<T>(&self, read: impl FnOnce(&mut dyn Iterator<Item = &R>) -> T) -> Result<T> {
        let mut cache = self.cached();
        if cache.is_none() {
            let records = self.read_all()?;
            *cache = Some(records.into_iter().map(|r| (r.id().as_str().to_owned(), r)).collect());
        }
        let mut ready = cache.iter().flat_map(|records| records.values()).filter(|r| r.phase().is_ready());
        Ok(read(&mut ready))
    }

    /// Every record whatever its phase, ordered by ID.
    pub fn list_any(&self) -> Result<Vec<R>> {
        let mut cache = self.cached();
        if let Some(records) = cache.as_ref() {
            return Ok(records.values().cloned().collect());
        }
        let records = self.read_all()?;
        *cache = Some(records.iter().map(|r| (r.id().as_str().to_owned(), r.clone())).collect());
        Ok(records)
    }

    fn read_all(&self) -> Result<Vec<R>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).context(|| format!("listing {}", self.dir.display()))? {
            let entry = entry.context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(R::Id::parse) {
                ids.push(id);
            }
        }
        ids.sort();
        // A record removed between listing and loading is simply gone.
        Ok(ids.iter().map(|id| self.read(id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::VolumeId;
    use crate::model::{Layout, Provisioning, VolumeRecord};

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::for_name(name),
            name: name.into(),
            capacity_bytes: 1 << 20,
            layout: Layout::Block,
            provisioning: Provisioning::Thin,
            created_at: 0,
            staged: None,
            published: Default::default(),
            content_source: None,
            filesystem_bytes: 0,
            mkfs_options: Vec::new(),
            loop_block_size: Some(4096),
            filesystem_usable_bytes: None,
            phase: Phase::Ready,
        }
    }

    #[test]
    fn saves_loads_lists_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        let (a, b) = (record("a"), record("b"));
        store.save(&a).unwrap();
        store.save(&b).unwrap();
        store.save(&a).unwrap();
        assert_eq!(store.load(&a.id).unwrap(), Some(a.clone()));
        let mut expected = vec![a.clone(), b.clone()];
        expected.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(store.list().unwrap(), expected);
        store.remove(&a.id).unwrap();
        store.remove(&a.id).unwrap();
        assert_eq!(store.load(&a.id).unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path().join("volumes")).unwrap().count(), 1);
    }

    #[test]
    fn the_cache_follows_every_write_and_matches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        let shared = store.clone();
        store.save(&record("a")).unwrap();
        assert_eq!(store.list().unwrap().len(), 1, "the first list fills the cache from disk");
        let mut b = record("b");
        shared.save(&b).unwrap();
        b.capacity_bytes *= 2;
        store.save(&b).unwrap();
        store.remove(&record("a").id).unwrap();
        let from_disk: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        assert_eq!(store.list().unwrap(), vec![b.clone()], "clones share one cache");
        assert_eq!(from_disk.list().unwrap(), store.list().unwrap(), "what is cached is what is on disk");
        assert_eq!(store.load(&b.id).unwrap(), Some(b.clone()));

        let mut creating = record("c");
        creating.phase = Phase::Creating;
        store.save(&creating).unwrap();
        let fresh: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        for visited_store in [&store, &fresh] {
            let visited: Vec<VolumeRecord> = visited_store.with_ready(|ready| ready.cloned().collect()).unwrap();
            assert_eq!(visited, vec![b.clone()], "ready records only, cached or read from disk");
        }
    }

    /// Copies the records plinth 0.1 (record schema 1) wrote into `data`.
    fn v1_records(data: &Path) {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/records/v1");
        for kind in ["volumes", "snapshots", "group-snapshots"] {
            std::fs::create_dir_all(data.join(kind)).unwrap();
            for entry in std::fs::read_dir(fixtures.join(kind)).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), data.join(kind).join(entry.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn records_of_schema_1_load_and_are_written_back_as_schema_2() {
        use crate::model::{ContentSource, GroupSnapshotRecord, SnapshotRecord};
        let dir = tempfile::tempdir().unwrap();
        v1_records(dir.path());
        let volumes: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        let listed = volumes.list().unwrap();
        assert_eq!(listed.len(), 2);
        let staged = listed.iter().find(|v| v.name == "pvc-staged-ext4").unwrap();
        assert_eq!(staged.layout, Layout::Filesystem { fs_type: crate::model::FsType::Ext4 });
        assert_eq!(staged.staged.as_ref().unwrap().mount_flags, vec!["noatime".to_owned()]);
        assert_eq!(staged.published.len(), 1);
        assert_eq!(staged.mkfs_options, vec!["-b".to_owned(), "4096".to_owned()]);
        assert_eq!(staged.loop_block_size, None, "schema 1 did not record the geometry: found out at stage");
        let block = listed.iter().find(|v| v.name == "restored-block").unwrap();
        assert_eq!(block.provisioning, Provisioning::Thick);
        assert!(matches!(block.content_source, Some(ContentSource::Snapshot(_))));

        let snapshots: Store<SnapshotRecord> = Store::open(dir.path().join("snapshots")).unwrap();
        let snapshot = snapshots.list().unwrap().pop().unwrap();
        assert_eq!((snapshot.name.as_str(), snapshot.copy_method.as_str()), ("nightly", "reflink"));
        assert!(snapshot.group_snapshot_id.is_some());
        let groups: Store<GroupSnapshotRecord> = Store::open(dir.path().join("group-snapshots")).unwrap();
        assert_eq!(groups.list().unwrap().pop().unwrap().snapshot_ids, vec![snapshot.id.clone()]);

        volumes.save(staged).unwrap();
        let text = std::fs::read_to_string(dir.path().join("volumes").join(format!("{}.json", staged.id))).unwrap();
        let written: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(written["schema"], 2);
        assert_eq!(volumes.load(&staged.id).unwrap().as_ref(), Some(staged));
    }

    #[test]
    fn a_record_of_a_newer_schema_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store<VolumeRecord> = Store::open(dir.path().join("volumes")).unwrap();
        let a = record("a");
        store.save(&a).unwrap();
        let path = dir.path().join("volumes").join(format!("{}.json", a.id));
        let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        value["schema"] = 3.into();
        value["a_field_from_the_future"] = "?".into();
        std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        let err = store.load(&a.id).unwrap_err();
        assert!(
            matches!(err, Error::FailedPrecondition(ref m) if m.contains("newer plinth") && m.contains("schema 3")),
            "{err:?}"
        );
        assert!(store.list().is_err(), "listing refuses too: nothing acts on a half-understood record");
    }
}
