//! Guest kernels: Debian's generic amd64 and arm64 kernels, fetched as packages with a private apt
//! state (`apt.rs`: the host's own apt configuration is only read, never changed), unpacked, and
//! prepared for a fast boot: amd64's ELF `vmlinux` (QEMU boots it through its PVH note, about
//! twice as fast as the compressed image), arm64's `Image`, and a small module tree with just the
//! NIC drivers and their dependencies.
//!
//! Cache layout, under `cmd::cache_dir()/kernels/<suite>/` (amd64) or `<suite>-arm64/`:
//! `apt/` (private apt lists), `current` (the release last resolved), and
//! `<release>/{vmlinux, config, root/lib/modules/<release>/…, .ready}`.
use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{apt::PrivateApt, arch::Arch, cmd};

/// Modules the guest gets (with their dependencies): the three NIC drivers under test, the virtio
/// PCI transport, and veth for link-deletion and namespace scenarios.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net", "e1000e", "e1000", "veth"];

/// What the distro guest needs besides: its root disk (virtio_blk, ext4) and systemd's autofs.
pub const DISTRO_MODULES: &[&str] = &["virtio_blk", "ext4", "autofs4"];

/// In the module tree but loaded only by the scenarios that use them: a NIC's children (VLAN,
/// macvlan), which share its MAC.
pub const ON_DEMAND_MODULES: &[&str] = &["8021q", "macvlan"];

/// Every module a prepared kernel keeps; written into its `.ready` marker, so that a kernel
/// prepared with another list is prepared again.
fn module_list(arch: Arch) -> String {
    // The suffix names how the list is completed (soft dependencies): a change re-prepares.
    format!("{} +softdeps", wanted_modules(arch).join(" "))
}

/// The modules a guest of `arch` loads at boot.
pub fn guest_modules(arch: Arch) -> Vec<&'static str> {
    GUEST_MODULES.iter().chain(arch.extra_modules()).copied().collect()
}

fn wanted_modules(arch: Arch) -> Vec<&'static str> {
    guest_modules(arch).into_iter().chain(DISTRO_MODULES.iter().chain(ON_DEMAND_MODULES).copied()).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Debian 11, Linux 5.10 (Amazon Linux 2's kernel generation).
    #[value(alias = "5.10")]
    Bullseye,
    /// Debian 12, Linux 6.1 (the default guest kernel).
    #[value(alias = "6.1")]
    Bookworm,
    /// Debian 13, Linux 6.12.
    #[value(alias = "6.12")]
    Trixie,
    /// Debian unstable, the newest kernel (7.x).
    #[value(alias = "7.2")]
    Sid,
}

impl Suite {
    pub const ALL: [Self; 4] = [Self::Bullseye, Self::Bookworm, Self::Trixie, Self::Sid];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Bullseye => "bullseye",
            Self::Bookworm => "bookworm",
            Self::Trixie => "trixie",
            Self::Sid => "sid",
        }
    }

    /// The apt suites whose newest `linux-image-<arch>` we take.
    fn apt_suites(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Self::Bullseye => (&["bullseye"], &["bullseye-security"]),
            Self::Bookworm => (&["bookworm"], &["bookworm-security"]),
            Self::Trixie => (&["trixie"], &["trixie-security"]),
            Self::Sid => (&["sid"], &[]),
        }
    }
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    pub suite: Suite,
    /// `uname -r` inside the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// What QEMU boots: the uncompressed ELF `vmlinux` (amd64, through its PVH note) or the
    /// uncompressed `Image` (arm64).
    pub image: PathBuf,
    pub arch: Arch,
    /// A directory holding `lib/modules/<release>/` with the selected modules and `modules.dep`.
    pub module_root: PathBuf,
}

pub fn ensure(suite: Suite, arch: Arch, refresh: bool) -> Result<GuestKernel> {
    // amd64 keeps the directory it always had; other architectures get their own.
    let dir = match arch {
        Arch::Amd64 => cmd::cache_dir().join("kernels").join(suite.name()),
        _ => cmd::cache_dir().join("kernels").join(format!("{}-{}", suite.name(), arch.name())),
    };
    let current = dir.join("current");
    if !refresh {
        if let Ok(release) = fs::read_to_string(&current) {
            if let Some(kernel) = prepared(suite, arch, &dir, release.trim()) {
                return Ok(kernel);
            }
        }
    }
    let (archive_suites, security_suites) = suite.apt_suites();
    let apt = PrivateApt::new(&dir.join("apt"), arch, archive_suites, security_suites)?;
    let release = apt.resolve_release()?;
    let kernel = match prepared(suite, arch, &dir, &release) {
        Some(kernel) => kernel,
        None => match prepare(suite, arch, &apt, &dir, &release) {
            Ok(kernel) => kernel,
            // A security index may name a kernel its mirror no longer serves (bullseye's arm64,
            // 2026-12-07: 404): the suite's own newest kernel then.
            Err(error) if !security_suites.is_empty() => {
                println!(
                    "setup: the {} {} kernel {release} could not be fetched ({error:#}); taking the suite's own newest, without its security updates",
                    suite.name(),
                    arch.name()
                );
                let archive = PrivateApt::new(&dir.join("apt-archive"), arch, archive_suites, &[])?;
                let release = archive.resolve_release()?;
                let kernel = match prepared(suite, arch, &dir, &release) {
                    Some(kernel) => kernel,
                    None => prepare(suite, arch, &archive, &dir, &release)?,
                };
                fs::write(&current, &release)?;
                return Ok(kernel);
            }
            Err(error) => return Err(error),
        },
    };
    fs::write(&current, &release)?;
    Ok(kernel)
}

