//! Durable records: one JSON file per object, replaced atomically (write a temp file, fsync,
//! rename over, fsync the directory), so a crash leaves either the old or the new record.

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Context, Result};
use crate::ids::RecordId;

/// Something kept in a [`Store`], keyed by its ID.
pub trait Record: Serialize + DeserializeOwned {
    type Id: RecordId;
    fn id(&self) -> &Self::Id;
}

#[derive(Debug)]
pub struct Store<R> {
    dir: PathBuf,
    _records: PhantomData<fn() -> R>,
}

impl<R> Clone for Store<R> {
    fn clone(&self) -> Self {
        Self { dir: self.dir.clone(), _records: PhantomData }
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
        Ok(Self { dir, _records: PhantomData })
    }

    fn path(&self, id: &R::Id) -> PathBuf {
        self.dir.join(format!("{}.json", id.as_str()))
    }

    pub fn load(&self, id: &R::Id) -> Result<Option<R>> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes).map(Some).context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, record: &R) -> Result<()> {
        crate::failpoint::check("store.save")?;
        let path = self.path(record.id());
        let bytes = serde_json::to_vec_pretty(record).context(|| format!("encoding {}", record.id()))?;
        write_atomic(&path, &bytes).context(|| format!("writing {}", path.display()))
    }

    pub fn remove(&self, id: &R::Id) -> Result<()> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir).context(|| format!("syncing {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context(|| format!("removing {}", path.display())),
        }
    }

    /// Every record, ordered by ID (the order pagination relies on).
    pub fn list(&self) -> Result<Vec<R>> {
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
        Ok(ids.iter().map(|id| self.load(id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect())
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
}
