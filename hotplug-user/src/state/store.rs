//! Persistence of per-NIC state in the state directory: one JSON file per NIC, written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a restarted agent — even one killed
//! with SIGKILL while a driver was unloaded — still knows what to restore.
//!
//! The directory is the agent's alone: it must belong to the agent's user and be writable by
//! nobody else, and one agent at a time holds it (an exclusive lock on `lock` inside it, kept for
//! the process's life; a second agent is refused, naming the first one's pid). A file that does
//! not parse is moved aside (`*.corrupt`), never overwritten, and reported; so is one of a format
//! newer than this agent reads (`*.format-N`). The format itself is `state`'s.
use std::{
    fs,
    io::{Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state file {path} cannot be read ({source}); it was moved to {kept} and ignored")]
    Corrupt { path: PathBuf, kept: PathBuf, source: super::FormatError },
    #[error(
        "state file {path} is in format {found}, newer than this hotplug-agent reads ({max}): it was written by a newer release (a downgrade?); it was moved to {kept}, and this NIC starts afresh"
    )]
    Newer { path: PathBuf, kept: PathBuf, found: u64, max: u64 },
    #[error("cannot serialize the state for {path}: {source}")]
    Serialize { path: PathBuf, source: serde_json::Error },
    #[error(
        "state directory {path} is held by another hotplug-agent{holder}: stop it first (systemctl stop hotplug-agent), or give this one another state_dir"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "state directory {path} belongs to uid {owner}, not to this agent (uid {me}): choose a state_dir of the agent's own (e.g. /var/lib/hotplug)"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
}

pub struct Store {
    dir: PathBuf,
    /// Holds the directory's lock for as long as the store lives.
    _lock: fs::File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The file name for a key: letters and digits as they are, anything else as `_xx` (its bytes in
/// hex), so that two keys never share a file (`aa:bb` and `aa-bb` once did).
pub fn file_name(key: &str) -> String {
    let mut name = String::from("nic-");
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("_{byte:02x}"));
        }
    }
    name.push_str(".json");
    name
}

/// A value [`Store::load_all`] found, the file it came from, and the format it was in.
#[derive(Debug)]
pub struct Found<T> {
    pub path: PathBuf,
    pub value: T,
    pub format: u64,
}

/// `path`, or `path.1`, `path.2`, … : the first name no file has (what is kept aside is never
/// overwritten).
fn free_name(path: PathBuf) -> PathBuf {
    if !path.exists() {
        return path;
    }
    (1..u32::MAX)
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .find(|p| !p.exists())
        .unwrap_or(path)
}

/// What [`Store::load_all`] found: each value with its file, and the files it could not use.
pub type Loaded<T> = (Vec<Found<T>>, Vec<StoreError>);

