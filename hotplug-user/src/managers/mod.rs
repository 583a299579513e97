//! The other network managers on the host, and what each does to a NIC after a driver reload:
//! systemd-networkd configures the returning link from its `.network` files and DHCP (deleting
//! what it calls foreign as it does: `networkd.conf.d/80-hotplug-agent.conf`, installed with the
//! package, keeps it from deleting routes and rules it did not make); amazon-ec2-net-utils writes
//! its policy routes through its own units on networkd; cloud-init's hotplug hook would crawl the
//! metadata service (the package gates it: `cloud_init`). The agent learns all this from the files
//! they keep (networkd's link state files are what `sd_network_link_get_*` reads), never over D-Bus.
pub mod cloud_init;
mod ifupdown;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who configures a NIC besides hotplug-agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Manager {
    /// systemd-networkd applies a `.network` file to it.
    Networkd,
    /// amazon-ec2-net-utils' policy routes, applied by networkd.
    Ec2NetUtils,
    /// NetworkManager has a device for it.
    NetworkManager,
    /// ifupdown brings it up on hotplug (`allow-hotplug`, `ifup@NAME.service`).
    Ifupdown,
}

impl Manager {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Networkd => "networkd",
            Self::Ec2NetUtils => "ec2-net-utils",
            Self::NetworkManager => "NetworkManager",
            Self::Ifupdown => "ifupdown",
        }
    }
}

/// networkd's view of one link (its state file, `/run/systemd/netif/links/IFINDEX`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkdLink {
    /// pending, initialized, configuring, configured, unmanaged, failed, linger.
    pub admin_state: String,
    pub network_file: Option<String>,
}

impl NetworkdLink {
    /// Whether networkd is done with the link for now (it configured it, gave up, or leaves it).
    pub fn settled(&self) -> bool {
        matches!(self.admin_state.as_str(), "configured" | "unmanaged" | "failed" | "linger")
    }

    fn parse(text: &str) -> Self {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        };
        Self { admin_state: field("ADMIN_STATE").unwrap_or_default(), network_file: field("NETWORK_FILE") }
    }
}

/// Where the managers keep their state: `/`, or another root for tests.
#[derive(Clone, Debug)]
pub struct Host {
    root: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self { root: PathBuf::from("/") }
    }
}

/// What `features` and `status` say of the other managers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostManagers {
    /// systemd-networkd runs (it keeps link state files).
    pub networkd: bool,
    /// The package's networkd.conf drop-in is there: networkd (from its next start) leaves the
    /// routes and rules it did not make alone.
    pub networkd_keeps_foreign: bool,
    /// cloud-init will configure NICs at boot (installed and not disabled).
    pub cloud_init: bool,
    /// cloud-init's hotplug hook is installed (its udev rule), and whether the package's gate
    /// stands in front of it.
    pub cloud_init_hotplug: Option<cloud_init::Hotplug>,
    pub ec2_net_utils: bool,
    pub network_manager: bool,
    /// ifupdown brings NICs up on hotplug (`allow-hotplug` lines): their names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ifupdown_hotplug: Vec<String>,
}

impl HostManagers {
    /// Whether anything but hotplug-agent configures NICs on this host.
    pub fn any(&self) -> bool {
        self.networkd
            || self.cloud_init
            || self.ec2_net_utils
            || self.network_manager
            || !self.ifupdown_hotplug.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.cloud_init {
            names.push("cloud-init");
        }
        if self.networkd {
            names.push("systemd-networkd");
        }
        if self.ec2_net_utils {
            names.push("amazon-ec2-net-utils");
        }
        if self.network_manager {
            names.push("NetworkManager");
        }
        if !self.ifupdown_hotplug.is_empty() {
            names.push("ifupdown");
        }
        names
    }
}

impl Host {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub(crate) fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    pub(crate) fn exists(&self, path: &str) -> bool {
        self.path(path).exists()
    }

    /// Which managers are on the host now.
    pub fn detect(&self) -> HostManagers {
        let networkd_enabled =
            self.exists("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service");
        let ec2_rule = self.path("/etc/udev/rules.d/99-vpc-policy-routes.rules");
        // A rule masked by a symlink to /dev/null is off.
        let ec2_masked = std::fs::read_link(&ec2_rule).is_ok_and(|t| t == Path::new("/dev/null"));
        HostManagers {
            // networkd writes its manager state file when it runs (the links directory is made by
            // systemd-tmpfiles whether networkd runs or not).
            networkd: self.exists("/run/systemd/netif/state") || networkd_enabled,
            networkd_keeps_foreign: self.exists("/usr/lib/systemd/networkd.conf.d/80-hotplug-agent.conf")
                && !self.exists("/etc/systemd/networkd.conf.d/80-hotplug-agent.conf"),
            cloud_init: self.exists("/usr/bin/cloud-init") && !self.exists("/etc/cloud/cloud-init.disabled"),
            cloud_init_hotplug: cloud_init::Hotplug::detect(self),
            ec2_net_utils: self.exists("/usr/lib/udev/rules.d/99-vpc-policy-routes.rules") && !ec2_masked,
            network_manager: self.exists("/run/NetworkManager"),
            ifupdown_hotplug: self.ifupdown_hotplug().into_iter().collect(),
        }
    }

