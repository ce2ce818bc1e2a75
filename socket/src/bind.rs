//! Binding a unix socket safely.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind as bind_fd, listen, socket};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("endpoint {0:?} must be a unix socket path such as unix:///var/lib/plinth/csi.sock")]
    NotUnix(String),
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BindError + 'a {
    move |source| BindError::Io { what, path: path.to_owned(), source }
}

/// `unix:///path`, `unix:/path` or a bare absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, BindError> {
    let path = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(BindError::NotUnix(endpoint.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// Binds `path` with mode 0600 before it listens, so no one else can connect in between.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, BindError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error("creating the directory of", path))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_error("removing stale socket", path))?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspecting", path)(e)),
    }
    let nix_err = |what| move |errno: nix::errno::Errno| io_error(what, path)(errno.into());
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(nix_err("creating a socket for"))?;
    let address = UnixAddr::new(path).map_err(nix_err("socket path"))?;
    bind_fd(fd.as_raw_fd(), &address).map_err(nix_err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_error("restricting", path))?;
    listen(&fd, Backlog::new(128).expect("valid backlog")).map_err(nix_err("listening on"))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(io_error("configuring", path))?;
    tokio::net::UnixListener::from_std(listener).map_err(io_error("registering", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(socket_path("unix:///a/b.sock").unwrap(), PathBuf::from("/a/b.sock"));
        assert_eq!(socket_path("unix:/a/b.sock").unwrap(), PathBuf::from("/a/b.sock"));
        assert_eq!(socket_path("/a/b.sock").unwrap(), PathBuf::from("/a/b.sock"));
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn binds_0600_and_refuses_to_replace_what_is_not_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(BindError::InUse(_))));
        drop(listener);
        bind(&path).expect("a stale socket is replaced");
        let file = dir.path().join("file");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(bind(&file), Err(BindError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
