//! Per-task kernel context: which of the paths that explain a NIC change the current task is
//! inside. Each path is hooked at entry and exit; the NIC programs read the map at the moment a
//! NIC is unregistered or registered.
//!
//! Kernel functions (all present on Debian's 6.1, 6.12 and 7.2):
//! - `unbind_store` / `bind_store` (drivers/base/bus.c): sysfs driver `unbind`/`bind` writes.
//!   Static, but referenced as sysfs callbacks, so never inlined away.
//! - `pci_stop_and_remove_bus_device[_locked]` (drivers/pci/remove.c): every PCI removal, from
//!   ACPI hotplug (acpiphp), native PCIe hotplug (pciehp) and sysfs `remove`.
//! - `pci_bus_add_devices` / `pci_bus_add_device` (drivers/pci/bus.c): devices added by a hot-plug
//!   or a rescan are bound to drivers from here.
//! - `rtnl_dellink` / `rtnl_newlink` (net/core/rtnetlink.c): rtnetlink handlers, registered as
//!   function pointers.
//! - `__<arch>_sys_init_module` / `__<arch>_sys_finit_module` (the architecture's syscall
//!   wrappers, found by user space in kallsyms): module load (the driver probes inside its
//!   init). kprobes rather than syscall tracepoints, see `module_lifecycle`. `delete_module` is
//!   handled in `module_lifecycle`.
use aya_ebpf::{
    macros::{kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use hotplug_common::{ContextKind, Counter, TaskContext};

use crate::{
    count, current_tid,
    kernel::{current_task_ptr, may_manage_modules},
};

/// Contexts of the tasks inside a hooked path, by thread id. LRU: a kretprobe can be missed (the
/// kernel keeps a bounded number of return instances per probe), and a context that never saw
/// its exit must age out rather than fill the map.
#[map]
pub static TASK_CONTEXT: LruHashMap<u32, TaskContext> = LruHashMap::with_max_entries(4096, 0);

/// The current task's context: an idle (zeroed) one unless it is inside a hooked path. An entry
/// left by an earlier thread with the same id (its exit probe missed) is not this task's.
///
/// Always a whole, initialised value rather than an `Option`: a `None` of a 72-byte payload
/// leaves the payload undefined, and LLVM may then copy an uninitialised register, which the
/// verifier refuses ("R2 !read_ok" on Linux 6.1).
#[inline(always)]
pub fn current() -> TaskContext {
    let task = current_task_ptr();
    // SAFETY: the value is copied out at once; a concurrent delete cannot free it under us
    // because only this thread touches its own entry.
    match unsafe { TASK_CONTEXT.get(current_tid()) } {
        Some(ctx) if ctx.task == task => *ctx,
        _ => TaskContext::zeroed(),
    }
}

/// Applies `update` to the current task's context, creating it if needed (and starting afresh
/// over an entry an earlier thread with the same id left behind).
#[inline(always)]
pub fn update(update: impl FnOnce(&mut TaskContext)) {
    let tid = current_tid();
    let task = current_task_ptr();
    if let Some(ctx) = TASK_CONTEXT.get_ptr_mut(tid) {
        // SAFETY: the pointer comes from the lookup; only this thread writes its own entry.
        let ctx = unsafe { &mut *ctx };
        if ctx.task != task {
            *ctx = TaskContext::zeroed();
            ctx.task = task;
        }
        update(ctx);
        return;
    }
    let mut ctx = TaskContext::zeroed();
    ctx.task = task;
    update(&mut ctx);
    if TASK_CONTEXT.insert(tid, ctx, 0).is_err() {
        count(Counter::ContextMapFull);
    }
}

#[inline(always)]
pub fn enter(kind: ContextKind) {
    update(|ctx| ctx.depth[kind as usize] = ctx.depth[kind as usize].saturating_add(1));
}

#[inline(always)]
pub fn leave(kind: ContextKind) {
    let tid = current_tid();
    if let Some(ctx) = TASK_CONTEXT.get_ptr_mut(tid) {
        // SAFETY: as in `update`.
        let ctx = unsafe { &mut *ctx };
        if ctx.task != current_task_ptr() {
            // An earlier thread's: this task never entered.
            let _ = TASK_CONTEXT.remove(tid);
            return;
        }
        ctx.depth[kind as usize] = ctx.depth[kind as usize].saturating_sub(1);
        if ctx.is_idle() {
            let _ = TASK_CONTEXT.remove(tid);
        }
    }
}

/// A kprobe/kretprobe pair that marks the current task as inside `kind` while the function runs.
macro_rules! context_probe {
    ($enter:ident, $exit:ident, $kind:expr) => {
        #[kprobe]
        pub fn $enter(_ctx: ProbeContext) -> u32 {
            enter($kind);
            0
        }

        #[kretprobe]
        pub fn $exit(_ctx: RetProbeContext) -> u32 {
            leave($kind);
            0
        }
    };
}

context_probe!(unbind_enter, unbind_exit, ContextKind::Unbind);
context_probe!(bind_enter, bind_exit, ContextKind::Bind);
context_probe!(pci_remove_enter, pci_remove_exit, ContextKind::PciRemove);
context_probe!(pci_add_enter, pci_add_exit, ContextKind::PciAdd);
context_probe!(dellink_enter, dellink_exit, ContextKind::LinkDelete);
context_probe!(newlink_enter, newlink_exit, ContextKind::LinkCreate);

/// Entry of `__<arch>_sys_{init,finit}_module`: the task is loading a module. A caller without
/// `CAP_SYS_MODULE` is refused by the kernel: no context is made for it.
#[kprobe]
pub fn module_init_enter(_ctx: ProbeContext) -> u32 {
    if !may_manage_modules() {
        count(Counter::UnprivilegedFiltered);
        return 0;
    }
    enter(ContextKind::ModuleLoad);
    0
}

/// Return of `__<arch>_sys_{init,finit}_module`.
#[kretprobe]
pub fn module_init_exit(_ctx: RetProbeContext) -> u32 {
    if current().inside(ContextKind::ModuleLoad) {
        update(|ctx| ctx.module = [0; hotplug_common::MODULE_NAME_LEN]);
        leave(ContextKind::ModuleLoad);
    }
    0
}