fn prepared(suite: Suite, arch: Arch, dir: &Path, release: &str) -> Option<GuestKernel> {
    let rel_dir = dir.join(release);
    let ready = fs::read_to_string(rel_dir.join(".ready")).ok()?;
    (ready.trim() == module_list(arch)).then(|| GuestKernel {
        suite,
        release: release.to_owned(),
        image: rel_dir.join(boot_image_name(arch)),
        arch,
        module_root: rel_dir.join("root"),
    })
}

fn prepare(suite: Suite, arch: Arch, apt: &PrivateApt, dir: &Path, release: &str) -> Result<GuestKernel> {
    let rel_dir = dir.join(release);
    let work = dir.join(format!("{release}.work"));
    let _ = fs::remove_dir_all(&work);
    let debs = work.join("debs");
    let unpacked = work.join("unpacked");
    fs::create_dir_all(&debs)?;
    fs::create_dir_all(&unpacked)?;

    let image = format!("linux-image-{release}");
    let mut packages = vec![image.clone()];
    // Newer kernels split the image package into binary and modules packages.
    for dep in apt.depends(&image)? {
        let split = ["linux-binary-", "linux-modules-", "linux-base-"];
        if split.iter().any(|prefix| dep == format!("{prefix}{release}")) {
            packages.push(dep);
        }
    }
    eprintln!("setup: downloading the {} {} guest kernel: {}", suite.name(), arch.name(), packages.join(" "));
    apt.download(&packages, &debs)?;
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }

    // Merged-/usr packages ship usr/lib/modules; depmod -b looks in lib/modules.
    let modules_src = unpacked.join("lib/modules").join(release);
    let usr_modules = unpacked.join("usr/lib/modules").join(release);
    if !modules_src.is_dir() && usr_modules.is_dir() {
        fs::create_dir_all(unpacked.join("lib/modules"))?;
        fs::rename(&usr_modules, &modules_src)?;
    }
    if !modules_src.is_dir() {
        bail!("{packages:?} hold no lib/modules/{release}");
    }
    // Packages ship no modules.dep (the postinst makes it); make it to resolve dependencies.
    if !modules_src.join("modules.dep").exists() {
        cmd::run(Command::new("depmod").arg("-b").arg(&unpacked).arg(release))?;
    }

    let _ = fs::remove_dir_all(&rel_dir);
    fs::create_dir_all(&rel_dir)?;
    // Older packages keep the image and config in /boot, split ones beside the modules.
    let boot = unpacked.join("boot");
    let vmlinuz = [boot.join(format!("vmlinuz-{release}")), modules_src.join("vmlinuz")]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("{packages:?} hold no vmlinuz"))?;
    let image = rel_dir.join(boot_image_name(arch));
    match arch {
        Arch::Amd64 => extract_vmlinux(&vmlinuz, &image)?,
        Arch::Arm64 => extract_arm64_image(&vmlinuz, &image)?,
    }
    if let Some(config) =
        [boot.join(format!("config-{release}")), modules_src.join("config")].into_iter().find(|p| p.exists())
    {
        fs::copy(&config, rel_dir.join("config"))?;
    }
    let module_root = rel_dir.join("root");
    let modules = module_list(arch);
    let wanted = wanted_modules(arch);
    select_modules(&modules_src, &module_root.join("lib/modules").join(release), &wanted)?;
    cmd::run(Command::new("depmod").arg("-b").arg(&module_root).arg(release))?;
    fs::remove_dir_all(&work)?;
    fs::write(rel_dir.join(".ready"), modules)?;
    eprintln!("setup: guest kernel {release} ready in {}", rel_dir.display());
    Ok(GuestKernel { suite, release: release.to_owned(), image, arch, module_root })
}

fn boot_image_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "vmlinux",
        Arch::Arm64 => "Image",
    }
}

/// Debian's arm64 `vmlinuz` is the kernel's uncompressed `Image` (an EFI stub, the "ARM\x64"
/// magic at byte 56; 6.1 to 7.2 have no `CONFIG_EFI_ZBOOT`): copied as it is. A gzipped one, as
/// other distributions ship, is unpacked.
fn extract_arm64_image(vmlinuz: &Path, out: &Path) -> Result<()> {
    let data = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let image = if data.starts_with(b"\x1f\x8b") {
        let output = Command::new("gzip").arg("-dc").arg(vmlinuz).output().context("cannot run gzip")?;
        if !output.status.success() {
            bail!("gzip could not unpack {}", vmlinuz.display());
        }
        output.stdout
    } else {
        data
    };
    if image.get(56..60) != Some(b"ARM\x64") {
        bail!("{} is no arm64 Image (no ARM\\x64 magic at byte 56): an EFI zboot image?", vmlinuz.display());
    }
    fs::write(out, image)?;
    Ok(())
}

