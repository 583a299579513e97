//! hotplug's kernel side: programs that watch module and NIC lifecycles and report them as
//! fixed-size records on one ring buffer. One module per hook family; the maps they share live here.
#![no_std]
#![no_main]

mod module_lifecycle;

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use hotplug_common::{Counter, COUNTER_SLOTS, EVENT_RING_BYTES};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves every program terminates; a panic path is never reachable.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
