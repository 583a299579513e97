//! ifupdown (Debian's `/etc/network/interfaces`). A NIC named on an `allow-hotplug` line is
//! ifupdown's on hotplug: its udev rule starts `ifup@NAME.service` when the NIC registers (`ifup`,
//! the stanza's address and `up` commands) and stops it when the NIC leaves (`ifdown`, which
//! flushes the NIC). After a driver reload the stop can run late, after the NIC is back: a restore
//! made before ifupdown is done is flushed by `ifdown`, and one made while `ifup` runs makes its
//! `ip addr add` fail. So the restore waits until `ifup` has run for the returning NIC, then adds
//! what the stanza does not make.
//!
//! What the agent reads: the interfaces file and what it sources (`allow-hotplug` lines), the
//! per-interface state file (`/run/network/ifstate.NAME`: the name while ifupdown counts the
//! interface up, written when `ifup` begins, before it adds the stanza's address; emptied by
//! `ifdown`), the pid files ifupdown keeps while it runs `up`/`down` commands
//! (`/run/network/ifup-NAME.pid`, `ifdown-NAME.pid`), and the `ifup`/`ifdown` processes in the
//! unit's cgroup (a stanza's DHCP client stays there for the lease's life: it does not count).
//! No D-Bus.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::Host;

/// The interfaces file.
const INTERFACES: &str = "/etc/network/interfaces";
/// ifupdown's udev rule (it starts and stops `ifup@NAME.service`), /usr-merged or not.
const UDEV_RULES: [&str; 2] =
    ["/usr/lib/udev/rules.d/80-ifupdown.rules", "/lib/udev/rules.d/80-ifupdown.rules"];
/// How deep `source` lines are followed (a file sourcing itself stops here).
const MAX_DEPTH: usize = 4;

impl Host {
    /// The interfaces ifupdown brings up on hotplug (`allow-hotplug` lines), if Debian's ifupdown
    /// is installed with its udev rule (ifupdown2, ifupdown-ng and busybox's ifup keep other
    /// state: their NICs are not waited for).
    pub fn ifupdown_hotplug(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let rule = UDEV_RULES.iter().any(|r| self.exists(r));
        if rule && (self.exists("/usr/sbin/ifup") || self.exists("/sbin/ifup")) {
            self.read_interfaces(&self.path(INTERFACES), 0, &mut names);
        }
        names
    }

