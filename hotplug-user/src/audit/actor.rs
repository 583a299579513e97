//! The task behind an event, as far as it can still be read: the kernel's record gives the pid,
//! uid, `comm` and (with BTF) the parent's pid; `/proc` adds the command line and the parent's
//! name while the task lives. A `modprobe` is often gone by the time its record is read: then
//! only the kernel's part is there.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::classify::{sanitize, Task};

/// The most of a command line kept (the rest is cut, with `…`).
const CMDLINE_MAX: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_comm: Option<String>,
    /// Arguments joined by spaces, read from `/proc/PID/cmdline` when the task was still there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl Actor {
    /// The kernel's task only, nothing read from `/proc`.
    pub fn from_kernel(task: &Task) -> Self {
        Self {
            pid: task.pid,
            uid: task.uid,
            comm: task.comm.clone(),
            ppid: task.ppid,
            parent_comm: None,
            cmdline: None,
        }
    }

    /// The kernel's task, completed from `/proc` on a thread of its own: a read of
    /// `/proc/PID/cmdline` takes the task's memory-map lock and reads its memory, which a
    /// process stuck in the kernel (or paging from its own FUSE mount) can hold up for ever.
    /// This waits at most [`READ_LIMIT`], then gives the kernel's part alone; a read that never
    /// returns keeps its thread, not the runtime's one blocking thread (file I/O everywhere
    /// else), and once [`MAX_READERS`] are stuck, `/proc` is no longer read.
    pub async fn read_soon(task: &Task, event_ns: u64) -> Self {
        Self::read_soon_in(std::path::PathBuf::from("/proc"), boot_ns(), task, event_ns).await
    }

    /// [`Actor::read_soon`] with `/proc` at `proc` and `boot_ns` as [`Actor::read_from`] takes.
    async fn read_soon_in(proc: std::path::PathBuf, boot_ns: u64, task: &Task, event_ns: u64) -> Self {
        use std::sync::atomic::Ordering;
        if READERS.fetch_add(1, Ordering::SeqCst) >= MAX_READERS {
            READERS.fetch_sub(1, Ordering::SeqCst);
            return Self::from_kernel(task);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let owned = task.clone();
        let spawned = std::thread::Builder::new().name("hotplug-proc".to_owned()).spawn(move || {
            // Given back however the read ends (a panic included).
            struct Slot;
            impl Drop for Slot {
                fn drop(&mut self) {
                    READERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _slot = Slot;
            let _ = tx.send(Self::read_from(&proc, &owned, event_ns, boot_ns));
        });
        if spawned.is_err() {
            READERS.fetch_sub(1, Ordering::SeqCst);
            return Self::from_kernel(task);
        }
        match tokio::time::timeout(READ_LIMIT, rx).await {
            Ok(Ok(actor)) => actor,
            _ => Self::from_kernel(task),
        }
    }

    /// As [`Actor::read_soon`], with `/proc` at `proc`, `boot_ns` the clock of `event_ns`
    /// (CLOCK_MONOTONIC) at boot, in the same units as `/proc/PID/stat`'s start time. A pid is
    /// trusted only while it is still the same task: the thread `/proc/PID/task/TID/comm`
    /// names the kernel's `comm`, its real uid is the kernel's uid, and it started before the
    /// event; a task that exited, its pid reused by another (even one that named itself the
    /// same), lends nothing. The parent is named only if it too started before the event.
    pub fn read_from(proc: &Path, task: &Task, event_ns: u64, boot_ns: u64) -> Self {
        let mut actor = Self::from_kernel(task);
        let dir = proc.join(task.pid.to_string());
        let started_before = |dir: &Path| {
            std::fs::read_to_string(dir.join("stat"))
                .ok()
                .and_then(|s| stat_start_ns(&s))
                .is_some_and(|start| start.saturating_sub(boot_ns) <= event_ns)
        };
        let comm_matches = std::fs::read_to_string(dir.join("task").join(task.tid.to_string()).join("comm"))
            .is_ok_and(|comm| sanitize(comm.trim_end_matches('\n')) == task.comm);
        let uid_matches = std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| status_uid(&s))
            .is_some_and(|uid| task.uid.is_none_or(|kernel| kernel == uid));
        if comm_matches && uid_matches && started_before(&dir) {
            actor.cmdline = read_cmdline(&dir.join("cmdline"));
            if actor.ppid.is_none() {
                actor.ppid = std::fs::read_to_string(dir.join("stat")).ok().and_then(|s| stat_ppid(&s));
            }
        }
        if let Some(ppid) = actor.ppid.filter(|&p| p != 0) {
            let parent = proc.join(ppid.to_string());
            if started_before(&parent) {
                actor.parent_comm = std::fs::read_to_string(parent.join("comm"))
                    .ok()
                    .map(|c| sanitize(c.trim_end_matches('\n')));
            }
        }
        actor
    }

    /// `modprobe[812] uid 0 (parent bash[790]): modprobe -r e1000e`.
    pub fn describe(&self) -> String {
        let mut text = format!("{}[{}]", self.comm, self.pid);
        if let Some(uid) = self.uid {
            text.push_str(&format!(" uid {uid}"));
        }
        match (self.ppid, &self.parent_comm) {
            (Some(ppid), Some(comm)) => text.push_str(&format!(" (parent {comm}[{ppid}])")),
            (Some(ppid), None) => text.push_str(&format!(" (parent {ppid})")),
            _ => {}
        }
        if let Some(cmdline) = &self.cmdline {
            text.push_str(&format!(" `{cmdline}`"));
        }
        text
    }

    /// Escapes control characters in every text (read back from a file anyone with access to
    /// the state directory could have edited).
    pub fn sanitize(&mut self) {
        self.comm = sanitize(&self.comm);
        for field in [&mut self.parent_comm, &mut self.cmdline] {
            if let Some(value) = field.as_mut() {
                *value = sanitize(value);
            }
        }
    }
}

/// `/proc` reads under way (or stuck) at once, and the most allowed.
static READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_READERS: usize = 4;

/// How long the audit trail's writer waits for `/proc` (see [`Actor::read_soon`]).
const READ_LIMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// At most this much of a command line is read (the rest is never looked at).
const CMDLINE_READ_MAX: u64 = 4 * CMDLINE_MAX as u64;

fn read_cmdline(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    std::fs::File::open(path).ok()?.take(CMDLINE_READ_MAX).read_to_end(&mut raw).ok()?;
    cmdline(&raw)
}

/// Clock ticks per second of `/proc/PID/stat`'s start time.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// CLOCK_MONOTONIC at boot, in ns: 0 (the kernel starts both clocks at boot; a suspended host's
/// start times run ahead of the monotonic clock, which only makes the check stricter).
fn boot_ns() -> u64 {
    0
}

/// The 22nd field of `/proc/PID/stat` (start time after boot, clock ticks), in ns.
fn stat_start_ns(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    ticks.checked_mul(1_000_000_000 / clock_ticks())
}

/// The real uid in `/proc/PID/status` (`Uid:\treal\teffective\t…`).
fn status_uid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// `/proc/PID/cmdline`: NUL-separated arguments, joined by spaces, control characters escaped,
/// cut at [`CMDLINE_MAX`]. Empty (a kernel thread, a zombie) is none.
fn cmdline(raw: &[u8]) -> Option<String> {
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| sanitize(&String::from_utf8_lossy(a)))
        .collect();
    if args.is_empty() {
        return None;
    }
    let mut line = args.join(" ");
    if line.len() > CMDLINE_MAX {
        let mut cut = CMDLINE_MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    Some(line)
}

/// The fourth field of `/proc/PID/stat`, after the `(comm)` that may hold spaces and `)`.
fn stat_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: u32, comm: &str) -> Task {
        Task { pid, tid: pid, comm: comm.to_owned(), uid: Some(1000), ppid: None }
    }

    /// A fake /proc: (pid, comm, cmdline, stat, uid); every task's one thread is the pid.
    fn fake_proc(entries: &[(u32, &str, &[u8], &str, u32)]) -> std::io::Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        for (pid, comm, cmdline, stat, uid) in entries {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(p.join("task").join(pid.to_string()))?;
            std::fs::write(p.join("comm"), format!("{comm}\n"))?;
            std::fs::write(p.join("task").join(pid.to_string()).join("comm"), format!("{comm}\n"))?;
            std::fs::write(p.join("cmdline"), cmdline)?;
            std::fs::write(p.join("stat"), stat)?;
            std::fs::write(p.join("status"), format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"))?;
        }
        Ok(dir)
    }

    /// A stat line whose start time is `start_ticks`.
    fn stat(pid: u32, comm: &str, ppid: u32, start_ticks: u64) -> String {
        format!("{pid} ({comm}) S {ppid} {pid} {ppid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start_ticks} 0 0")
    }

    /// An event 10 s after boot; tasks started at 5 s (500 ticks) came before it.
    const EVENT_NS: u64 = 10_000_000_000;

    #[tokio::test]
    async fn a_proc_read_that_never_returns_holds_up_nothing() -> std::io::Result<()> {
        // A command line that never reads (a FIFO nobody writes: open(2) blocks for good, as a
        // read of argv paged from a hung FUSE file does).
        let proc = fake_proc(&[(812, "modprobe", b"", &stat(812, "modprobe", 1, 500), 1000)])?;
        let fifo = proc.path().join("812").join("cmdline");
        std::fs::remove_file(&fifo)?;
        let path =
            std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let started = std::time::Instant::now();
        for _ in 0..MAX_READERS {
            let actor =
                Actor::read_soon_in(proc.path().to_owned(), 0, &task(812, "modprobe"), EVENT_NS).await;
            assert_eq!(actor, Actor::from_kernel(&task(812, "modprobe")), "the kernel's part alone");
        }
        assert!(started.elapsed() < READ_LIMIT * u32::try_from(MAX_READERS + 2).unwrap_or(u32::MAX));
        // Every reader is stuck now: the next one is not even started.
        let started = std::time::Instant::now();
        let actor = Actor::read_soon_in(proc.path().to_owned(), 0, &task(812, "modprobe"), EVENT_NS).await;
        assert_eq!(actor.cmdline, None);
        assert!(started.elapsed() < READ_LIMIT / 2, "{:?}", started.elapsed());
        // The stuck threads are let go (the FIFO opened for writing ends their open and read).
        let _writer = std::fs::OpenOptions::new().write(true).open(&fifo)?;
        Ok(())
    }

    #[test]
    fn a_live_task_gets_its_command_line_and_parent() -> std::io::Result<()> {
        let proc = fake_proc(&[
            (812, "modprobe", b"modprobe\0-r\0e1000e\0", &stat(812, "modprobe", 790, 500), 0),
            (790, "bash", b"-bash\0", &stat(790, "bash", 1, 100), 0),
        ])?;
        let mut root = task(812, "modprobe");
        root.uid = Some(0);
        let actor = Actor::read_from(proc.path(), &root, EVENT_NS, 0);
        assert_eq!(actor.cmdline.as_deref(), Some("modprobe -r e1000e"));
        assert_eq!(actor.ppid, Some(790));
        assert_eq!(actor.parent_comm.as_deref(), Some("bash"));
        assert_eq!(actor.describe(), "modprobe[812] uid 0 (parent bash[790]) `modprobe -r e1000e`");
        Ok(())
    }

    #[test]
    fn a_reused_pid_lends_nothing() -> std::io::Result<()> {
        // pid 812 is now another program: its command line is not the modprobe's.
        let proc = fake_proc(&[(812, "sshd", b"sshd: root\0", &stat(812, "sshd", 1, 500), 1000)])?;
        let actor = Actor::read_from(proc.path(), &task(812, "modprobe"), EVENT_NS, 0);
        assert_eq!(actor.cmdline, None);
        assert_eq!(actor.ppid, None);
        assert_eq!(actor.describe(), "modprobe[812] uid 1000");
        Ok(())
    }

    #[test]
    fn an_impostor_with_the_same_name_lends_nothing() -> std::io::Result<()> {
        // Same comm (prctl(PR_SET_NAME) is anyone's), but another uid: not root's modprobe.
        let proc = fake_proc(&[(812, "modprobe", b"evil\0", &stat(812, "modprobe", 1, 500), 1000)])?;
        let mut root = task(812, "modprobe");
        root.uid = Some(0);
        assert_eq!(Actor::read_from(proc.path(), &root, EVENT_NS, 0).cmdline, None);
        // Same comm and uid, but started after the event: a new process on a reused pid.
        let proc = fake_proc(&[(812, "modprobe", b"later\0", &stat(812, "modprobe", 1, 5000), 1000)])?;
        assert_eq!(Actor::read_from(proc.path(), &task(812, "modprobe"), EVENT_NS, 0).cmdline, None);
        Ok(())
    }

    #[test]
    fn the_kernels_parent_wins_and_a_gone_parent_is_a_number() -> std::io::Result<()> {
        let proc = fake_proc(&[])?;
        let mut kernel_task = task(812, "modprobe");
        kernel_task.ppid = Some(4242);
        let actor = Actor::read_from(proc.path(), &kernel_task, EVENT_NS, 0);
        assert_eq!(actor.describe(), "modprobe[812] uid 1000 (parent 4242)");
        Ok(())
    }

    #[test]
    fn stat_and_cmdline_survive_hostile_names() {
        assert_eq!(stat_ppid("5 (a) b) c) S 77 5 5 0"), Some(77));
        assert_eq!(stat_ppid("garbage"), None);
        assert_eq!(cmdline(b"echo\0\x1b[2J\nforged\0"), Some("echo \\x1b[2J\\x0aforged".to_owned()));
        assert_eq!(cmdline(b"\0\0"), None);
        let long = cmdline(&[b'x'; 2000]).unwrap_or_default();
        assert!(long.ends_with('…') && long.len() <= CMDLINE_MAX + '…'.len_utf8(), "{long}");
    }
}
