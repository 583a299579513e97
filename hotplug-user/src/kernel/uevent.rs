//! Kernel uevents (`NETLINK_KOBJECT_UEVENT`, the messages udev reads): module add/remove, PCI
//! device add/remove, driver bind/unbind. Degraded mode uses them as hints about why a NIC came
//! or went.
use std::collections::HashMap;

use futures::Stream;
use rtnetlink::sys::{
    protocols::NETLINK_KOBJECT_UEVENT, AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket,
};

/// One uevent: `ACTION@DEVPATH` and its `KEY=VALUE` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub vars: HashMap<String, String>,
}

impl Uevent {
    /// Parses a kernel uevent datagram (`ACTION@DEVPATH\0KEY=VALUE\0...`). udev's re-broadcasts
    /// (`libudev` header) are not kernel messages and yield `None`.
    pub fn parse(datagram: &[u8]) -> Option<Self> {
        Self::parse_from(0, datagram)
    }

    /// Parses a datagram received from netlink port `sender`: only the kernel's (port 0) are
    /// uevents. A process with `CAP_NET_ADMIN` over the host's network namespace (a container on
    /// the host network) may send to the uevent group too, from a port of its own, as udev's
    /// re-broadcasts do; libudev drops those the same way.
    pub fn parse_from(sender: u32, datagram: &[u8]) -> Option<Self> {
        if sender != 0 {
            return None;
        }
        let mut parts = datagram.split(|&b| b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        let (action, devpath) = header.split_once('@')?;
        let vars = parts
            .filter_map(|p| std::str::from_utf8(p).ok())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Self { action: action.to_owned(), devpath: devpath.to_owned(), vars })
    }

    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    pub fn subsystem(&self) -> Option<&str> {
        self.var("SUBSYSTEM")
    }

    /// The last path component of DEVPATH (`/module/e1000e` → `e1000e`, a PCI device → its BDF).
    pub fn name(&self) -> &str {
        self.devpath.rsplit('/').next().unwrap_or_default()
    }
}

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`): a driver reload on a
/// host with many devices sends bursts of uevents.
const RECEIVE_BUFFER: usize = 1 << 20;

/// A stream of kernel uevents. A burst that overflows the socket (`ENOBUFS`) loses some uevents,
/// which are only hints: that is logged and the stream goes on. Any other error ends it.
pub fn stream() -> std::io::Result<impl Stream<Item = Uevent>> {
    let mut socket = TokioSocket::new(NETLINK_KOBJECT_UEVENT)?;
    // Group 1 is the kernel's broadcast group.
    socket.socket_mut().bind(&SocketAddr::new(0, 1))?;
    if let Err(error) = socket.socket_mut().set_rx_buf_sz(RECEIVE_BUFFER) {
        tracing::debug!(%error, "uevent socket: cannot raise the receive buffer");
    }
    Ok(futures::stream::unfold(socket, |socket| async move {
        loop {
            match socket.recv_from_full().await {
                Ok((datagram, from)) => {
                    if let Some(event) = Uevent::parse_from(from.port_number(), &datagram) {
                        return Some((event, socket));
                    }
                    if from.port_number() != 0 {
                        crate::metrics::global().ignored_uevent("not-from-kernel");
                        tracing::debug!(
                            port = from.port_number(),
                            "uevent from a process, not the kernel: ignored"
                        );
                    }
                }
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("uevents lost (socket buffer overrun): some causes may be less certain");
                }
                Err(error) => {
                    tracing::error!(%error, "uevent socket failed");
                    return None;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_module_remove() {
        let datagram =
            b"remove@/module/e1000e\0ACTION=remove\0DEVPATH=/module/e1000e\0SUBSYSTEM=module\0SEQNUM=1234\0";
        let event = Uevent::parse(datagram);
        let Some(event) = event else { panic!("not parsed") };
        assert_eq!(event.action, "remove");
        assert_eq!(event.subsystem(), Some("module"));
        assert_eq!(event.name(), "e1000e");
        assert_eq!(event.var("SEQNUM"), Some("1234"));
    }

    #[test]
    fn only_the_kernel_sends_uevents() {
        let datagram = b"remove@/module/e1000e\0ACTION=remove\0SUBSYSTEM=module\0";
        assert!(Uevent::parse_from(0, datagram).is_some());
        // The same bytes from a process's port: forged, however kernel-like.
        assert_eq!(Uevent::parse_from(4242, datagram), None);
    }

    #[test]
    fn ignores_udev_rebroadcasts_and_garbage() {
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(Uevent::parse(b""), None);
    }
}