impl Store {
    /// Opens the state directory, creating it with mode 0700 if missing, and takes its lock. An
    /// existing directory's mode is left as it is, but one that others may write to, or that
    /// belongs to another user, is refused.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let meta = fs::metadata(dir).map_err(io(dir))?;
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            let source = std::io::Error::other(format!(
                "mode {mode:o} lets other users write there; choose a root-only state_dir (e.g. /var/lib/hotplug)"
            ));
            return Err(StoreError::Io { path: dir.to_path_buf(), source });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(StoreError::Owner { path: dir.to_path_buf(), owner: meta.uid(), me });
        }
        let lock_path = dir.join("lock");
        let mut lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a file descriptor this function owns; LOCK_NB makes it return at once.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let holder = pid.trim().parse::<u32>().map(|p| format!(" (pid {p})")).unwrap_or_default();
                return Err(StoreError::Locked { path: dir.to_path_buf(), holder });
            }
            return Err(StoreError::Io { path: lock_path, source: error });
        }
        // The holder's pid, for the message a second agent gives.
        lock.set_len(0).map_err(io(&lock_path))?;
        lock.rewind().map_err(io(&lock_path))?;
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(Self { dir: dir.to_path_buf(), _lock: lock })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    pub fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let bytes =
            super::encode(value).map_err(|source| StoreError::Serialize { path: path.clone(), source })?;
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(&bytes)?;
                file.sync_all()
            });
        if let Err(source) = written {
            // A full disk, say: the previous file stays as it was, and no partial one is left.
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { path: tmp, source });
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Every stored value with the file it came from, and the problems met; a file that does not parse is moved aside
    /// (`NAME.corrupt`, kept for the operator) and reported, never deleted or overwritten.
    pub fn load_all<T: DeserializeOwned>(&self) -> Result<Loaded<T>, StoreError> {
        let mut values = Vec::new();
        let mut problems = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let is_state = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nic-") && n.ends_with(".json"));
            if !is_state {
                continue;
            }
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(source) => {
                    problems.push(StoreError::Io { path, source });
                    continue;
                }
            };
            match super::decode(&bytes) {
                Ok(super::Decoded { nic, format }) => values.push(Found { path, value: nic, format }),
                Err(error) => {
                    let kept = free_name(match &error {
                        super::FormatError::Newer { found } => {
                            path.with_extension(format!("json.format-{found}"))
                        }
                        _ => path.with_extension("json.corrupt"),
                    });
                    if let Err(error) = fs::rename(&path, &kept) {
                        problems.push(StoreError::Io { path: path.clone(), source: error });
                    }
                    problems.push(match error {
                        super::FormatError::Newer { found } => {
                            StoreError::Newer { path, kept, found, max: super::FORMAT }
                        }
                        source => StoreError::Corrupt { path, kept, source },
                    });
                }
            }
        }
        Ok((values, problems))
    }

    /// A file loaded under an older naming: saved again under the current name first, and only
    /// then removed (a crash in between loses nothing). Where a file of the current name exists
    /// as well, that one is the newer: the old one is superseded and removed unread. A file of
    /// the current name in an older format is written again in the current one.
    pub fn migrate<T: Serialize>(&self, key: &str, found: &Found<T>) -> Result<Migrated, StoreError> {
        let (loaded_from, value) = (found.path.as_path(), &found.value);
        let current = self.path(key);
        if loaded_from == current {
            if found.format == super::FORMAT {
                return Ok(Migrated::Current);
            }
            // The file as the older release wrote it stays beside (`*.json.format-N`): an
            // operator who goes back to that release moves it back.
            let old = free_name(current.with_extension(format!("json.format-{}", found.format)));
            fs::copy(&current, &old).map_err(io(&old))?;
            self.save(key, value)?;
            return Ok(Migrated::Rewritten);
        }
        let outcome = if current.exists() {
            Migrated::Superseded
        } else {
            self.save(key, value)?;
            Migrated::Renamed
        };
        fs::remove_file(loaded_from).map_err(io(loaded_from))?;
        Ok(outcome)
    }
}

