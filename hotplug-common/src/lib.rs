//! Types shared between hotplug's eBPF programs (`hotplug-ebpf`) and its agent (`hotplug-user`).
//!
//! Every record the programs put on the ring buffer is a fixed-size `#[repr(C)]` struct that starts
//! with a `u32` [`EventKind`], so user space can tell records apart before it copies one out.
//! This crate is `no_std` so that the eBPF side can use it; the `user` feature adds `aya::Pod`.
#![no_std]

/// `TASK_COMM_LEN` in `include/linux/sched.h` (16 on every kernel since 2.6).
pub const TASK_COMM_LEN: usize = 16;

/// `MODULE_NAME_LEN` in `include/linux/module.h`: `64 - sizeof(unsigned long)`, 56 on 64-bit.
pub const MODULE_NAME_LEN: usize = 56;

/// Size of the ring buffer the programs write to, in bytes (a power of two, multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// What a record on the ring buffer reports. The discriminant is the record's first `u32`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A task entered the `delete_module` syscall (the start of `modprobe -r` / `rmmod`).
    ModuleUnloadBegin = 1,
    /// That task left `delete_module`; [`ModuleEvent::ret`] holds the syscall's return value.
    ModuleUnloadEnd = 2,
    /// `module:module_load`: a module was loaded, before its init function ran.
    ModuleLoad = 3,
    /// `module:module_free`: a module's memory is being freed (after its exit function ran).
    ModuleFree = 4,
    /// A net device is being unregistered (or moved out of its namespace): a [`NetdevEvent`].
    NetdevRemoval = 5,
    /// A net device was registered (or moved into a namespace): a [`NetdevEvent`].
    NetdevRegistration = 6,
}

impl EventKind {
    /// The kind for a record's leading `u32`, or `None` for an unknown value.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::ModuleUnloadBegin),
            2 => Some(Self::ModuleUnloadEnd),
            3 => Some(Self::ModuleLoad),
            4 => Some(Self::ModuleFree),
            5 => Some(Self::NetdevRemoval),
            6 => Some(Self::NetdevRegistration),
            _ => None,
        }
    }
}

/// The task that was current when the hook fired.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// Thread-group id (what user space calls the pid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
    /// The task's real uid as the initial user namespace sees it (`bpf_get_current_uid_gid`).
    pub uid: u32,
    /// `task->real_parent->tgid`: the parent's pid; 0 when the kernel's BTF did not give the
    /// offsets (`PARENT_KNOWN` 0) or the read failed.
    pub ppid: u32,
}

/// A module lifecycle record: unload begin and end, load, free.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleEvent {
    /// Always one of the module [`EventKind`]s, as `u32`.
    pub kind: u32,
    /// For [`EventKind::ModuleUnloadEnd`]: the syscall's return value (0 or `-errno`); else 0.
    pub ret: i32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in nanoseconds when the hook fired.
    pub timestamp_ns: u64,
    pub task: TaskInfo,
    /// The module's name, NUL-padded.
    pub name: [u8; MODULE_NAME_LEN],
}

impl ModuleEvent {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            ret: 0,
            timestamp_ns: 0,
            task: TaskInfo { pid: 0, tid: 0, comm: [0; TASK_COMM_LEN], uid: 0, ppid: 0 },
            name: [0; MODULE_NAME_LEN],
        }
    }
}

/// `IFNAMSIZ` in `include/uapi/linux/if.h`.
pub const IFNAMSIZ: usize = 16;

/// `MAX_ADDR_LEN` in `include/linux/netdevice.h`: room for any link-layer address.
pub const MAX_ADDR_LEN: usize = 32;

/// Room for a bus address (`0000:00:1f.6`) or a driver name.
pub const SHORT_NAME_LEN: usize = 32;

