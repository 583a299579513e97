//! What an operator tunes on a NIC beyond its addresses, routes and rules, and the kernel drops
//! with the netdev when its driver unregisters it: link attributes (transmit queue length, alias,
//! group, GSO/GRO limits, a MAC set over the permanent one, the bond or bridge it is a port of),
//! its per-interface sysctls that differ from their family's `default` (what a new device gets),
//! and its queues' RPS/XPS settings.
//!
//! Kernel facts relied on: a new netdev's `net.ipv4.conf.IF.*` and `net.ipv6.conf.IF.*` start as
//! copies of `…conf.default.*` (net/ipv4/devinet.c `inetdev_init`, net/ipv6/addrconf.c
//! `ipv6_add_dev`), `net.ipv{4,6}.neigh.IF.*` of `…neigh.default.*` (net/core/neighbour.c
//! `neigh_parms_alloc`); `net.ipv6.conf.IF.mtu` follows the link's MTU (restored with the link);
//! queue settings live in /sys/class/net/IF/queues/{rx,tx}-N and start empty (no CPU in a mask,
//! 0 flows, no rate limit) unless the driver sets XPS itself, in which case its new load sets
//! the same again.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// A new Ethernet device's transmit queue length (`ether_setup`).
pub const DEFAULT_TXQUEUELEN: u32 = 1000;
/// A new device's GSO and GRO limits (`GSO_LEGACY_MAX_SIZE`, `GSO_MAX_SEGS`, `GRO_LEGACY_MAX_SIZE`).
pub const DEFAULT_GSO_MAX_SIZE: u32 = 65536;
pub const DEFAULT_GSO_MAX_SEGS: u32 = 65535;
pub const DEFAULT_GRO_MAX_SIZE: u32 = 65536;

/// The per-interface sysctl trees under /proc/sys/net, each with its `default` beside the
/// interfaces' directories.
pub const SYSCTL_TREES: [&str; 4] = ["ipv4/conf", "ipv6/conf", "ipv4/neigh", "ipv6/neigh"];

/// Per-interface sysctls that are no configuration of their own: `ipv6/conf/IF/mtu` is the
/// link's MTU (the link restore sets it); the neighbour tables' `retrans_time` and
/// `base_reachable_time` are the same values as their `_ms` twins, in older units, and the kernel
/// logs a deprecation warning each time IPv6's are read (net/ipv6/ndisc.c
/// `ndisc_warn_deprecated_sysctl`): never read, the `_ms` ones carry them.
const NOT_CONFIGURATION: [&str; 5] = [
    "ipv6/conf/mtu",
    "ipv4/neigh/retrans_time",
    "ipv4/neigh/base_reachable_time",
    "ipv6/neigh/retrans_time",
    "ipv6/neigh/base_reachable_time",
];

/// The queue settings read, per queue kind.
const RX_QUEUE_FILES: [&str; 2] = ["rps_cpus", "rps_flow_cnt"];
const TX_QUEUE_FILES: [&str; 3] = ["xps_cpus", "xps_rxqs", "tx_maxrate"];

/// One setting kept as the kernel shows it: `key` without the interface's name
/// (`ipv4/conf/rp_filter`, `rx-0/rps_cpus`), `value` as read, trimmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Setting {
    pub key: String,
    pub value: String,
}

/// A link's attributes that an operator sets and a new netdev does not keep.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkTuning {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txqueuelen: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Its group, when not the default group 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gso_max_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gso_max_segs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gro_max_size: Option<u32>,
    /// A MAC set over the permanent one (`ip link set IF address …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The bond or bridge it is a port of, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
}

