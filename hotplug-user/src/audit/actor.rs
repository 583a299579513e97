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
    /// The kernel's task, completed from `/proc`.
    pub fn read(task: &Task) -> Self {
        Self::read_from(Path::new("/proc"), task)
    }

    /// As [`Actor::read`], with `/proc` at `proc`. A pid is trusted only while `/proc/PID/comm`
    /// still names the kernel's `comm`: a task that exited, its pid reused by another, must not
    /// lend that one's command line.
    pub fn read_from(proc: &Path, task: &Task) -> Self {
        let mut actor = Self {
            pid: task.pid,
            uid: task.uid,
            comm: task.comm.clone(),
            ppid: task.ppid,
            parent_comm: None,
            cmdline: None,
        };
        let dir = proc.join(task.pid.to_string());
        let same_task = std::fs::read_to_string(dir.join("comm"))
            .is_ok_and(|comm| sanitize(comm.trim_end_matches('\n')) == task.comm);
        if same_task {
            actor.cmdline = std::fs::read(dir.join("cmdline")).ok().and_then(|raw| cmdline(&raw));
            if actor.ppid.is_none() {
                actor.ppid = std::fs::read_to_string(dir.join("stat")).ok().and_then(|s| stat_ppid(&s));
            }
        }
        if let Some(ppid) = actor.ppid.filter(|&p| p != 0) {
            actor.parent_comm = std::fs::read_to_string(proc.join(ppid.to_string()).join("comm"))
                .ok()
                .map(|c| sanitize(c.trim_end_matches('\n')));
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

    fn fake_proc(entries: &[(u32, &str, &[u8], &str)]) -> std::io::Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        for (pid, comm, cmdline, stat) in entries {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&p)?;
            std::fs::write(p.join("comm"), format!("{comm}\n"))?;
            std::fs::write(p.join("cmdline"), cmdline)?;
            std::fs::write(p.join("stat"), stat)?;
        }
        Ok(dir)
    }

    #[test]
    fn a_live_task_gets_its_command_line_and_parent() -> std::io::Result<()> {
        let proc = fake_proc(&[
            (812, "modprobe", b"modprobe\0-r\0e1000e\0", "812 (modprobe) S 790 812 790 0"),
            (790, "bash", b"-bash\0", "790 (bash) S 1 790 790 0"),
        ])?;
        let actor = Actor::read_from(proc.path(), &task(812, "modprobe"));
        assert_eq!(actor.cmdline.as_deref(), Some("modprobe -r e1000e"));
        assert_eq!(actor.ppid, Some(790));
        assert_eq!(actor.parent_comm.as_deref(), Some("bash"));
        assert_eq!(actor.describe(), "modprobe[812] uid 1000 (parent bash[790]) `modprobe -r e1000e`");
        Ok(())
    }

    #[test]
    fn a_reused_pid_lends_nothing() -> std::io::Result<()> {
        // pid 812 is now another program: its command line is not the modprobe's.
        let proc = fake_proc(&[(812, "sshd", b"sshd: root\0", "812 (sshd) S 1 812 812 0")])?;
        let actor = Actor::read_from(proc.path(), &task(812, "modprobe"));
        assert_eq!(actor.cmdline, None);
        assert_eq!(actor.ppid, None);
        assert_eq!(actor.describe(), "modprobe[812] uid 1000");
        Ok(())
    }

    #[test]
    fn the_kernels_parent_wins_and_a_gone_parent_is_a_number() -> std::io::Result<()> {
        let proc = fake_proc(&[])?;
        let mut kernel_task = task(812, "modprobe");
        kernel_task.ppid = Some(4242);
        let actor = Actor::read_from(proc.path(), &kernel_task);
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