/// Why a NIC went away or appeared, as the kernel context at that moment tells it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No known context: neither a module load/unload, a sysfs (un)bind, a PCI hot-plug event,
    /// an rtnetlink link request, nor a namespace move.
    Unknown = 0,
    /// Removal inside `delete_module` (`modprobe -r`, `rmmod`): the driver will likely come back.
    DriverUnload = 1,
    /// Removal inside a sysfs `unbind` write.
    DriverUnbind = 2,
    /// Removal inside a PCI device removal (ACPI or native hot-unplug, sysfs `remove`).
    DeviceRemoved = 3,
    /// Removal inside an rtnetlink `RTM_DELLINK` request (`ip link del`).
    LinkDeleted = 4,
    /// The device moved to another network namespace (removal here, registration there).
    NetnsMove = 5,
    /// Registration inside `init_module`/`finit_module` (`modprobe`, `insmod`).
    DriverLoad = 6,
    /// Registration inside a sysfs `bind` write.
    DriverBind = 7,
    /// Registration inside a PCI bus scan adding devices (hot-plug, rescan).
    DeviceAdded = 8,
    /// Registration inside an rtnetlink `RTM_NEWLINK` request (`ip link add`).
    LinkCreated = 9,
}

impl Cause {
    pub const fn from_u32(value: u32) -> Self {
        match value {
            1 => Self::DriverUnload,
            2 => Self::DriverUnbind,
            3 => Self::DeviceRemoved,
            4 => Self::LinkDeleted,
            5 => Self::NetnsMove,
            6 => Self::DriverLoad,
            7 => Self::DriverBind,
            8 => Self::DeviceAdded,
            9 => Self::LinkCreated,
            _ => Self::Unknown,
        }
    }
}

/// A NIC removal or registration with what the kernel knew about the NIC at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetdevEvent {
    /// [`EventKind::NetdevRemoval`] or [`EventKind::NetdevRegistration`], as `u32`.
    pub kind: u32,
    /// A [`Cause`], as `u32`.
    pub cause: u32,
    /// `bpf_ktime_get_ns()` when the hook fired.
    pub timestamp_ns: u64,
    pub task: TaskInfo,
    pub ifindex: i32,
    /// `dev->addr_len`: how many bytes of the addresses below are meaningful.
    pub addr_len: u32,
    pub name: [u8; IFNAMSIZ],
    /// `dev->perm_addr`: the burned-in address (all zero for most virtual devices).
    pub perm_addr: [u8; MAX_ADDR_LEN],
    /// `dev->dev_addr`: the current address.
    pub dev_addr: [u8; MAX_ADDR_LEN],
    /// Name of the nearest PCI ancestor device (its BDF), empty when there is none.
    pub bus_addr: [u8; SHORT_NAME_LEN],
    /// The parent device's driver name, or the rtnetlink link kind (`veth`) for virtual devices.
    pub driver: [u8; SHORT_NAME_LEN],
    /// The module that owns that driver, empty when built in.
    pub module: [u8; MODULE_NAME_LEN],
    /// The module being unloaded or loaded by this task, when the cause is one of those.
    pub context_module: [u8; MODULE_NAME_LEN],
    /// Inode number of the device's network namespace (0: unknown); ifindexes and names are only
    /// unique within one namespace. For a namespace move's removal: the namespace it left.
    pub netns: u32,
    pub _reserved: u32,
}

impl NetdevEvent {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            cause: 0,
            timestamp_ns: 0,
            task: TaskInfo { pid: 0, tid: 0, comm: [0; TASK_COMM_LEN], uid: 0, ppid: 0 },
            ifindex: 0,
            addr_len: 0,
            name: [0; IFNAMSIZ],
            perm_addr: [0; MAX_ADDR_LEN],
            dev_addr: [0; MAX_ADDR_LEN],
            bus_addr: [0; SHORT_NAME_LEN],
            driver: [0; SHORT_NAME_LEN],
            module: [0; MODULE_NAME_LEN],
            context_module: [0; MODULE_NAME_LEN],
            netns: 0,
            _reserved: 0,
        }
    }
}