/// What [`Store::migrate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migrated {
    /// The file already had the current name and format.
    Current,
    /// The file had the current name, in an older format: written again in the current one.
    Rewritten,
    /// Saved under the current name, the old file removed.
    Renamed,
    /// A file of the current name exists: the old one was removed, and is not to be used.
    Superseded,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hotplug-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_atomically_loads_and_moves_corrupt_files_aside() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp("save");
        let store = Store::open(&dir)?;
        store.save("52:54:00:12:34:11", &vec![1, 2, 3])?;
        store.save("52:54:00:12:34:12", &vec![4])?;
        fs::write(dir.join("nic-broken.json"), b"{not json")?;
        let (values, problems): (Vec<Found<Vec<i32>>>, _) = store.load_all()?;
        assert!(values.iter().all(|f| f.format == super::super::FORMAT));
        let mut values: Vec<Vec<i32>> = values.into_iter().map(|f| f.value).collect();
        values.sort();
        assert_eq!(values, vec![vec![1, 2, 3], vec![4]]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("nic-broken.json"), "{}", problems[0]);
        assert!(!dir.join("nic-broken.json").exists(), "moved aside, so that nothing overwrites it");
        assert_eq!(fs::read(dir.join("nic-broken.json.corrupt"))?, b"{not json", "kept for the operator");
        store.remove("52:54:00:12:34:12")?;
        store.remove("52:54:00:12:34:12")?;
        let (values, _): (Vec<Found<Vec<i32>>>, _) = store.load_all()?;
        assert_eq!(values.len(), 1);
        drop(store);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn two_keys_never_share_a_file() {
        assert_ne!(file_name("aa:bb:cc:dd:ee:ff"), file_name("aa-bb-cc-dd-ee-ff"));
        assert_ne!(file_name("aa:bb@eth0.1"), file_name("aa:bb@eth0_1"));
        assert_eq!(file_name("52:54:00:12:34:11"), "nic-52_3a54_3a00_3a12_3a34_3a11.json");
        assert!(!file_name("../../etc/passwd").contains('/'), "a key never leaves the directory");
    }

    #[test]
    fn one_agent_at_a_time() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp("lock");
        let first = Store::open(&dir)?;
        match Store::open(&dir) {
            Err(StoreError::Locked { holder, .. }) => {
                assert_eq!(holder, format!(" (pid {})", std::process::id()), "names the holder");
            }
            Err(other) => panic!("not refused as locked: {other}"),
            Ok(_) => panic!("a second store opened the same directory"),
        }
        drop(first);
        let again = Store::open(&dir);
        assert!(again.is_ok(), "the lock goes with its holder");
        drop(again);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn older_formats_are_read_and_written_again_and_newer_ones_moved_aside(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp("formats");
        let store = Store::open(&dir)?;
        let key = "52:54:00:12:34:11";
        // Release 0.1.0: the value itself, no envelope (an object: a NIC's fields).
        fs::write(dir.join(file_name(key)), br#"{"a": 1}"#)?;
        fs::write(dir.join("nic-future.json"), br#"{"format": 99, "nic": {"a": 2}}"#)?;
        let (values, problems): (Vec<Found<std::collections::BTreeMap<String, u32>>>, _) =
            store.load_all()?;
        assert_eq!(values.len(), 1, "{values:?}");
        assert_eq!(values[0].format, super::super::FORMAT_0_1_0);
        assert_eq!(values[0].value.get("a"), Some(&1));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(matches!(&problems[0], StoreError::Newer { found: 99, .. }), "{}", problems[0]);
        assert!(problems[0].to_string().contains("newer"), "{}", problems[0]);
        assert!(dir.join("nic-future.json.format-99").exists(), "kept for the newer agent, not overwritten");
        fs::write(dir.join("nic-future.json"), br#"{"format": 99, "nic": {"a": 3}}"#)?;
        let _: Loaded<std::collections::BTreeMap<String, u32>> = store.load_all()?;
        assert_eq!(fs::read(dir.join("nic-future.json.format-99"))?, br#"{"format": 99, "nic": {"a": 2}}"#);
        assert!(
            dir.join("nic-future.json.format-99.1").exists(),
            "a second one kept under a name of its own"
        );
        assert!(!dir.join("nic-future.json").exists());
        assert_eq!(store.migrate(key, &values[0])?, Migrated::Rewritten);
        let kept = dir.join(format!("{}.format-0", file_name(key)));
        assert_eq!(fs::read(&kept)?, br#"{"a": 1}"#, "the older release's file kept beside, as it was");
        let text = fs::read_to_string(dir.join(file_name(key)))?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!(value["format"], super::super::FORMAT);
        assert_eq!(value["nic"]["a"], 1);
        let (again, _): (Vec<Found<std::collections::BTreeMap<String, u32>>>, _) = store.load_all()?;
        assert_eq!(store.migrate(key, &again[0])?, Migrated::Current);
        drop(store);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
