//! `cargo xtask package`: the `.deb` (cargo-deb) and the `.rpm` for Amazon Linux 2023
//! (cargo-generate-rpm) under `target/package/`, with the man pages and shell completions
//! generated from the agent's clap definitions, and the checks CI runs on them (lintian, the file
//! lists, what the binary links against).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, CommandFactory as _};

use crate::{arch::Arch, build, cmd, setup};

/// The agent's command line, shared with the agent itself (the file is self-contained).
#[allow(dead_code, clippy::all)]
#[path = "../../hotplug-user/src/cli.rs"]
mod agent_cli;

/// The oldest glibc the packages must run on: Amazon Linux 2023 ships 2.34 (Debian 12: 2.36,
/// Ubuntu 22.04: 2.35).
const GLIBC_FLOOR: (u32, u32) = (2, 34);

/// Shared libraries the agent may link: glibc's own, and libgcc_s, which glibc itself loads for
/// unwinding (Debian's libc6 depends on libgcc-s1; every Amazon Linux has libgcc).
const ALLOWED_LIBRARIES: &[&str] =
    &["libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libgcc_s.so.1"];

/// What the packages install (besides documentation), checked against each package's file list.
const INSTALLED: &[&str] = &[
    "/usr/sbin/hotplug-agent",
    "/usr/lib/systemd/system/hotplug-agent.service",
    "/etc/hotplug/hotplug.toml",
    "/usr/share/man/man8/hotplug-agent.8.gz",
    "/usr/share/man/man8/hotplug-agent-status.8.gz",
    "/usr/share/man/man5/hotplug.toml.5.gz",
    "/usr/share/bash-completion/completions/hotplug-agent",
    "/usr/share/fish/vendor_completions.d/hotplug-agent.fish",
    "/usr/lib/systemd/system/cloud-init-hotplugd.service.d/hotplug-agent.conf",
    "/usr/lib/systemd/system/cloud-init-hotplugd.socket.d/hotplug-agent.conf",
    "/usr/lib/systemd/networkd.conf.d/80-hotplug-agent.conf",
];

#[derive(Args, Debug, Default)]
pub struct PackageArgs {
    /// Also run the checks (lintian, file lists, linked libraries) that `cargo xtask test` runs.
    #[arg(long)]
    pub check: bool,
    /// The architecture to package: amd64 or arm64 (cross-built; `hotplug-agent_*_arm64.deb` and
    /// `hotplug-agent-*.aarch64.rpm` under `target/package-arm64/`).
    #[arg(long, value_enum, default_value_t)]
    pub arch: Arch,
}

/// The packages written.
#[derive(Clone, Debug)]
pub struct Packages {
    pub deb: PathBuf,
    /// The same package with its revision bumped (`-2`): what an upgrade installs in the tests.
    pub deb_upgrade: PathBuf,
    pub rpm: PathBuf,
}

pub fn run(args: &PackageArgs) -> Result<()> {
    setup::ensure_toolchain()?;
    setup::ensure_packaging_tools()?;
    setup::ensure_cross(args.arch)?;
    let packages = build_packages(args.arch)?;
    for path in [&packages.deb, &packages.deb_upgrade, &packages.rpm] {
        println!("{}", path.display());
    }
    if args.check {
        for problem in check(&packages, args.arch)? {
            eprintln!("package: {problem}");
        }
    }
    Ok(())
}

fn out_dir(arch: Arch) -> PathBuf {
    match arch {
        Arch::Amd64 => cmd::target_dir().join("package"),
        Arch::Arm64 => cmd::target_dir().join("package-arm64"),
    }
}