/// The kernel contexts a task can be inside, indexes into [`TaskContext::depth`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    ModuleUnload = 0,
    ModuleLoad = 1,
    Unbind = 2,
    Bind = 3,
    PciRemove = 4,
    PciAdd = 5,
    LinkDelete = 6,
    LinkCreate = 7,
}

pub const CONTEXT_KINDS: usize = 8;

/// What a task is in the middle of, kept per thread id while it is inside one of the hooked
/// functions or syscalls. Depths count nesting (entry adds one, exit takes one away).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskContext {
    pub depth: [u8; CONTEXT_KINDS],
    /// The module being unloaded (`delete_module`) or loaded (`module:module_load`).
    pub module: [u8; MODULE_NAME_LEN],
    /// The `struct task_struct *` that made the entry: a thread id is reused once its thread has
    /// exited, and an entry whose exit probe was missed must not pass to the new thread.
    pub task: u64,
}

impl TaskContext {
    pub const fn zeroed() -> Self {
        Self { depth: [0; CONTEXT_KINDS], module: [0; MODULE_NAME_LEN], task: 0 }
    }

    pub const fn is_idle(&self) -> bool {
        let mut i = 0;
        while i < CONTEXT_KINDS {
            if self.depth[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    pub const fn inside(&self, kind: ContextKind) -> bool {
        self.depth[kind as usize] > 0
    }

    /// The cause of a removal seen in this context. A PCI removal wins over an unbind (it
    /// unbinds too); a module unload over everything (its exit function does the rest).
    pub const fn removal_cause(&self) -> Cause {
        if self.inside(ContextKind::ModuleUnload) {
            Cause::DriverUnload
        } else if self.inside(ContextKind::PciRemove) {
            Cause::DeviceRemoved
        } else if self.inside(ContextKind::Unbind) {
            Cause::DriverUnbind
        } else if self.inside(ContextKind::LinkDelete) {
            Cause::LinkDeleted
        } else {
            Cause::Unknown
        }
    }

    /// The cause of a registration seen in this context.
    pub const fn registration_cause(&self) -> Cause {
        if self.inside(ContextKind::ModuleLoad) {
            Cause::DriverLoad
        } else if self.inside(ContextKind::PciAdd) {
            Cause::DeviceAdded
        } else if self.inside(ContextKind::Bind) {
            Cause::DriverBind
        } else if self.inside(ContextKind::LinkCreate) {
            Cause::LinkCreated
        } else {
            Cause::Unknown
        }
    }
}

/// Indexes into the per-CPU `COUNTERS` array the programs keep.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A ring buffer reservation failed: an event was lost and user space must resynchronise.
    RingReserveFailed = 0,
    /// A kernel read (`bpf_probe_read_*`) failed; the event went out with an empty field.
    KernelReadFailed = 1,
    /// The per-task context map was full: a cause may read `unknown`.
    ContextMapFull = 2,
    /// An unregister batch held more devices than one program run walks.
    BatchTruncated = 3,
    /// A `delete_module` or `init_module` call by a task without `CAP_SYS_MODULE` in the initial
    /// user namespace: the kernel refuses it, and the programs report nothing (not a loss).
    UnprivilegedFiltered = 4,
    /// A NIC event in a network namespace other than the agent's: not reported (not a loss).
    ForeignNetnsFiltered = 5,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 6] = [
        Self::RingReserveFailed,
        Self::KernelReadFailed,
        Self::ContextMapFull,
        Self::BatchTruncated,
        Self::UnprivilegedFiltered,
        Self::ForeignNetnsFiltered,
    ];

    /// Whether a rise means that events were lost or went out incomplete (the agent then
    /// resynchronises); the others count what the programs filtered on purpose.
    pub const fn is_loss(self) -> bool {
        !matches!(self, Self::UnprivilegedFiltered | Self::ForeignNetnsFiltered)
    }

    /// The counter's name in logs and `bpf-stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RingReserveFailed => "ring-reserve-failed",
            Self::KernelReadFailed => "kernel-read-failed",
            Self::ContextMapFull => "context-map-full",
            Self::BatchTruncated => "batch-truncated",
            Self::UnprivilegedFiltered => "unprivileged-filtered",
            Self::ForeignNetnsFiltered => "foreign-netns-filtered",
        }
    }
}

