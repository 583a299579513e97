//! tracefs: where it is mounted, and the field layout of a tracepoint's records.
//!
//! Tracepoint records are not a stable ABI: fields move between kernel versions. The programs read
//! every field at an offset taken from `events/<system>/<event>/format` on the running kernel.
use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}): as a service, \
         is sys-kernel-tracing.mount active (systemctl status sys-kernel-tracing.mount)?"
    )]
    Mount(std::io::Error),
    #[error("tracepoint {system}:{event} does not exist on this kernel")]
    NoSuchTracepoint { system: String, event: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("tracepoint {system}:{event} has no field {field:?} (its format file lists: {known})")]
    NoSuchField { system: String, event: String, field: String, known: String },
}

/// One field of a tracepoint record, from its `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The field's name (the last word of its declaration, without array brackets).
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The tracefs mount point, mounting tracefs at `/sys/kernel/tracing` if nothing provides it.
pub fn find_or_mount() -> Result<PathBuf, TracefsError> {
    if let Some(found) = find_mounted() {
        return Ok(found);
    }
    let target = Path::new("/sys/kernel/tracing");
    mount_tracefs(target).map_err(TracefsError::Mount)?;
    tracing::info!(path = %target.display(), "mounted tracefs");
    Ok(target.to_path_buf())
}

fn find_mounted() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    for line in mounts.lines() {
        let mut words = line.split_whitespace();
        let (_, mount_point, fs_type) = (words.next()?, words.next()?, words.next()?);
        match fs_type {
            "tracefs" => return Some(PathBuf::from(mount_point)),
            "debugfs" if Path::new(mount_point).join("tracing/events").is_dir() => {
                return Some(Path::new(mount_point).join("tracing"));
            }
            _ => {}
        }
    }
    None
}

fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let target = CString::new(target.as_os_str().as_bytes())?;
    let fstype = c"tracefs";
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; data is NULL.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `system:event` exists on this kernel.
pub fn has_tracepoint(tracefs: &Path, system: &str, event: &str) -> bool {
    tracefs.join("events").join(system).join(event).is_dir()
}

/// The offset of `field` in `system:event` records on the running kernel.
pub fn field_offset(tracefs: &Path, system: &str, event: &str, field: &str) -> Result<u32, TracefsError> {
    let dir = tracefs.join("events").join(system).join(event);
    if !dir.is_dir() {
        return Err(TracefsError::NoSuchTracepoint { system: system.into(), event: event.into() });
    }
    let path = dir.join("format");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read { path, source })?;
    let fields = parse_format(&text);
    fields.iter().find(|f| f.name == field).map(|f| f.offset).ok_or_else(|| TracefsError::NoSuchField {
        system: system.into(),
        event: event.into(),
        field: field.into(),
        known: fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// Parses the `field:` lines of a tracepoint `format` file, e.g.
/// `field:__data_loc char[] name; offset:12; size:4; signed:0;` (fields separated by tabs).
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let mut name = None;
            let mut offset = None;
            let mut size = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(decl) = part.strip_prefix("field:") {
                    let last = decl.split_whitespace().last()?;
                    name = Some(last.split('[').next().unwrap_or(last).to_owned());
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            Some(Field { name: name?, offset: offset?, size: size? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim from Debian's 6.1 kernel.
    const MODULE_LOAD: &str = "name: module_load
ID: 470
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:unsigned int taints;	offset:8;	size:4;	signed:0;
	field:__data_loc char[] name;	offset:12;	size:4;	signed:0;

print fmt: \"%s %s\", __get_str(name), __print_flags(REC->taints, \"\", { (1UL << 0), \"P\" })
";

    const SYS_ENTER_DELETE_MODULE: &str = "name: sys_enter_delete_module
ID: 635
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
	field:const char * name_user;	offset:16;	size:8;	signed:0;
	field:unsigned int flags;	offset:24;	size:8;	signed:0;
";

    #[test]
    fn parses_data_loc_and_pointer_fields() {
        let fields = parse_format(MODULE_LOAD);
        assert_eq!(fields.len(), 6);
        assert_eq!(fields[5], Field { name: "name".into(), offset: 12, size: 4 });
        let fields = parse_format(SYS_ENTER_DELETE_MODULE);
        let name = fields.iter().find(|f| f.name == "name_user");
        assert_eq!(name, Some(&Field { name: "name_user".into(), offset: 16, size: 8 }));
    }

    #[test]
    fn field_offset_reads_a_tracefs_tree_and_names_missing_fields() -> Result<(), Box<dyn std::error::Error>>
    {
        let root = std::env::temp_dir().join(format!("hotplug-tracefs-test-{}", std::process::id()));
        let dir = root.join("events/module/module_load");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("format"), MODULE_LOAD)?;
        assert_eq!(field_offset(&root, "module", "module_load", "name")?, 12);
        let missing = field_offset(&root, "module", "module_load", "nope");
        assert!(
            matches!(missing, Err(TracefsError::NoSuchField { ref known, .. }) if known.contains("taints"))
        );
        assert!(matches!(
            field_offset(&root, "module", "module_free", "name"),
            Err(TracefsError::NoSuchTracepoint { .. })
        ));
        fs::remove_dir_all(&root)?;
        Ok(())
    }
}
