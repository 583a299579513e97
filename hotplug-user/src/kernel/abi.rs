//! The running kernel's architecture, as the probes see it: which function wraps a system call,
//! and which `struct pt_regs` member holds a probed function's first argument, its return value
//! and a system call's first argument. The eBPF programs carry none of this (`hotplug-ebpf`'s
//! `kernel::probe_arg0`): the names below are the only per-architecture facts, and every offset
//! comes from the running kernel's BTF, so a layout change in a new kernel is followed.
//!
//! Kernel facts relied on:
//! - x86_64 (Linux 4.17+, `CONFIG_ARCH_HAS_SYSCALL_WRAPPER`): `__x64_sys_<name>(const struct
//!   pt_regs *regs)`, the syscall's arguments in `regs->di, si, dx, r10, r8, r9`; a C function's
//!   first argument arrives in `di`, its return value leaves in `ax`
//!   (arch/x86/include/asm/syscall_wrapper.h, the System V AMD64 ABI).
//! - arm64 (Linux 4.19+): `__arm64_sys_<name>(const struct pt_regs *regs)`, arguments in
//!   `regs->regs[0..5]`; a function's first argument and return value are both `x0`, `regs[0]`
//!   (arch/arm64/include/asm/syscall_wrapper.h, AAPCS64). `regs` sits in an anonymous union with
//!   `user_regs`, which the BTF look-up walks through.
//! - A kprobe's context is the `struct pt_regs` the kernel saved when it fired (on arm64 the BPF
//!   context type is `user_pt_regs`, the same leading members).
use std::path::Path;

use thiserror::Error;

use super::btf::{Btf, BtfError, Shape};

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AbiError {
    #[error(
        "no calling convention is known for the {0} architecture (x86_64 and aarch64 are): the \
         probes cannot read function arguments here"
    )]
    UnknownArchitecture(String),
    #[error("register {register}: {source}")]
    Btf { register: &'static str, source: BtfError },
    #[error("register {register}: pt_regs member {member} is not an array, so it has no element {index}")]
    NotAnArray { register: &'static str, member: &'static str, index: u32 },
}

/// A register: a `struct pt_regs` member (a path for `Btf::member`) and, for an array of
/// registers, the element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    pub member: &'static str,
    pub index: u32,
}

/// One architecture's calling convention, as far as the probes need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Convention {
    /// The kernel's name for the architecture (`uname -m`).
    pub machine: &'static str,
    /// The system call wrapper's prefix: `<prefix><name>` in kallsyms.
    pub syscall_prefix: &'static str,
    /// A function's first argument at its entry.
    pub arg0: Register,
    /// A function's return value at its return.
    pub ret: Register,
    /// A system call's first argument, in the registers its wrapper receives.
    pub syscall_arg0: Register,
}

const fn reg(member: &'static str, index: u32) -> Register {
    Register { member, index }
}

/// The architectures hotplug runs on: EC2's x86_64 and Graviton instances.
pub const CONVENTIONS: [Convention; 2] = [
    Convention {
        machine: "x86_64",
        syscall_prefix: "__x64_sys_",
        arg0: reg("di", 0),
        ret: reg("ax", 0),
        syscall_arg0: reg("di", 0),
    },
    Convention {
        machine: "aarch64",
        syscall_prefix: "__arm64_sys_",
        arg0: reg("regs", 0),
        ret: reg("regs", 0),
        syscall_arg0: reg("regs", 0),
    },
];

/// Registers are 64 bits on every architecture in [`CONVENTIONS`].
const REGISTER_BYTES: u32 = 8;

/// Byte offsets into `struct pt_regs`, for the programs' `REGS_ARG0`, `REGS_RET`, `SYSCALL_ARG0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterOffsets {
    pub arg0: u32,
    pub ret: u32,
    pub syscall_arg0: u32,
}

/// The running kernel's architecture: `/proc/sys/kernel/arch` (Linux 6.1+), else the one this
/// agent was built for (an x86_64 or aarch64 binary runs only on a kernel of its own kind).
pub fn machine() -> String {
    machine_from(Path::new("/proc/sys/kernel/arch"))
}

