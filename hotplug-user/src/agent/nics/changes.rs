//! rtnetlink notifications that can change a NIC's configuration, for the manager's re-reads.
use futures::{Stream, StreamExt as _};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REPLACE},
    packet_route::{route::RouteAttribute, RouteNetlinkMessage},
    sys::AsyncSocket as _,
    MulticastGroup,
};

use super::{ManagerError, NicManager};
use crate::{decide::NicState, snapshot};

/// How often the NICs' tuning (sysctls, queue settings) is read again: most of it changes
/// without an rtnetlink notification, so a change made less than this before a driver reload may
/// not be in the snapshot held.
pub const TUNING_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// A present NIC's tuning as last held, to compare with what it has now.
struct Held {
    ifindex: u32,
    tuning: snapshot::Tuning,
}

/// The ifindexes among `held` whose tuning is no longer what was held: one link request each on
/// the loop's connection, the files read on a blocking thread.
async fn changed_tuning(netlink: snapshot::Netlink, held: Vec<Held>) -> Vec<u32> {
    let mut read = Vec::new();
    for nic in held {
        let Ok(link) = netlink.link(nic.ifindex).await else { continue };
        let attributes = snapshot::link_tuning(&netlink, &link).await;
        read.push((nic, link.name, attributes));
    }
    let compared = tokio::task::spawn_blocking(move || {
        let root = snapshot::tuning::Root::default();
        read.into_iter()
            .filter(|(nic, name, attributes)| {
                snapshot::Tuning::read(&root, name, attributes.clone()) != nic.tuning
            })
            .map(|(nic, ..)| nic.ifindex)
            .collect::<Vec<u32>>()
    });
    compared.await.unwrap_or_default()
}

impl NicManager {
    /// The present NICs' tuning as held (those not already waiting for a re-read).
    fn held_tuning(&self) -> Vec<Held> {
        self.by_ifindex
            .iter()
            .filter(|(ifindex, _)| !self.dirty.contains(ifindex))
            .filter_map(|(ifindex, mac)| {
                let nic = self.nics.get(mac)?;
                let current =
                    matches!(&nic.record.state, NicState::Present { ifindex: i, .. } if i == ifindex);
                let held = nic.snapshot.as_ref().filter(|_| current)?;
                Some(Held { ifindex: *ifindex, tuning: held.tuning.clone() })
            })
            .collect()
    }

    /// Starts a read of each present NIC's tuning in a task of its own (the loop goes on); the
    /// NICs whose tuning changed come back as `Background::TuningChanged`, to be read in full.
    pub(super) fn poll_tuning(&self) {
        let held = self.held_tuning();
        if held.is_empty() {
            return;
        }
        let (netlink, tx) = (self.netlink.clone(), self.background.clone());
        tokio::spawn(async move {
            let changed = changed_tuning(netlink, held).await;
            if !changed.is_empty() {
                let _ = tx.send(super::Background::TuningChanged(changed)).await;
            }
        });
    }

    /// [`NicManager::poll_tuning`], waited for: the NICs whose tuning changed are read in full
    /// before this returns (a guided reload relies on current snapshots).
    pub(super) async fn poll_tuning_now(&mut self) {
        let changed = changed_tuning(self.netlink.clone(), self.held_tuning()).await;
        for ifindex in changed {
            tracing::debug!(ifindex, "tuning changed: reading the NIC again");
            self.note_change(Some(ifindex));
        }
    }
}

/// Receive buffer of the notification socket, bytes (an `int` for `setsockopt`).
const NOTIFICATION_BUFFER: i32 = 4 << 20;

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
    enlarge(connection.socket_mut().socket_mut());
    tokio::spawn(connection);
    Ok(messages.flat_map(|(message, _)| futures::stream::iter(changes_of(message))))
}

/// Room for a burst (a routing daemon installing a table, 200,000 routes in a few seconds)
/// before the kernel drops notifications and the agent has to re-read every NIC: `SO_RCVBUF`,
/// which the kernel caps at `net.core.rmem_max` (212,992 bytes on stock images). Not forced past
/// it: the connection drains the socket into memory as fast as notifications come, so a larger
/// buffer only moves a backlog into the agent's heap (driver-reload saw RSS grow 5.5 MB with an
/// 8 MiB one); a lost burst costs one re-read of every NIC instead. Failing is not fatal.
fn enlarge(socket: &rtnetlink::sys::Socket) {
    if let Err(error) = socket.set_rx_buf_sz(NOTIFICATION_BUFFER) {
        tracing::debug!(%error, "cannot enlarge the rtnetlink notification buffer");
    }
}

/// The NICs a notification may concern: `Some(ifindex)` each, `None` for "any of them".
fn changes_of(message: NetlinkMessage<RouteNetlinkMessage>) -> Vec<Option<u32>> {
    let replace = message.header.flags & NLM_F_REPLACE != 0;
    match message.payload {
        NetlinkPayload::InnerMessage(message) => match message {
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => vec![Some(l.header.index)],
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                vec![Some(a.header.index)]
            }
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                // The devices the route goes through: its RTA_OIF, or its multipath hops'.
                let mut nics: Vec<Option<u32>> =
                    crate::snapshot::route_oif(&r).map(Some).into_iter().collect();
                for attribute in &r.attributes {
                    if let RouteAttribute::MultiPath(hops) = attribute {
                        nics.extend(hops.iter().map(|hop| Some(hop.interface_index)));
                    }
                }
                // A replace notifies the new route only: the one it replaced, perhaps through
                // another NIC, went without a notification of its own (fib_table_insert,
                // fib6_add_rt2node), so every NIC is read again.
                if replace {
                    nics.push(None);
                }
                // A route through no device (a blackhole, unreachable or prohibit route, added:
                // no RTA_OIF) is in no NIC's snapshot: a routing daemon adding a table of them
                // costs no re-read.
                nics
            }
            RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_) => vec![None],
            _ => Vec::new(),
        },
        // The socket's buffer overflowed: notifications were lost, re-read every NIC.
        NetlinkPayload::Overrun(_) => {
            tracing::warn!("rtnetlink notifications lost (buffer overrun): re-reading every NIC");
            vec![None]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::route::{RouteMessage, RouteNextHop};

    use super::*;

    fn notification(route: RouteMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewRoute(route));
        message.header.flags = flags;
        message
    }

    #[test]
    fn a_route_concerns_the_nics_it_goes_through_and_a_replace_any_nic() {
        let mut through = RouteMessage::default();
        through.attributes.push(RouteAttribute::Oif(4));
        assert_eq!(changes_of(notification(through.clone(), 0)), [Some(4)]);
        assert_eq!(changes_of(notification(through, NLM_F_REPLACE)), [Some(4), None]);

        let blackhole = RouteMessage::default();
        assert!(changes_of(notification(blackhole.clone(), 0)).is_empty(), "an added blackhole is no NIC's");
        assert_eq!(
            changes_of(notification(blackhole, NLM_F_REPLACE)),
            [None],
            "it may replace a NIC's route"
        );

        let mut multipath = RouteMessage::default();
        let hops: Vec<RouteNextHop> = [5, 6]
            .into_iter()
            .map(|index| {
                let mut hop = RouteNextHop::default();
                hop.interface_index = index;
                hop
            })
            .collect();
        multipath.attributes.push(RouteAttribute::MultiPath(hops));
        assert_eq!(changes_of(notification(multipath, 0)), [Some(5), Some(6)]);
    }
}
