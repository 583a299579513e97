//! Whether this host is an EC2 instance, told the way cloud-init's `ds-identify` tells it (its
//! `dscheck_Ec2`/`ec2_identify`): from the firmware's SMBIOS strings, which no local user can
//! change, never from the network. The IMDS client is only used where this says EC2 (unless
//! `imds.require_ec2 = false`): elsewhere 169.254.169.254 is somebody else's, or nobody's.
//!
//! Kernel files read (sysfs, present since Linux 2.6; `product_uuid` and `product_serial` are
//! readable by root only, which the agent is):
//! - `/sys/class/dmi/id/sys_vendor`: "Amazon EC2" on Nitro instances (and on metal);
//! - `/sys/class/dmi/id/product_uuid`, `product_serial`: start with "ec2" on Xen instances;
//! - `/sys/hypervisor/uuid`: starts with "ec2" on Xen PV instances without DMI.
use std::path::{Path, PathBuf};

/// What the firmware says about the platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Platform {
    /// EC2, with the evidence (which file said what).
    Ec2(String),
    /// Not EC2, with what was seen instead.
    Other(String),
}

impl Platform {
    pub const fn is_ec2(&self) -> bool {
        matches!(self, Self::Ec2(_))
    }
}

/// Reads the platform from the files under `root` (`/` on a host).
pub fn detect(root: &Path) -> Platform {
    let read = |path: &str| -> Option<String> {
        let full: PathBuf = root.join(path);
        // Firmware strings are short; a longer file is not one.
        std::fs::read(&full)
            .ok()
            .filter(|b| b.len() <= 256)
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
    };
    let vendor = read("sys/class/dmi/id/sys_vendor");
    if vendor.as_deref() == Some("Amazon EC2") {
        return Platform::Ec2("DMI sys_vendor is \"Amazon EC2\"".into());
    }
    for path in ["sys/class/dmi/id/product_uuid", "sys/class/dmi/id/product_serial", "sys/hypervisor/uuid"] {
        if let Some(value) = read(path) {
            if value.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ec2")) {
                return Platform::Ec2(format!("/{path} starts with \"ec2\""));
            }
        }
    }
    Platform::Other(match vendor {
        Some(vendor) if !vendor.is_empty() => format!("DMI sys_vendor is {vendor:?}, no ec2 UUID"),
        _ => "no DMI vendor and no ec2 UUID".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: usize, files: &[(&str, &str)]) -> std::io::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("hotplug-platform-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, content) in files {
            let full = dir.join(path);
            std::fs::create_dir_all(full.parent().unwrap_or(&dir))?;
            std::fs::write(full, content)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[test]
    fn ec2_is_told_by_vendor_or_uuid_like_ds_identify() -> std::io::Result<()> {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("sys/class/dmi/id/sys_vendor", "Amazon EC2\n")], true),
            (
                &[
                    ("sys/class/dmi/id/sys_vendor", "Xen\n"),
                    ("sys/class/dmi/id/product_uuid", "EC2E1916-9099-7CAF-FD21-012345ABCDEF\n"),
                ],
                true,
            ),
            (&[("sys/class/dmi/id/product_serial", "ec2f1a2b-3c4d\n")], true),
            (&[("sys/hypervisor/uuid", "ec2a0b1c-0000\n")], true),
            (
                &[
                    ("sys/class/dmi/id/sys_vendor", "QEMU\n"),
                    ("sys/class/dmi/id/product_uuid", "5a1b2c3d-0000\n"),
                ],
                false,
            ),
            // A vendor string that only contains the name is not the name.
            (&[("sys/class/dmi/id/sys_vendor", "Not Amazon EC2\n")], false),
            (&[], false),
        ];
        for (n, (files, ec2)) in cases.iter().enumerate() {
            let root = host(n, files)?;
            let platform = detect(&root);
            assert_eq!(platform.is_ec2(), *ec2, "{files:?}: {platform:?}");
            std::fs::remove_dir_all(root)?;
        }
        let root = host(99, &[("sys/class/dmi/id/sys_vendor", "QEMU\n")])?;
        assert_eq!(detect(&root), Platform::Other("DMI sys_vendor is \"QEMU\", no ec2 UUID".into()));
        std::fs::remove_dir_all(root)
    }
}
