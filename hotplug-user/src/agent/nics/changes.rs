//! rtnetlink notifications that can change a NIC's configuration, for the manager's re-reads.
use futures::{Stream, StreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{route::RouteAttribute, RouteNetlinkMessage},
    MulticastGroup,
};

use super::ManagerError;

/// rtnetlink notifications that can change a NIC's configuration: the ifindex they concern, or
/// `None` for rules (not bound to one NIC).
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
    let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&groups)?;
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
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                    Some(r.attributes.iter().find_map(|a| {
                        if let RouteAttribute::Oif(i) = a {
                            Some(*i)
                        } else {
                            None
                        }
                    }))
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
