//! The distro guest's root file system: Debian with systemd as PID 1, udev, iproute2, kmod, and the
//! network managers hotplug must live with (cloud-init, systemd-networkd, ifupdown,
//! amazon-ec2-net-utils), built by mmdebstrap from the host's Debian mirror into an ext4 image
//! (`mke2fs -d`, no loop mount), cached beside the kernels and rebuilt when its recipe (package
//! list and customization) changes. Guests boot it with `snapshot=on`: every boot is a fresh
//! instance, and nothing a scenario does reaches the image.
//!
//! Each network manager is installed but off in the image; a scenario's `# managers:` line turns
//! on the ones it wants at boot (see `vm::Manager`).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result};

use crate::{apt::HostMirrors, cmd};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Distro {
    /// Debian 13: systemd 257, cloud-init 25.1, amazon-ec2-net-utils 2.4.
    Trixie,
    /// Debian unstable: the newest peers (systemd 26x, cloud-init 26.x), as Ubuntu takes them
    /// within weeks. Its packages move daily: `cargo xtask setup --rebuild-distro` takes the new.
    Sid,
}

impl Distro {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Trixie => "trixie",
            Self::Sid => "sid",
        }
    }

    /// The packages beyond [`PACKAGES`] that differ by release: sid has no isc-dhcp-client any
    /// more (ifupdown falls back to dhcpcd), and its `apt` variant no longer brings `mount`
    /// (without /usr/bin/mount, systemd's sys-kernel-tracing.mount fails and the agent runs
    /// degraded: the cause of the degraded service first seen on sid).
    fn release_packages(self) -> &'static [&'static str] {
        match self {
            Self::Trixie => &["isc-dhcp-client"],
            Self::Sid => &["dhcpcd-base", "mount"],
        }
    }

    /// Whether the release has a `-security` suite (unstable has none).
    const fn has_security_suite(self) -> bool {
        matches!(self, Self::Trixie)
    }
}

/// Packages beyond the `apt` variant (Essential and apt): an init system and device manager, the
/// tools scenarios use, and the network managers.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "iproute2",
    "kmod",
    "procps",
    "jq",
    "curl",
    "cloud-init",
    "ifupdown",
    "amazon-ec2-net-utils",
];

/// Run by mmdebstrap on the finished tree (`$1`): quiet, quick and repeatable boots, and every
/// network manager installed but off (scenarios turn on the ones they want).
const CUSTOMIZE: &str = r#"set -eu
root=$1
echo hotplug-guest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 hotplug-guest\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,relatime 0 0\n' >"$root/etc/fstab"
# Nothing on a timer, no login prompts on the harness's serial console.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer \
	e2scrub_all.timer e2scrub_reap.service getty@tty1.service serial-getty@ttyS0.service \
	systemd-timesyncd.service; do
	ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# Network managers off: systemd-networkd, cloud-init, amazon-ec2-net-utils' udev rule.
rm -f "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service" \
	"$root/etc/systemd/system/sockets.target.wants/systemd-networkd.socket" \
	"$root/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service" \
	"$root/etc/systemd/system/sysinit.target.wants/systemd-network-generator.service"
touch "$root/etc/cloud/cloud-init.disabled"
# cloud-init, where a scenario turns it on: no resizing the root (a snapshot), no SSH host keys
# (no SSH server here); both would make it report an error.
printf 'resize_rootfs: false\ngrowpart:\n  mode: "off"\nssh_genkeytypes: []\n' >"$root/etc/cloud/cloud.cfg.d/90-hotplug-harness.cfg"
ln -sf /dev/null "$root/etc/udev/rules.d/99-vpc-policy-routes.rules"
# The journal in memory, every line kept: the harness saves it beside the scenario's result.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\nForwardToConsole=no\n' \
	>"$root/etc/systemd/journald.conf.d/hotplug-harness.conf"
# No machine-id: systemd makes a new one at each boot (every boot a new instance).
: >"$root/etc/machine-id"
"#;