    /// networkd's state of the link `ifindex`, if networkd knows it.
    pub fn networkd_link(&self, ifindex: u32) -> Option<NetworkdLink> {
        let text = std::fs::read_to_string(self.path(&format!("/run/systemd/netif/links/{ifindex}"))).ok()?;
        Some(NetworkdLink::parse(&text))
    }

    /// Whether udev runs here (it names NICs and starts what other managers hang on them).
    pub fn udev_running(&self) -> bool {
        self.exists("/run/udev/control")
    }

    /// Whether udev is done with the NIC `ifindex`: it renamed it and recorded it (its database
    /// entry is written once the rules ran).
    pub fn udev_done(&self, ifindex: u32) -> bool {
        self.exists(&format!("/run/udev/data/n{ifindex}"))
    }

    /// Whether networkd is configuring the link `ifindex` or did something to it in the last
    /// `within` (it rewrites the link's state file on every change).
    pub fn networkd_touched(&self, ifindex: u32, within: std::time::Duration) -> bool {
        let path = self.path(&format!("/run/systemd/netif/links/{ifindex}"));
        let recent = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age <= within));
        recent || self.networkd_link(ifindex).is_some_and(|l| !l.settled())
    }

    /// Who configures the NIC `ifindex` (named `name`) now, besides hotplug-agent.
    pub fn nic_manager(&self, ifindex: u32, name: &str) -> Option<Manager> {
        if let Some(link) = self.networkd_link(ifindex) {
            if link.admin_state != "unmanaged" && link.network_file.is_some() {
                // amazon-ec2-net-utils' per-ENI file, which networkd applies.
                let ec2 = self.exists(&format!("/run/systemd/network/70-{name}.network"));
                return Some(if ec2 { Manager::Ec2NetUtils } else { Manager::Networkd });
            }
        }
        if self.exists(&format!("/run/NetworkManager/devices/{ifindex}")) {
            return Some(Manager::NetworkManager);
        }
        self.ifupdown_hotplug().contains(name).then_some(Manager::Ifupdown)
    }

    /// Whether `manager` is done configuring the NIC `ifindex`, named `name`, that registered
    /// again at `registered` (wall clock).
    pub fn manager_done(
        &self,
        manager: Option<Manager>,
        ifindex: u32,
        name: &str,
        registered: std::time::SystemTime,
    ) -> bool {
        match manager {
            Some(Manager::Ifupdown) => self.ifupdown_done(name, registered),
            _ => self.networkd_link(ifindex).is_some_and(|l| l.settled()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hotplug-managers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Writes `text` at `path` under the test root `root`, making its directories.
    pub(super) fn write(root: &Path, path: &str, text: &str) -> std::io::Result<()> {
        let path = root.join(path.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)
    }

    #[test]
    fn a_bare_host_has_no_manager() {
        let dir = root("bare");
        let host = Host::at(&dir);
        assert_eq!(host.detect(), HostManagers::default());
        assert!(!host.detect().any());
        assert_eq!(host.nic_manager(2, "eth0"), None);
    }

    #[test]
    fn networkd_links_and_ec2_net_utils_files() -> std::io::Result<()> {
        let dir = root("networkd");
        let host = Host::at(&dir);
        write(&dir, "/run/systemd/netif/links/2", "# This is private data. Do not parse.\nADMIN_STATE=configuring\nOPER_STATE=carrier\nNETWORK_FILE=/run/systemd/network/70-ens5.network\n")?;
        write(&dir, "/run/systemd/netif/links/3", "ADMIN_STATE=unmanaged\n")?;
        write(&dir, "/run/systemd/network/70-ens5.network", "")?;
        write(
            &dir,
            "/run/systemd/netif/links/4",
            "ADMIN_STATE=configured\nNETWORK_FILE=/etc/systemd/network/10-ens6.network\n",
        )?;
        assert!(
            !host.detect().networkd,
            "link files alone (systemd-tmpfiles makes the directory) say nothing"
        );
        write(&dir, "/run/systemd/netif/state", "OPER_STATE=routable\n")?;
        let managers = host.detect();
        assert!(managers.networkd && managers.any());
        assert_eq!(host.nic_manager(2, "ens5"), Some(Manager::Ec2NetUtils));
        assert_eq!(host.nic_manager(3, "ens7"), None, "unmanaged by networkd");
        assert_eq!(host.nic_manager(4, "ens6"), Some(Manager::Networkd));
        assert!(!host.networkd_link(2).is_some_and(|l| l.settled()), "still configuring");
        assert!(host.networkd_link(4).is_some_and(|l| l.settled()));
        assert!(host.networkd_link(3).is_some_and(|l| l.settled()), "networkd leaves it alone");
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn a_masked_ec2_net_utils_rule_and_a_disabled_cloud_init_are_off() -> std::io::Result<()> {
        let dir = root("masked");
        let host = Host::at(&dir);
        write(&dir, "/usr/lib/udev/rules.d/99-vpc-policy-routes.rules", "")?;
        write(&dir, "/usr/bin/cloud-init", "")?;
        assert!(host.detect().ec2_net_utils && host.detect().cloud_init);
        std::fs::create_dir_all(dir.join("etc/udev/rules.d"))?;
        std::os::unix::fs::symlink("/dev/null", dir.join("etc/udev/rules.d/99-vpc-policy-routes.rules"))?;
        write(&dir, "/etc/cloud/cloud-init.disabled", "")?;
        let managers = host.detect();
        assert!(!managers.ec2_net_utils && !managers.cloud_init);
        std::fs::remove_dir_all(&dir)
    }
}
