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

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    },
    packet_route::{
        route::{RouteAttribute, RouteMessage},
        AddressFamily, RouteNetlinkMessage,
    },
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

/// Requests in flight at once on one connection: their acknowledgements wait in the socket's
/// receive buffer (an error's echoes its request: well under 1 KiB each, against the default
/// 208 KiB).
const IN_FLIGHT: usize = 32;

/// How a request is sent: `NLM_F_EXCL` (an existing object fails with EEXIST) or `NLM_F_REPLACE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Create {
    Exclusive,
    Replace,
}

/// Sends `requests` (`RTM_NEW*` messages) pipelined and returns each one's outcome, in order:
/// each chunk of [`IN_FLIGHT`] is queued on the connection, in order, before any of its
/// acknowledgements is awaited.
///
/// Kernel fact relied on: rtnetlink handles a request inside the `sendmsg` that carries it
/// (`netlink_unicast_kernel` -> `rtnetlink_rcv`, under RTNL), and the connection sends in the order
/// it was handed the requests, so each request sees every earlier one applied, exactly as one at a
/// time would (a route through a gateway after the route that makes it reachable); only the
/// waits for the acknowledgements overlap.
pub(crate) async fn send_pipelined(
    handle: &Handle,
    requests: Vec<RouteNetlinkMessage>,
    create: Create,
) -> Vec<Result<(), rtnetlink::Error>> {
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        let mut waiting = Vec::with_capacity(IN_FLIGHT);
        for message in requests.by_ref().take(IN_FLIGHT) {
            let mut request = NetlinkMessage::from(message);
            let create = match create {
                Create::Exclusive => NLM_F_EXCL,
                Create::Replace => NLM_F_REPLACE,
            };
            request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | create;
            waiting.push(handle.clone().request(request));
        }
        for responses in waiting {
            outcomes.push(match responses {
                Ok(responses) => acknowledged(responses).await,
                Err(error) => Err(error),
            });
        }
    }
    outcomes
}

/// Reads a request's answers to its end: an error message with a code is its refusal.
async fn acknowledged(
    responses: impl futures::Stream<Item = NetlinkMessage<RouteNetlinkMessage>>,
) -> Result<(), rtnetlink::Error> {
    let mut responses = std::pin::pin!(responses);
    while let Some(message) = responses.next().await {
        if let NetlinkPayload::Error(error) = message.payload {
            if error.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(error));
            }
        }
    }
    Ok(())
}

/// Adds `message` (never replacing): an equal route already there is fine; one with the same key
/// through another NIC or gateway is an error naming it.
pub(crate) async fn add_route_exclusive(handle: &Handle, message: RouteMessage) -> Result<(), String> {
    add_routes_exclusive(handle, vec![message]).await.pop().unwrap_or(Ok(()))
}

/// [`add_route_exclusive`] for many routes, pipelined (in order); the routes already there are
/// compared with what the kernel holds after one dump per family.
pub(crate) async fn add_routes_exclusive(
    handle: &Handle,
    messages: Vec<RouteMessage>,
) -> Vec<Result<(), String>> {
    let requests = messages.iter().cloned().map(RouteNetlinkMessage::NewRoute).collect();
    let sent = send_pipelined(handle, requests, Create::Exclusive).await;
    let mut existing: Vec<(AddressFamily, Result<Vec<RouteMessage>, String>)> = Vec::new();
    let mut outcomes = Vec::with_capacity(sent.len());
    for (message, result) in messages.iter().zip(sent) {
        outcomes.push(match result {
            Ok(()) => Ok(()),
            Err(error) if failed_with(&error, libc::EEXIST) => {
                let family = message.header.address_family;
                if !existing.iter().any(|(f, _)| *f == family) {
                    let mut probe = RouteMessage::default();
                    probe.header.address_family = family;
                    let dump =
                        handle.route().get(probe).execute().try_collect().await.map_err(|e| e.to_string());
                    existing.push((family, dump));
                }
                match existing.iter().find(|(f, _)| *f == family).map(|(_, dump)| dump) {
                    Some(Ok(routes)) => {
                        let want_key = route_key(message);
                        match routes.iter().find(|r| route_key(r) == want_key) {
                            Some(there) if route_target(there) != route_target(message) => Err(format!(
                                "another route has its place, left alone: {}",
                                snapshot::route_summary(there)
                            )),
                            _ => Ok(()),
                        }
                    }
                    Some(Err(error)) => Err(error.clone()),
                    None => Ok(()),
                }
            }
            Err(error) => Err(error.to_string()),
        });
    }
    outcomes
}
