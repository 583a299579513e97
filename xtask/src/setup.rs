//! `cargo xtask setup`: installs what is missing, says what it installs, and is quick (well under
//! 5 s) when everything is already there.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::{arch::Arch, cmd, distro, kernels, userland};

/// Debian packages the guest harness uses: QEMU, busybox for the guest's userland, cpio and kmod
/// (depmod) for the initramfs, xz and zstd to unpack kernels and modules, socat to talk to a
/// running guest's sockets by hand, iproute2 for the guest's `ip` (busybox's lacks most of it).
pub const DEBIAN_PACKAGES: &[&str] =
    &["qemu-system-x86", "busybox-static", "cpio", "kmod", "xz-utils", "zstd", "socat", "iproute2"];

/// Debian packages for `cargo xtask package` and its checks: lintian for the .deb, rpm for
/// `rpm -qlp`, binutils for what the binary links against.
pub const PACKAGING_PACKAGES: &[&str] = &["lintian", "rpm", "binutils", "gzip"];

/// Cargo subcommands that write the packages (versions pinned: both build with this toolchain).
const CARGO_TOOLS: &[(&str, &str, &str)] =
    &[("cargo-deb", "3.8.0", "cargo-deb"), ("cargo-generate-rpm", "0.21.1", "cargo-generate-rpm")];

/// The fuzzing front end (`cargo xtask fuzz`).
const CARGO_FUZZ: (&str, &str, &str) = ("cargo-fuzz", "0.13.2", "cargo-fuzz");

/// Debian packages for the distro guest's root file system: mmdebstrap and mke2fs.
pub const DISTRO_PACKAGES: &[&str] = &["mmdebstrap", "e2fsprogs"];

/// The bpf-linker release that matches aya 0.14's object format.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Args, Debug, Clone)]
pub struct SetupArgs {
    /// Guest kernels to prepare (bookworm, trixie, sid); default: all of them.
    #[arg(long, value_delimiter = ',')]
    pub kernels: Vec<kernels::Suite>,
    /// arm64 guest kernels to prepare as well (with the arm64 cross toolchain, QEMU and
    /// userland); default: none.
    #[arg(long, value_delimiter = ',')]
    pub arm64_kernels: Vec<kernels::Suite>,
    /// Only the toolchain (for `cargo xtask run`): no Debian packages, no guest kernels.
    #[arg(long)]
    pub toolchain_only: bool,
    /// Resolve the guest kernels' package names again and fetch newer ones if the archive moved.
    #[arg(long)]
    pub refresh_kernels: bool,
    /// Build the distro guest's image again (its packages moved on in the archive).
    #[arg(long)]
    pub rebuild_distro: bool,
}

/// What `setup` prepared, for the commands that run after it.
pub struct Prepared {
    pub kernels: Vec<kernels::GuestKernel>,
    pub distros: Vec<distro::DistroImage>,
}

pub fn run(args: &SetupArgs) -> Result<Prepared> {
    let started = Instant::now();
    ensure_toolchain()?;
    let mut prepared = Prepared { kernels: Vec::new(), distros: Vec::new() };
    if !args.toolchain_only {
        let packages: Vec<&str> =
            DEBIAN_PACKAGES.iter().chain(PACKAGING_PACKAGES).chain(DISTRO_PACKAGES).copied().collect();
        ensure_debian_packages(&packages)?;
        ensure_packaging_tools()?;
        let suites =
            if args.kernels.is_empty() { kernels::Suite::ALL.to_vec() } else { args.kernels.clone() };
        for suite in suites {
            prepared.kernels.push(kernels::ensure(suite, Arch::Amd64, args.refresh_kernels)?);
        }
        prepared.kernels.extend(arm64_guests(&args.arm64_kernels, args.refresh_kernels)?);
        prepared.distros.push(distro::ensure(distro::Distro::Trixie, args.rebuild_distro)?);
        ensure_promtool()?;
    }
    eprintln!("setup: ready in {:.1} s", started.elapsed().as_secs_f64());
    Ok(prepared)
}

/// Nightly with rust-src (for `-Z build-std=core`) and a bpf-linker linked against nightly's LLVM.
pub fn ensure_toolchain() -> Result<()> {
    if cmd::which("rustup").is_none() {
        bail!(
            "rustup is not on PATH: hotplug's eBPF programs are built with a nightly toolchain \
             managed by rustup (see https://rustup.rs), then run `cargo xtask setup` again"
        );
    }
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (rustup toolchain install nightly)");
        cmd::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("no nightly toolchain and rustup could not install one; install it with `rustup toolchain install nightly`")?;
    }
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!(
            "setup: installing rust-src for nightly (rustup component add rust-src --toolchain nightly)"
        );
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    ensure_bpf_linker()
}

/// `libLLVM.so.*` shipped in nightly's sysroot: bpf-linker must link exactly that one.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let version = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .context("`rustc +nightly -vV` names no LLVM version")?;
    for entry in fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))? {
        let path = entry?.path();
        let is_llvm = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")));
        if is_llvm {
            return Ok((path, major));
        }
    }
    bail!("nightly's sysroot ({}) has no libLLVM.so.{major}*", lib.display())
}

