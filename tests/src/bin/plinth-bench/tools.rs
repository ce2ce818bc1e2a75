//! Running the system tools the baselines use (truncate, losetup, mkfs, mount, cp, fio):
//! arguments as separate strings, never a shell, so no path can become a command.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
}

fn describe(program: &str, args: &[&OsStr]) -> String {
    std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args…`; `ok_codes` are the exit codes that count as success.
pub fn run_with_codes(program: &str, args: &[&OsStr], ok_codes: &[i32]) -> Result<(Output, Duration), ToolError> {
    let started = Instant::now();
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ToolError::Spawn { program: program.to_owned(), source })?;
    let elapsed = started.elapsed();
    if !output.status.code().is_some_and(|c| ok_codes.contains(&c)) {
        return Err(ToolError::Failed {
            command: describe(program, args),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok((output, elapsed))
}

/// Runs `program args…`, which must exit 0; returns its output and how long it took.
pub fn run(program: &str, args: &[&OsStr]) -> Result<(Output, Duration), ToolError> {
    run_with_codes(program, args, &[0])
}

/// Shorthand for argument lists mixing `&str` and paths.
#[macro_export]
macro_rules! args {
    ($($arg:expr),* $(,)?) => { &[$(::std::convert::AsRef::<::std::ffi::OsStr>::as_ref(&$arg)),*] };
}

/// Whether `program` is installed (on PATH).
pub fn installed(program: &str) -> bool {
    plinth_engine::sys::mkfs::on_path(program)
}