fn machine_from(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

impl Convention {
    /// The convention of `machine` (`uname -m`; `arm64` is accepted for `aarch64`).
    pub fn of(machine: &str) -> Result<Self, AbiError> {
        let machine = if machine == "arm64" { "aarch64" } else { machine };
        CONVENTIONS
            .iter()
            .find(|c| c.machine == machine)
            .copied()
            .ok_or_else(|| AbiError::UnknownArchitecture(machine.to_owned()))
    }

    /// The registers' offsets in this kernel's `struct pt_regs`.
    pub fn offsets(&self, btf: &Btf) -> Result<RegisterOffsets, AbiError> {
        Ok(RegisterOffsets {
            arg0: offset(btf, "first argument", self.arg0)?,
            ret: offset(btf, "return value", self.ret)?,
            syscall_arg0: offset(btf, "syscall argument", self.syscall_arg0)?,
        })
    }
}

fn offset(btf: &Btf, register: &'static str, reg: Register) -> Result<u32, AbiError> {
    let member = btf.member("pt_regs", reg.member).map_err(|source| AbiError::Btf { register, source })?;
    if reg.index == 0 {
        return Ok(member.offset);
    }
    if member.shape != Shape::Array {
        return Err(AbiError::NotAnArray { register, member: reg.member, index: reg.index });
    }
    Ok(member.offset + reg.index * REGISTER_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::test_blob;

    /// x86_64's `struct pt_regs`: fifteen general registers from r15 down, then `orig_ax`, `ip`.
    fn x86_pt_regs() -> Vec<u8> {
        let names = [
            "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si", "di",
            "orig_ax", "ip",
        ];
        test_blob::structure("pt_regs", &names.map(|n| (n, test_blob::Member::U64)))
    }

    fn arm64_pt_regs() -> Vec<u8> {
        test_blob::arm64_pt_regs()
    }

    #[test]
    fn picks_each_architectures_registers() -> Result<(), Box<dyn std::error::Error>> {
        let x86 = Convention::of("x86_64")?;
        let offsets = x86.offsets(&Btf::parse(&x86_pt_regs())?)?;
        assert_eq!(offsets, RegisterOffsets { arg0: 112, ret: 80, syscall_arg0: 112 });

        let arm = Convention::of("aarch64")?;
        assert_eq!(Convention::of("arm64")?, arm);
        let offsets = arm.offsets(&Btf::parse(&arm64_pt_regs())?)?;
        assert_eq!(offsets, RegisterOffsets { arg0: 0, ret: 0, syscall_arg0: 0 });

        // Each convention against the other's BTF: the registers are not there.
        assert!(matches!(arm.offsets(&Btf::parse(&x86_pt_regs())?), Err(AbiError::Btf { .. })));
        assert!(matches!(x86.offsets(&Btf::parse(&arm64_pt_regs())?), Err(AbiError::Btf { .. })));
        Ok(())
    }

    #[test]
    fn an_array_register_is_indexed_and_a_scalar_one_is_not() -> Result<(), Box<dyn std::error::Error>> {
        let btf = Btf::parse(&arm64_pt_regs())?;
        assert_eq!(offset(&btf, "x1", reg("regs", 1))?, 8);
        assert_eq!(offset(&btf, "x30", reg("regs", 30))?, 240);
        assert_eq!(offset(&btf, "pc", reg("pc", 0))?, 256);
        let btf = Btf::parse(&x86_pt_regs())?;
        assert_eq!(
            offset(&btf, "bad", reg("di", 1)),
            Err(AbiError::NotAnArray { register: "bad", member: "di", index: 1 })
        );
        Ok(())
    }

    #[test]
    fn an_unknown_architecture_is_named() {
        assert_eq!(Convention::of("riscv64"), Err(AbiError::UnknownArchitecture("riscv64".into())));
    }

    #[test]
    fn reads_the_architecture_from_the_kernel_else_from_the_build() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("hotplug-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("arch");
        std::fs::write(&file, "aarch64\n")?;
        assert_eq!(machine_from(&file), "aarch64");
        assert_eq!(machine_from(&dir.join("absent")), std::env::consts::ARCH);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn the_running_kernels_registers_when_present() -> Result<(), Box<dyn std::error::Error>> {
        let Ok(btf) = Btf::vmlinux() else {
            eprintln!("SKIP: this kernel has no /sys/kernel/btf/vmlinux");
            return Ok(());
        };
        let offsets = Convention::of(&machine())?.offsets(&btf)?;
        match machine().as_str() {
            "x86_64" => assert_eq!(offsets, RegisterOffsets { arg0: 112, ret: 80, syscall_arg0: 112 }),
            "aarch64" => assert_eq!(offsets, RegisterOffsets { arg0: 0, ret: 0, syscall_arg0: 0 }),
            other => panic!("no expectation for {other}"),
        }
        Ok(())
    }
}
