//! Reading kernel memory at offsets user space took from the running kernel's BTF, and what the
//! programs read about the current task through it.
use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        bpf_probe_read_kernel_str_bytes,
    },
    EbpfContext,
};
use hotplug_common::Counter;

use crate::{count, global_u32};

// Where the probed function's registers are, as byte offsets into the kprobe's `struct pt_regs`
// (the register set the kernel saved when the probe fired): the first argument, the return value
// (in a kretprobe), and the first argument of a system call inside the `struct pt_regs *` its
// wrapper receives. Set by user space from the running kernel's BTF and the architecture's calling
// convention (`hotplug-user/src/kernel/abi.rs`): nothing here is specific to one architecture,
// which is why the programs use these rather than aya's `ctx.arg()`/`ctx.ret()` (compiled for the
// `bpf_target_arch` the object was built with). The defaults are x86_64's, never used: a kprobe is
// attached only after user space set them.
#[unsafe(no_mangle)]
static REGS_ARG0: u32 = 112;
#[unsafe(no_mangle)]
static REGS_RET: u32 = 80;
#[unsafe(no_mangle)]
static SYSCALL_ARG0: u32 = 112;

/// The probed function's first argument (a kprobe at its entry).
#[inline(always)]
pub fn probe_arg0<C: EbpfContext>(ctx: &C) -> Option<u64> {
    read::<u64>(ctx.as_ptr() as u64, global_u32(&REGS_ARG0))
}

/// The probed function's return value (a kretprobe), the whole register: callers narrow it to the
/// function's type (`int` is its low 32 bits on every 64-bit little-endian architecture).
#[inline(always)]
pub fn probe_ret<C: EbpfContext>(ctx: &C) -> Option<u64> {
    read::<u64>(ctx.as_ptr() as u64, global_u32(&REGS_RET))
}

/// A system call's first argument, from the `struct pt_regs *` its wrapper (`__<arch>_sys_<name>`,
/// Linux 4.17+ on x86_64, 4.19+ on arm64) receives as its own first argument.
#[inline(always)]
pub fn syscall_arg0<C: EbpfContext>(ctx: &C) -> Option<u64> {
    let user_regs = probe_arg0(ctx)?;
    read::<u64>(user_regs, global_u32(&SYSCALL_ARG0))
}

// `task_struct.cred`, `cred.cap_effective`, `cred.user_ns`, `user_namespace.level`: set by user
// space from BTF; `PRIV_KNOWN` is 1 only when all four are (else nothing is filtered).
#[unsafe(no_mangle)]
static TASK_CRED: u32 = 0;
#[unsafe(no_mangle)]
static CRED_CAP_EFFECTIVE: u32 = 0;
#[unsafe(no_mangle)]
static CRED_USER_NS: u32 = 0;
#[unsafe(no_mangle)]
static USER_NS_LEVEL: u32 = 0;
#[unsafe(no_mangle)]
static PRIV_KNOWN: u32 = 0;

// `task_struct.real_parent` and `task_struct.tgid`: set by user space from BTF; `PARENT_KNOWN` is 1
// only when both are (else the parent is reported as 0 and user space reads /proc).
#[unsafe(no_mangle)]
static TASK_REAL_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID: u32 = 0;
#[unsafe(no_mangle)]
static PARENT_KNOWN: u32 = 0;

/// The current task's parent's pid (`current->real_parent->tgid`), 0 when the offsets are unknown
/// or a read fails. `real_parent` is RCU-protected; a BPF program runs inside an RCU read-side
/// section, and `bpf_probe_read_kernel` fails cleanly on a stale pointer.
#[inline(always)]
pub fn current_parent_pid() -> u32 {
    if global_u32(&PARENT_KNOWN) == 0 {
        return 0;
    }
    let parent = read::<u64>(current_task_ptr(), global_u32(&TASK_REAL_PARENT)).unwrap_or(0);
    // `pid_t tgid`: an `int` in every kernel.
    read::<i32>(parent, global_u32(&TASK_TGID)).map_or(0, |tgid| tgid as u32)
}

/// `CAP_SYS_MODULE` in `include/uapi/linux/capability.h`.
const CAP_SYS_MODULE: u64 = 16;

/// The current `struct task_struct *`.
#[inline(always)]
pub fn current_task_ptr() -> u64 {
    // SAFETY: bpf_get_current_task has no preconditions; it returns the current task's address.
    unsafe { bpf_get_current_task() }
}

/// Whether the current task may load or unload modules: `CAP_SYS_MODULE` effective in the initial
/// user namespace, which is what `delete_module` and `init_module` check (`capable()` is
/// `ns_capable(&init_user_ns, ...)`, and `cap_capable` grants it only to a cred whose `user_ns` is
/// the initial one, `level` 0, with the bit in `cap_effective`). Their probes fire before that
/// check, so without this any local user could fill the ring buffer with refused calls.
/// `kernel_cap_t` is `u32 cap[2]` before Linux 6.3 and `u64 val` since: read as one
/// little-endian `u64`, bit 16 is the same bit in both. True when the offsets are unknown.
#[inline(always)]
pub fn may_manage_modules() -> bool {
    if global_u32(&PRIV_KNOWN) == 0 {
        return true;
    }
    let cred = read::<u64>(current_task_ptr(), global_u32(&TASK_CRED)).unwrap_or(0);
    let Some(caps) = read::<u64>(cred, global_u32(&CRED_CAP_EFFECTIVE)) else {
        return true;
    };
    let user_ns = read::<u64>(cred, global_u32(&CRED_USER_NS)).unwrap_or(0);
    let Some(level) = read::<u32>(user_ns, global_u32(&USER_NS_LEVEL)) else {
        return true;
    };
    caps & (1 << CAP_SYS_MODULE) != 0 && level == 0
}

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
