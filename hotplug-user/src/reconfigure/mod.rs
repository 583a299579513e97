//! Where a NIC is reconfigured: restoring a snapshot over netlink (`restore`), configuring a NIC
//! really attached (`attach`), or handing the NIC to a site's own command (`command`); and the
//! two outside actions of a guided reload: the module commands (`module`) and the gateway's
//! reachability probe (`neighbour`).
//!
//! Nothing here replaces what is there: routes are added exclusively, and a route with the same
//! key (table, destination, metric) through another NIC or gateway is reported, never taken over.
pub mod attach;
pub mod command;
pub mod module;
pub mod neighbour;
pub mod restore;

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::route::{RouteAttribute, RouteMessage},
    Handle,
};

use crate::snapshot;

/// Whether a netlink request failed with `errno` (e.g. EEXIST: already there, which is fine).
pub(crate) fn failed_with(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message) if message.raw_code() == -errno)
}

/// The attributes that make two routes with the same key the same route.
fn route_target(message: &RouteMessage) -> (Option<u32>, Option<String>) {
    let gateway = message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => Some(format!("{g:?}")),
        _ => None,
    });
    (snapshot::route_oif(message), gateway)
}

fn route_key(message: &RouteMessage) -> (u32, u8, u8, Option<String>, Option<u32>) {
    let destination = message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => Some(format!("{d:?}")),
        _ => None,
    });
    let metric = message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    let family = u8::from(message.header.address_family);
    (snapshot::route_table(message), family, message.header.destination_prefix_length, destination, metric)
}

/// Adds `message` (never replacing): an equal route already there is fine; one with the same key
/// through another NIC or gateway is an error naming it.
pub(crate) async fn add_route_exclusive(handle: &Handle, message: RouteMessage) -> Result<(), String> {
    let mut request = handle.route().add(message.clone());
    *request.message_mut() = message.clone();
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(error) if failed_with(&error, libc::EEXIST) => {
            let mut probe = RouteMessage::default();
            probe.header.address_family = message.header.address_family;
            let existing: Vec<RouteMessage> =
                handle.route().get(probe).execute().try_collect().await.map_err(|e| e.to_string())?;
            let want_key = route_key(&message);
            match existing.iter().find(|r| route_key(r) == want_key) {
                Some(there) if route_target(there) != route_target(&message) => Err(format!(
                    "another route has its place, left alone: {}",
                    snapshot::route_summary(there)
                )),
                _ => Ok(()),
            }
        }
        Err(error) => Err(error.to_string()),
    }
}
