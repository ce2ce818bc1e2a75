//! The CLI walk-through from the README, run through the real binary.

use std::process::Command;

use plinth_tests::*;

fn plinth(sandbox: &Sandbox, args: &[&str]) -> (bool, String, String) {
    let output =
        Command::new(plinth_bin()).args(args).env("PLINTH_ENDPOINT", sandbox.endpoint()).output().expect("run plinth");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
fn walkthrough_create_mount_write_unmount_delete() {
    require_root!();
    let sandbox = Sandbox::new();
    let _server = Plinth::start(&sandbox, &[]);
    let mount = sandbox.root().join("demo");
    let mount_arg = mount.to_str().unwrap();

    let (ok, out, err) = plinth(&sandbox, &["volume", "create", "demo", "--size", "1GiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("created demo") && out.contains("1 GiB"), "{out}");
    let (ok, _, err) = plinth(&sandbox, &["volume", "create", "scratch", "--size", "512Mi", "--fs", "xfs", "--thick"]);
    assert!(ok, "{err}");
    let (ok, _, err) = plinth(&sandbox, &["volume", "mount", "demo", mount_arg]);
    assert!(ok, "{err}");
    std::fs::write(mount.join("hello.txt"), "hello from plinth\n").unwrap();

    let (ok, out, _) = plinth(&sandbox, &["volume", "list"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(
        out.contains("demo") && out.contains(mount_arg) && out.contains("scratch") && out.contains("thick"),
        "{out}"
    );
    let (ok, out, _) = plinth(&sandbox, &["status", "--output", "json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).expect("status --output json is JSON");
    assert_eq!(status["driver"], "plinth.csi.dev");
    assert_eq!(status["ready"], true);
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(status["provisioned_bytes"], (1u64 << 30) + (512u64 << 20));

    let (ok, _, err) = plinth(&sandbox, &["volume", "delete", "demo"]);
    assert!(!ok, "a mounted volume is not deleted");
    assert!(err.contains("unmount"), "the error says what to do: {err}");

    let (ok, _, err) = plinth(&sandbox, &["volume", "unmount", mount_arg]);
    assert!(ok, "{err}");
    assert!(!mount.exists());
    let (ok, _, err) = plinth(&sandbox, &["volume", "mount", "demo", mount_arg]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(mount.join("hello.txt")).unwrap(), "hello from plinth\n");
    let (ok, _, err) = plinth(&sandbox, &["volume", "unmount", mount_arg]);
    assert!(ok, "{err}");
    for name in ["demo", "scratch"] {
        let (ok, out, err) = plinth(&sandbox, &["volume", "delete", name]);
        assert!(ok, "{err}");
        assert!(out.contains("deleted"));
    }
    let (ok, out, _) = plinth(&sandbox, &["volume", "list", "-o", "json"]);
    assert!(ok);
    assert_eq!(out.trim(), "[]");
    assert!(sandbox.pool_images().is_empty());
    assert!(loop_devices_under(sandbox.path()).is_empty() && mounts_under(sandbox.path()).is_empty());
}

#[test]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
fn snapshots_clones_restores_and_expansion_from_the_cli() {
    require_root!();
    let sandbox = Sandbox::new();
    let _server = Plinth::start(&sandbox, &[]);
    let mount = sandbox.root().join("src");
    let run = |args: &[&str]| {
        let (ok, out, err) = plinth(&sandbox, args);
        assert!(ok, "plinth {args:?}: {err}");
        out
    };
    run(&["volume", "create", "src", "--size", "320Mi", "--fs", "xfs"]);
    run(&["volume", "mount", "src", mount.to_str().unwrap()]);
    std::fs::write(mount.join("data.txt"), "before the snapshot\n").unwrap();

    let out = run(&["snapshot", "create", "snap", "--volume", "src"]);
    assert!(out.contains("snapshot snap of src taken"), "{out}");
    std::fs::write(mount.join("data.txt"), "after the snapshot\n").unwrap();
    let out = run(&["snapshot", "list"]);
    assert!(out.starts_with("NAME") && out.contains("snap") && out.contains("src"), "{out}");
    let listed: serde_json::Value = serde_json::from_str(&run(&["snapshot", "list", "-o", "json"])).unwrap();
    assert_eq!(listed[0]["name"], "snap");
    assert_eq!(listed[0]["source_volume"], "src");

    // Restore (larger than the source: grows on first stage) and clone, each mounted and read.
    let out = run(&["volume", "create", "restored", "--size", "400Mi", "--from-snapshot", "snap"]);
    assert!(out.contains("xfs") && out.contains("from snapshot snap"), "{out}");
    run(&["volume", "create", "clone", "--size", "320Mi", "--from-volume", "src"]);
    for (name, expected) in [("restored", "before the snapshot\n"), ("clone", "after the snapshot\n")] {
        let at = sandbox.root().join(name);
        run(&["volume", "mount", name, at.to_str().unwrap()]);
        assert_eq!(std::fs::read_to_string(at.join("data.txt")).unwrap(), expected, "{name}");
        run(&["volume", "unmount", at.to_str().unwrap()]);
    }

    // Expansion of a mounted xfs volume: the filesystem grows now.
    let before = nix::sys::statvfs::statvfs(&mount).unwrap();
    let out = run(&["volume", "expand", "src", "--size", "640Mi", "-o", "json"]);
    let expanded: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(expanded["capacity_bytes"], 640 << 20);
    let after = nix::sys::statvfs::statvfs(&mount).unwrap();
    assert!(after.blocks() * after.fragment_size() > before.blocks() * before.fragment_size() + (250 << 20));

    run(&["volume", "unmount", mount.to_str().unwrap()]);
    assert!(run(&["snapshot", "delete", "snap"]).contains("deleted snapshot snap"));
    assert_eq!(run(&["snapshot", "list", "-o", "json"]).trim(), "[]");
    for name in ["src", "restored", "clone"] {
        run(&["volume", "delete", name]);
    }
    assert!(sandbox.pool_images().is_empty());
}

#[test]
fn errors_tell_the_user_what_to_do() {
    let sandbox = Sandbox::new();
    let (ok, _, err) = plinth(&sandbox, &["volume", "list"]);
    assert!(!ok);
    assert!(err.contains("cannot reach plinth") && err.contains("plinth standalone"), "{err}");
    let (ok, _, err) = plinth(&sandbox, &["volume", "create", "x", "--size", "1XB"]);
    assert!(!ok);
    assert!(err.contains("unknown size unit"), "{err}");
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
fn health_and_metrics_endpoints() {
    require_root!();
    let sandbox = Sandbox::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let _server = Plinth::start(&sandbox, &["--http-address", &address]);
    assert_eq!(http_get(port, "/healthz"), (200, "ok".to_owned()));
    assert_eq!(http_get(port, "/readyz"), (200, "ok".to_owned()));
    let (ok, _, err) = plinth(&sandbox, &["volume", "create", "metered", "--size", "64Mi"]);
    assert!(ok, "{err}");
    let (_, _, _) = plinth(&sandbox, &["volume", "create", "metered", "--size", "128Mi"]);
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains(r#"plinth_rpc_requests_total{method="CreateVolume",code="Ok"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"plinth_rpc_requests_total{method="CreateVolume",code="AlreadyExists"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("plinth_rpc_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains(r#"plinth_pool_bytes{state="provisioned"} 67108864"#), "{metrics}");
    assert!(metrics.contains(r#"plinth_volumes{state="created"} 1"#), "{metrics}");
    let (ok, _, _) = plinth(&sandbox, &["volume", "delete", "metered"]);
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn node_mode_registers_with_kubelet() {
    use plinth_proto::pluginregistration::{InfoRequest, RegistrationStatus, registration_client::RegistrationClient};
    require_root!();
    let sandbox = Sandbox::new();
    let kubelet = sandbox.root().join("kubelet");
    std::fs::create_dir_all(kubelet.join("plugins_registry")).unwrap();
    let server =
        Plinth::start_mode(&sandbox, "node", &sandbox.data_dir(), &["--kubelet-dir", kubelet.to_str().unwrap()]);
    let socket = kubelet.join("plugins_registry/plinth.csi.dev-reg.sock");
    // kubelet's side: dial the registration socket, ask who is there, confirm.
    let mut registration = None;
    for _ in 0..100 {
        if socket.exists() {
            registration = Some(RegistrationClient::new(Clients::channel(&socket).await));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut registration = registration.expect("registration socket appears");
    let info = registration.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "plinth.csi.dev");
    assert_eq!(info.endpoint, sandbox.socket().display().to_string());
    assert!(info.supported_versions.contains(&"1.0.0".to_owned()));
    registration
        .notify_registration_status(RegistrationStatus { plugin_registered: true, error: String::new() })
        .await
        .unwrap();
    // The node plugin serves Node but not Controller.
    let mut clients = server.clients().await;
    let caps = clients.identity.get_plugin_capabilities(plinth_proto::csi_v1::GetPluginCapabilitiesRequest {}).await;
    use plinth_proto::csi_v1::plugin_capability::{Type, service::Type as ServiceType};
    let controller_advertised = caps
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .any(|c| matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == ServiceType::ControllerService as i32));
    assert!(!controller_advertised, "node mode must not advertise CONTROLLER_SERVICE");
    clients.node.node_get_info(plinth_proto::csi_v1::NodeGetInfoRequest {}).await.expect("node service");
    assert!(clients.controller.list_volumes(plinth_proto::csi_v1::ListVolumesRequest::default()).await.is_err());
    assert!(server.stop().success());
    assert!(!socket.exists(), "registration socket removed on shutdown");
}
