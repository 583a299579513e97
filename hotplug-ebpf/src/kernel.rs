//! Reading kernel memory at offsets user space took from the running kernel's BTF.
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes};
use hotplug_common::Counter;

use crate::count;

/// Reads a `T` at `base + offset`; `None` (and a counted fault) if the read faults or `base` is 0.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly on a bad one.
    match unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) } {
        Ok(value) => Some(value),
        Err(_) => {
            count(Counter::KernelReadFailed);
            None
        }
    }
}

/// Copies `dest.len()` bytes from `addr`.
#[inline(always)]
pub fn read_bytes(addr: u64, dest: &mut [u8]) {
    if addr == 0 {
        return;
    }
    // SAFETY: the helper checks the source address and writes only within `dest`.
    if unsafe { bpf_probe_read_kernel_buf(addr as *const u8, dest) }.is_err() {
        count(Counter::KernelReadFailed);
    }
}

/// Copies a NUL-terminated kernel string at `addr` into `dest` (truncated, NUL-terminated).
#[inline(always)]
pub fn read_str(addr: u64, dest: &mut [u8]) {
    if addr == 0 {
        return;
    }
    // SAFETY: the helper checks the source address, bounds the copy by `dest`, NUL-terminates.
    if unsafe { bpf_probe_read_kernel_str_bytes(addr as *const u8, dest) }.is_err() {
        count(Counter::KernelReadFailed);
    }
}
