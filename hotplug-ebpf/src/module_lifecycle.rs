//! Module lifecycle: the `delete_module` syscall (entry and exit), `module:module_load` and
//! `module:module_free`.
//!
//! The syscall is hooked with a kprobe/kretprobe on its architecture's wrapper
//! (`__x64_sys_delete_module` on x86_64 since Linux 4.17, `__arm64_sys_delete_module` on arm64
//! since 4.19; user space finds it in kallsyms), not with the
//! `syscalls:sys_{enter,exit}_delete_module` tracepoints: enabling any
//! syscall tracepoint sends every syscall of every task through the tracing slow path, and on
//! Linux 7.2 under QEMU TCG patching that hot path crashed the guest (an int3 oops in
//! `trace_syscall_enter`) about one boot in five. A kprobe patches only the probed function.
//!
//! Kernel facts relied on (checked on Debian 6.1, 6.12 and 7.2):
//! - `delete_module` (kernel/module/main.c) runs the module's exit function, which unregisters its
//!   drivers and so its NICs, inside the syscall, in the task that called it; `module_free` fires
//!   only after that, from `free_module`. The syscall entry is the earliest signal of an unload.
//! - `module:module_load` fires in `load_module` before the module's init function runs, so before
//!   the driver probes and registers any NIC.
//! - `delete_module` checks `capable(CAP_SYS_MODULE)` only after the probe fired: callers without
//!   it are filtered here (`kernel::may_manage_modules`), so unprivileged calls cost no record.
//! - Tracepoint record layouts differ between kernels, so every field offset is a global that user
//!   space fills in from tracefs `events/<system>/<event>/format` before loading; the registers
//!   holding the syscall's argument and return value come from BTF (`kernel::syscall_arg0`).
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes},
    macros::{kprobe, kretprobe, tracepoint},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext as _,
};
use hotplug_common::{ContextKind, Counter, EventKind, ModuleEvent, MODULE_NAME_LEN};

use crate::{
    context, count, current_task, emit, global_u32,
    kernel::{may_manage_modules, probe_ret, syscall_arg0},
    now_ns,
};

// Tracepoint field offsets, overridden by user space (see `hotplug_common::globals`).
#[unsafe(no_mangle)]
static MODULE_LOAD_NAME_OFFSET: u32 = 12;
#[unsafe(no_mangle)]
static MODULE_FREE_NAME_OFFSET: u32 = 8;

/// `EFAULT` (include/uapi/asm-generic/errno-base.h), negated as the kernel returns it.
const EFAULT: i32 = -14;

#[inline(always)]
fn new_event(kind: EventKind) -> ModuleEvent {
    let mut event = ModuleEvent::zeroed();
    event.kind = kind as u32;
    event.timestamp_ns = now_ns();
    event.task = current_task();
    event
}

/// Copies a tracepoint `__data_loc char[]` field into `dest`. The descriptor is a `u32` at
/// `offset`: the low 16 bits are the string's offset from the record start, the high 16 its length.
#[inline(always)]
fn read_data_loc_str(ctx: &TracePointContext, offset: usize, dest: &mut [u8]) -> Result<(), i64> {
    // SAFETY: `offset` comes from the running kernel's format file for this tracepoint.
    let data_loc: u32 = unsafe { ctx.read_at(offset) }.map_err(i64::from)?;
    let string_offset = (data_loc & 0xffff) as usize;
    // SAFETY: the descriptor points inside the tracepoint record, which is kernel memory; the
    // helper bounds the copy by `dest`'s length and NUL-terminates.
    unsafe { bpf_probe_read_kernel_str_bytes(ctx.as_ptr().cast::<u8>().add(string_offset), dest) }
        .map(|_| ())
        .map_err(i64::from)
}

/// Entry of `__<arch>_sys_delete_module(const struct pt_regs *regs)`.
#[kprobe]
pub fn delete_module_enter(ctx: ProbeContext) -> u32 {
    try_delete_module_enter(&ctx).map_or(1, |()| 0)
}

fn try_delete_module_enter(ctx: &ProbeContext) -> Result<(), i64> {
    // A caller the kernel is about to refuse: no record, no context (its exit then sends none).
    if !may_manage_modules() {
        count(Counter::UnprivilegedFiltered);
        return Ok(());
    }
    let mut event = new_event(EventKind::ModuleUnloadBegin);
    let name_user = syscall_arg0(ctx).ok_or(0i64)? as *const u8;
    // SAFETY: `name_user` is the syscall's user pointer; the helper faults safely and bounds the copy.
    if unsafe { bpf_probe_read_user_str_bytes(name_user, &mut event.name) }.is_err() {
        count(Counter::KernelReadFailed);
    }
    // NIC removals in this task until the syscall returns are driver unloads of this module.
    context::update(|task| {
        task.depth[ContextKind::ModuleUnload as usize] =
            task.depth[ContextKind::ModuleUnload as usize].saturating_add(1);
        task.module = event.name;
    });
    emit(&event);
    Ok(())
}

/// Return of `__<arch>_sys_delete_module`.
#[kretprobe]
pub fn delete_module_exit(ctx: RetProbeContext) -> u32 {
    try_delete_module_exit(&ctx).map_or(1, |()| 0)
}

fn try_delete_module_exit(ctx: &RetProbeContext) -> Result<(), i64> {
    let mut event = new_event(EventKind::ModuleUnloadEnd);
    let task = context::current();
    if !task.inside(ContextKind::ModuleUnload) {
        // The entry raced with the agent's start, or the map was full: nothing to pair with.
        return Ok(());
    }
    event.name = task.module;
    context::update(|task| task.module = [0; MODULE_NAME_LEN]);
    context::leave(ContextKind::ModuleUnload);
    // `long`: 0 or a negative errno, which fits the event's `i32`. A register that cannot be read
    // is reported as -EFAULT, never as a success.
    event.ret = probe_ret(ctx).map_or(EFAULT, |ret| ret as i32);
    emit(&event);
    Ok(())
}

#[tracepoint]
pub fn module_load(ctx: TracePointContext) -> u32 {
    let Ok(event) = module_named(&ctx, EventKind::ModuleLoad, global_u32(&MODULE_LOAD_NAME_OFFSET) as usize)
    else {
        return 1;
    };
    // NICs this task registers before its init_module returns belong to this module's load.
    if context::current().inside(ContextKind::ModuleLoad) {
        context::update(|task| task.module = event.name);
    }
    emit(&event);
    0
}

#[tracepoint]
pub fn module_free(ctx: TracePointContext) -> u32 {
    match module_named(&ctx, EventKind::ModuleFree, global_u32(&MODULE_FREE_NAME_OFFSET) as usize) {
        Ok(event) => {
            emit(&event);
            0
        }
        Err(_) => 1,
    }
}

#[inline(always)]
fn module_named(ctx: &TracePointContext, kind: EventKind, name_offset: usize) -> Result<ModuleEvent, i64> {
    let mut event = new_event(kind);
    if read_data_loc_str(ctx, name_offset, &mut event.name).is_err() {
        count(Counter::KernelReadFailed);
    }
    Ok(event)
}
