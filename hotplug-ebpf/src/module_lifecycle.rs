//! Module lifecycle: the `delete_module` syscall (entry and exit), `module:module_load` and
//! `module:module_free`.
//!
//! Kernel facts relied on (checked on Debian 6.1, 6.12 and 7.2):
//! - `delete_module` (kernel/module/main.c) runs the module's exit function, which unregisters its
//!   drivers and so its NICs, inside the syscall, in the task that called it; `module_free` fires
//!   only after that, from `free_module`. The syscall entry is the earliest signal of an unload.
//! - `module:module_load` fires in `load_module` before the module's init function runs, so before
//!   the driver probes and registers any NIC.
//! - Tracepoint record layouts differ between kernels, so every field offset is a global that user
//!   space fills in from tracefs `events/<system>/<event>/format` before loading.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
    EbpfContext as _,
};
use hotplug_common::{Counter, EventKind, ModuleEvent, TaskInfo, MODULE_NAME_LEN};

use crate::{count, emit};

// Tracepoint field offsets, overridden by user space (see `hotplug_common::globals`).
#[unsafe(no_mangle)]
static DELETE_MODULE_ENTER_NAME_OFFSET: u32 = 16;
#[unsafe(no_mangle)]
static DELETE_MODULE_EXIT_RET_OFFSET: u32 = 16;
#[unsafe(no_mangle)]
static MODULE_LOAD_NAME_OFFSET: u32 = 12;
#[unsafe(no_mangle)]
static MODULE_FREE_NAME_OFFSET: u32 = 8;

/// Threads inside `delete_module`, keyed by thread id, with the name of the module they unload.
/// Later hooks (NIC unregistration) look here to tell a driver unload from a device removal.
#[map]
pub static UNLOADING: HashMap<u32, [u8; MODULE_NAME_LEN]> = HashMap::with_max_entries(1024, 0);

/// Reads a global that user space may have overridden at load time.
#[inline(always)]
fn global(value: &'static u32) -> usize {
    // SAFETY: a volatile read of a valid static stops the compiler from folding in the default
    // value, so the loader's override (patched into .rodata) is what the program sees.
    unsafe { core::ptr::read_volatile(value) as usize }
}

#[inline(always)]
fn current_task() -> TaskInfo {
    let pid_tgid = bpf_get_current_pid_tgid();
    TaskInfo {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

#[inline(always)]
fn new_event(kind: EventKind) -> ModuleEvent {
    let mut event = ModuleEvent::zeroed();
    event.kind = kind as u32;
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads CLOCK_MONOTONIC.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
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

#[tracepoint]
pub fn delete_module_enter(ctx: TracePointContext) -> u32 {
    try_delete_module_enter(&ctx).map_or(1, |()| 0)
}

fn try_delete_module_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let mut event = new_event(EventKind::ModuleUnloadBegin);
    // SAFETY: the offset of `name_user` comes from the running kernel's format file.
    let name_user: *const u8 =
        unsafe { ctx.read_at(global(&DELETE_MODULE_ENTER_NAME_OFFSET)) }.map_err(i64::from)?;
    // SAFETY: `name_user` is the syscall's user pointer; the helper faults safely and bounds the copy.
    if unsafe { bpf_probe_read_user_str_bytes(name_user, &mut event.name) }.is_err() {
        count(Counter::KernelReadFailed);
    }
    UNLOADING
        .insert(event.task.tid, event.name, 0)
        .map_err(i64::from)?;
    emit(&event);
    Ok(())
}

#[tracepoint]
pub fn delete_module_exit(ctx: TracePointContext) -> u32 {
    try_delete_module_exit(&ctx).map_or(1, |()| 0)
}

fn try_delete_module_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let mut event = new_event(EventKind::ModuleUnloadEnd);
    // SAFETY: the lookup result is copied out at once, before the entry is removed below.
    let Some(name) = (unsafe { UNLOADING.get(event.task.tid) }).copied() else {
        // Entry raced with the agent's start, or the map was full: nothing to pair with.
        return Ok(());
    };
    event.name = name;
    // SAFETY: the offset of `ret` (a `long`) comes from the running kernel's format file.
    let ret: i64 =
        unsafe { ctx.read_at(global(&DELETE_MODULE_EXIT_RET_OFFSET)) }.map_err(i64::from)?;
    event.ret = ret as i32;
    let _ = UNLOADING.remove(event.task.tid);
    emit(&event);
    Ok(())
}

#[tracepoint]
pub fn module_load(ctx: TracePointContext) -> u32 {
    try_module_named(
        &ctx,
        EventKind::ModuleLoad,
        global(&MODULE_LOAD_NAME_OFFSET),
    )
    .map_or(1, |()| 0)
}

#[tracepoint]
pub fn module_free(ctx: TracePointContext) -> u32 {
    try_module_named(
        &ctx,
        EventKind::ModuleFree,
        global(&MODULE_FREE_NAME_OFFSET),
    )
    .map_or(1, |()| 0)
}

fn try_module_named(
    ctx: &TracePointContext,
    kind: EventKind,
    name_offset: usize,
) -> Result<(), i64> {
    let mut event = new_event(kind);
    if read_data_loc_str(ctx, name_offset, &mut event.name).is_err() {
        count(Counter::KernelReadFailed);
    }
    emit(&event);
    Ok(())
}
