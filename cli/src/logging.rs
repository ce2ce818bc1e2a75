//! tracing-subscriber set-up: human or JSON lines on stderr. Colour only on a terminal: a log
//! redirected to a file, a pipe or journald carries no ANSI escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

pub fn init(filter: Option<&str>, format: LogFormat, server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = EnvFilter::try_new(filter.unwrap_or(default)).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.with_ansi(false).json().init(),
    }
}