/// Number of entries in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

/// How many devices of one `unregister_netdevice_many` batch the program reports.
pub const MAX_UNREGISTER_BATCH: u32 = 16;

/// Names of the globals user space sets before loading (`EbpfLoader::override_global`): byte
/// offsets of tracepoint fields (from the running kernel's tracefs `format` files) and of struct
/// members (from its BTF), so that no layout is compiled in for one kernel.
pub mod globals {
    /// `module:module_load`: offset of the `__data_loc char[] name` descriptor.
    pub const MODULE_LOAD_NAME: &str = "MODULE_LOAD_NAME_OFFSET";
    /// `module:module_free`: offset of the `__data_loc char[] name` descriptor.
    pub const MODULE_FREE_NAME: &str = "MODULE_FREE_NAME_OFFSET";

    /// Offsets of the kernel struct members the NIC programs read, from the running kernel's
    /// BTF: (global name, struct, member path).
    pub const STRUCT_OFFSETS: [(&str, &str, &str); 16] = [
        ("NETDEV_IFINDEX", "net_device", "ifindex"),
        ("NETDEV_NAME", "net_device", "name"),
        ("NETDEV_PERM_ADDR", "net_device", "perm_addr"),
        ("NETDEV_ADDR_LEN", "net_device", "addr_len"),
        ("NETDEV_DEV_ADDR", "net_device", "dev_addr"),
        ("NETDEV_UNREG_LIST", "net_device", "unreg_list"),
        ("NETDEV_RTNL_LINK_OPS", "net_device", "rtnl_link_ops"),
        ("NETDEV_PARENT", "net_device", "dev.parent"),
        ("RTNL_LINK_OPS_KIND", "rtnl_link_ops", "kind"),
        ("DEVICE_PARENT", "device", "parent"),
        ("DEVICE_DRIVER", "device", "driver"),
        ("DEVICE_BUS", "device", "bus"),
        ("BUS_TYPE_NAME", "bus_type", "name"),
        ("DEVICE_NAME", "device", "kobj.name"),
        ("DRIVER_NAME", "device_driver", "name"),
        ("DRIVER_OWNER", "device_driver", "owner"),
    ];
    /// Byte offsets into `struct pt_regs` of a probed function's first argument and return value,
    /// and of a system call's first argument in the registers its wrapper receives: from the
    /// architecture's calling convention and the running kernel's BTF.
    pub const REGS_ARG0: &str = "REGS_ARG0";
    pub const REGS_RET: &str = "REGS_RET";
    pub const SYSCALL_ARG0: &str = "SYSCALL_ARG0";
    /// `module.name` offset (a `char[56]`).
    pub const MODULE_STRUCT_NAME: &str = "MODULE_NAME";
    /// 1 when `net_device.dev_addr` is a pointer (Linux 5.17+), 0 when it is an array.
    pub const NETDEV_DEV_ADDR_IS_POINTER: &str = "NETDEV_DEV_ADDR_IS_POINTER";
    /// Optional offsets (a kernel without them still gets every other field): the device's
    /// namespace, `net_device.nd_net.net` then `net.ns.inum`; `NETNS_KNOWN` is 1 when both are set.
    pub const NETNS_OFFSETS: [(&str, &str, &str); 2] =
        [("NETDEV_NET", "net_device", "nd_net.net"), ("NET_NS_INUM", "net", "ns.inum")];
    pub const NETNS_KNOWN: &str = "NETNS_KNOWN";
    /// The inode of the agent's own network namespace: NIC events from any other are dropped in
    /// the kernel (0: no filter).
    pub const AGENT_NETNS: &str = "AGENT_NETNS";
    /// Optional offsets for the privilege filter on `delete_module` and `init_module`:
    /// `task_struct.cred`, then `cred.cap_effective` and `cred.user_ns`, then
    /// `user_namespace.level`. `PRIV_KNOWN` is 1 when all are set.
    pub const PRIV_OFFSETS: [(&str, &str, &str); 4] = [
        ("TASK_CRED", "task_struct", "cred"),
        ("CRED_CAP_EFFECTIVE", "cred", "cap_effective"),
        ("CRED_USER_NS", "cred", "user_ns"),
        ("USER_NS_LEVEL", "user_namespace", "level"),
    ];
    pub const PRIV_KNOWN: &str = "PRIV_KNOWN";
    /// Optional offsets for the acting task's parent (the audit trail): `task_struct.real_parent`
    /// and `task_struct.tgid`. `PARENT_KNOWN` is 1 when both are set.
    pub const PARENT_OFFSETS: [(&str, &str, &str); 2] =
        [("TASK_REAL_PARENT", "task_struct", "real_parent"), ("TASK_TGID", "task_struct", "tgid")];
    pub const PARENT_KNOWN: &str = "PARENT_KNOWN";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data `#[repr(C)]` structs of integers and byte arrays, no padding holes
    // that could expose uninitialised memory (every field is written or zeroed by the producer),
    // valid for any bit pattern.
    unsafe impl aya::Pod for super::ModuleEvent {}
    unsafe impl aya::Pod for super::TaskInfo {}
    unsafe impl aya::Pod for super::NetdevEvent {}
    unsafe impl aya::Pod for super::TaskContext {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_event_layout_is_fixed() {
        // 4 + 4 + 8 + (4 + 4 + 16 + 4 + 4) + 56: no implicit padding, same on both sides.
        assert_eq!(core::mem::size_of::<ModuleEvent>(), 104);
        assert_eq!(core::mem::align_of::<ModuleEvent>(), 8);
    }

