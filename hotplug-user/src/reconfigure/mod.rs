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
pub mod tuning;

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
use thiserror::Error;

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

/// Requests queued on the connection at once. The connection sends the next as soon as the
/// kernel has answered the one before, without a round trip through the restore's task.
const IN_FLIGHT: usize = 32;

/// How long one phase's requests may wait for their answers, together: the kernel answers each at
/// once; a missing answer is a lost message or a stuck connection, and must not hang a restore.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a request did not go through.
#[derive(Debug, Error)]
pub enum SendError {
    #[error("{0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("the netlink connection ended before the kernel answered")]
    NoAnswer,
    #[error(
        "no answer from the kernel within {} s: whether it was applied is unknown (the read-back says)",
        ANSWER_TIMEOUT.as_secs()
    )]
    Timeout,
    #[error("not sent: an earlier request of the same restore had no answer")]
    NotSent,
}

impl SendError {
    /// Whether the kernel refused the request with `errno`.
    pub fn is_errno(&self, errno: i32) -> bool {
        matches!(self, Self::Netlink(error) if failed_with(error, errno))
    }
}

/// How a request is sent: `NLM_F_EXCL` (an existing object fails with EEXIST) or `NLM_F_REPLACE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Create {
    Exclusive,
    Replace,
}

/// Sends `requests` (`RTM_NEW*` messages) pipelined and returns each one's outcome, in order:
/// each chunk of [`IN_FLIGHT`] is queued on the connection, in order, before any of its answers
/// is awaited.
///
/// Kernel fact relied on: rtnetlink handles a request inside the `sendmsg` that carries it
/// (`netlink_unicast_kernel` -> `rtnetlink_rcv`, under RTNL), and the connection sends in the order
/// it was handed the requests, so each request sees every earlier one applied, exactly as one at a
/// time would (a route through a gateway after the route that makes it reachable).
pub(crate) async fn send_pipelined(
    netlink: &snapshot::Netlink,
    requests: Vec<RouteNetlinkMessage>,
    create: Create,
) -> Vec<Result<(), SendError>> {
    let (mut handle, mut acks_forwarded) = netlink.requests();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
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
            let mut sent = handle.clone().request(request.clone());
            if sent.is_err() && acks_forwarded {
                // The requests' connection ended (a socket error ends a netlink-proto
                // connection for good): go on through the agent's main one.
                tracing::error!("the netlink connection for restores has closed: using the main one");
                (handle, acks_forwarded) = (&netlink.handle, false);
                sent = handle.clone().request(request);
            }
            waiting.push(sent);
        }
        for responses in waiting {
            outcomes.push(match responses {
                Ok(responses) => tokio::time::timeout_at(deadline, answer(responses, acks_forwarded))
                    .await
                    .unwrap_or(Err(SendError::Timeout)),
                Err(error) => Err(error.into()),
            });
        }
        if outcomes.iter().any(|o| matches!(o, Err(SendError::Timeout))) {
            // The kernel answers at once: a connection this late is stuck; what is left is not
            // sent, and says so.
            outcomes.extend(requests.by_ref().map(|_| Err(SendError::NotSent)));
        }
    }
    outcomes
}

/// Reads a request's answers to its end: an error message with a code is its refusal, one without
/// its acknowledgement. Where the connection hands acknowledgements over, answers that end without
/// one mean the connection ended; where it swallows them, the end is the acknowledgement.
async fn answer(
    responses: impl futures::Stream<Item = NetlinkMessage<RouteNetlinkMessage>>,
    acks_forwarded: bool,
) -> Result<(), SendError> {
    let mut responses = std::pin::pin!(responses);
    while let Some(message) = responses.next().await {
        if let NetlinkPayload::Error(error) = message.payload {
            if error.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(error).into());
            }
            return Ok(());
        }
    }
    if acks_forwarded {
        Err(SendError::NoAnswer)
    } else {
        Ok(())
    }
}

/// Adds `message` (never replacing): an equal route already there is fine; one with the same key
/// through another NIC or gateway is an error naming it.
pub(crate) async fn add_route_exclusive(handle: &Handle, message: RouteMessage) -> Result<(), String> {
    let netlink = snapshot::Netlink::unfiltered(handle.clone());
    add_routes_exclusive(&netlink, vec![message]).await.pop().unwrap_or(Ok(()))
}

