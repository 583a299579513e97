//! hotplug's kernel side: programs that watch module and NIC lifecycles and report them as
//! fixed-size records on one ring buffer. One module per hook family:
//! - `module_lifecycle`: module unload (the `delete_module` syscall) and load, module free;
//! - `context`: the kernel paths that explain a NIC change (sysfs bind/unbind, PCI removal and
//!   addition, rtnetlink link deletion and creation, module init), tracked per task;
//! - `netdev`: NIC unregistration, registration and namespace moves, classified by that context.
#![no_std]
#![no_main]

mod context;
mod kernel;
mod module_lifecycle;
mod netdev;

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use hotplug_common::{Counter, TaskInfo, COUNTER_SLOTS, EVENT_RING_BYTES};

/// Every record for user space goes here.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Loss and fault counters, indexed by [`Counter`]; user space sums the CPUs.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Adds one to a counter. Per-CPU slots need no atomics: a program runs on one CPU at a time.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
        unsafe { *slot += 1 };
    }
}

/// Puts `event` on the ring buffer, counting a failed reservation as a lost event.
#[inline(always)]
fn emit<T: 'static>(event: &T) {
    if EVENTS.output::<T>(event, 0).is_err() {
        count(Counter::RingReserveFailed);
    }
}

#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
fn current_task() -> TaskInfo {
    let pid_tgid = bpf_get_current_pid_tgid();
    TaskInfo {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        // The low half is the uid, in the initial user namespace.
        uid: bpf_get_current_uid_gid() as u32,
        ppid: kernel::current_parent_pid(),
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a global that user space may have overridden at load time.
#[inline(always)]
fn global_u32(value: &'static u32) -> u32 {
    // SAFETY: a volatile read of a valid static stops the compiler from folding in the default
    // value, so the loader's override (patched into .rodata) is what the program sees.
    unsafe { core::ptr::read_volatile(value) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves every program terminates; a panic path is never reachable.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