fn ensure_bpf_linker() -> Result<()> {
    let (libllvm, major) = nightly_llvm()?;
    let lib_name = libllvm.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    if let Some(linker) = cmd::which("bpf-linker") {
        let version = cmd::output(Command::new(&linker).arg("--version")).unwrap_or_default();
        let links = cmd::output(Command::new("ldd").arg(&linker)).unwrap_or_default();
        let linked_ok = links
            .lines()
            .any(|line| line.contains(&format!("{lib_name} => /")) && !line.contains("not found"));
        if version.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") && linked_ok {
            return Ok(());
        }
        eprintln!(
            "setup: {} is not bpf-linker {BPF_LINKER_VERSION} linked against {lib_name}; rebuilding it",
            linker.display()
        );
    }
    // bpf-linker's build looks for llvm-config or LLVM_PREFIX; nightly ships only the shared
    // library, so give it a prefix whose lib/ holds that library under both names it looks for.
    let prefix = cmd::cache_dir().join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", lib_name.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} \
         (cargo install, about a minute)"
    );
    cmd::run(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")]),
    )
    .context("building bpf-linker failed")
}

/// cargo-fuzz at its pinned version (the fuzz targets are built with it and nightly).
pub fn ensure_cargo_fuzz() -> Result<()> {
    ensure_cargo_tools(&[CARGO_FUZZ])
}

/// cargo-deb and cargo-generate-rpm at their pinned versions, and the Debian tools the package
/// checks use.
pub fn ensure_packaging_tools() -> Result<()> {
    ensure_debian_packages(PACKAGING_PACKAGES)?;
    ensure_cargo_tools(CARGO_TOOLS)
}

fn ensure_cargo_tools(tools: &[(&str, &str, &str)]) -> Result<()> {
    for (crate_name, version, binary) in tools {
        let installed = cmd::which(binary)
            .and_then(|path| cmd::output(Command::new(path).arg("--version")).ok())
            .is_some_and(|v| v.split_whitespace().any(|w| w == *version));
        if installed {
            continue;
        }
        eprintln!("setup: installing {crate_name} {version} (cargo install --locked, about a minute)");
        cmd::run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
            "install",
            "--locked",
            "--force",
            &format!("{crate_name}@{version}"),
        ]))
        .with_context(|| format!("cargo install {crate_name} failed"))?;
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if cmd::which("apt-get").is_none() {
        bail!("missing packages ({list}) and no apt-get here: install them with your package manager");
    }
    if !cmd::is_root() {
        bail!("missing Debian packages: {list}. Run as root, or: sudo apt-get install {list}");
    }
    eprintln!("setup: installing Debian packages: {list}");
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// What arm64 guests need: their emulator and firmware, the cross toolchain (their binaries),
/// their userland and the kernels `suites` (nothing when it is empty).
pub fn arm64_guests(suites: &[kernels::Suite], refresh: bool) -> Result<Vec<kernels::GuestKernel>> {
    if suites.is_empty() {
        return Ok(Vec::new());
    }
    ensure_debian_packages(Arch::Arm64.guest_packages())?;
    ensure_cross(Arch::Arm64)?;
    userland::ensure(Arch::Arm64)?;
    suites.iter().map(|suite| kernels::ensure(*suite, Arch::Arm64, refresh)).collect()
}

/// `promtool` (from Debian's `prometheus` package, which would also install and start a
/// Prometheus server): the .deb is fetched with `apt-get download` and only `promtool` is
/// unpacked into the cache, never installed on the host. The metrics test checks the agent's
/// exposition with `promtool check metrics`.
pub fn promtool() -> PathBuf {
    cmd::cache_dir().join("promtool").join("promtool")
}

pub fn ensure_promtool() -> Result<()> {
    let path = promtool();
    if path.is_file() {
        return Ok(());
    }
    let dir = path.parent().context("promtool path has no parent")?.to_path_buf();
    let work = dir.join("download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    eprintln!(
        "setup: fetching promtool (apt-get download prometheus, unpacked into {}; nothing installed)",
        dir.display()
    );
    cmd::run(Command::new("apt-get").current_dir(&work).args([
        "-o",
        "APT::Sandbox::User=root",
        "download",
        "prometheus",
    ]))
    .context("cannot download Debian's prometheus package for promtool (apt-get download prometheus)")?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    let unpacked = work.join("x");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    // Into place by a rename: an interrupted copy never leaves a broken promtool behind.
    let partial = dir.join("promtool.partial");
    fs::copy(unpacked.join("usr/bin/promtool"), &partial)
        .context("the prometheus package has no usr/bin/promtool")?;
    fs::rename(&partial, &path)?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// The rustup target and the Debian cross toolchain (linker, binutils, glibc) an arm64 build
/// needs; nothing for amd64.
pub fn ensure_cross(arch: Arch) -> Result<()> {
    let Some(triple) = arch.rust_target() else {
        return Ok(());
    };
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "this machine is {}: cross-building for {} assumes an x86_64 host (Debian's \
             gcc-aarch64-linux-gnu)",
            std::env::consts::ARCH,
            arch.name()
        );
    }
    ensure_debian_packages(&["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"])?;
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|t| t.trim() == triple) {
        eprintln!("setup: adding the Rust target {triple} (rustup target add {triple})");
        cmd::run(Command::new("rustup").args(["target", "add", triple]))
            .with_context(|| format!("rustup target add {triple} failed"))?;
    }
    Ok(())
}
