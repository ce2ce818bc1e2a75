//! Durable volume records: one JSON file per volume, replaced atomically (write a temp file,
//! fsync, rename over, fsync the directory), so a crash leaves either the old or the new record.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::ids::VolumeId;
use crate::model::VolumeRecord;

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
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

impl Store {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Temp files of writes interrupted by a crash.
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn load(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, record: &VolumeRecord) -> Result<()> {
        let path = self.path(&record.id);
        let bytes =
            serde_json::to_vec_pretty(record).context(|| format!("encoding {}", record.id))?;
        write_atomic(&path, &bytes).context(|| format!("writing {}", path.display()))
    }

    pub fn remove(&self, id: &VolumeId) -> Result<()> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir).context(|| format!("syncing {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context(|| format!("removing {}", path.display())),
        }
    }

    /// Every record, ordered by volume ID (the order pagination relies on).
    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        let mut ids = Vec::new();
        for entry in
            std::fs::read_dir(&self.dir).context(|| format!("listing {}", self.dir.display()))?
        {
            let entry = entry.context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(VolumeId::parse)
            {
                ids.push(id);
            }
        }
        ids.sort();
        // A record removed between listing and loading is simply gone.
        Ok(ids
            .iter()
            .map(|id| self.load(id))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Layout, Provisioning};

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
        }
    }

    #[test]
    fn saves_loads_lists_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("volumes")).unwrap();
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
        assert_eq!(
            std::fs::read_dir(dir.path().join("volumes"))
                .unwrap()
                .count(),
            1
        );
    }
}
