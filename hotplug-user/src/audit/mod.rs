//! The audit trail: every module unload and load, every NIC removal and registration with its
//! cause and the task that made it, what the agent decided and how it ended. Each entry goes to
//! the log (with structured fields: `HOTPLUG_AUDIT=…` in the journal) and, as one JSON line, to
//! `audit.jsonl` in the state directory, rotated at [`MAX_FILE_BYTES`] with [`KEPT_FILES`]
//! files in all; `hotplug-agent history` reads them back.
//!
//! An output, like the snapshot store: it decides nothing, and a write that fails (a full disk,
//! a read-only state directory) never stops the agent: it is said once, the journal still gets
//! the entry, and the file is tried again with the next one.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::classify::sanitize;

pub mod actor;
pub mod sink;

pub use actor::Actor;
pub use sink::Sink;

/// The current file's name in the state directory; rotated ones are `audit.jsonl.1` (newest) to
/// `audit.jsonl.N`.
pub const FILE_NAME: &str = "audit.jsonl";
/// A file is rotated before it would grow past this.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The current file and the rotated ones: at most this many MiB of trail on disk.
pub const KEPT_FILES: usize = 4;

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("cannot read the audit trail {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
}

/// What an entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A module unload or load (its syscall, as the kernel saw it).
    Module,
    /// A NIC removal or registration, and the agent's decision on it.
    Nic,
    /// How a restore ended.
    Restore,
    /// How an attach (IMDS look-up and configuration) ended.
    Attach,
    /// A NIC handed to the detach path.
    Detach,
    /// A guided driver reload (`hotplug-agent reload`) and its report.
    Reload,
}

/// One entry of the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The same, as RFC 3339 UTC (for people reading the file).
    pub time: String,
    pub kind: Kind,
    /// `unload`, `load`, `removal`, `registration`, `restored`, ...
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The kernel's cause for a NIC event (`driver-unload`, `hot-unplug`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// `kernel` or `heuristic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The task that acted, as the kernel and /proc described it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Actor>,
    /// What the agent decided (a NIC event) or did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// How it ended (`ok`, `failed: …`, `restored in 42 ms`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

impl Entry {
    /// An entry stamped now.
    pub fn now(kind: Kind, action: &str) -> Self {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            time_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch).to_string(),
            kind,
            action: action.to_owned(),
            mac: None,
            interface: None,
            module: None,
            cause: None,
            source: None,
            task: None,
            decision: None,
            outcome: None,
        }
    }

    /// One line for people: what, who, decision, outcome.
    pub fn summary(&self) -> String {
        let mut line = format!("{:?} {}", self.kind, self.action).to_lowercase();
        for (label, value) in [
            ("", self.interface.as_deref()),
            ("", self.mac.as_deref()),
            ("module ", self.module.as_deref()),
            ("cause ", self.cause.as_deref()),
        ] {
            if let Some(value) = value {
                line.push_str(&format!(" {label}{value}"));
            }
        }
        if let Some(task) = &self.task {
            line.push_str(&format!(" by {}", task.describe()));
        }
        if let Some(decision) = &self.decision {
            line.push_str(&format!(": {decision}"));
        }
        if let Some(outcome) = &self.outcome {
            line.push_str(&format!(" => {outcome}"));
        }
        line
    }
}

/// The entry of a module event: `unload` (the `delete_module` call began), `unloaded` (it
/// returned, with its result), `load`. A module's free (the kernel's own step) has none.
/// Its task is the kernel's (`Sink::record_by` completes it from `/proc`).
pub fn module_entry(event: &crate::kernel::ModuleLifecycle) -> Option<Entry> {
    use crate::kernel::ModuleEventKind;
    let (action, outcome) = match event.kind {
        ModuleEventKind::UnloadBegin => ("unload", None),
        ModuleEventKind::UnloadEnd => match event.ret {
            Some(0) | None => ("unloaded", Some("ok".to_owned())),
            Some(ret) => ("unloaded", Some(format!("failed: {}", std::io::Error::from_raw_os_error(-ret)))),
        },
        ModuleEventKind::Load => ("load", Some("ok".to_owned())),
        ModuleEventKind::Free => return None,
    };
    let mut entry = Entry::now(Kind::Module, action);
    entry.module = Some(event.module.clone());
    entry.outcome = outcome;
    Some(entry)
}

/// The writer: the journal gets every entry, the file every entry it can take.
pub struct Trail {
    dir: PathBuf,
    file: Option<File>,
    size: u64,
    /// The last write failed (said once; said again when writing works again).
    failing: bool,
}

