//! `forge`: what a local process can send the agent that is not what it seems, for the trust
//! scenarios. `forge uevent ACTION DEVPATH [KEY=VALUE...]` sends one kernel-looking uevent to
//! the uevent multicast group from this process's own netlink port (sending to that group needs
//! `CAP_NET_ADMIN` over the network namespace: root in the guest, or a container on the host
//! network with that capability). Prints one JSON line saying what it sent.
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// One uevent, `ACTION@DEVPATH` with ACTION, DEVPATH, SEQNUM and the given pairs.
    Uevent { action: String, devpath: String, pairs: Vec<String> },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("forge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    match Args::parse().what {
        What::Uevent { action, devpath, pairs } => {
            let mut datagram =
                format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SEQNUM=999999\0");
            for pair in &pairs {
                if !pair.contains('=') || pair.contains('\0') {
                    bail!("{pair:?}: not KEY=VALUE");
                }
                datagram.push_str(pair);
                datagram.push('\0');
            }
            let port = send_uevent(datagram.as_bytes()).context("sending the uevent")?;
            println!(r#"{{"sent":"uevent","action":"{action}","devpath":"{devpath}","port":{port}}}"#);
            Ok(())
        }
    }
}

/// Sends `datagram` to NETLINK_KOBJECT_UEVENT's group 1 (the kernel's) and returns the port the
/// kernel gave this socket.
fn send_uevent(datagram: &[u8]) -> Result<u32> {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_KOBJECT_UEVENT)
    };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut local: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    local.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default();
    // SAFETY: local is a valid sockaddr_nl of `len` bytes; port 0 asks the kernel for one.
    if unsafe { libc::bind(raw, std::ptr::addr_of!(local).cast(), len) } != 0 {
        bail!("bind: {}", std::io::Error::last_os_error());
    }
    let mut bound = local;
    let mut bound_len = len;
    // SAFETY: bound has room for a sockaddr_nl; bound_len says so.
    if unsafe { libc::getsockname(raw, std::ptr::addr_of_mut!(bound).cast(), &mut bound_len) } != 0 {
        bail!("getsockname: {}", std::io::Error::last_os_error());
    }
    let mut to = local;
    to.nl_groups = 1;
    // SAFETY: datagram is a valid buffer of its length; `to` a valid sockaddr_nl.
    let sent = unsafe {
        libc::sendto(raw, datagram.as_ptr().cast(), datagram.len(), 0, std::ptr::addr_of!(to).cast(), len)
    };
    if sent < 0 {
        bail!("sendto: {}", std::io::Error::last_os_error());
    }
    Ok(bound.nl_pid)
}
