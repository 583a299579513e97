//! rtnetlink notifications that can change a NIC's configuration, for the manager's re-reads.
use futures::{Stream, StreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload, packet_route::RouteNetlinkMessage, sys::AsyncSocket as _, MulticastGroup,
};

use super::ManagerError;

/// Receive buffer of the notification socket, bytes.
const NOTIFICATION_BUFFER: usize = 4 << 20;

/// rtnetlink notifications that can change a NIC's configuration: the ifindex they concern, or
/// `None` for rules (not bound to one NIC) and lost notifications.
pub fn config_changes() -> Result<impl Stream<Item = Option<u32>>, ManagerError> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ];
    let (mut connection, _handle, messages) = rtnetlink::new_multicast_connection(&groups)?;
    // Room for a burst (a routing daemon installing a table, 200,000 routes in a few seconds)
    // before the kernel drops notifications and the agent has to re-read every NIC. The kernel
    // caps it at net.core.rmem_max; failing to grow it is not fatal.
    if let Err(error) = connection.socket_mut().socket_mut().set_rx_buf_sz(NOTIFICATION_BUFFER) {
        tracing::debug!(%error, "cannot enlarge the rtnetlink notification buffer");
    }
    tokio::spawn(connection);
    Ok(messages.filter_map(|(message, _)| async move {
        match message.payload {
            NetlinkPayload::InnerMessage(message) => match message {
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                    Some(Some(l.header.index))
                }
                RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                    Some(Some(a.header.index))
                }
                // A route without an output device (blackhole, unreachable, prohibit, multipath:
                // no `RTA_OIF`) is in no NIC's snapshot (`snapshot::route_oif`): a host adding a
                // table of them (a BGP feed's blackholes) costs the agent no re-read.
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                    crate::snapshot::route_oif(&r).map(Some)
                }
                RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_) => Some(None),
                _ => None,
            },
            // The socket's buffer overflowed: notifications were lost, re-read every NIC.
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("rtnetlink notifications lost (buffer overrun): re-reading every NIC");
                Some(None)
            }
            _ => None,
        }
    }))
}
