//! Is a NIC's gateway there? The kernel is asked to resolve it (an `RTM_NEWNEIGH` with
//! `NTF_USE`: `neigh_event_send`, the same path a packet takes), and its neighbour table read
//! until the entry is `REACHABLE` or `FAILED`: ARP requests or IPv6 neighbour solicitations on
//! the link, no packet beyond it. A static entry is left alone and reported as such.
use std::{net::IpAddr, time::Duration};

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        link::LinkFlags,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        AddressFamily,
    },
    Handle,
};

/// The kernel gives up after its unicast/multicast probes (3 × 1 s by default).
const PROBE_LIMIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// A NIC that just registered may take seconds to get its carrier (a driver's link watchdog):
/// a solicitation sent before then is dropped, so the probe waits for it this long.
const CARRIER_LIMIT: Duration = Duration::from_secs(15);

/// Until the link has its carrier (`IFF_LOWER_UP`), or the wait ends (false).
async fn wait_carrier(handle: &Handle, ifindex: u32) -> bool {
    let started = tokio::time::Instant::now();
    while started.elapsed() < CARRIER_LIMIT {
        let mut links = handle.link().get().match_index(ifindex).execute();
        if let Ok(Some(link)) = links.try_next().await {
            if link.header.flags.contains(LinkFlags::LowerUp) {
                return true;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    false
}

/// `reachable`, `failed`, or what went wrong, for one gateway.
pub async fn probe(handle: &Handle, ifindex: u32, gateway: IpAddr) -> String {
    if !wait_carrier(handle, ifindex).await {
        return format!("{gateway} not probed: the NIC has no carrier after {} s", CARRIER_LIMIT.as_secs());
    }
    // A static entry (an operator's or networkd's pin against spoofing) is never touched: since
    // Linux 5.16 NTF_USE would turn it into a dynamic one.
    match state(handle, ifindex, gateway).await {
        Ok(Some(s)) if s == NeighbourState::Permanent || s == NeighbourState::Noarp => {
            return format!("{gateway} (static: not probed)");
        }
        // A dump that met one of the loop's (EBUSY): probed as an entry of unknown state.
        Ok(_) => {}
        Err(error) if super::failed_with(&error, libc::EBUSY) => {}
        Err(error) => return format!("{gateway}: cannot read the neighbour table: {error}"),
    }
    // Just after the carrier comes, the first solicitations can be lost (the driver's queues
    // still starting): a failed resolution is asked again, [`ATTEMPTS`] times in all.
    for attempt in 1..=ATTEMPTS {
        let mut request = handle.neighbours().add(ifindex, gateway).replace();
        // NTF_USE: the kernel resolves the entry (the state in the message is not kept).
        request.message_mut().header.flags = NeighbourFlags::Use;
        request.message_mut().header.state = NeighbourState::None;
        if let Err(error) = request.execute().await {
            return format!("{gateway}: cannot ask the kernel to resolve it: {error}");
        }
        let started = tokio::time::Instant::now();
        loop {
            match state(handle, ifindex, gateway).await {
                Ok(Some(NeighbourState::Reachable)) => {
                    return format!("{gateway} reachable");
                }
                Ok(Some(NeighbourState::Failed)) => break,
                Ok(_) if started.elapsed() >= PROBE_LIMIT => break,
                Ok(_) => tokio::time::sleep(POLL).await,
                // The agent's loop shares the socket: a dump that met one of its dumps (EBUSY)
                // is asked again.
                Err(error) if super::failed_with(&error, libc::EBUSY) => tokio::time::sleep(POLL).await,
                Err(error) => return format!("{gateway}: cannot read the neighbour table: {error}"),
            }
        }
        tracing::debug!(%gateway, ifindex, attempt, "gateway did not answer");
    }
    format!("{gateway} failed (no answer on the link to {ATTEMPTS} resolutions)")
}

/// Resolutions asked before the gateway counts as unreachable.
const ATTEMPTS: u32 = 3;

/// The neighbour entry's state for `gateway` on `ifindex`, if there is one.
async fn state(
    handle: &Handle,
    ifindex: u32,
    gateway: IpAddr,
) -> Result<Option<NeighbourState>, rtnetlink::Error> {
    let family = if gateway.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let mut dump = handle.neighbours().get().set_address_family(family).execute();
    while let Some(message) = dump.try_next().await? {
        if message.header.ifindex != ifindex {
            continue;
        }
        let matches = message.attributes.iter().any(|a| match (a, gateway) {
            (NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)), IpAddr::V4(g)) => *v4 == g,
            (NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)), IpAddr::V6(g)) => *v6 == g,
            _ => false,
        });
        if matches {
            return Ok(Some(message.header.state));
        }
    }
    Ok(None)
}
