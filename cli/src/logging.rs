//! tracing-subscriber set-up: human or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

pub fn init(filter: Option<&str>, format: LogFormat, server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = EnvFilter::try_new(filter.unwrap_or(default)).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