impl Trail {
    /// The trail in `dir` (the state directory). Opening happens with the first entry.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), file: None, size: 0, failing: false }
    }

    /// Logs the entry and appends it to the file (rotating first when it would grow too big).
    pub fn record(&mut self, entry: &Entry) {
        let task = entry.task.as_ref();
        tracing::info!(
            target: "hotplug::audit",
            audit = ?entry.kind,
            action = %entry.action,
            mac = entry.mac.as_deref().unwrap_or(""),
            interface = entry.interface.as_deref().unwrap_or(""),
            module = entry.module.as_deref().unwrap_or(""),
            cause = entry.cause.as_deref().unwrap_or(""),
            source = entry.source.as_deref().unwrap_or(""),
            pid = task.map_or(0, |t| t.pid),
            uid = task.and_then(|t| t.uid).map_or(-1, i64::from),
            comm = task.map_or("", |t| t.comm.as_str()),
            ppid = task.and_then(|t| t.ppid).unwrap_or(0),
            decision = entry.decision.as_deref().unwrap_or(""),
            outcome = entry.outcome.as_deref().unwrap_or(""),
            "audit: {}",
            entry.summary()
        );
        match self.append(entry) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(dir = %self.dir.display(), "audit trail: writing again");
            }
            Ok(()) => {}
            Err(error) if !self.failing => {
                self.failing = true;
                self.file = None;
                tracing::warn!(dir = %self.dir.display(), %error, "audit trail: cannot write {FILE_NAME}; entries go to the log only until it can (full disk? read-only state directory?)");
            }
            Err(_) => self.file = None,
        }
    }

    fn append(&mut self, entry: &Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
        line.push('\n');
        let bytes = line.len() as u64;
        if self.file.is_none() {
            let (file, size) = open_for_append(&self.dir.join(FILE_NAME))?;
            self.size = size;
            self.file = Some(file);
        }
        if self.size + bytes > MAX_FILE_BYTES && self.size > 0 {
            self.file = None;
            rotate(&self.dir)?;
            let (file, size) = open_for_append(&self.dir.join(FILE_NAME))?;
            self.size = size;
            self.file = Some(file);
        }
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        // One write of the whole line (O_APPEND): a reader never sees half of one, and a crash
        // leaves at most one torn last line, which `read` skips.
        file.write_all(line.as_bytes())?;
        self.size += bytes;
        Ok(())
    }
}

/// Opens the trail for appending (never through a symlink), and ends a line a crash or a full
/// disk left torn, so that the next entry starts a line of its own.
fn open_for_append(path: &Path) -> std::io::Result<(File, u64)> {
    use std::io::{Read as _, Seek as _};
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut size = file.metadata()?.len();
    if size > 0 {
        let mut last = [0u8];
        file.seek(std::io::SeekFrom::End(-1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
            size += 1;
        }
    }
    Ok((file, size))
}

/// `audit.jsonl.{N-1}` → `.N` … `audit.jsonl` → `.1`; the oldest falls off.
fn rotate(dir: &Path) -> std::io::Result<()> {
    for n in (1..KEPT_FILES).rev() {
        let from = if n == 1 { dir.join(FILE_NAME) } else { dir.join(format!("{FILE_NAME}.{}", n - 1)) };
        let to = dir.join(format!("{FILE_NAME}.{n}"));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// What [`read`] found.
#[derive(Debug, Default)]
pub struct History {
    /// Oldest first.
    pub entries: Vec<Entry>,
    /// Lines that were not entries (a torn last line after a crash, an edit by hand).
    pub unreadable_lines: usize,
}

/// Every entry at or after `since_ms` (all without it), oldest first, from the rotated files
/// and the current one. A missing trail is an empty history.
pub fn read(dir: &Path, since_ms: Option<u64>) -> Result<History, AuditError> {
    let mut history = History::default();
    let mut files: Vec<PathBuf> =
        (1..KEPT_FILES).rev().map(|n| dir.join(format!("{FILE_NAME}.{n}"))).collect();
    files.push(dir.join(FILE_NAME));
    for path in files {
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::Read { path, source }),
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| AuditError::Read { path: path.clone(), source })?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Entry>(&line) {
                Ok(entry) if since_ms.is_none_or(|since| entry.time_ms >= since) => {
                    history.entries.push(sanitized(entry));
                }
                Ok(_) => {}
                Err(_) => history.unreadable_lines += 1,
            }
        }
    }
    Ok(history)
}

/// The file is the agent's, but is printed to terminals: whatever it holds is shown with its
/// control characters escaped.
fn sanitized(mut entry: Entry) -> Entry {
    let clean = |s: &mut String| *s = sanitize(s);
    clean(&mut entry.action);
    clean(&mut entry.time);
    for field in
        [&mut entry.mac, &mut entry.interface, &mut entry.module, &mut entry.cause, &mut entry.source]
    {
        if let Some(value) = field.as_mut() {
            clean(value);
        }
    }
    for field in [&mut entry.decision, &mut entry.outcome] {
        if let Some(value) = field.as_mut() {
            clean(value);
        }
    }
    if let Some(task) = entry.task.as_mut() {
        task.sanitize();
    }
    entry
}

/// `--since`: a duration back from now (`90s`, `10m`, `2h`, `1day`) or an RFC 3339 time
/// (`2026-11-29T22:00:00Z`); milliseconds since the epoch.
pub fn parse_since(text: &str, now: SystemTime) -> Result<u64, String> {
    let at = match humantime::parse_duration(text) {
        Ok(ago) => now.checked_sub(ago).unwrap_or(UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(text).map_err(|_| {
            format!("--since {text:?}: neither a duration (10m, 2h, 1day) nor a time (2026-11-29T22:00:00Z)")
        })?,
    };
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Ok(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
