//! Builds the agent (release, with its eBPF object) and the other binaries the guest gets.
use std::{path::PathBuf, process::Command};

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
            .args([
                "build",
                "--release",
                "--package",
                "hotplug-user",
                "--package",
                "hotplug-tests",
                "--bins",
            ]),
    )?;
    let release = cmd::target_dir().join("release");
    Ok(["hotplug-agent", "hotplug-bench", "mock-imds", "flood"].iter().map(|b| release.join(b)).collect())
}

/// `cargo <subcommand>` for the eBPF crate with the flags hotplug-user's build script uses (same
/// target directory, so nothing is compiled twice).
pub fn ebpf_cargo(subcommand: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .current_dir(cmd::workspace_root())
        .args(["run", "nightly", "cargo", subcommand, "--package", "hotplug-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(cmd::target_dir().join("bpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "RUSTUP_TOOLCHAIN", "CARGO"]
    {
        command.env_remove(var);
    }
    command
}
