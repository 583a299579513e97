//! Command-line interface of `hotplug-agent`.
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hotplug-agent",
    version,
    about = "Keeps NIC configuration right across driver reloads and real attach/detach"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `hotplug=trace`. RUST_LOG also works.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, Copy)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Stream kernel events as they happen, one per line.
    Events {
        /// JSON lines; the first line describes the agent's mode and the kernel's features.
        #[arg(long)]
        json: bool,
    },
    /// Print what the running kernel offers and which mode the agent would run in.
    Features {
        #[arg(long)]
        json: bool,
    },
}