/// [`add_route_exclusive`] for many routes, pipelined (in order). A route already there is looked
/// for among the routes through its device first (a dump the kernel filters), and only when it is
/// not there among every route of its family (one dump per family, shared): the cost of a large
/// table elsewhere is paid only when another device holds the route's place.
pub(crate) async fn add_routes_exclusive(
    netlink: &snapshot::Netlink,
    messages: Vec<RouteMessage>,
) -> Vec<Result<(), String>> {
    let requests = messages.iter().cloned().map(RouteNetlinkMessage::NewRoute).collect();
    let sent = send_pipelined(netlink, requests, Create::Exclusive).await;
    let mut through: Vec<((AddressFamily, u32), Vec<RouteMessage>)> = Vec::new();
    let mut every: Vec<(AddressFamily, Result<Vec<RouteMessage>, String>)> = Vec::new();
    let mut outcomes = Vec::with_capacity(sent.len());
    for (message, result) in messages.iter().zip(sent) {
        let error = match result {
            Ok(()) => {
                outcomes.push(Ok(()));
                continue;
            }
            Err(error) if error.is_errno(libc::EEXIST) => error,
            Err(error) => {
                outcomes.push(Err(error.to_string()));
                continue;
            }
        };
        let family = message.header.address_family;
        let want_key = route_key(message);
        let same_key = |routes: &[RouteMessage]| routes.iter().find(|r| route_key(r) == want_key).cloned();
        let mut there = None;
        if let Some(oif) = snapshot::route_oif(message) {
            if !through.iter().any(|(k, _)| *k == (family, oif)) {
                match netlink.routes_through(family, oif).await {
                    Ok(routes) => through.push(((family, oif), routes)),
                    Err(read_error) => {
                        // The device is gone, most likely: no point reading every route.
                        outcomes.push(Err(format!("{error}; reading the routes through it: {read_error}")));
                        continue;
                    }
                }
            }
            there = through.iter().find(|(k, _)| *k == (family, oif)).and_then(|(_, r)| same_key(r));
        }
        if there.is_none() {
            if !every.iter().any(|(f, _)| *f == family) {
                let mut probe = RouteMessage::default();
                probe.header.address_family = family;
                let dump = netlink
                    .handle
                    .route()
                    .get(probe)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| e.to_string());
                every.push((family, dump));
            }
            match every.iter().find(|(f, _)| *f == family).map(|(_, dump)| dump) {
                Some(Ok(routes)) => there = same_key(routes),
                Some(Err(dump_error)) => {
                    outcomes.push(Err(format!("{error}; reading the routes there: {dump_error}")));
                    continue;
                }
                None => {}
            }
        }
        outcomes.push(match there {
            Some(there) if route_target(&there) != route_target(message) => {
                Err(format!("another route has its place, left alone: {}", snapshot::route_summary(&there)))
            }
            _ => Ok(()),
        });
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use rtnetlink::packet_core::{ErrorMessage, NetlinkHeader};

    use super::*;

    fn error(code: Option<i32>) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut message = ErrorMessage::default();
        message.code = code.and_then(NonZeroI32::new);
        NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Error(message))
    }

    async fn answer_to(
        messages: Vec<NetlinkMessage<RouteNetlinkMessage>>,
        acks_forwarded: bool,
    ) -> Result<(), SendError> {
        answer(futures::stream::iter(messages), acks_forwarded).await
    }

    #[tokio::test]
    async fn a_request_is_applied_on_its_acknowledgement_only() {
        assert!(answer_to(vec![error(None)], true).await.is_ok(), "the acknowledgement");
        let refused = answer_to(vec![error(Some(-libc::EEXIST))], true).await;
        assert!(refused.as_ref().is_err_and(|e| e.is_errno(libc::EEXIST)), "{refused:?}");
        assert!(
            matches!(answer_to(Vec::new(), true).await, Err(SendError::NoAnswer)),
            "the connection ended"
        );
        assert!(
            answer_to(Vec::new(), false).await.is_ok(),
            "where acknowledgements are swallowed, the end is one"
        );
        assert!(answer_to(vec![error(Some(-libc::ENODEV))], false).await.is_err());
    }
}
