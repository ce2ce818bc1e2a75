//! Confinement of CO-supplied paths (staging and target paths) to configured roots.
//!
//! Invariant: a path that passes [`PathPolicy::confine`] is absolute, in normal form, strictly
//! inside an allowed root, has no symlink among its existing components, and is not a symlink.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, Clone)]
pub struct PathPolicy {
    roots: Vec<PathBuf>,
}

impl PathPolicy {
    /// Roots are canonicalized once here (created if missing), so a root that is itself reached
    /// through a symlink (e.g. /var/lib/kubelet → /data/kubelet) still works.
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> std::io::Result<Self> {
        let mut canonical = Vec::new();
        for root in roots {
            std::fs::create_dir_all(&root)?;
            canonical.push(std::fs::canonicalize(&root)?);
        }
        Ok(Self { roots: canonical })
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Checks the text of the path only (no filesystem access).
    pub fn check_lexically(&self, what: &str, raw: &str) -> Result<PathBuf> {
        if raw.is_empty() {
            return Err(Error::InvalidArgument(format!("{what} is required")));
        }
        if raw.len() > MAX_PATH_LEN || raw.contains('\0') {
            return Err(Error::InvalidArgument(format!("{what} is not a usable path")));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(Error::InvalidArgument(format!("{what} {raw:?} must be absolute")));
        }
        let normal = path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        let rebuilt: PathBuf = path.components().collect();
        if !normal || rebuilt.as_os_str() != path.as_os_str() {
            return Err(Error::InvalidArgument(format!(
                "{what} {raw:?} must be in normal form (no '.', '..', '//' or trailing '/')"
            )));
        }
        if !self.roots.iter().any(|root| path.starts_with(root) && path != root) {
            return Err(Error::InvalidArgument(format!(
                "{what} {raw:?} is outside the allowed roots {:?}",
                self.roots
            )));
        }
        Ok(rebuilt)
    }

    /// Full check: lexical, then no symlinks on the way and not a symlink itself. Creates the
    /// missing parent directories inside the root (the CO normally has already).
    pub fn confine(&self, what: &str, raw: &str) -> Result<PathBuf> {
        self.check(what, raw, true)
    }

    /// Like [`confine`](Self::confine) but never creates anything (for teardown paths).
    pub fn confine_existing(&self, what: &str, raw: &str) -> Result<PathBuf> {
        self.check(what, raw, false)
    }

    fn check(&self, what: &str, raw: &str, create_parents: bool) -> Result<PathBuf> {
        let path = self.check_lexically(what, raw)?;
        let parent = path.parent().expect("a path strictly inside a root has a parent");
        if create_parents {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::internal(format!("creating the parent of {what} {}", path.display()), e))?;
        } else if !parent.exists() {
            return Ok(path);
        }
        let canonical_parent = std::fs::canonicalize(parent)
            .map_err(|e| Error::internal(format!("resolving the parent of {what} {}", path.display()), e))?;
        if canonical_parent != parent {
            return Err(Error::InvalidArgument(format!(
                "{what} {raw:?} goes through a symlink (resolves to {}); refusing",
                canonical_parent.join(path.file_name().unwrap_or_default()).display()
            )));
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::InvalidArgument(format!("{what} {raw:?} is a symlink; refusing")));
        }
        Ok(path)
    }
}

/// A path opened without following any symlink on the way or at the end (openat2 with
/// RESOLVE_NO_SYMLINKS) and held open: a mount made through [`Pinned::fd_path`] lands on exactly
/// the inode that was checked, so a symlink swapped in between the check and the mount (to
/// `/etc`, to `/`) changes nothing.
#[derive(Debug)]
pub struct Pinned {
    path: PathBuf,
    fd: OwnedFd,
}

impl Pinned {
    pub fn open(path: &Path) -> Result<Self> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(nix::fcntl::AT_FDCWD, path, how).map_err(|errno| match errno {
            nix::errno::Errno::ELOOP => {
                Error::InvalidArgument(format!("{} is or goes through a symlink; refusing", path.display()))
            }
            other => Error::internal(format!("opening {}", path.display()), other),
        })?;
        Ok(Self { path: path.to_owned(), fd })
    }

    /// The path as the CO named it (what the mount table shows once mounted).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor (for the fd-based mount calls).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The magic link to the opened inode itself: what mount(2) is given.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: &Path) -> PathPolicy {
        PathPolicy::new([root.to_owned()]).unwrap()
    }

    #[test]
    fn accepts_paths_inside_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        let root = p.roots()[0].clone();
        let inside = root.join("pods/x/volumes/mount");
        assert_eq!(p.confine("target_path", inside.to_str().unwrap()).unwrap(), inside);
        assert!(inside.parent().unwrap().is_dir());
    }

    #[test]
    fn rejects_bad_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        let root = p.roots()[0].to_str().unwrap().to_owned();
        for bad in [
            String::new(),
            "relative/path".into(),
            format!("{root}/a/../../etc"),
            format!("{root}/./a"),
            format!("{root}//a"),
            format!("{root}/a/"),
            root.clone(),
            "/etc/passwd".into(),
            format!("{root}x/a"),
            format!("{root}/a\0b"),
        ] {
            let err = p.confine("target_path", &bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?} → {err:?}");
        }
    }

    #[test]
    fn rejects_symlinks_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        let root = p.roots()[0].clone();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("target")).unwrap();
        for bad in [root.join("escape/target"), root.join("target")] {
            let err = p.confine("target_path", bad.to_str().unwrap()).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("symlink")), "{bad:?} → {err:?}");
        }
    }

    #[test]
    fn a_pinned_path_keeps_the_inode_it_checked() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let pinned = Pinned::open(&target).unwrap();
        // Swapped for a symlink to somewhere else after the check.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::rename(&target, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        let resolved = std::fs::read_link(pinned.fd_path()).unwrap();
        assert_eq!(resolved, dir.path().join("moved"), "the fd still names the checked directory");
        let err = Pinned::open(&target).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("link")).unwrap();
        assert!(Pinned::open(&dir.path().join("link/x")).is_err(), "a symlink on the way is refused too");
    }
}
