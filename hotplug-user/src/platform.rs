//! Whether this host is an EC2 instance, told the way cloud-init's `ds-identify` tells it (its
//! `dscheck_Ec2`/`ec2_identify`): from the firmware's SMBIOS strings, which no local user can
//! change, never from the network. The IMDS client is only used where this says EC2 (unless
//! `imds.require_ec2 = false`): elsewhere 169.254.169.254 is somebody else's, or nobody's.
//!
//! Kernel files read (sysfs, present since Linux 2.6; `product_uuid` and `product_serial` are
//! readable by root only, which the agent is):
//! - `/sys/class/dmi/id/sys_vendor`: "Amazon EC2" on Nitro instances (and on metal);
//! - `/sys/hypervisor/uuid`: starts with "ec2" on Xen instances;
//! - `/sys/class/dmi/id/product_uuid` and `product_serial`: on Xen HVM instances both start with
//!   "ec2" and are equal (ds-identify asks for both, so that a random UUID starting with "ec2" --
//!   one VM in 4096 -- is not taken for EC2); AWS documents that some instances show the UUID's
//!   first field byte-swapped (`45E12AEC-…` for `EC2AE145-…`), which is read both ways.
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
    if read("sys/hypervisor/uuid").is_some_and(|uuid| starts_with_ec2(&uuid)) {
        return Platform::Ec2("/sys/hypervisor/uuid starts with \"ec2\"".into());
    }
    if let (Some(uuid), Some(serial)) =
        (read("sys/class/dmi/id/product_uuid"), read("sys/class/dmi/id/product_serial"))
    {
        let swapped = swap_first_field(&uuid);
        for (form, uuid) in [("", uuid.as_str()), (" (its first field byte-swapped)", swapped.as_str())] {
            if starts_with_ec2(uuid) && uuid.eq_ignore_ascii_case(&serial) {
                return Platform::Ec2(format!(
                    "DMI product_uuid{form} and product_serial are the same ec2 UUID"
                ));
            }
        }
    }
    Platform::Other(match vendor {
        Some(vendor) if !vendor.is_empty() => format!("DMI sys_vendor is {vendor:?}, no ec2 UUID"),
        _ => "no DMI vendor and no ec2 UUID".into(),
    })
}

fn starts_with_ec2(value: &str) -> bool {
    value.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ec2"))
}

/// `45E12AEC-DCD1-…` → `EC2AE145-DCD1-…`: the first field's four bytes in the other order.
fn swap_first_field(uuid: &str) -> String {
    match uuid.get(..8) {
        Some(field) if field.is_ascii() && uuid.get(8..9) == Some("-") => {
            let bytes: Vec<&str> = (0..4).rev().filter_map(|i| field.get(2 * i..2 * i + 2)).collect();
            format!("{}{}", bytes.concat(), &uuid[8..])
        }
        _ => uuid.to_owned(),
    }
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
        const UUID: &str = "sys/class/dmi/id/product_uuid";
        const SERIAL: &str = "sys/class/dmi/id/product_serial";
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("sys/class/dmi/id/sys_vendor", "Amazon EC2\n")], true),
            (&[("sys/hypervisor/uuid", "ec2a0b1c-0000\n")], true),
            (
                &[
                    ("sys/class/dmi/id/sys_vendor", "Xen\n"),
                    (UUID, "EC2E1916-9099-7CAF-FD21-012345ABCDEF\n"),
                    (SERIAL, "ec2e1916-9099-7caf-fd21-012345abcdef\n"),
                ],
                true,
            ),
            // AWS's documented little-endian example.
            (
                &[
                    (UUID, "45E12AEC-DCD1-B213-94ED-012345ABCDEF\n"),
                    (SERIAL, "EC2AE145-DCD1-B213-94ED-012345ABCDEF\n"),
                ],
                true,
            ),
            // A UUID alone that happens to start with ec2, or a serial alone, is not EC2.
            (
                &[
                    ("sys/class/dmi/id/sys_vendor", "QEMU\n"),
                    (UUID, "ec2d3c4b-0000-0000-0000-000000000000\n"),
                ],
                false,
            ),
            (&[(SERIAL, "ec2f1a2b-3c4d\n")], false),
            (&[("sys/class/dmi/id/sys_vendor", "QEMU\n"), (UUID, "5a1b2c3d-0000\n")], false),
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