impl LinkTuning {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Everything of a NIC this module covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tuning {
    /// The snapshot read its tuning (one held by release 0.1.0 did not: nothing of it is compared).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read: bool,
    #[serde(skip_serializing_if = "LinkTuning::is_empty")]
    pub link: LinkTuning,
    /// Sysctls that differ from their family's default, sorted by key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sysctls: Vec<Setting>,
    /// Queue settings other than empty, sorted by key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<Setting>,
}

impl Tuning {
    /// The tuning of the interface `name` with the link attributes `link` (read over rtnetlink),
    /// its sysctls and queue settings read from their files under `root`.
    pub fn read(root: &Root, name: &str, link: LinkTuning) -> Self {
        Self { read: true, link, sysctls: read_sysctls(root, name), queues: read_queues(root, name) }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// One line per difference between `self` (what should be) and `have`, naming the object;
    /// none when `self` was never read.
    pub fn differences(&self, have: &Self) -> Vec<String> {
        let mut diffs = Vec::new();
        if !self.read {
            return diffs;
        }
        let (w, h) = (&self.link, &have.link);
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".to_owned());
        let num = |v: Option<u32>| v.map_or_else(|| "default".to_owned(), |n| n.to_string());
        for (what, want, got) in [
            ("txqueuelen", num(w.txqueuelen), num(h.txqueuelen)),
            ("group", num(w.group), num(h.group)),
            ("gso_max_size", num(w.gso_max_size), num(h.gso_max_size)),
            ("gso_max_segs", num(w.gso_max_segs), num(h.gso_max_segs)),
            ("gro_max_size", num(w.gro_max_size), num(h.gro_max_size)),
            ("alias", show(&w.alias), show(&h.alias)),
            ("address", show(&w.address), show(&h.address)),
            ("master", show(&w.master), show(&h.master)),
        ] {
            if want != got {
                diffs.push(format!("link {what}: want {want}, have {got}"));
            }
        }
        setting_differences("sysctl", &self.sysctls, &have.sysctls, "default", &mut diffs);
        setting_differences("queue", &self.queues, &have.queues, "empty", &mut diffs);
        diffs
    }
}

fn setting_differences(kind: &str, want: &[Setting], have: &[Setting], unset: &str, diffs: &mut Vec<String>) {
    let value = |list: &[Setting], key: &str| list.iter().find(|s| s.key == key).map(|s| s.value.clone());
    let mut keys: Vec<&str> = want.iter().chain(have).map(|s| s.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let (w, h) = (value(want, key), value(have, key));
        if w != h {
            let w = w.unwrap_or_else(|| unset.to_owned());
            let h = h.unwrap_or_else(|| unset.to_owned());
            diffs.push(format!("{kind} {key}: want {w}, have {h}"));
        }
    }
}

/// Where the settings are read and written: `/` on a host, a directory tree in tests.
#[derive(Clone, Debug)]
pub struct Root(pub PathBuf);

impl Default for Root {
    fn default() -> Self {
        Self(PathBuf::from("/"))
    }
}

impl Root {
    /// A sysctl's file: `tree` as in [`SYSCTL_TREES`], `dir` an interface's name or `default`.
    pub fn sysctl(&self, tree: &str, dir: &str, name: &str) -> PathBuf {
        self.0.join("proc/sys/net").join(tree).join(dir).join(name)
    }

    /// A queue's file (`queue` as `rx-0`).
    pub fn queue(&self, interface: &str, queue: &str, name: &str) -> PathBuf {
        self.0.join("sys/class/net").join(interface).join("queues").join(queue).join(name)
    }
}

/// A file's contents, trimmed; `None` if it cannot be read (a setting this kernel or device does
/// not have, or one that reads as an error until it is set, like `stable_secret`).
fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn writable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o200 != 0)
}

/// A valid interface name: what may be joined to a path (never `.`, `..` or with a `/`).
pub fn safe_name(name: &str) -> bool {
    // `all` and `default` are sysctl directories of every interface, not one of them.
    !name.is_empty()
        && !matches!(name, "." | ".." | "all" | "default")
        && !name.contains('/')
        && name.len() < 16
}

/// The interface's sysctls that differ from their family's default and that can be written.
pub fn read_sysctls(root: &Root, interface: &str) -> Vec<Setting> {
    let mut settings = Vec::new();
    if !safe_name(interface) {
        return settings;
    }
    for tree in SYSCTL_TREES {
        let Ok(entries) = fs::read_dir(root.0.join("proc/sys/net").join(tree).join(interface)) else {
            continue;
        };
        // The family's defaults, each read once when first needed.
        let mut defaults: std::collections::HashMap<String, Option<String>> =
            std::collections::HashMap::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let key = format!("{tree}/{name}");
            if NOT_CONFIGURATION.contains(&key.as_str()) {
                continue;
            }
            let path = entry.path();
            if !writable(&path) {
                continue;
            }
            let default =
                defaults.entry(name.clone()).or_insert_with(|| read(&root.sysctl(tree, "default", &name)));
            // A setting without a default to compare with is left alone: it is not one a new
            // device would get from anywhere.
            let Some(default) = default.clone() else { continue };
            let Some(value) = read(&path) else { continue };
            if value != default {
                settings.push(Setting { key, value });
            }
        }
    }
    settings.sort();
    settings
}

