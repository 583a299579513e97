//! The rtnetlink connections a snapshot is read through: one for every request, and one with
//! strict checking (`NETLINK_GET_STRICT_CHK`, Linux 4.20+) for route dumps, so that the kernel
//! sends only the routes through the NIC rather than every route of every table: a host with a
//! BGP feed or a Kubernetes node holds hundreds of thousands, and a NIC's snapshot would cost a
//! read of all of them. Strict checking is its own socket because it also makes the kernel check
//! the header of every other dump request (links, addresses, rules, neighbours), which the other
//! requests do not all fill in as it wants.
//!
//! Kernel facts relied on (net/ipv4/fib_frontend.c `ip_valid_fib_dump_req`, shared by IPv6's
//! `inet6_dump_fib`, Linux 4.20+): a strict route dump accepts a zeroed header (address family
//! aside) with `RTA_OIF` and filters by the device any nexthop uses; a header field set (table,
//! protocol, type) filters too, which is why the request carries none, and `rtm_flags` 0 leaves
//! out the cached exceptions (PMTU, redirects) a non-strict dump adds. The request is checked
//! inside the dump callback, so a refusal (or the device gone, ENODEV) comes back as the error
//! code of `NLMSG_DONE`, which the connection is told to hand over rather than swallow.
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
    packet_route::{
        link::LinkMessage,
        route::{RouteAttribute, RouteMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::AsyncSocket as _,
    Handle, RouteMessageBuilder,
};

use super::{LinkState, SnapshotError};

/// `ENODEV` (include/uapi/asm-generic/errno-base.h).
const ENODEV: i32 = 19;

/// The handles: `handle` for requests and dumps, `dumps` (strict) for filtered route dumps, and
/// `requests` for a restore's pipelined requests, on a connection that hands over each
/// acknowledgement: a request counts as applied on its acknowledgement only, never because its
/// answers stopped (the connection ended).
#[derive(Clone, Debug)]
pub struct Netlink {
    pub handle: Handle,
    /// `None`: strict checking is not available; route dumps read every route.
    dumps: Option<Handle>,
    requests: Handle,
    /// Whether `requests` hands over acknowledgements (false only for [`Netlink::unfiltered`]).
    acks_forwarded: bool,
}

/// How a filtered dump ended other than with the routes.
enum Filtered {
    /// The NIC is gone.
    NoDevice,
    /// The kernel refused the request (its errno), or the connection ended mid-dump.
    Refused(String),
}

impl Netlink {
    /// Opens both connections, their tasks spawned on the current tokio runtime (an error, not a
    /// panic, outside one).
    pub fn connect() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            std::io::Error::other(format!("no tokio runtime for the netlink connections: {e}"))
        })?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        runtime.spawn(connection);
        let (mut connection, dumps, _) = rtnetlink::new_connection()?;
        let dumps = match connection.socket_mut().socket_mut().set_netlink_get_strict_chk(true) {
            Ok(()) => {
                connection.set_forward_done(true);
                runtime.spawn(connection);
                Some(dumps)
            }
            Err(error) => {
                tracing::warn!(%error, "this kernel has no strict netlink checking (Linux 4.20+): each snapshot reads every route of the host");
                None
            }
        };
        let (mut connection, requests, _) = rtnetlink::new_connection()?;
        connection.set_forward_ack(true);
        runtime.spawn(connection);
        Ok(Self { handle, dumps, requests, acks_forwarded: true })
    }

    /// Requests and unfiltered dumps through `handle` alone (its connection swallows the
    /// acknowledgements: a request's answers ending counts as its acknowledgement).
    pub fn unfiltered(handle: Handle) -> Self {
        Self { requests: handle.clone(), handle, dumps: None, acks_forwarded: false }
    }

    /// The connection for pipelined requests, and whether it hands over acknowledgements.
    pub fn requests(&self) -> (&Handle, bool) {
        (&self.requests, self.acks_forwarded)
    }

    /// The link's own settings (one request, no dump).
    pub async fn link(&self, ifindex: u32) -> Result<LinkState, SnapshotError> {
        let links: Vec<LinkMessage> =
            self.handle.link().get().match_index(ifindex).execute().try_collect().await?;
        links.first().map(super::link_settings).ok_or(SnapshotError::NoSuchLink(ifindex))
    }

    /// The ifindex of the link named `name`, if there is one.
    pub async fn index_of(&self, name: &str) -> Option<u32> {
        let links: Vec<LinkMessage> =
            self.handle.link().get().match_name(name.to_owned()).execute().try_collect().await.ok()?;
        links.first().map(|l| l.header.index)
    }

    /// The routes of `family` whose output device is `ifindex` (and, from an unfiltered dump,
    /// every other route: the caller keeps the ones through the NIC).
    pub async fn routes_through(
        &self,
        family: AddressFamily,
        ifindex: u32,
    ) -> Result<Vec<RouteMessage>, SnapshotError> {
        if let Some(dumps) = &self.dumps {
            match filtered_dump(dumps, family, ifindex).await {
                Ok(routes) => return Ok(routes),
                Err(Filtered::NoDevice) => return Err(SnapshotError::NoSuchLink(ifindex)),
                Err(Filtered::Refused(why)) => {
                    tracing::debug!(ifindex, "filtered route dump refused ({why}): reading every route");
                }
            }
        }
        let all = if family == AddressFamily::Inet6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        Ok(self.handle.route().get(all).execute().try_collect().await?)
    }
}

/// A strict `RTM_GETROUTE` dump of `family` filtered by `RTA_OIF`, read to its `NLMSG_DONE`.
async fn filtered_dump(
    dumps: &Handle,
    family: AddressFamily,
    ifindex: u32,
) -> Result<Vec<RouteMessage>, Filtered> {
    let mut filter = RouteMessage::default();
    filter.header.address_family = family;
    filter.attributes.push(RouteAttribute::Oif(ifindex));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(filter));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut responses = dumps.clone().request(request).map_err(|e| Filtered::Refused(e.to_string()))?;
    let mut routes = Vec::new();
    while let Some(message) = responses.next().await {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => routes.push(route),
            NetlinkPayload::Done(done) if done.code == -ENODEV => return Err(Filtered::NoDevice),
            NetlinkPayload::Done(done) if done.code < 0 => {
                return Err(Filtered::Refused(std::io::Error::from_raw_os_error(-done.code).to_string()))
            }
            NetlinkPayload::Done(_) => return Ok(routes),
            NetlinkPayload::Error(error) if error.code.map(|c| c.get()) == Some(-ENODEV) => {
                return Err(Filtered::NoDevice)
            }
            NetlinkPayload::Error(error) => return Err(Filtered::Refused(error.to_string())),
            _ => {}
        }
    }
    // Without its NLMSG_DONE the dump may be cut short: not a NIC's routes.
    Err(Filtered::Refused("the dump ended without NLMSG_DONE".into()))
}
