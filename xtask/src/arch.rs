//! The architectures hotplug is built, packaged and tested for: this machine's own (amd64) and
//! arm64 (Graviton), cross-built here with rustup's target and Debian's cross toolchain, and
//! booted under `qemu-system-aarch64`. The eBPF object is the same for both (little-endian BPF;
//! the programs take their register offsets from user space).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64, this machine's own.
    #[default]
    #[value(alias = "x86_64", alias = "x86-64")]
    Amd64,
    /// aarch64 (AWS Graviton), cross-built and run under emulation.
    #[value(alias = "aarch64")]
    Arm64,
}

impl Arch {
    /// Debian's name, as in `linux-image-<arch>` and package file names.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// Debian's multiarch triple: where its libraries live (`/lib/<triple>/`).
    pub const fn multiarch(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-linux-gnu",
            Self::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// The name rpm gives it.
    pub const fn rpm_name(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64",
            Self::Arm64 => "aarch64",
        }
    }

    /// The Rust target triple, or `None` for the host's own (no `--target`, `target/release`).
    pub const fn rust_target(self) -> Option<&'static str> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some("aarch64-unknown-linux-gnu"),
        }
    }

    /// Where cargo writes this architecture's release binaries.
    pub fn release_dir(self) -> PathBuf {
        match self.rust_target() {
            None => cmd::target_dir().join("release"),
            Some(triple) => cmd::target_dir().join(triple).join("release"),
        }
    }

    /// `cargo build --release` arguments and environment for this architecture.
    pub fn cargo_build(self) -> Command {
        let mut cargo = cmd::cargo();
        cargo.current_dir(cmd::workspace_root()).args(["build", "--release"]);
        if let Some(triple) = self.rust_target() {
            cargo
                .args(["--target", triple])
                .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
                .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc");
        }
        cargo
    }

    /// The QEMU system emulator for a guest of this architecture.
    pub const fn qemu(self) -> &'static str {
        match self {
            Self::Amd64 => "qemu-system-x86_64",
            Self::Arm64 => "qemu-system-aarch64",
        }
    }

    /// QEMU's accelerator, CPU, machine and firmware. arm64: the `virt` machine booted through
    /// UEFI (AAVMF), as EC2's Graviton instances boot, so that the kernel finds SMBIOS (the EC2
    /// identity the agent checks) and ACPI, whose PCIe hot-plug the NIC scenarios use; the
    /// Neoverse N1 CPU is Graviton2's core (QEMU's `max` emulates pointer authentication, which
    /// makes the guest about three times slower).
    pub fn qemu_machine(self) -> Vec<&'static str> {
        match self {
            Self::Amd64 => vec!["-accel", "tcg", "-cpu", "max", "-smp", "2", "-machine", "q35"],
            Self::Arm64 => vec![
                "-accel",
                "tcg",
                "-cpu",
                "neoverse-n1",
                "-smp",
                "2",
                "-machine",
                "virt",
                "-drive",
                "if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
                // The firmware's variable store: its writes go to a temporary overlay.
                "-drive",
                "if=pflash,format=raw,snapshot=on,file=/usr/share/AAVMF/AAVMF_VARS.fd",
            ],
        }
    }

    /// The guest's console device (the kernel's `console=`).
    pub const fn console(self) -> &'static str {
        match self {
            Self::Amd64 => "ttyS0",
            Self::Arm64 => "ttyAMA0",
        }
    }

    /// The guest's end of the control channel (`vmctl`'s `VMCTL_DEVICE`).
    pub const fn control_device(self) -> &'static str {
        match self {
            Self::Amd64 => "/dev/ttyS1",
            Self::Arm64 => "/dev/hvc0",
        }
    }

    /// QEMU arguments that give the guest the control channel on chardev `ctl`: a second serial
    /// port on amd64; `virt` has only one PL011, so a virtio console (`hvc0`) on arm64.
    pub fn control_channel(self) -> Vec<&'static str> {
        match self {
            Self::Amd64 => vec!["-serial", "chardev:ctl"],
            Self::Arm64 => {
                vec!["-device", "virtio-serial-pci,id=vser", "-device", "virtconsole,chardev=ctl,id=ctlport"]
            }
        }
    }

    /// Debian packages a guest of this architecture needs here: its emulator (and firmware).
    pub const fn guest_packages(self) -> &'static [&'static str] {
        match self {
            Self::Amd64 => &["qemu-system-x86"],
            // ipxe-qemu: the NICs' option ROMs, which qemu-system-arm only recommends.
            Self::Arm64 => &["qemu-system-arm", "qemu-efi-aarch64", "ipxe-qemu"],
        }
    }

    /// Kernel modules a guest of this architecture loads besides the NIC drivers: arm64's control
    /// channel is a virtio console (a module in Debian's 6.1).
    pub const fn extra_modules(self) -> &'static [&'static str] {
        match self {
            Self::Amd64 => &[],
            Self::Arm64 => &["virtio_console"],
        }
    }

    /// `objdump` that reads this architecture's binaries (Debian's plain binutils reads only the
    /// host's).
    pub const fn objdump(self) -> &'static str {
        match self {
            Self::Amd64 => "objdump",
            Self::Arm64 => "aarch64-linux-gnu-objdump",
        }
    }
}

/// Fails unless `binary` is an ELF file for `arch` (a host binary in an arm64 guest would only
/// fail there, as "not found").
pub fn check_binary(binary: &Path, arch: Arch) -> Result<()> {
    let header = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    // e_machine, a little-endian u16 at byte 18: 62 is x86-64, 183 is AArch64.
    let machine = header.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let want = match arch {
        Arch::Amd64 => 62,
        Arch::Arm64 => 183,
    };
    if !header.starts_with(b"\x7fELF") || machine != Some(want) {
        bail!("{} is not an {} ELF binary", binary.display(), arch.name());
    }
    Ok(())
}
