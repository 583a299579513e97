//! Where a NIC removal or registration gets its cause.
//!
//! In full mode the kernel classifies: the eBPF programs read the task's context at the moment a
//! NIC is unregistered or registered (`hotplug-ebpf/src/context.rs`, `netdev.rs`), and
//! [`NicEvent::from_kernel`] turns the record into a [`NicEvent`] with `source: kernel`. In degraded
//! mode `kernel::heuristic` infers a best-effort cause from rtnetlink, sysfs and module state,
//! marked `source: heuristic`. This module only defines what an event is: it depends on nothing
//! of the agent's but `identity`.
use hotplug_common::{Cause as RawCause, EventKind, NetdevEvent};
use serde::{Deserialize, Serialize};

pub use crate::identity::{format_mac, nic_key};

/// The task that was running when the hook fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The task's real uid (initial user namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its parent's pid, where the kernel's BTF let the programs read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
}

impl Task {
    /// The task a kernel record names.
    pub fn from_kernel(task: &hotplug_common::TaskInfo) -> Self {
        Self {
            pid: task.pid,
            tid: task.tid,
            comm: c_string(&task.comm),
            uid: Some(task.uid),
            ppid: (task.ppid != 0).then_some(task.ppid),
        }
    }
}

/// A NUL-padded C string from a fixed-size buffer, lossily as UTF-8.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    sanitize(&String::from_utf8_lossy(&bytes[..end]))
}

/// `text` with control characters written as `\xNN` (`\u{NNNN}` beyond ASCII): a task's `comm`
/// (any user sets its own with `prctl(PR_SET_NAME)`) and module names reach log lines, the
/// journal and terminals, where a newline would forge a log entry and an escape sequence would
/// drive the operator's terminal.
pub fn sanitize(text: &str) -> String {
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_control() && c.is_ascii() => clean.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if c.is_control() || is_invisible_format(c) => {
                clean.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
            }
            c => clean.push(c),
        }
    }
    clean
}

/// Characters that change how a line reads without being seen: bidirectional overrides and
/// isolates (a `comm` that renders backwards), zero-width characters, the byte order mark.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{061c}')
}

/// Why a NIC went away or appeared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    DriverUnload,
    DriverUnbind,
    DeviceRemoved,
    LinkDeleted,
    NetnsMove,
    DriverLoad,
    DriverBind,
    DeviceAdded,
    LinkCreated,
    Unknown,
}

impl Cause {
    pub const fn from_raw(raw: RawCause) -> Self {
        match raw {
            RawCause::Unknown => Self::Unknown,
            RawCause::DriverUnload => Self::DriverUnload,
            RawCause::DriverUnbind => Self::DriverUnbind,
            RawCause::DeviceRemoved => Self::DeviceRemoved,
            RawCause::LinkDeleted => Self::LinkDeleted,
            RawCause::NetnsMove => Self::NetnsMove,
            RawCause::DriverLoad => Self::DriverLoad,
            RawCause::DriverBind => Self::DriverBind,
            RawCause::DeviceAdded => Self::DeviceAdded,
            RawCause::LinkCreated => Self::LinkCreated,
        }
    }

    /// The kebab-case name used in JSON and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::DriverUnload => "driver-unload",
            Self::DriverUnbind => "driver-unbind",
            Self::DeviceRemoved => "device-removed",
            Self::LinkDeleted => "link-deleted",
            Self::NetnsMove => "netns-move",
            Self::DriverLoad => "driver-load",
            Self::DriverBind => "driver-bind",
            Self::DeviceAdded => "device-added",
            Self::LinkCreated => "link-created",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the NIC is expected back (its driver went away, the device did not).
    pub const fn expects_return(self) -> bool {
        matches!(self, Self::DriverUnload | Self::DriverUnbind)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Removal,
    Registration,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Removal => "removal",
            Self::Registration => "registration",
        }
    }
}

/// Who decided the cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The eBPF programs, from kernel context at the moment of the change.
    Kernel,
    /// Degraded mode's inference from rtnetlink, sysfs and module state after the fact.
    Heuristic,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Heuristic => "heuristic",
        }
    }
}

