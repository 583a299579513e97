//! Guest kernels: Debian's generic amd64 kernels, fetched as packages with a private apt state (the
//! host's own apt configuration is only read, never changed), unpacked, and prepared for a fast
//! boot: the ELF `vmlinux` (QEMU boots it through its PVH note, about twice as fast as the
//! compressed image) and a small module tree with just the NIC drivers and their dependencies.
//!
//! Cache layout, under `cmd::cache_dir()/kernels/<suite>/`:
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

use crate::cmd;

/// Modules the guest gets (with their dependencies): the three NIC drivers under test, the virtio
/// PCI transport, and veth for link-deletion and namespace scenarios.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net", "e1000e", "e1000", "veth"];

/// What the distro guest needs besides: its root disk (virtio_blk, ext4) and systemd's autofs.
pub const DISTRO_MODULES: &[&str] = &["virtio_blk", "ext4", "autofs4"];

/// Every module a prepared kernel keeps; written into its `.ready` marker, so that a kernel
/// prepared with another list is prepared again.
fn module_list() -> String {
    // The suffix names how the list is completed (soft dependencies): a change re-prepares.
    let list: Vec<&str> = GUEST_MODULES.iter().chain(DISTRO_MODULES).copied().collect();
    format!("{} +softdeps", list.join(" "))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
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
    pub const ALL: [Self; 3] = [Self::Bookworm, Self::Trixie, Self::Sid];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Bookworm => "bookworm",
            Self::Trixie => "trixie",
            Self::Sid => "sid",
        }
    }

    /// The apt suites whose newest `linux-image-amd64` we take.
    fn apt_suites(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
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
    /// Uncompressed ELF kernel image.
    pub vmlinux: PathBuf,
    /// A directory holding `lib/modules/<release>/` with the selected modules and `modules.dep`.
    pub module_root: PathBuf,
}

pub fn ensure(suite: Suite, refresh: bool) -> Result<GuestKernel> {
    let dir = cmd::cache_dir().join("kernels").join(suite.name());
    let current = dir.join("current");
    if !refresh {
        if let Ok(release) = fs::read_to_string(&current) {
            if let Some(kernel) = prepared(suite, &dir, release.trim()) {
                return Ok(kernel);
            }
        }
    }
    let apt = PrivateApt::new(&dir.join("apt"), suite)?;
    let release = apt.resolve_release()?;
    let kernel = match prepared(suite, &dir, &release) {
        Some(kernel) => kernel,
        None => prepare(suite, &apt, &dir, &release)?,
    };
    fs::write(&current, &release)?;
    Ok(kernel)
}

fn prepared(suite: Suite, dir: &Path, release: &str) -> Option<GuestKernel> {
    let rel_dir = dir.join(release);
    let ready = fs::read_to_string(rel_dir.join(".ready")).ok()?;
    (ready.trim() == module_list()).then(|| GuestKernel {
        suite,
        release: release.to_owned(),
        vmlinux: rel_dir.join("vmlinux"),
        module_root: rel_dir.join("root"),
    })
}

fn prepare(suite: Suite, apt: &PrivateApt, dir: &Path, release: &str) -> Result<GuestKernel> {
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
    eprintln!("setup: downloading the {} guest kernel: {}", suite.name(), packages.join(" "));
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
    extract_vmlinux(&vmlinuz, &rel_dir.join("vmlinux"))?;
    if let Some(config) =
        [boot.join(format!("config-{release}")), modules_src.join("config")].into_iter().find(|p| p.exists())
    {
        fs::copy(&config, rel_dir.join("config"))?;
    }
    let module_root = rel_dir.join("root");
    let modules = module_list();
    let wanted: Vec<&str> = GUEST_MODULES.iter().chain(DISTRO_MODULES).copied().collect();
    select_modules(&modules_src, &module_root.join("lib/modules").join(release), &wanted)?;
    cmd::run(Command::new("depmod").arg("-b").arg(&module_root).arg(release))?;
    fs::remove_dir_all(&work)?;
    fs::write(rel_dir.join(".ready"), modules)?;
    eprintln!("setup: guest kernel {release} ready in {}", rel_dir.display());
    Ok(GuestKernel { suite, release: release.to_owned(), vmlinux: rel_dir.join("vmlinux"), module_root })
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

/// apt with its own lists and cache, reading the host's Debian mirrors and keyring.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(dir: &Path, suite: Suite) -> Result<Self> {
        let mirrors = HostMirrors::read()?;
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let (archive_suites, security_suites) = suite.apt_suites();
        let mut sources = String::new();
        for s in archive_suites {
            sources.push_str(&format!("deb [signed-by={}] {} {s} main\n", mirrors.keyring, mirrors.archive));
        }
        if let Some(security) = &mirrors.security {
            for s in security_suites {
                sources.push_str(&format!("deb [signed-by={}] {security} {s} main\n", mirrors.keyring));
            }
        }
        let list = dir.join("sources.list");
        fs::write(&list, sources)?;
        let options = vec![
            format!("Dir::Etc::sourcelist={}", list.display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            "APT::Get::List-Cleanup=0".to_owned(),
            // The cache is root's own directory; apt's _apt sandbox user cannot write there.
            "APT::Sandbox::User=root".to_owned(),
        ];
        Ok(Self { options })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command
    }

    /// Updates the private lists and names the kernel release `linux-image-amd64` depends on.
    fn resolve_release(&self) -> Result<String> {
        cmd::output(self.command("apt-get").args(["update", "-qq"]))
            .context("apt-get update (private lists for the guest kernels) failed")?;
        let deps = self.depends("linux-image-amd64")?;
        deps.iter()
            .find_map(|dep| dep.strip_prefix("linux-image-").filter(|r| *r != "amd64").map(str::to_owned))
            .context("linux-image-amd64 depends on no linux-image-<release> package")
    }

    fn depends(&self, package: &str) -> Result<Vec<String>> {
        let text = cmd::output(self.command("apt-cache").args(["depends", package]))?;
        Ok(text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .map(|dep| dep.trim_matches(|c| c == '<' || c == '>').to_owned())
            .collect())
    }

    fn download(&self, packages: &[String], into: &Path) -> Result<()> {
        cmd::run(self.command("apt-get").current_dir(into).arg("download").args(packages))
    }
}