/// Whether a queue setting is the empty one a new queue starts with: a CPU mask of zeros, or 0.
fn empty_queue_value(value: &str) -> bool {
    value.chars().all(|c| c == '0' || c == ',')
}

/// The interface's queue settings that are not empty.
pub fn read_queues(root: &Root, interface: &str) -> Vec<Setting> {
    let mut settings = Vec::new();
    if !safe_name(interface) {
        return settings;
    }
    let Ok(queues) = fs::read_dir(root.0.join("sys/class/net").join(interface).join("queues")) else {
        return settings;
    };
    for queue in queues.flatten() {
        let Some(queue) = queue.file_name().to_str().map(str::to_owned) else { continue };
        let files: &[&str] = if queue.starts_with("rx-") {
            &RX_QUEUE_FILES
        } else if queue.starts_with("tx-") {
            &TX_QUEUE_FILES
        } else {
            continue;
        };
        for file in files {
            let Some(value) = read(&root.queue(interface, &queue, file)) else { continue };
            if !empty_queue_value(&value) {
                settings.push(Setting { key: format!("{queue}/{file}"), value });
            }
        }
    }
    settings.sort();
    settings
}

/// Splits a kept key back into where it is written: (`tree`, name) of a sysctl.
pub fn sysctl_parts(key: &str) -> Option<(&'static str, &str)> {
    SYSCTL_TREES.iter().find_map(|tree| {
        let name = key.strip_prefix(tree)?.strip_prefix('/')?;
        let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        plain.then_some((*tree, name))
    })
}