/// What a release's image needs beyond [`CUSTOMIZE`]. cloud-init 26.x reports `error` when its
/// `users-groups` module has a default user to make without sudo and its
/// `ssh-authkey-fingerprints` module finds no SSH: no default user and no fingerprints here (no
/// SSH server, nobody logs in).
fn customize(distro: Distro) -> String {
    match distro {
        Distro::Trixie => CUSTOMIZE.to_owned(),
        Distro::Sid => format!(
            "{CUSTOMIZE}printf 'users: []\\nno_ssh_fingerprints: true\\n' >\"$root/etc/cloud/cloud.cfg.d/91-hotplug-harness-sid.cfg\"\n"
        ),
    }
}

/// An image ready to boot.
#[derive(Clone, Debug)]
pub struct DistroImage {
    pub distro: Distro,
    pub image: PathBuf,
}

/// Every package the image gets (the release's own after ifupdown, where trixie's recipe always
/// had it: the cached image stays valid).
fn packages(distro: Distro) -> Vec<&'static str> {
    let mut all = PACKAGES.to_vec();
    let at = all.iter().position(|p| *p == "ifupdown").map_or(all.len(), |i| i + 1);
    for (offset, package) in distro.release_packages().iter().enumerate() {
        all.insert(at + offset, package);
    }
    all
}

/// The recipe the cached image was built from: when it changes, the image is built again.
fn recipe(distro: Distro) -> String {
    format!("distro {}\npackages {}\n{}", distro.name(), packages(distro).join(" "), customize(distro))
}

/// The cached image for `distro`, built first if missing or built from another recipe (or when
/// `rebuild` asks for it: the archive moved on).
pub fn ensure(distro: Distro, rebuild: bool) -> Result<DistroImage> {
    let dir = cmd::cache_dir().join("distro").join(distro.name());
    let image = dir.join("rootfs.ext4");
    let recipe_file = dir.join("recipe");
    let want = recipe(distro);
    if !rebuild && image.exists() && fs::read_to_string(&recipe_file).is_ok_and(|r| r == want) {
        return Ok(DistroImage { distro, image });
    }
    let started = Instant::now();
    eprintln!(
        "setup: building the {} guest's root file system with mmdebstrap ({} packages, about a minute)",
        distro.name(),
        packages(distro).len()
    );
    fs::create_dir_all(&dir)?;
    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let tree = work.join("root");
    let hook = work.join("customize.sh");
    fs::write(&hook, customize(distro))?;
    let mirrors = HostMirrors::read()?;
    let mut sources =
        vec![format!("deb [signed-by={}] {} {} main", mirrors.keyring, mirrors.archive, distro.name())];
    if let Some(security) = mirrors.security.as_ref().filter(|_| distro.has_security_suite()) {
        sources.push(format!(
            "deb [signed-by={}] {security} {}-security main",
            mirrors.keyring,
            distro.name()
        ));
    }
    cmd::run(
        Command::new("mmdebstrap")
            .args(["--mode=root", "--variant=apt", "--format=directory", "--quiet"])
            .arg("--aptopt=APT::Install-Recommends \"false\"")
            // A mirror's unstable index may be older than its Valid-Until (a snapshot mirror).
            .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
            .arg(format!("--include={}", packages(distro).join(",")))
            .arg(format!("--customize-hook=sh {} \"$1\"", hook.display()))
            .arg(distro.name())
            .arg(&tree)
            .args(&sources),
    )
    .context("mmdebstrap failed (it needs root and the host's Debian mirror)")?;
    let partial = work.join("rootfs.ext4");
    build_ext4(&tree, &partial)?;
    fs::rename(&partial, &image)?;
    fs::write(&recipe_file, want)?;
    fs::remove_dir_all(&work)?;
    eprintln!(
        "setup: {} guest image ready in {:.0} s: {}",
        distro.name(),
        started.elapsed().as_secs_f64(),
        image.display()
    );
    Ok(DistroImage { distro, image })
}

/// An ext4 file system holding `tree`, with room to spare for what scenarios install and write.
fn build_ext4(tree: &Path, image: &Path) -> Result<()> {
    cmd::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "hotplug-root", "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(image)
            .arg("2G"),
    )
    .context("mke2fs -d failed (e2fsprogs 1.43 or newer is needed)")
}