    fn read_interfaces(&self, file: &Path, depth: usize, names: &mut BTreeSet<String>) {
        let Ok(text) = std::fs::read_to_string(file) else { return };
        for line in logical_lines(&text) {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("allow-hotplug") => names.extend(words.map(str::to_owned)),
                Some("source") if depth < MAX_DEPTH => {
                    for pattern in words {
                        for found in self.expand(pattern, file) {
                            self.read_interfaces(&found, depth + 1, names);
                        }
                    }
                }
                Some("source-directory") if depth < MAX_DEPTH => {
                    for dir in words {
                        // interfaces(5): the files whose names are made of letters, digits,
                        // underscores and hyphens only, in lexical order.
                        let dir = self.under_root(dir, file);
                        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                        let mut files: Vec<PathBuf> = entries
                            .filter_map(Result::ok)
                            .filter(|e| {
                                e.file_name().to_str().is_some_and(|n| {
                                    n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                                })
                            })
                            .map(|e| e.path())
                            .collect();
                        files.sort();
                        for found in files {
                            self.read_interfaces(&found, depth + 1, names);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A path of the interfaces file (relative ones are relative to the file's directory) under
    /// this host's root.
    fn under_root(&self, path: &str, from: &Path) -> PathBuf {
        if path.starts_with('/') {
            self.path(path)
        } else {
            from.parent().unwrap_or(Path::new("/")).join(path)
        }
    }

    /// A `source` pattern's files: a `*` or `?` in its last component is a glob (the form Debian
    /// writes, `/etc/network/interfaces.d/*`), matched in lexical order.
    fn expand(&self, pattern: &str, from: &Path) -> Vec<PathBuf> {
        let path = self.under_root(pattern, from);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if !name.contains(['*', '?']) {
            return vec![path];
        }
        let Some(dir) = path.parent() else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(|n| glob_match(&name, n)))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// When `ifup` last configured `name` (the mtime of its state file, which holds the name
    /// while the interface is up), if it is up by ifupdown's account.
    pub fn ifupdown_up_since(&self, name: &str) -> Option<SystemTime> {
        let path = self.path(&format!("/run/network/ifstate.{name}"));
        let text = std::fs::read_to_string(&path).ok()?;
        if text.trim().is_empty() {
            return None;
        }
        std::fs::metadata(&path).and_then(|m| m.modified()).ok()
    }

    /// Whether `ifup` or `ifdown` runs for `name`: its pid file, or its process in the unit's
    /// cgroup (cgroup v2, or v1's systemd hierarchy).
    pub fn ifupdown_running(&self, name: &str) -> bool {
        if ["ifup", "ifdown"].iter().any(|tool| self.exists(&format!("/run/network/{tool}-{name}.pid"))) {
            return true;
        }
        let unit = format!("ifup@{}.service", systemd_escape(name));
        // Debian's ifup@.service says Slice=system.slice; a template's own slice otherwise.
        let cgroups = ["/sys/fs/cgroup", "/sys/fs/cgroup/systemd"].iter().flat_map(|root| {
            [format!("{root}/system.slice/{unit}"), format!("{root}/system.slice/system-ifup.slice/{unit}")]
        });
        cgroups.into_iter().any(|cgroup| {
            let procs = self.path(&format!("{cgroup}/cgroup.procs"));
            std::fs::read_to_string(procs).is_ok_and(|pids| {
                pids.split_whitespace().any(|pid| {
                    let comm =
                        std::fs::read_to_string(self.path(&format!("/proc/{pid}/comm"))).unwrap_or_default();
                    matches!(comm.trim(), "ifup" | "ifdown")
                })
            })
        })
    }

    /// Whether ifupdown is done with `name` returning at `registered` (wall clock): `ifup` began
    /// for it since, and neither `ifup` nor `ifdown` runs for it now.
    pub fn ifupdown_done(&self, name: &str, registered: SystemTime) -> bool {
        self.ifupdown_up_since(name).is_some_and(|at| at >= registered) && !self.ifupdown_running(name)
    }
}

/// systemd's escaping of a unit instance name (`systemd-escape`): `-`, `/`, and anything but ASCII
/// letters, digits, `:`, `_` and `.` (not leading) become `\xNN`.
fn systemd_escape(name: &str) -> String {
    let mut out = String::new();
    for (i, byte) in name.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || byte == b':' || byte == b'_' || (byte == b'.' && i > 0);
        if plain {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// The lines of an interfaces file, comments dropped and `\`-continued lines joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        if current.is_empty() && raw.trim_start().starts_with('#') {
            continue;
        }
        // ifupdown joins a `\`-continued line to the next as it is.
        match raw.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(raw);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// A shell glob of `*` and `?` against a file name (hidden files never match, as in sh).
fn glob_match(pattern: &str, name: &str) -> bool {
    fn matches(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => matches(&p[1..], n) || (!n.is_empty() && matches(p, &n[1..])),
            (Some('?'), Some(_)) => matches(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &n[1..]),
            _ => false,
        }
    }
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::managers::tests::write;

    #[test]
    fn allow_hotplug_lines_through_sourced_files() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("hotplug-ifupdown-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let host = Host::at(&dir);
        write(&dir, INTERFACES, "allow-hotplug eth0\n")?;
        assert!(host.ifupdown_hotplug().is_empty(), "no ifup installed: nobody reads the file");
        write(&dir, "/usr/sbin/ifup", "")?;
        assert!(host.ifupdown_hotplug().is_empty(), "no udev rule: not Debian's ifupdown");
        write(&dir, UDEV_RULES[0], "")?;
        write(
            &dir,
            INTERFACES,
            "# allow-hotplug commented\nauto lo\niface lo inet loopback\nallow-hotplug \\\n  enp1s0 enp2s0\n\
             source /etc/network/interfaces.d/*\nsource-directory /etc/network/more.d\nsource /etc/network/interfaces\n",
        )?;
        write(&dir, "/etc/network/interfaces.d/ens5", "allow-hotplug ens5\niface ens5 inet dhcp\n")?;
        write(&dir, "/etc/network/interfaces.d/.hidden", "allow-hotplug hidden0\n")?;
        write(&dir, "/etc/network/more.d/ens6", "allow-hotplug ens6\n")?;
        write(&dir, "/etc/network/more.d/skip.cfg", "allow-hotplug ens7\n")?;
        let names: Vec<String> = host.ifupdown_hotplug().into_iter().collect();
        assert_eq!(
            names,
            ["enp1s0", "enp2s0", "ens5", "ens6"],
            "auto lo is not hotplug; a file sourcing itself stops"
        );
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn ifup_done_means_its_state_written_since_and_no_job_running() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("hotplug-ifstate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let host = Host::at(&dir);
        let before = SystemTime::now() - std::time::Duration::from_secs(5);
        assert!(!host.ifupdown_done("enp2s0", before), "never up");
        write(&dir, "/run/network/ifstate.enp2s0", "")?;
        assert!(!host.ifupdown_done("enp2s0", before), "ifdown emptied it");
        write(&dir, "/run/network/ifstate.enp2s0", "enp2s0\n")?;
        assert!(host.ifupdown_done("enp2s0", before));
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        assert!(!host.ifupdown_done("enp2s0", later), "written before the NIC came back: the old ifup");
        write(&dir, "/run/network/ifup-enp2s0.pid", "1234\n")?;
        assert!(!host.ifupdown_done("enp2s0", before), "ifup still runs the stanza's commands");
        std::fs::remove_file(dir.join("run/network/ifup-enp2s0.pid"))?;
        assert!(host.ifupdown_done("enp2s0", before));
        // ifup writes the state before it adds the address (no pid file yet): its process counts.
        let procs = "/sys/fs/cgroup/system.slice/ifup@enp2s0.service/cgroup.procs";
        write(&dir, procs, "40\n41\n")?;
        write(&dir, "/proc/40/comm", "dhclient\n")?;
        assert!(host.ifupdown_done("enp2s0", before), "a DHCP client staying in the unit is no job");
        write(&dir, "/proc/41/comm", "ifup\n")?;
        assert!(!host.ifupdown_done("enp2s0", before), "ifup itself still runs");
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn globs_as_sh_and_units_as_systemd() {
        assert_eq!(systemd_escape("enp2s0"), "enp2s0");
        assert_eq!(systemd_escape("eth0.100"), "eth0.100");
        assert_eq!(systemd_escape("br-lan"), "br\\x2dlan");
        assert!(glob_match("*", "ens5") && !glob_match("*", ".hidden") && glob_match("e?s*", "ens5"));
        assert!(!glob_match("*.cfg", "ens5"));
    }
}