/// (queue, file) of a kept queue key, checked: `rx-N` or `tx-N`, and a file this module reads.
pub fn queue_parts(key: &str) -> Option<(&str, &str)> {
    let (queue, file) = key.split_once('/')?;
    let number_ok = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    let known = match queue.split_once('-') {
        Some(("rx", n)) if number_ok(n) => RX_QUEUE_FILES.contains(&file),
        Some(("tx", n)) if number_ok(n) => TX_QUEUE_FILES.contains(&file),
        _ => false,
    };
    known.then_some((queue, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> Result<Root, std::io::Error> {
        let dir = std::env::temp_dir().join(format!("hotplug-tuning-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = Root(dir);
        let put = |path: PathBuf, value: &str, mode: u32| -> Result<(), std::io::Error> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&path, format!("{value}\n"))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        };
        for (tree, name, default, eth1) in [
            ("ipv4/conf", "rp_filter", "0", "2"),
            ("ipv4/conf", "arp_ignore", "0", "1"),
            ("ipv4/conf", "forwarding", "1", "1"),
            ("ipv6/conf", "accept_ra", "1", "0"),
            ("ipv6/conf", "mtu", "1280", "9001"),
            ("ipv4/neigh", "retrans_time_ms", "1000", "500"),
            // Its twin in older units: never read (IPv6's warns in the kernel log when read).
            ("ipv4/neigh", "retrans_time", "100", "50"),
        ] {
            put(root.sysctl(tree, "default", name), default, 0o644)?;
            put(root.sysctl(tree, "eth1", name), eth1, 0o644)?;
        }
        // Read-only, and without a default: neither is configuration to keep.
        put(root.sysctl("ipv4/conf", "eth1", "mc_forwarding"), "1", 0o444)?;
        put(root.sysctl("ipv4/conf", "default", "mc_forwarding"), "0", 0o444)?;
        put(root.sysctl("ipv6/conf", "eth1", "only_here"), "7", 0o644)?;
        put(root.queue("eth1", "rx-0", "rps_cpus"), "3", 0o644)?;
        put(root.queue("eth1", "rx-0", "rps_flow_cnt"), "0", 0o644)?;
        put(root.queue("eth1", "rx-1", "rps_cpus"), "00000000,00000000", 0o644)?;
        put(root.queue("eth1", "tx-0", "xps_cpus"), "1", 0o644)?;
        put(root.queue("eth1", "tx-0", "tx_maxrate"), "0", 0o644)?;
        Ok(root)
    }

    fn setting(key: &str, value: &str) -> Setting {
        Setting { key: key.into(), value: value.into() }
    }

    #[test]
    fn sysctls_that_differ_from_their_default_and_queues_that_are_set() -> Result<(), std::io::Error> {
        let root = tree("read")?;
        assert_eq!(
            read_sysctls(&root, "eth1"),
            vec![
                setting("ipv4/conf/arp_ignore", "1"),
                setting("ipv4/conf/rp_filter", "2"),
                setting("ipv4/neigh/retrans_time_ms", "500"),
                setting("ipv6/conf/accept_ra", "0"),
            ]
        );
        assert_eq!(
            read_queues(&root, "eth1"),
            vec![setting("rx-0/rps_cpus", "3"), setting("tx-0/xps_cpus", "1")]
        );
        assert!(read_sysctls(&root, "eth9").is_empty(), "an interface that is not there has none");
        assert!(read_sysctls(&root, "..").is_empty() && read_queues(&root, "../eth1").is_empty());
        assert!(read_sysctls(&root, "default").is_empty() && !safe_name("all"), "not an interface's");
        fs::remove_dir_all(&root.0)
    }

    #[test]
    fn differences_name_each_object() {
        let want = Tuning {
            read: true,
            link: LinkTuning {
                txqueuelen: Some(5000),
                alias: Some("uplink".into()),
                ..LinkTuning::default()
            },
            sysctls: vec![setting("ipv4/conf/rp_filter", "2"), setting("ipv6/conf/accept_ra", "0")],
            queues: vec![setting("rx-0/rps_cpus", "3")],
        };
        assert!(want.differences(&want.clone()).is_empty());
        let have = Tuning {
            read: true,
            link: LinkTuning { txqueuelen: Some(1000), ..LinkTuning::default() },
            sysctls: vec![setting("ipv6/conf/accept_ra", "0"), setting("ipv6/conf/use_tempaddr", "2")],
            queues: Vec::new(),
        };
        assert_eq!(
            want.differences(&have),
            vec![
                "link txqueuelen: want 5000, have 1000",
                "link alias: want uplink, have none",
                "sysctl ipv4/conf/rp_filter: want 2, have default",
                "sysctl ipv6/conf/use_tempaddr: want default, have 2",
                "queue rx-0/rps_cpus: want 3, have empty",
            ]
        );
        let unread = Tuning { read: false, ..want };
        assert!(unread.differences(&have).is_empty(), "a snapshot of release 0.1.0 read no tuning");
    }

    #[test]
    fn kept_keys_map_back_to_their_files_only() {
        assert_eq!(sysctl_parts("ipv4/conf/rp_filter"), Some(("ipv4/conf", "rp_filter")));
        assert_eq!(sysctl_parts("ipv6/neigh/retrans_time_ms"), Some(("ipv6/neigh", "retrans_time_ms")));
        assert_eq!(sysctl_parts("ipv4/route/flush"), None);
        assert_eq!(sysctl_parts("ipv4/conf/../../kernel/x"), None, "a state file names no other file");
        assert_eq!(sysctl_parts("ipv4/conf/"), None);
        assert_eq!(queue_parts("rx-0/rps_cpus"), Some(("rx-0", "rps_cpus")));
        assert_eq!(queue_parts("tx-12/tx_maxrate"), Some(("tx-12", "tx_maxrate")));
        assert_eq!(queue_parts("rx-0/xps_cpus"), None, "xps is a transmit queue's");
        assert_eq!(queue_parts("rx-../rps_cpus"), None);
        assert_eq!(queue_parts("rx-0/../../x"), None);
        assert!(empty_queue_value("00000000,00000000") && empty_queue_value("0") && !empty_queue_value("3"));
    }
}