/// The Debian archive and security mirrors the host's apt already uses, and their keyring.
pub struct HostMirrors {
    pub archive: String,
    pub security: Option<String>,
    pub keyring: String,
}

impl HostMirrors {
    const DEFAULT_KEYRING: &'static str = "/usr/share/keyrings/debian-archive-keyring.gpg";

    pub fn read() -> Result<Self> {
        let mut entries = Vec::new();
        let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
            files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
        }
        for file in files {
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            match file.extension().and_then(|e| e.to_str()) {
                Some("sources") => entries.extend(parse_deb822(&text)),
                Some("list") | None => entries.extend(parse_one_line(&text)),
                _ => {}
            }
        }
        let is_debian = |e: &&SourceEntry| e.suites.iter().any(|s| is_debian_suite(s));
        let archive = std::env::var("HOTPLUG_DEBIAN_MIRROR").ok().or_else(|| {
            entries
                .iter()
                .filter(is_debian)
                .find(|e| e.suites.iter().any(|s| !s.contains('-')))
                .map(|e| e.uri.clone())
        });
        let security = std::env::var("HOTPLUG_DEBIAN_SECURITY_MIRROR").ok().or_else(|| {
            entries
                .iter()
                .filter(is_debian)
                .find(|e| e.suites.iter().any(|s| s.ends_with("-security")))
                .map(|e| e.uri.clone())
        });
        let keyring = entries
            .iter()
            .filter(is_debian)
            .find_map(|e| e.signed_by.clone())
            .filter(|k| Path::new(k).exists())
            .unwrap_or_else(|| Self::DEFAULT_KEYRING.to_owned());
        let Some(archive) = archive else {
            bail!(
                "no Debian archive in this host's apt sources, so no guest kernel can be fetched: \
                 set HOTPLUG_DEBIAN_MIRROR to a Debian mirror's URL"
            );
        };
        Ok(Self { archive, security, keyring })
    }
}

fn is_debian_suite(suite: &str) -> bool {
    let base = suite.split('-').next().unwrap_or(suite);
    [
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "stable",
        "testing",
        "unstable",
        "oldstable",
    ]
    .contains(&base)
}

struct SourceEntry {
    uri: String,
    suites: Vec<String>,
    signed_by: Option<String>,
}

fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field =
                |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()));
            if field("Types:").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb")) {
                return None;
            }
            if field("Enabled:").is_some_and(|v| v == "no") {
                return None;
            }
            Some(SourceEntry {
                uri: field("URIs:")?.split_whitespace().next()?.to_owned(),
                suites: field("Suites:")?.split_whitespace().map(str::to_owned).collect(),
                signed_by: field("Signed-By:"),
            })
        })
        .collect()
}

fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("deb ")?;
            let (options, rest) = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']')?,
                None => ("", rest),
            };
            let mut words = rest.split_whitespace();
            let signed_by =
                options.split_whitespace().find_map(|o| o.strip_prefix("signed-by=").map(str::to_owned));
            Some(SourceEntry {
                uri: words.next()?.to_owned(),
                suites: vec![words.next()?.to_owned()],
                signed_by,
            })
        })
        .collect()
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

    #[test]
    fn reads_both_apt_source_formats() {
        let deb822 = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let entries = parse_deb822(deb822);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].uri, "http://mirror.invalid/debian");
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(entries[1].suites, ["bookworm-security"]);

        let one_line = "# comment\ndeb [arch=amd64 signed-by=/x.gpg] http://mirror.invalid/debian trixie main\ndeb-src http://mirror.invalid/debian trixie main\n";
        let entries = parse_one_line(one_line);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].suites, ["trixie"]);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/x.gpg"));
        assert!(is_debian_suite("trixie-security"));
        assert!(!is_debian_suite("nodistro"));
    }
}
