//! `cargo xtask run`: builds the agent and replaces this process with it, so Ctrl-C reaches the
//! agent directly and stops it cleanly.
use std::{
    os::unix::process::CommandExt as _,
    process::{Command, ExitCode},
};

use anyhow::{bail, Result};
use clap::Args;

use crate::arch::Arch;
use crate::{build, cmd, setup};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Arguments for `hotplug-agent` (default: `run`), after `--`.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    setup::ensure_toolchain()?;
    let binaries = build::guest_binaries(Arch::Amd64)?;
    let Some(agent) = binaries.iter().find(|b| b.ends_with("hotplug-agent")) else {
        bail!("no agent binary was built")
    };
    if !cmd::is_root() {
        bail!(
            "hotplug-agent needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN to load its programs \
             and configure NICs): run `sudo -E cargo xtask run`"
        );
    }
    let agent_args =
        if args.agent_args.is_empty() { vec!["run".to_owned()] } else { args.agent_args.clone() };
    eprintln!("xtask: exec {} {}", agent.display(), agent_args.join(" "));
    let error = Command::new(agent).args(&agent_args).exec();
    bail!("cannot exec {}: {error}", agent.display())
}
