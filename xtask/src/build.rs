//! Builds the agent (release, with its eBPF object) and the other binaries the guest gets.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

#[derive(Args, Debug)]
pub struct BuildArgs {}

pub fn run(_args: &BuildArgs) -> Result<()> {
    setup::ensure_toolchain()?;
    for binary in guest_binaries()? {
        println!("{}", binary.display());
    }
    Ok(())
}

/// The release binaries, built with the real eBPF object (never skipped here).
pub fn guest_binaries() -> Result<Vec<PathBuf>> {
    cmd::run(
        cmd::cargo()
            .current_dir(cmd::workspace_root())
            .env_remove("HOTPLUG_SKIP_EBPF")
            .env_remove("AYA_BUILD_SKIP")
            .args(["build", "--release", "--package", "hotplug-user", "--bins"]),
    )?;
    let release = cmd::target_dir().join("release");
    Ok(vec![release.join("hotplug-agent")])
}
