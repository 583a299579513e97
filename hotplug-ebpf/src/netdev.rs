//! NIC unregistration, registration and namespace moves, each reported with its cause (read from
//! the task's context, see `context`) and what the kernel knows about the NIC at that moment.
//!
//! Kernel functions (attach points are chosen by user space from /proc/kallsyms):
//! - `unregister_netdevice_many_notify(struct list_head *head, ...)` (Linux 6.1+), else
//!   `unregister_netdevice_many(struct list_head *head)`: every unregistration goes through one of
//!   them with the devices linked through `dev->unreg_list`; the devices are still intact at entry.
//! - `register_netdevice(struct net_device *dev)`: the ifindex and final name are assigned inside,
//!   so the event is sent from the kretprobe when it returned 0.
//! - `netif_change_net_namespace` (7.x), `__dev_change_net_namespace` (5.x-6.x): a move to another
//!   namespace is neither, so it is reported as a removal and a registration with cause netns-move.
use aya_ebpf::{
    macros::{kprobe, kretprobe, map},
    maps::{LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use hotplug_common::{Cause, Counter, EventKind, NetdevEvent, MAX_UNREGISTER_BATCH, MODULE_NAME_LEN};

use crate::{
    context, count, current_task, current_tid, emit, global_u32,
    kernel::{probe_arg0, probe_ret, read, read_bytes, read_str},
    now_ns,
};

// Struct member offsets, overridden by user space from the running kernel's BTF (the defaults are
// never used: the loader refuses to attach these programs without the real values).
#[unsafe(no_mangle)]
static NETDEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_NAME: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_PERM_ADDR: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_ADDR_LEN: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_DEV_ADDR: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_DEV_ADDR_IS_POINTER: u32 = 1;
#[unsafe(no_mangle)]
static NETDEV_UNREG_LIST: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_RTNL_LINK_OPS: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static RTNL_LINK_OPS_KIND: u32 = 0;
#[unsafe(no_mangle)]
static DEVICE_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static DEVICE_DRIVER: u32 = 0;
#[unsafe(no_mangle)]
static DEVICE_BUS: u32 = 0;
#[unsafe(no_mangle)]
static BUS_TYPE_NAME: u32 = 0;
#[unsafe(no_mangle)]
static DEVICE_NAME: u32 = 0;
#[unsafe(no_mangle)]
static DRIVER_NAME: u32 = 0;
#[unsafe(no_mangle)]
static DRIVER_OWNER: u32 = 0;
#[unsafe(no_mangle)]
static MODULE_NAME: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_NET: u32 = 0;
#[unsafe(no_mangle)]
static NET_NS_INUM: u32 = 0;
#[unsafe(no_mangle)]
static NETNS_KNOWN: u32 = 0;
/// The agent's network namespace inode: NIC events of any other namespace are dropped here, so
/// that link churn in a container or an unprivileged user namespace costs no ring buffer space.
/// 0: no filter.
#[unsafe(no_mangle)]
static AGENT_NETNS: u32 = 0;

/// The `context_module` of events whose cause is not a module unload or load.
const NO_MODULE: [u8; MODULE_NAME_LEN] = [0; MODULE_NAME_LEN];

/// How far up the device tree to look for the PCI device (virtio NICs sit one level below it).
const MAX_PARENT_DEPTH: u32 = 4;

/// Scratch space for building one event (too large for the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<NetdevEvent> = PerCpuArray::with_max_entries(1, 0);

/// `register_netdevice` calls in flight: thread id → `struct net_device *`. LRU: an entry whose
/// kretprobe was missed ages out instead of filling the map (the next entry of the same thread
/// overwrites it anyway).
#[map]
static REGISTERING: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);

/// Namespace moves in flight: thread id → (`struct net_device *`, ifindex and namespace inode
/// before the move). LRU, as `REGISTERING`.
#[map]
static MOVING: LruHashMap<u32, (u64, i32, u32)> = LruHashMap::with_max_entries(1024, 0);

/// The inode number of `dev`'s network namespace (`dev_net(dev)->ns.inum`), 0 when unknown.
#[inline(always)]
fn netns_of(dev: u64) -> u32 {
    if global_u32(&NETNS_KNOWN) == 0 {
        return 0;
    }
    let net = read::<u64>(dev, global_u32(&NETDEV_NET)).unwrap_or(0);
    read::<u32>(net, global_u32(&NET_NS_INUM)).unwrap_or(0)
}

/// Fills the scratch event for `dev` and sends it, unless it concerns another namespace.
#[inline(always)]
/// `module`: the module the task is unloading or loading, for those causes, else zeroes (read
/// once per program run by the caller: an unregister batch sends up to 16 events).
fn send(
    kind: EventKind,
    cause: Cause,
    dev: u64,
    before_move: Option<(i32, u32)>,
    module: &[u8; MODULE_NAME_LEN],
) {
    let netns = before_move.map_or_else(|| netns_of(dev), |(_, netns)| netns);
    if foreign(netns) {
        count(Counter::ForeignNetnsFiltered);
        return;
    }
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program run.
    clear(event);
    // SAFETY: as above; `clear` has initialised every byte.
    let event = unsafe { &mut *event };
    event.kind = kind as u32;
    event.cause = cause as u32;
    event.timestamp_ns = now_ns();
    event.task = current_task();
    event.context_module = *module;
    describe(event, dev);
    event.netns = netns;
    if let Some((ifindex, _)) = before_move {
        event.ifindex = ifindex;
    }
    emit(event);
}

/// Zeroes the scratch event word by word. A plain `*event = zeroed()` becomes a byte-wise memset
/// loop that the verifier walks 300 times per event; volatile 8-byte stores stay 38 instructions.
#[inline(always)]
fn clear(event: *mut NetdevEvent) {
    const WORDS: usize = core::mem::size_of::<NetdevEvent>() / 8;
    let words = event.cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: `event` points to a whole NetdevEvent (8-byte aligned, a multiple of 8 long).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Copies what the kernel knows about `dev` into `event`.
#[inline(always)]
fn describe(event: &mut NetdevEvent, dev: u64) {
    event.ifindex = read::<i32>(dev, global_u32(&NETDEV_IFINDEX)).unwrap_or(0);
    read_bytes(dev + global_u32(&NETDEV_NAME) as u64, &mut event.name);
    event.addr_len = read::<u8>(dev, global_u32(&NETDEV_ADDR_LEN)).unwrap_or(0) as u32;
    read_bytes(dev + global_u32(&NETDEV_PERM_ADDR) as u64, &mut event.perm_addr);
    let dev_addr = if global_u32(&NETDEV_DEV_ADDR_IS_POINTER) != 0 {
        read::<u64>(dev, global_u32(&NETDEV_DEV_ADDR)).unwrap_or(0)
    } else {
        dev + global_u32(&NETDEV_DEV_ADDR) as u64
    };
    read_bytes(dev_addr, &mut event.dev_addr);

    let parent = read::<u64>(dev, global_u32(&NETDEV_PARENT)).unwrap_or(0);
    if parent != 0 {
        let driver = read::<u64>(parent, global_u32(&DEVICE_DRIVER)).unwrap_or(0);
        if driver != 0 {
            read_str(read::<u64>(driver, global_u32(&DRIVER_NAME)).unwrap_or(0), &mut event.driver);
            let owner = read::<u64>(driver, global_u32(&DRIVER_OWNER)).unwrap_or(0);
            if owner != 0 {
                read_str(owner + global_u32(&MODULE_NAME) as u64, &mut event.module);
            }
        }
    } else {
        // A virtual device: its rtnetlink link kind ("veth", "bridge") stands for the driver.
        let ops = read::<u64>(dev, global_u32(&NETDEV_RTNL_LINK_OPS)).unwrap_or(0);
        if ops != 0 {
            read_str(read::<u64>(ops, global_u32(&RTNL_LINK_OPS_KIND)).unwrap_or(0), &mut event.driver);
        }
    }

    let mut device = parent;
    for _ in 0..MAX_PARENT_DEPTH {
        if device == 0 {
            break;
        }
        if on_pci_bus(device) {
            read_str(read::<u64>(device, global_u32(&DEVICE_NAME)).unwrap_or(0), &mut event.bus_addr);
            break;
        }
        device = read::<u64>(device, global_u32(&DEVICE_PARENT)).unwrap_or(0);
    }
}

/// Whether `device` sits on the PCI bus: its `bus_type` is named "pci" (`pci_bus_type.name`, the
/// same since Linux 2.6). By name rather than by the address of `pci_bus_type`, which only a
/// reader of /proc/kallsyms with CAP_SYSLOG could give.
#[inline(always)]
fn on_pci_bus(device: u64) -> bool {
    let bus = read::<u64>(device, global_u32(&DEVICE_BUS)).unwrap_or(0);
    let name = read::<u64>(bus, global_u32(&BUS_TYPE_NAME)).unwrap_or(0);
    read::<[u8; 4]>(name, 0) == Some(*b"pci\0")
}

/// Entry of `unregister_netdevice_many[_notify]`: one removal event per device in the batch.
#[kprobe]
pub fn netdev_unregister(ctx: ProbeContext) -> u32 {
    try_netdev_unregister(&ctx).map_or(1, |()| 0)
}

fn try_netdev_unregister(ctx: &ProbeContext) -> Result<(), ()> {
    let head = probe_arg0(ctx).ok_or(())?;
    let task = context::current();
    let cause = task.removal_cause();
    let module = if cause == Cause::DriverUnload { task.module } else { NO_MODULE };
    let unreg_list = global_u32(&NETDEV_UNREG_LIST) as u64;
    let mut node = read::<u64>(head, 0).ok_or(())?;
    for _ in 0..MAX_UNREGISTER_BATCH {
        if node == head || node == 0 {
            return Ok(());
        }
        send(EventKind::NetdevRemoval, cause, node - unreg_list, None, &module);
        node = read::<u64>(node, 0).ok_or(())?;
    }
    // More devices than one run walks. A loss only if the next one is in the agent's namespace
    // (a batch is one namespace's teardown, or a group delete in one): a user namespace deleting
    // 17 dummy links of its own in a loop must not make the agent re-read every NIC.
    if node != head && node != 0 && !foreign(netns_of(node - unreg_list)) {
        count(Counter::BatchTruncated);
    }
    Ok(())
}

/// Whether `netns` (a device's, 0 when unknown) is not the agent's.
#[inline(always)]
fn foreign(netns: u32) -> bool {
    let agent = global_u32(&AGENT_NETNS);
    agent != 0 && netns != 0 && netns != agent
}

#[kprobe]
pub fn netdev_register_enter(ctx: ProbeContext) -> u32 {
    let Some(dev) = probe_arg0(&ctx) else {
        return 1;
    };
    if REGISTERING.insert(current_tid(), dev, 0).is_err() {
        count(Counter::ContextMapFull);
    }
    0
}

#[kretprobe]
pub fn netdev_register_exit(ctx: RetProbeContext) -> u32 {
    let tid = current_tid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dev) = (unsafe { REGISTERING.get(tid) }).copied() else {
        return 0;
    };
    let _ = REGISTERING.remove(tid);
    let ret = probe_ret(&ctx).unwrap_or(u64::MAX) as i32;
    if ret == 0 {
        let task = context::current();
        let cause = task.registration_cause();
        let module = if cause == Cause::DriverLoad { task.module } else { NO_MODULE };
        send(EventKind::NetdevRegistration, cause, dev, None, &module);
    }
    0
}

#[kprobe]
pub fn netns_move_enter(ctx: ProbeContext) -> u32 {
    let Some(dev) = probe_arg0(&ctx) else {
        return 1;
    };
    let ifindex = read::<i32>(dev, global_u32(&NETDEV_IFINDEX)).unwrap_or(0);
    if MOVING.insert(current_tid(), (dev, ifindex, netns_of(dev)), 0).is_err() {
        count(Counter::ContextMapFull);
    }
    0
}

#[kretprobe]
pub fn netns_move_exit(ctx: RetProbeContext) -> u32 {
    let tid = current_tid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some((dev, old_ifindex, old_netns)) = (unsafe { MOVING.get(tid) }).copied() else {
        return 0;
    };
    let _ = MOVING.remove(tid);
    let ret = probe_ret(&ctx).unwrap_or(u64::MAX) as i32;
    if ret == 0 {
        send(EventKind::NetdevRemoval, Cause::NetnsMove, dev, Some((old_ifindex, old_netns)), &NO_MODULE);
        send(EventKind::NetdevRegistration, Cause::NetnsMove, dev, None, &NO_MODULE);
    }
    0
}
