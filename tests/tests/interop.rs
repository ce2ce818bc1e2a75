//! Real gRPC clients other than tonic against a real plinth process: grpc-go dialing exactly as
//! kubelet's plugin watcher does (the socket path as target, so `:authority` is the path), grpc-go
//! with a `unix://` target, and Python grpcio with default channel options. tests/run-all.sh
//! builds them (tests/interop/) and names them in PLINTH_GO_INTEROP and PLINTH_PYTHON_INTEROP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use plinth_tests::*;

struct InteropClients {
    go: PathBuf,
    python: PathBuf,
}

fn interop_clients() -> Option<InteropClients> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    match (var("PLINTH_GO_INTEROP"), var("PLINTH_PYTHON_INTEROP")) {
        (Some(go), Some(python)) => Some(InteropClients { go, python }),
        _ => None,
    }
}

macro_rules! require_interop {
    () => {{
        require_root!();
        interop_clients()
            .expect("interop clients not built (PLINTH_GO_INTEROP, PLINTH_PYTHON_INTEROP): run tests/run-all.sh")
    }};
}

fn run_json(command: &mut Command) -> serde_json::Value {
    let output = command.output().expect("run interop client");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{command:?} printed no JSON ({e})"))
}

fn go(clients: &InteropClients, args: &[&str]) -> serde_json::Value {
    run_json(Command::new(&clients.go).args(args))
}

fn python(clients: &InteropClients, socket: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/python/csi_client.py");
    run_json(Command::new(&clients.python).arg(script).arg(socket))
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and the interop clients: tests/run-all.sh runs it"]
fn kubelet_registration_dial_registers_plinth_node() {
    let clients = require_interop!();
    let sandbox = Sandbox::new();
    let kubelet_dir = sandbox.root().join("kubelet");
    let kubelet_arg = kubelet_dir.display().to_string();
    let plinth = Plinth::start_mode(&sandbox, "node", &sandbox.data_dir(), &["--kubelet-dir", &kubelet_arg]);
    let registration = kubelet_dir.join("plugins_registry/plinth.csi.dev-reg.sock");
    wait_for(&registration);

    let info = go(&clients, &["register", "-socket", registration.to_str().unwrap()]);
    assert_eq!(info["type"], "CSIPlugin");
    assert_eq!(info["name"], "plinth.csi.dev");
    assert_eq!(info["endpoint"], sandbox.socket().display().to_string(), "GetInfo names the CSI socket");
    assert!(!info["supported_versions"].as_array().unwrap().is_empty());
    assert_eq!(info["notified"], true);
    let log = std::fs::read_to_string(&plinth.log).unwrap();
    assert!(log.contains("kubelet registered plinth"), "NotifyRegistrationStatus reached plinth:\n{log}");

    let socket = sandbox.socket();
    for dial in ["path", "unix"] {
        let csi = go(&clients, &["csi", "-socket", socket.to_str().unwrap(), "-dial", dial]);
        assert_eq!(csi["name"], "plinth.csi.dev", "dial {dial}");
        assert_eq!(csi["node_id"], "test-node", "dial {dial}: NodeGetInfo");
        assert_eq!(csi["topology"]["topology.plinth.csi.dev/node"], "test-node");
    }
    let py = python(&clients, &socket);
    assert_eq!(py["name"], "plinth.csi.dev");
    assert_eq!(py["node_id"], "test-node");
    assert_eq!(py["ready"], true);
}

#[test]
#[ignore = "needs root and the interop clients: tests/run-all.sh runs it"]
fn go_and_python_clients_talk_to_standalone() {
    let clients = require_interop!();
    let sandbox = Sandbox::new();
    let _plinth = Plinth::start(&sandbox, &[]);
    let socket = sandbox.socket();
    for dial in ["path", "unix"] {
        let csi = go(&clients, &["csi", "-socket", socket.to_str().unwrap(), "-dial", dial]);
        assert_eq!(csi["name"], "plinth.csi.dev", "dial {dial}");
        assert!(csi["capabilities"].as_u64().unwrap() >= 2, "dial {dial}: {csi}");
        assert_eq!(csi["node_id"], "test-node");
    }
    let py = python(&clients, &socket);
    assert_eq!(py["name"], "plinth.csi.dev");
    assert_eq!(py["ready"], true);
    assert_eq!(py["node_id"], "test-node");
}

#[test]
#[ignore = "needs root and the interop clients: tests/run-all.sh runs it"]
fn go_and_python_clients_talk_to_the_controller_socket() {
    let clients = require_interop!();
    let sandbox = Sandbox::new();
    let _plinth = Plinth::start_mode(&sandbox, "controller", &sandbox.data_dir(), &[]);
    let socket = sandbox.socket();
    let csi = go(&clients, &["csi", "-socket", socket.to_str().unwrap(), "-dial", "path"]);
    assert_eq!(csi["name"], "plinth.csi.dev");
    assert!(csi["node_error"].as_str().unwrap().contains("Unimplemented"), "no Node service: {csi}");
    let py = python(&clients, &socket);
    assert_eq!(py["name"], "plinth.csi.dev");
    assert!(py["node_error"].as_str().unwrap().starts_with("UNIMPLEMENTED"), "{py}");
}
