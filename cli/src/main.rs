//! `plinth`: one binary for the controller, the node plugin, standalone mode and the CLI.

mod cli;
mod client;
mod cluster;
mod http;
mod logging;
mod registration;
mod server;
mod verbs;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    logging::init(args.log_level.as_deref(), args.log_format, args.command.is_server());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: cli::Args) -> anyhow::Result<()> {
    use cli::Command;
    let client_endpoint = args.endpoint_or_default();
    match args.command {
        Command::Controller(opts) => server::serve(args.endpoint, opts, server::Mode::Controller).await,
        Command::Node(opts) => server::serve(args.endpoint, opts, server::Mode::Node).await,
        Command::Standalone(opts) => server::serve(args.endpoint, opts, server::Mode::Standalone).await,
        Command::Volume(verb) => verbs::volume(&client_endpoint, args.output, verb).await,
        Command::Snapshot(verb) => verbs::snapshot(&client_endpoint, args.output, verb).await,
        Command::Status => verbs::status(&client_endpoint, args.output).await,
    }
}
