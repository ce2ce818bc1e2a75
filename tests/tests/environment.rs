//! Environment faults are reported up front, not discovered at stage time: a node without a
//! filesystem's tools says so (status, plugin manifest, /metrics, start-up log) and refuses that
//! filesystem's volumes at once, naming the package to install.

use std::path::Path;
use std::process::Command;

use plinth_tests::*;

/// A directory of links to every program on this machine except `missing`, for PATH.
fn path_without(dir: &Path, missing: &[&str]) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for system in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        for entry in std::fs::read_dir(system).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let link = bin.join(&name);
            if missing.iter().any(|m| name == *m) || link.exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), link);
        }
    }
    bin.display().to_string()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn a_node_without_mkfs_xfs_says_so_and_refuses_xfs_at_once() {
    require_root!();
    let sandbox = Sandbox::new();
    let path = path_without(sandbox.path(), &["mkfs.xfs"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let plinth = Plinth::start_with_env(
        &sandbox.socket(),
        &sandbox.root(),
        "standalone",
        &sandbox.data_dir(),
        &["--http-address", &address],
        true,
        &[("PATH", &path)],
    );
    let log = std::fs::read_to_string(&plinth.log).unwrap();
    assert!(log.contains("cannot fully serve xfs volumes: install the xfsprogs package"), "{log}");

    let status = Command::new(plinth_bin())
        .args(["status", "--output", "json"])
        .env("PLINTH_ENDPOINT", sandbox.endpoint())
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["filesystems"]["format"], serde_json::json!(["ext4", "btrfs"]));
    assert_eq!(status["ready"], true, "still ready for what it can do");

    let mut clients = plinth.clients().await;
    let info = clients.identity.get_plugin_info(plinth_proto::csi_v1::GetPluginInfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().manifest["plinth.csi.dev/filesystems"], "ext4,btrfs");

    let err = clients.controller.create_volume(create_request("x", 400 * MIB, mount_cap("xfs"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("mkfs.xfs") && err.message().contains("xfsprogs"), "{}", err.message());
    assert!(sandbox.pool_images().is_empty(), "nothing was created");
    clients.controller.create_volume(create_request("e", 64 * MIB, mount_cap("ext4"))).await.expect("ext4 still works");

    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains(r#"plinth_filesystem_supported{fs="xfs",operation="format"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"plinth_filesystem_supported{fs="ext4",operation="format"} 1"#), "{metrics}");
}
