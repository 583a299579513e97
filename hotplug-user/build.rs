//! Builds the eBPF object (`hotplug-ebpf`, target `bpfel-unknown-none`) with the nightly toolchain
//! and bpf-linker, for the agent to embed.
//!
//! `HOTPLUG_SKIP_EBPF=1` (or aya's `AYA_BUILD_SKIP=1`) skips it: the agent then embeds no object and
//! can only run in degraded mode. `cargo check`, `clippy` and unit tests use that; `cargo xtask`
//! never does. The object is built in one fixed directory, `<target>/bpf`, shared by every profile
//! (debug, release, clippy, test), so it is compiled once and only again when its sources change.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

const SKIP_VARS: [&str; 2] = ["HOTPLUG_SKIP_EBPF", "AYA_BUILD_SKIP"];

fn main() {
    if let Err(message) = run() {
        // A build script reports failure by exiting non-zero; say what to do first.
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn skip_requested() -> bool {
    SKIP_VARS.iter().any(|var| {
        println!("cargo:rerun-if-env-changed={var}");
        env::var(var).is_ok_and(|value| value == "1" || value.eq_ignore_ascii_case("true"))
    })
}

fn run() -> Result<(), String> {
    println!("cargo::rustc-check-cfg=cfg(hotplug_ebpf_object)");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let workspace = manifest_dir.parent().ok_or("hotplug-user has no parent directory")?;
    for path in
        ["hotplug-ebpf/src", "hotplug-ebpf/Cargo.toml", "hotplug-common/src", "Cargo.lock", "Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    if skip_requested() {
        println!(
            "cargo:warning=eBPF build skipped (HOTPLUG_SKIP_EBPF/AYA_BUILD_SKIP): this agent \
             embeds no eBPF object and can only run in degraded mode"
        );
        return Ok(());
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("bpf");
    let object = build_object(workspace, &target_dir)?;
    let embedded = out_dir.join("hotplug.bpf.o");
    fs::copy(&object, &embedded)
        .map_err(|e| format!("cannot copy {} to {}: {e}", object.display(), embedded.display()))?;
    println!("cargo:rustc-cfg=hotplug_ebpf_object");
    Ok(())
}

fn build_object(workspace: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace)
        .args(["run", "nightly", "cargo", "build", "--package", "hotplug-ebpf", "--bin", "hotplug"])
        .args(["--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir);
    // The outer (stable) cargo's compiler settings must not leak into the nightly build.
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    // `bpf_target_arch` only picks which of aya-ebpf's generated binding sets compiles (they differ
    // in `pt_regs`); the programs read no register through aya (`kernel::probe_arg0` and friends
    // take offsets from user space), so this one object serves x86_64 and arm64 agents alike: the
    // same bytes are embedded whatever `--target` the agent is built for.
    let mut rustflags = OsString::new();
    for (i, flag) in
        ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].iter().enumerate()
    {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The workspace's release profile links the agent with LTO in one codegen unit; the eBPF
    // object keeps the build it was verified with on every kernel (cargo's defaults, the crate's
    // own codegen-units = 1; bpf-linker links it).
    cmd.env("CARGO_PROFILE_RELEASE_LTO", "false").env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    let status = cmd
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status().map_err(|e| {
        format!("cannot run `rustup run nightly cargo` ({e}): run `cargo xtask setup`, or set HOTPLUG_SKIP_EBPF=1 to build without the eBPF object")
    })?;
    if !status.success() {
        return Err(format!(
            "building the eBPF object failed ({status}). It needs the nightly toolchain with \
             rust-src and bpf-linker built for nightly's LLVM: `cargo xtask setup` installs them. \
             Set HOTPLUG_SKIP_EBPF=1 to build without the eBPF object."
        ));
    }
    Ok(target_dir.join("bpfel-unknown-none/release/hotplug"))
}
