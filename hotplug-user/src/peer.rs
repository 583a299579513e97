//! Who is on the other end of a control connection, and whether it has the rights it needs. The
//! socket's mode (root only) is not enough: a uid-0 process stripped of its capabilities (a
//! container with the host's /run, `setpriv --bounding-set=-all`) or root inside its own user
//! namespace connects as uid 0 too, and may even take the socket's path for itself. So the process
//! at the other end is looked at, by the agent (its callers) and by the clients (the agent): its
//! effective capabilities (`CapEff` in /proc/PID/status) and its user namespace, which must be
//! the looker's.
//!
//! Kernel facts relied on: `SO_PEERCRED` gives the peer's pid and uid as they were at `connect`,
//! the uid translated into the reader's user namespace; `SO_PEERPIDFD` (Linux 6.5+) a pidfd of
//! the same process (`ENOPROTOOPT` before; another error, such as a peer already reaped, refuses),
//! through which the reader checks that the pid it read /proc for is still that process (`Pid:`
//! in the pidfd's fdinfo; -1 once it exited). The rights are read as soon as the connection is
//! accepted or made: without a pidfd (older kernels) a peer that exits and whose pid is reused by
//! a more privileged process within the moment between `connect` and that read could lend it its
//! rights; the start time read before and after narrows that to a reuse before the first read.
use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_MODULE: u32 = 16;
/// `SO_PEERPIDFD` (include/uapi/asm-generic/socket.h), Linux 6.5+.
const SO_PEERPIDFD: libc::c_int = 77;

/// What a request needs of its caller beyond reaching the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    NetAdmin,
    SysModule,
}

impl Needs {
    pub const fn capability(self) -> Option<(u32, &'static str)> {
        match self {
            Self::Nothing => None,
            Self::NetAdmin => Some((CAP_NET_ADMIN, "CAP_NET_ADMIN")),
            Self::SysModule => Some((CAP_SYS_MODULE, "CAP_SYS_MODULE")),
        }
    }
}

/// The caller, as far as the check goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    /// Its effective capabilities (a bit per capability).
    pub effective: u64,
    /// It is in the agent's user namespace (its capabilities count here).
    pub same_user_namespace: bool,
}

/// Whether `caller` has what `needs` asks for (why not, naming the process, when it has not).
pub fn allowed(caller: &Caller, needs: Needs) -> Result<(), String> {
    let Some((bit, name)) = needs.capability() else { return Ok(()) };
    if !caller.same_user_namespace {
        return Err(format!(
            "pid {} (uid {}) is in another user namespace: its capabilities do not count here",
            caller.pid, caller.uid
        ));
    }
    if caller.effective & (1 << bit) == 0 {
        return Err(format!("pid {} (uid {}) lacks {name}", caller.pid, caller.uid));
    }
    Ok(())
}

/// The effective capabilities in a /proc/PID/status text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The pid a pidfd's fdinfo names (`Pid:`; -1 once the process exited).
fn pidfd_pid(fdinfo: &str) -> Option<i64> {
    fdinfo.lines().find_map(|line| line.strip_prefix("Pid:")).and_then(|pid| pid.trim().parse().ok())
}

/// The process at the other end of a Unix socket as the kernel saw it at `connect`
/// (`SO_PEERCRED`: its pid, and its uid and gid in this user namespace).
pub fn peer_cred(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).map_err(std::io::Error::other)?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred we own; the socket is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// The pidfd of the peer: `Ok(None)` where the kernel has none to give (`ENOPROTOOPT`, before
/// Linux 6.5), an error where it refuses (the peer already reaped, say).
fn peer_pidfd(socket: &impl std::os::fd::AsRawFd) -> Result<Option<OwnedFd>, String> {
    let mut fd: libc::c_int = -1;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).map_err(|e| e.to_string())?;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, an int we own; the socket is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            std::ptr::from_mut(&mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(format!("SO_PEERPIDFD: {error} (the peer exited?)")),
        };
    }
    // SAFETY: on success the kernel handed us a new file descriptor, which nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A process's start time (`/proc/PID/stat`'s 22nd field), to tell it from a later one that
/// took its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).and_then(|t| t.parse().ok())
}