    #[test]
    fn netdev_event_layout_is_fixed() {
        assert_eq!(core::mem::size_of::<NetdevEvent>(), 320);
        assert_eq!(core::mem::size_of::<TaskContext>(), 72);
    }

    #[test]
    fn causes_follow_the_innermost_meaningful_context() {
        let mut ctx = TaskContext::zeroed();
        assert!(ctx.is_idle());
        assert_eq!(ctx.removal_cause(), Cause::Unknown);
        ctx.depth[ContextKind::Unbind as usize] = 1;
        assert_eq!(ctx.removal_cause(), Cause::DriverUnbind);
        ctx.depth[ContextKind::PciRemove as usize] = 1;
        assert_eq!(ctx.removal_cause(), Cause::DeviceRemoved);
        ctx.depth[ContextKind::ModuleUnload as usize] = 1;
        assert_eq!(ctx.removal_cause(), Cause::DriverUnload);
        assert_eq!(ctx.registration_cause(), Cause::Unknown);
        ctx.depth[ContextKind::LinkCreate as usize] = 2;
        assert_eq!(ctx.registration_cause(), Cause::LinkCreated);
        ctx.depth[ContextKind::ModuleLoad as usize] = 1;
        assert_eq!(ctx.registration_cause(), Cause::DriverLoad);
        assert!(!ctx.is_idle());
        for value in 0..12 {
            let cause = Cause::from_u32(value);
            assert!(value > 9 || cause as u32 == value);
        }
    }

    #[test]
    fn event_kind_round_trips() {
        for kind in [
            EventKind::ModuleUnloadBegin,
            EventKind::ModuleUnloadEnd,
            EventKind::ModuleLoad,
            EventKind::ModuleFree,
            EventKind::NetdevRemoval,
            EventKind::NetdevRegistration,
        ] {
            assert_eq!(EventKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(99), None);
    }
}
