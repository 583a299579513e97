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
}

impl EventKind {
    /// The kind for a record's leading `u32`, or `None` for an unknown value.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::ModuleUnloadBegin),
            2 => Some(Self::ModuleUnloadEnd),
            3 => Some(Self::ModuleLoad),
            4 => Some(Self::ModuleFree),
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
            task: TaskInfo {
                pid: 0,
                tid: 0,
                comm: [0; TASK_COMM_LEN],
            },
            name: [0; MODULE_NAME_LEN],
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
}

/// Number of entries in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = 2;

/// Names of the globals user space sets before loading (`EbpfLoader::override_global`): byte
/// offsets of tracepoint fields, read from the running kernel's tracefs `format` files so that no
/// layout is compiled in for one kernel.
pub mod globals {
    /// `syscalls:sys_enter_delete_module`: offset of `name_user` (a `const char __user *`).
    pub const DELETE_MODULE_ENTER_NAME: &str = "DELETE_MODULE_ENTER_NAME_OFFSET";
    /// `syscalls:sys_exit_delete_module`: offset of `ret` (a `long`).
    pub const DELETE_MODULE_EXIT_RET: &str = "DELETE_MODULE_EXIT_RET_OFFSET";
    /// `module:module_load`: offset of the `__data_loc char[] name` descriptor.
    pub const MODULE_LOAD_NAME: &str = "MODULE_LOAD_NAME_OFFSET";
    /// `module:module_free`: offset of the `__data_loc char[] name` descriptor.
    pub const MODULE_FREE_NAME: &str = "MODULE_FREE_NAME_OFFSET";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data `#[repr(C)]` structs of integers and byte arrays, no padding holes
    // that could expose uninitialised memory (every field is written or zeroed by the producer),
    // valid for any bit pattern.
    unsafe impl aya::Pod for super::ModuleEvent {}
    unsafe impl aya::Pod for super::TaskInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_event_layout_is_fixed() {
        // 4 + 4 + 8 + (4 + 4 + 16) + 56: no implicit padding, same on both sides.
        assert_eq!(core::mem::size_of::<ModuleEvent>(), 96);
        assert_eq!(core::mem::align_of::<ModuleEvent>(), 8);
    }

    #[test]
    fn event_kind_round_trips() {
        for kind in [
            EventKind::ModuleUnloadBegin,
            EventKind::ModuleUnloadEnd,
            EventKind::ModuleLoad,
            EventKind::ModuleFree,
        ] {
            assert_eq!(EventKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(99), None);
    }
}
