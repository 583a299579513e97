//! The rtnetlink connections a snapshot is read through: one for every request, and one with
//! strict checking (`NETLINK_GET_STRICT_CHK`, Linux 4.20+) for route dumps, so that the kernel
//! sends only the routes through the NIC rather than every route of every table: a host with a
//! BGP feed or a Kubernetes node holds hundreds of thousands, and a NIC's snapshot would cost a
//! read of all of them. Strict checking is its own socket because it also makes the kernel check
//! the header of every other dump request (links, addresses, rules, neighbours), which the other
//! requests do not all fill in as it wants.
//!
//! Kernel facts relied on (net/ipv4/fib_frontend.c `ip_valid_fib_dump_req`, shared by IPv6's
//! `inet6_dump_fib`): a strict route dump accepts a zeroed header (address family aside) with
//! `RTA_OIF` and filters by the device any nexthop uses; a header field set (table, protocol,
//! type) filters too, which is why the request carries none.
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        route::{RouteAttribute, RouteMessage},
        AddressFamily,
    },
    sys::AsyncSocket as _,
    Handle, RouteMessageBuilder,
};

/// The handles: `handle` for requests, `dumps` (strict) for filtered route dumps.
#[derive(Clone, Debug)]
pub struct Netlink {
    pub handle: Handle,
    /// `None`: strict checking is not available; route dumps read every route.
    dumps: Option<Handle>,
}

impl Netlink {
    /// Opens both connections, their tasks spawned on the current tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let (mut connection, dumps, _) = rtnetlink::new_connection()?;
        let dumps = match connection.socket_mut().socket_mut().set_netlink_get_strict_chk(true) {
            Ok(()) => {
                tokio::spawn(connection);
                Some(dumps)
            }
            Err(error) => {
                tracing::warn!(%error, "this kernel has no strict netlink checking (Linux 4.20+): each snapshot reads every route of the host");
                None
            }
        };
        Ok(Self { handle, dumps })
    }

    /// Requests and unfiltered dumps through `handle` alone.
    pub const fn unfiltered(handle: Handle) -> Self {
        Self { handle, dumps: None }
    }

    /// The routes of `family` whose output device is `ifindex` (and, from an unfiltered dump,
    /// every other route: the caller keeps the ones through the NIC).
    pub async fn routes_through(
        &self,
        family: AddressFamily,
        ifindex: u32,
    ) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
        if let Some(dumps) = &self.dumps {
            let mut filter = RouteMessage::default();
            filter.header.address_family = family;
            filter.attributes.push(RouteAttribute::Oif(ifindex));
            match dumps.route().get(filter).execute().try_collect().await {
                Ok(routes) => return Ok(routes),
                // The NIC left meanwhile (ENODEV), or a kernel refused the filter: read them all.
                Err(error) => {
                    tracing::debug!(%error, ifindex, "filtered route dump refused: reading every route")
                }
            }
        }
        let all = if family == AddressFamily::Inet6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        self.handle.route().get(all).execute().try_collect().await
    }
}
