//! Logs redirected away from a terminal (a file, a pipe, journald) carry no ANSI escape codes.
//! Runs the real binary in a mode that needs neither root nor Kubernetes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn human_logs_written_to_a_file_have_no_colour_codes() {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = TempDir(std::env::temp_dir().join(format!("plinth-logging-{}-{nanos}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let log = dir.0.join("plinth.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("controller")
        .arg("--data-dir")
        .arg(dir.0.join("data"))
        .arg("--allowed-root")
        .arg(&dir.0)
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.0.join("csi.sock").display()))
        .args(["--log-level", "debug", "--log-format", "human", "--node-id", "log-test"])
        // Nothing here may turn colour off for us, nor reach a cluster.
        .env_remove("NO_COLOR")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start plinth");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("plinth serving") {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("plinth exited ({status}) before serving:\n{text}");
        }
        assert!(Instant::now() < deadline, "plinth did not log `plinth serving` within 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("INFO"), "the human format was used:\n{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in a log file:\n{text:?}");
}