/// Builds the release agent, its man pages and completions, and both packages.
pub fn build_packages(arch: Arch) -> Result<Packages> {
    build::guest_binaries(arch)?;
    generate_docs(arch)?;
    let out = out_dir(arch);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(out.join("upgrade"))?;
    let root = cmd::workspace_root();
    // With `--target`, both tools read the assets' `target/release/` paths as
    // `target/<triple>/release/` and name the package's architecture after the triple.
    let target: Vec<&str> = arch.rust_target().map(|t| vec!["--target", t]).unwrap_or_default();
    let variant: Vec<&str> = if arch == Arch::Amd64 { Vec::new() } else { vec!["--variant", arch.name()] };
    let deb = |revision: &str, dir: &Path| -> Result<PathBuf> {
        let output = cmd::output(
            cmd::cargo()
                .current_dir(&root)
                .args(["deb", "--package", "hotplug-user", "--no-build", "--deb-revision", revision])
                .args(&target)
                .args(&variant)
                .arg("--output")
                .arg(dir),
        )
        .context("cargo deb failed (cargo xtask setup installs cargo-deb)")?;
        // cargo-deb prints the path of the package it wrote as its last line.
        let path = output.lines().last().map(PathBuf::from).context("cargo deb printed no path")?;
        if !path.exists() {
            bail!("cargo deb did not write {}", path.display());
        }
        Ok(path)
    };
    let first = deb("1", &out)?;
    let upgrade = deb("2", &out.join("upgrade"))?;
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["generate-rpm", "--package", "hotplug-user"])
            .args(&target)
            .arg("--output")
            .arg(&out),
    )
    .context("cargo generate-rpm failed (cargo xtask setup installs cargo-generate-rpm)")?;
    let rpm = fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "rpm"))
        .context("cargo generate-rpm wrote no .rpm")?;
    Ok(Packages { deb: first, deb_upgrade: upgrade, rpm })
}

/// Man pages (hotplug-agent(8) from the clap definitions, hotplug.toml(5) from docs/) and bash,
/// zsh and fish completions, into `package-gen/` next to the architecture's release binaries.
fn generate_docs(arch: Arch) -> Result<()> {
    let dir = arch.release_dir().join("package-gen");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("completions"))?;
    // hotplug-agent(8) and one page per subcommand (hotplug-agent-status(8), ...), as git does.
    let mut command = agent_cli::Cli::command()
        .name("hotplug-agent")
        .bin_name("hotplug-agent")
        .disable_help_subcommand(true);
    command.build();
    let man8 = dir.join("man8");
    fs::create_dir_all(&man8)?;
    let mut pages = Vec::new();
    for page in std::iter::once(&command).chain(command.get_subcommands().filter(|s| !s.is_hide_set())) {
        let man = clap_mangen::Man::new(page.clone())
            .section("8")
            .manual("System Administration")
            .source("hotplug");
        pages.push(man.generate_to(&man8)?);
    }
    let man5 = dir.join("man5");
    fs::create_dir_all(&man5)?;
    fs::copy(cmd::workspace_root().join("docs/hotplug.toml.5"), man5.join("hotplug.toml.5"))?;
    pages.push(man5.join("hotplug.toml.5"));
    for page in pages {
        // -n: no name or time stamp in the header, so the package is reproducible (lintian asks).
        cmd::run(Command::new("gzip").args(["-9nf"]).arg(page))?;
    }
    let completions = dir.join("completions");
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "hotplug-agent", &completions)?;
    }
    Ok(())
}

