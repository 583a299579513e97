//! `flood`: what an unprivileged local user can throw at the agent's kernel probes, as fast as it
//! can, for the `unprivileged-flood` scenario. Run as root; it drops to `--uid` at once, then
//! forks one process that calls `delete_module` and `finit_module` in a loop (both refused: no
//! `CAP_SYS_MODULE`) and one that makes a user and network namespace of its own and creates and
//! deletes veth pairs in it. Prints one JSON line of counts when `--seconds` have passed.
//!
//! veth must be loaded already (a user namespace cannot make the kernel load modules).
use std::{
    ffi::CString,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rtnetlink::packet_route::link::LinkAttribute;

/// The link group the batches are made in and deleted by.
const GROUP: u32 = 7;
use clap::Parser;
use futures::TryStreamExt as _;

#[derive(Parser)]
struct Args {
    /// How long to flood.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The unprivileged user to become.
    #[arg(long, default_value_t = 65534)]
    uid: u32,
    /// Churn links in batches: create this many veth pairs in the namespace, then delete them
    /// all with one request (`ip link delete group`): one kernel batch of twice as many devices,
    /// more than the agent's probe walks in one run. 0: one pair at a time.
    #[arg(long, default_value_t = 0)]
    batch: u32,
    /// Only the link churn (no module calls).
    #[arg(long)]
    links_only: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flood: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    // The lowest priority (busybox has no `nice`): what a scenario measures is the ring buffer,
    // not the CPU the guest's emulated cores share with the flood.
    // SAFETY: setpriority has no memory effects; PRIO_PROCESS with who 0 is this process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        bail!("setpriority: {}", std::io::Error::last_os_error());
    }
    drop_privileges(args.uid)?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let batch = args.batch;
    let modules = if args.links_only { None } else { Some(spawn(|| module_calls(deadline))?) };
    let links = spawn(|| link_churn(deadline, batch))?;
    let modules = modules.map(wait).transpose()?.unwrap_or(0);
    let links = wait(links)?;
    println!("{{\"module_calls\":{modules},\"link_changes\":{links}}}");
    Ok(())
}

fn drop_privileges(uid: u32) -> Result<()> {
    // SAFETY: plain syscalls on this single-threaded process; order matters (groups and gid
    // while still root, uid last).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
            bail!("cannot become uid {uid}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Forks a process that runs `work` and writes its count to a pipe.
fn spawn(work: impl FnOnce() -> Result<u64>) -> Result<(libc::pid_t, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the process is single-threaded here, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let count = match work() {
            Ok(count) => count,
            Err(error) => {
                eprintln!("flood: {error:#}");
                u64::MAX
            }
        };
        let bytes = count.to_le_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our end of the pipe, then exiting
        // without running the parent's destructors.
        unsafe {
            libc::write(fds[1], bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    // SAFETY: the write end belongs to the child now.
    unsafe { libc::close(fds[1]) };
    Ok((pid, fds[0]))
}

fn wait((pid, fd): (libc::pid_t, i32)) -> Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: reading at most 8 bytes into a live buffer from our end of the pipe.
    let n = unsafe { libc::read(fd, bytes.as_mut_ptr().cast(), bytes.len()) };
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let count = u64::from_le_bytes(bytes);
    if n != 8 || count == u64::MAX {
        bail!("a flood process failed");
    }
    Ok(count)
}

/// `delete_module` and `finit_module` calls until `deadline` (each refused with EPERM).
fn module_calls(deadline: Instant) -> Result<u64> {
    let name = CString::new("hotplug_flood_no_such_module").context("name")?;
    let empty = CString::new("").context("params")?;
    let mut calls = 0u64;
    while Instant::now() < deadline {
        for _ in 0..256 {
            // SAFETY: raw syscalls with valid pointers; the kernel refuses both for lack of
            // CAP_SYS_MODULE (fd -1 for finit_module is refused before it is used).
            unsafe {
                libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK);
                libc::syscall(libc::SYS_finit_module, -1, empty.as_ptr(), 0);
            }
            calls += 2;
        }
    }
    Ok(calls)
}

/// veth pairs created and deleted in a user and network namespace of this process's own, one at
/// a time or `batch` at once.
fn link_churn(deadline: Instant, batch: u32) -> Result<u64> {
    // SAFETY: unshare on this single-threaded child process.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWUSER | CLONE_NEWNET): {} (unprivileged user namespaces disabled?)",
            std::io::Error::last_os_error()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let mut changes = 0u64;
        while batch > 0 && Instant::now() < deadline {
            for i in 0..batch {
                let mut veth = rtnetlink::LinkVeth::new(&format!("fa{i}"), &format!("fb{i}")).build();
                veth.attributes.push(LinkAttribute::Group(GROUP));
                handle.link().add(veth).execute().await.context("creating a veth pair in the namespace")?;
            }
            let mut delete = handle.link().del(0);
            delete.message_mut().attributes.push(LinkAttribute::Group(GROUP));
            delete.execute().await.context("deleting the group")?;
            changes += 4 * u64::from(batch);
        }
        while batch == 0 && Instant::now() < deadline {
            let veth = rtnetlink::LinkVeth::new("fl0", "fl1").build();
            handle.link().add(veth).execute().await.context("creating a veth pair in the namespace")?;
            let mut links = handle.link().get().match_name("fl0").execute();
            let Some(link) = links.try_next().await? else { bail!("fl0 vanished") };
            handle.link().del(link.header.index).execute().await.context("deleting the veth pair")?;
            changes += 2;
        }
        Ok(changes)
    })
}