/// Finds the compressed payload inside a bzImage and decompresses it to the ELF vmlinux (what the
/// kernel's `scripts/extract-vmlinux` does).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08", "gzip", &["-dcq"]),
    ];
    for (magic, tool, args) in formats {
        let mut start = 0;
        while let Some(pos) = find(&image[start..], magic) {
            let offset = start + pos;
            start = offset + 1;
            let mut child = Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot run {tool}"))?;
            let mut stdin = child.stdin.take().context("no stdin")?;
            let payload = image[offset..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let output = child.wait_with_output()?;
            let _ = writer.join();
            if output.stdout.starts_with(b"\x7fELF") {
                fs::write(out, &output.stdout)?;
                return Ok(());
            }
        }
    }
    bail!("found no compressed ELF kernel inside {}", vmlinuz.display())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The module name of a path in `modules.dep` (`kernel/drivers/net/virtio_net.ko.xz` → `virtio_net`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Copies `wanted` and everything they depend on from `src` (a `lib/modules/<release>`) to `dst`,
/// decompressed, with the files depmod needs.
fn select_modules(src: &Path, dst: &Path, wanted: &[&str]) -> Result<()> {
    let dep_file = src.join("modules.dep");
    let dep_text =
        fs::read_to_string(&dep_file).with_context(|| format!("cannot read {}", dep_file.display()))?;
    let builtin = fs::read_to_string(src.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let deps: Vec<(String, Vec<String>)> = dep_text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(path, deps)| (path.to_owned(), deps.split_whitespace().map(str::to_owned).collect()))
        .collect();
    // Soft dependencies (ext4 wants "crc32c" before it, through the crypto API) are resolved
    // through modules.alias, so that the module the kernel will ask for at run time is there.
    let softdeps = fs::read_to_string(src.join("modules.softdep")).unwrap_or_default();
    let aliases = fs::read_to_string(src.join("modules.alias")).unwrap_or_default();
    let soft_of = |name: &str| -> Vec<String> {
        softdeps
            .lines()
            .filter_map(|l| l.strip_prefix("softdep "))
            .filter_map(|l| l.split_once(' '))
            .filter(|(module, _)| module_name(module) == name)
            .flat_map(|(_, rest)| rest.split_whitespace().filter(|w| !w.ends_with(':')).map(str::to_owned))
            .flat_map(|dep| {
                let via_alias: Vec<String> = aliases
                    .lines()
                    .filter_map(|l| l.strip_prefix("alias "))
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(alias, _)| *alias == dep || *alias == format!("crypto-{dep}"))
                    .map(|(_, module)| module_name(module))
                    .collect();
                std::iter::once(module_name(&dep)).chain(via_alias)
            })
            .collect()
    };
    let mut chosen = BTreeSet::new();
    let mut queue: Vec<(String, bool)> = wanted.iter().map(|w| ((*w).to_owned(), true)).collect();
    let mut seen = BTreeSet::new();
    while let Some((name, required)) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        match deps.iter().find(|(path, _)| module_name(path) == name) {
            Some((path, needs)) => {
                chosen.insert(path.clone());
                for need in needs {
                    chosen.insert(need.clone());
                    queue.push((module_name(need), false));
                }
            }
            None if builtin.contains(&name) || !required => {}
            None => bail!("module {name} is neither built into nor shipped with this kernel"),
        }
        queue.extend(soft_of(&name).into_iter().map(|n| (n, false)));
    }
    fs::create_dir_all(dst)?;
    for file in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        if src.join(file).exists() {
            fs::copy(src.join(file), dst.join(file))?;
        }
    }
    for path in &chosen {
        let from = src.join(path);
        let plain = path.trim_end_matches(".xz").trim_end_matches(".zst").trim_end_matches(".gz");
        let to = dst.join(plain);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        let tool = match path.rsplit('.').next() {
            Some("xz") => Some("xz"),
            Some("zst") => Some("zstd"),
            Some("gz") => Some("gzip"),
            _ => None,
        };
        match tool {
            Some(tool) => {
                let out = fs::File::create(&to)?;
                cmd::run(Command::new(tool).arg("-dc").arg(&from).stdout(out))?;
            }
            None => {
                fs::copy(&from, &to)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_from_dep_paths() {
        assert_eq!(module_name("kernel/drivers/net/virtio_net.ko.xz"), "virtio_net");
        assert_eq!(module_name("kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko"), "e1000e");
        assert_eq!(module_name("kernel/drivers/ptp/ptp-foo.ko.zst"), "ptp_foo");
    }
}