/// The checks CI runs on the packages; each problem is one line (empty: all good).
pub fn check(packages: &Packages, arch: Arch) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    // lintian: errors fail, warnings are printed.
    let lintian = Command::new("lintian")
        .args(["--no-tag-display-limit", "--display-level", ">=warning"])
        .arg(&packages.deb)
        .output()
        .context("cannot run lintian (cargo xtask setup installs it)")?;
    let report = String::from_utf8_lossy(&lintian.stdout);
    for line in report.lines() {
        println!("lintian: {line}");
        if line.starts_with("E: ") {
            problems.push(format!("lintian error: {line}"));
        }
    }
    let deb_files = cmd::output(Command::new("dpkg-deb").arg("--contents").arg(&packages.deb))?;
    let deb_files: BTreeSet<String> = deb_files
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect();
    let rpm_files = cmd::output(Command::new("rpm").arg("-qlp").arg(&packages.rpm))?;
    println!("rpm -qlp {}:\n{rpm_files}", packages.rpm.display());
    let rpm_files: BTreeSet<String> = rpm_files.lines().map(str::to_owned).collect();
    for want in INSTALLED {
        if !deb_files.contains(*want) {
            problems.push(format!("the .deb does not install {want}"));
        }
        if !rpm_files.contains(*want) {
            problems.push(format!("the .rpm does not install {want}"));
        }
    }
    let conffiles = cmd::output(Command::new("dpkg-deb").arg("--info").arg(&packages.deb).arg("conffiles"))?;
    if !conffiles.lines().any(|l| l.trim() == "/etc/hotplug/hotplug.toml") {
        problems.push("/etc/hotplug/hotplug.toml is not a conffile of the .deb".into());
    }
    // Each package says the architecture its binary is built for.
    let deb_arch =
        cmd::output(Command::new("dpkg-deb").arg("--field").arg(&packages.deb).arg("Architecture"))?;
    if deb_arch.trim() != arch.name() {
        problems.push(format!("the .deb's architecture is {:?}, not {}", deb_arch.trim(), arch.name()));
    }
    // Each .deb asks for no newer glibc than the binary is checked against below (else it would
    // refuse a host the binary runs on).
    for deb in [&packages.deb, &packages.deb_upgrade] {
        let depends = cmd::output(Command::new("dpkg-deb").arg("--field").arg(deb).arg("Depends"))?;
        match glibc_floor(&depends) {
            Some(floor) if floor <= GLIBC_FLOOR => {}
            Some(floor) => problems.push(format!(
                "{} depends on glibc {}.{}, newer than {}.{}",
                deb.display(),
                floor.0,
                floor.1,
                GLIBC_FLOOR.0,
                GLIBC_FLOOR.1
            )),
            None => problems.push(format!("{} names no libc6 version: {:?}", deb.display(), depends.trim())),
        }
    }
    let rpm_arch =
        cmd::output(Command::new("rpm").args(["-qp", "--queryformat", "%{ARCH}"]).arg(&packages.rpm))?;
    if rpm_arch.trim() != arch.rpm_name() {
        problems.push(format!("the .rpm's architecture is {:?}, not {}", rpm_arch.trim(), arch.rpm_name()));
    }
    let binary = arch.release_dir().join("hotplug-agent");
    if let Err(error) = crate::arch::check_binary(&binary, arch) {
        problems.push(format!("{error:#}"));
    }
    problems.extend(check_binary(&binary, arch)?);
    Ok(problems)
}

/// The version in a `Depends` field's `libc6 (>= X.Y)` (arch-qualified or not).
fn glibc_floor(depends: &str) -> Option<(u32, u32)> {
    let rest =
        depends.split(',').map(str::trim).find(|d| d.starts_with("libc6 ") || d.starts_with("libc6:"))?;
    let version = rest.split_once(">=")?.1.trim().trim_end_matches(')').trim();
    let number = |part: &str| part.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok();
    let mut parts = version.split('.');
    Some((number(parts.next()?)?, number(parts.next()?)?))
}

/// What the agent needs at run time: only glibc's libraries, and no symbol newer than
/// [`GLIBC_FLOOR`].
fn check_binary(binary: &Path, arch: Arch) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let dynamic = cmd::output(Command::new("readelf").arg("--dynamic").arg(binary))?;
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let library = line.rsplit('[').next().unwrap_or_default().trim_end_matches(']');
        if !ALLOWED_LIBRARIES.contains(&library) {
            problems.push(format!("{} needs {library}, which is not part of glibc", binary.display()));
        }
    }
    let symbols = cmd::output(Command::new(arch.objdump()).arg("-T").arg(binary))?;
    let newest = symbols
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.trim_end_matches(')').split('.');
            Some((parts.next()?.parse::<u32>().ok()?, parts.next().unwrap_or("0").parse::<u32>().ok()?))
        })
        .max();
    if let Some(newest) = newest.filter(|n| *n > GLIBC_FLOOR) {
        problems.push(format!(
            "{} uses glibc {}.{} symbols; Amazon Linux 2023 has glibc {}.{}",
            binary.display(),
            newest.0,
            newest.1,
            GLIBC_FLOOR.0,
            GLIBC_FLOOR.1
        ));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_glibc_floor_of_a_depends_field() {
        assert_eq!(glibc_floor("libc6 (>= 2.34)"), Some((2, 34)));
        assert_eq!(glibc_floor("systemd, libc6:arm64 (>= 2.36)"), Some((2, 36)));
        assert_eq!(glibc_floor("libc6 (>= 2.17-3)"), Some((2, 17)));
        assert_eq!(glibc_floor("systemd"), None);
    }
}
