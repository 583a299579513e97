//! Builds the agent (release, with its eBPF object) and the other binaries the guest gets.
use std::{path::PathBuf, process::Command};

use anyhow::Result;
use clap::Args;

use crate::{arch::Arch, cmd, setup};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The architecture to build for: amd64 (this machine's) or arm64 (cross-built with rustup's
    /// aarch64 target and Debian's gcc-aarch64-linux-gnu, which this installs).
    #[arg(long, value_enum, default_value_t)]
    pub arch: Arch,
}

pub fn run(args: &BuildArgs) -> Result<()> {
    setup::ensure_toolchain()?;
    setup::ensure_cross(args.arch)?;
    for binary in guest_binaries(args.arch)? {
        println!("{}", binary.display());
    }
    Ok(())
}

/// The release binaries for `arch`, built with the real eBPF object (never skipped here). The
/// object is built once for both architectures (hotplug-user's build script runs on this machine
/// and writes it under `target/bpf`).
pub fn guest_binaries(arch: Arch) -> Result<Vec<PathBuf>> {
    cmd::run(arch.cargo_build().env_remove("HOTPLUG_SKIP_EBPF").env_remove("AYA_BUILD_SKIP").args([
        "--package",
        "hotplug-user",
        "--package",
        "hotplug-tests",
        "--bins",
    ]))?;
    let release = arch.release_dir();
    Ok(["hotplug-agent", "hotplug-bench", "mock-imds", "flood", "forge"]
        .iter()
        .map(|b| release.join(b))
        .collect())
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
        )
        // As hotplug-user/build.rs: no LTO for the eBPF object.
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "RUSTUP_TOOLCHAIN", "CARGO"]
    {
        command.env_remove(var);
    }
    command
}
