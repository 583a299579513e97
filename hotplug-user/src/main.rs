//! `hotplug-agent`: a thin entry point; everything lives in the `hotplug` library.
use std::process::ExitCode;

use clap::Parser as _;
use hotplug::{
    agent,
    cli::{Cli, Command},
    config::Config,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log));
    let filter = match filter {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("hotplug-agent: bad --log filter {:?}: {error}", cli.log);
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr so that `events` output on stdout stays machine-readable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    // aya and aya-log log through the `log` crate; `init` bridges it (feature `tracing-log`).

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hotplug-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Only the commands that use the configuration read it: a broken file must not stop
    // `events` or `features`, which an operator may need to diagnose the host.
    let config = || Config::load(cli.config.as_deref());
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => agent::run(config()?, cli.ring_bytes).await,
            Command::Status { json } => Ok(agent::control::print_status(&config()?.socket, json)?),
            Command::Events { json } => agent::stream_events(json, cli.ring_bytes).await,
            Command::Features { json } => agent::print_features(json),
            Command::BpfStats { json } => agent::print_bpf_stats(json),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hotplug-agent: {error}");
            ExitCode::FAILURE
        }
    }
}