/// A NIC removal or registration with its cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicEvent {
    pub action: Action,
    pub cause: Cause,
    pub source: Source,
    pub ifindex: i32,
    pub name: String,
    /// The permanent (burned-in) MAC when the device has one, else the current one.
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permanent_mac: Option<String>,
    /// PCI address of the NIC (or of the PCI device below a virtio NIC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The module that owns the driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The module being unloaded or loaded when the cause is driver-unload or driver-load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// CLOCK_MONOTONIC nanoseconds of the kernel event (for heuristic events: when it was seen).
    pub timestamp_ns: u64,
    /// Inode number of the NIC's network namespace, when the kernel reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl NicEvent {
    /// See [`nic_key`]. A device without bus and module whose "driver" is a link kind is virtual.
    pub fn key(&self) -> String {
        let is_virtual = self.bus.is_none() && self.module.is_none() && self.driver.is_some();
        nic_key(self.permanent_mac.as_deref(), &self.mac, &self.name, is_virtual)
    }

    /// The classified event for a kernel record.
    pub fn from_kernel(record: &NetdevEvent) -> Self {
        let action = if record.kind == EventKind::NetdevRemoval as u32 {
            Action::Removal
        } else {
            Action::Registration
        };
        let len = usize::try_from(record.addr_len).unwrap_or(0).min(record.perm_addr.len());
        let current = format_mac(&record.dev_addr, len);
        let permanent = (len > 0 && record.perm_addr[..len].iter().any(|&b| b != 0))
            .then(|| format_mac(&record.perm_addr, len));
        Self {
            action,
            cause: Cause::from_raw(RawCause::from_u32(record.cause)),
            source: Source::Kernel,
            ifindex: record.ifindex,
            name: c_string(&record.name),
            mac: permanent.clone().unwrap_or(current),
            permanent_mac: permanent,
            bus: non_empty(c_string(&record.bus_addr)),
            driver: non_empty(c_string(&record.driver)),
            module: non_empty(c_string(&record.module)),
            context_module: non_empty(c_string(&record.context_module)),
            task: Some(Task::from_kernel(&record.task)),
            timestamp_ns: record.timestamp_ns,
            netns: (record.netns != 0).then_some(record.netns),
        }
    }
}

#[cfg(test)]
mod tests {
    use hotplug_common::TaskInfo;

    use super::*;

    #[test]
    fn kernel_records_become_nic_events() {
        let mut record = NetdevEvent::zeroed();
        record.kind = EventKind::NetdevRemoval as u32;
        record.cause = RawCause::DriverUnload as u32;
        record.ifindex = 2;
        record.addr_len = 6;
        record.name[..4].copy_from_slice(b"eth0");
        record.dev_addr[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x10]);
        record.bus_addr[..12].copy_from_slice(b"0000:01:00.0");
        record.driver[..10].copy_from_slice(b"virtio_net");
        record.context_module[..10].copy_from_slice(b"virtio_net");
        record.task = TaskInfo { pid: 9, tid: 9, comm: *b"modprobe\0\0\0\0\0\0\0\0", uid: 0, ppid: 1 };
        let event = NicEvent::from_kernel(&record);
        assert_eq!(event.action, Action::Removal);
        assert_eq!(event.cause, Cause::DriverUnload);
        assert_eq!(event.mac, "52:54:00:12:34:10");
        assert_eq!(event.permanent_mac, None, "an all-zero perm_addr is no permanent MAC");
        assert_eq!(event.bus.as_deref(), Some("0000:01:00.0"));
        assert_eq!(event.module, None);
        assert!(event.cause.expects_return());

        record.perm_addr[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        record.kind = EventKind::NetdevRegistration as u32;
        record.cause = RawCause::DeviceAdded as u32;
        let event = NicEvent::from_kernel(&record);
        assert_eq!(event.action, Action::Registration);
        assert_eq!(event.mac, "02:00:00:00:00:01", "the permanent MAC identifies the NIC");
        assert_eq!(event.cause.as_str(), "device-added");
        assert_eq!(event.key(), "02:00:00:00:00:01");
    }

    #[test]
    fn virtual_links_never_share_a_physical_nics_key() {
        assert_eq!(
            nic_key(Some("52:54:00:12:34:11"), "52:54:00:12:34:11", "eth1", false),
            "52:54:00:12:34:11"
        );
        assert_eq!(nic_key(None, "52:54:00:12:34:11", "eth1", false), "52:54:00:12:34:11");
        assert_eq!(nic_key(None, "52:54:00:12:34:11", "eth1.100", true), "52:54:00:12:34:11@eth1.100");
    }
}