/// Whether a process's user namespace is this one's: by the namespace's identity where /proc
/// lets this process read it, else by the user id map (a namespace made without the privilege to
/// map every id has a map of its own; with that privilege, a caller has every right anyway).
fn same_user_namespace(pid: u32) -> bool {
    let link = |who: &str| fs::read_link(format!("/proc/{who}/ns/user"));
    match (link(&pid.to_string()), link("self")) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => {
            let map = |who: &str| fs::read_to_string(format!("/proc/{who}/uid_map")).ok();
            let normal = |m: Option<String>| m.map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "));
            let theirs = normal(map(&pid.to_string()));
            theirs.is_some() && theirs == normal(map("self"))
        }
    }
}

/// The process at the other end of `socket`, its rights read now (call it as soon as the
/// connection is accepted or made; it reads /proc, so off any loop that must not wait on files).
pub fn of(socket: &impl std::os::fd::AsRawFd) -> Result<Caller, String> {
    let cred = peer_cred(socket).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let pid = u32::try_from(cred.pid).map_err(|_| "the peer's pid is not known here".to_owned())?;
    let pidfd = peer_pidfd(socket)?;
    let started = start_time(pid);
    let caller = read_caller(pid, cred.uid, pidfd.as_ref())?;
    if started.is_none() || start_time(pid) != started {
        return Err(format!("the peer (pid {pid}) exited while its rights were read"));
    }
    Ok(caller)
}

/// Reads the process `pid` (checked against its pidfd when there is one).
fn read_caller(pid: u32, uid: u32, pidfd: Option<&OwnedFd>) -> Result<Caller, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the peer's /proc/{pid}/status ({e}): it exited?"))?;
    let effective = effective_capabilities(&status).ok_or("the peer's status has no CapEff line")?;
    let same_user_namespace = same_user_namespace(pid);
    if let Some(pidfd) = pidfd {
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap_or_default();
        if pidfd_pid(&info) != Some(i64::from(pid)) {
            return Err(format!("the peer (pid {pid}) exited before its rights could be read"));
        }
    }
    Ok(Caller { pid, uid, effective, same_user_namespace })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(effective: u64, same_user_namespace: bool) -> Caller {
        Caller { pid: 42, uid: 0, effective, same_user_namespace }
    }

    #[test]
    fn each_need_is_a_capability_in_the_same_namespace() {
        let root = caller(0x1ff_ffff_ffff, true);
        let stripped = caller(0, true);
        let net_admin_only = caller(1 << CAP_NET_ADMIN, true);
        let userns_root = caller(0x1ff_ffff_ffff, false);
        assert!(allowed(&root, Needs::SysModule).is_ok());
        assert!(allowed(&stripped, Needs::Nothing).is_ok(), "status needs nothing more");
        let refused = allowed(&stripped, Needs::SysModule);
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("lacks CAP_SYS_MODULE") && e.contains("pid 42")),
            "{refused:?}"
        );
        assert!(allowed(&net_admin_only, Needs::NetAdmin).is_ok());
        assert!(allowed(&net_admin_only, Needs::SysModule).is_err());
        let refused = allowed(&userns_root, Needs::NetAdmin);
        assert!(refused.as_ref().is_err_and(|e| e.contains("another user namespace")), "{refused:?}");
    }

    #[test]
    fn proc_texts_are_read_as_the_kernel_writes_them() {
        let status = "Name:\tsh\nUid:\t0\t0\t0\t0\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tsh\n"), None);
        assert_eq!(
            pidfd_pid("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\nPid:\t1234\nNSpid:\t1234\n"),
            Some(1234)
        );
        assert_eq!(pidfd_pid("Pid:\t-1\n"), Some(-1));
    }

    #[test]
    fn this_process_reads_as_itself() -> Result<(), String> {
        // The test's own connection: its caller is this process, in this namespace.
        let (a, _b) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        let me = caller_of_pair(&a)?;
        assert_eq!(me.pid, std::process::id());
        assert!(me.same_user_namespace);
        let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
        assert_eq!(Some(me.effective), effective_capabilities(&status));
        Ok(())
    }

    fn caller_of_pair(socket: &std::os::unix::net::UnixStream) -> Result<Caller, String> {
        super::of(socket)
    }
}
