//! Applies an attach plan (`decide::attach_plan`: what IMDS says about a NIC really attached,
//! checked for meaning) the way Amazon Linux 2023's amazon-ec2-net-utils configures an ENI: its
//! private IPv4 and IPv6 addresses, its altnames, and for any ENI but the primary a
//! policy-routing table (default routes via the subnet's router and, once one advertises
//! itself, the IPv6 router; the subnet's blocks on-link) with one rule per address and delegated
//! prefix. Its addresses carry no prefix route (`IFA_F_NOPREFIXROUTE`): the subnet is on-link in
//! its table only. The main table gets at most a default route behind the primary's (a higher metric);
//! nothing that is there is replaced. [`detach`] and [`remove`] undo exactly what was added.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressFlags},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags},
    route::{RouteAttribute, RouteProtocol, RouteScope},
    rule::RuleAction,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::{
    decide::attach_plan::{main_default_allowed, AttachPlan, PolicyRouting},
    snapshot::{self, Entry},
};

/// How long a new ENI's IPv6 router may take to advertise itself (the kernel solicits one when
/// the link comes up; EC2's answers within a second).
const ROUTER_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttachReport {
    /// The rules the agent added (the detach path removes exactly these).
    pub rules: Vec<Entry>,
    /// The addresses this call added (not those already there: a refresh removes only the
    /// agent's own that IMDS no longer lists).
    pub addresses: Vec<(IpAddr, u8)>,
    pub table: Option<u32>,
    pub errors: Vec<String>,
}

fn note(report: &mut AttachReport, what: String, result: Result<(), rtnetlink::Error>) {
    if let Err(error) = result {
        if !super::failed_with(&error, libc::EEXIST) {
            report.errors.push(format!("{what}: {error}"));
        }
    }
}

pub async fn configure(handle: &Handle, ifindex: u32, plan: &AttachPlan) -> AttachReport {
    let mut report = AttachReport::default();
    let up = handle.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await;
    note(&mut report, "link up".into(), up);
    for (address, prefix) in &plan.addresses {
        // Added, not replaced: an address already there (on this NIC) stays as it is, and is not
        // the agent's (a refresh never removes it).
        let mut request = handle.address().add(ifindex, *address, *prefix);
        if plan.policy.is_some() {
            // No prefix route in main (IFA_F_NOPREFIXROUTE, Linux 3.14+): the subnet's route
            // goes in the ENI's table only, so that an ENI whose subnet overlaps the primary's
            // (or an answer naming a narrower block inside it) draws none of the host's other
            // traffic onto the new NIC.
            request.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        }
        let result = request.execute().await;
        if result.is_ok() {
            report.addresses.push((*address, *prefix));
        }
        note(&mut report, format!("address {address}/{prefix}"), result);
    }
    add_altnames(handle, ifindex, &plan.altnames, &mut report).await;
    let Some(policy) = &plan.policy else { return report };
    report.table = Some(policy.table);
    routes(handle, ifindex, policy, &mut report).await;
    for (source, length) in &policy.sources {
        // One rule per address or prefix, of its family
        // (`ip rule add from SOURCE lookup TABLE priority TABLE`).
        let (result, message) = match source {
            IpAddr::V4(v4) => {
                let mut request = handle
                    .rule()
                    .add()
                    .v4()
                    .source_prefix(*v4, *length)
                    .table_id(policy.table)
                    .priority(policy.table)
                    // rtnetlink leaves the action unspecified: the kernel keeps such a rule
                    // and answers every lookup through it with EINVAL.
                    .action(RuleAction::ToTable);
                let message = request.message_mut().clone();
                (request.execute().await, message)
            }
            IpAddr::V6(v6) => {
                let mut request = handle
                    .rule()
                    .add()
                    .v6()
                    .source_prefix(*v6, *length)
                    .table_id(policy.table)
                    .priority(policy.table)
                    // rtnetlink leaves the action unspecified: the kernel keeps such a rule
                    // and answers every lookup through it with EINVAL.
                    .action(RuleAction::ToTable);
                let message = request.message_mut().clone();
                (request.execute().await, message)
            }
        };
        note(&mut report, format!("rule from {source}/{length} lookup {}", policy.table), result);
        report
            .rules
            .push(Entry { summary: snapshot::rule_summary(&message), message: snapshot::to_hex(&message) });
    }
    if policy.ipv6_default {
        // Learnt, never assumed: the router EC2 advertises (`fe80::1` there) may not have spoken
        // yet; a task of its own waits for it so that the agent's loop does not.
        let (handle, policy) = (handle.clone(), policy.clone());
        tokio::spawn(async move { ipv6_default(&handle, ifindex, &policy).await });
    }
    report
}

/// The table's default route via the subnet's router and its on-link subnet routes; the main
/// table's default behind the primary's.
async fn routes(handle: &Handle, ifindex: u32, policy: &PolicyRouting, report: &mut AttachReport) {
    // The subnet first: the kernel checks that a route's gateway is reachable in the route's
    // table, and main has no route to the subnet.
    for (network, length) in &policy.subnets {
        let message = match network {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(*v4, *length)
                .output_interface(ifindex)
                .table_id(policy.table)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(*v6, *length)
                .output_interface(ifindex)
                .table_id(policy.table)
                .build(),
        };
        if let Err(error) = super::add_route_exclusive(handle, message).await {
            report.errors.push(format!("{network}/{length} table {}: {error}", policy.table));
        }
    }
    let mut default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(policy.gateway)
        .output_interface(ifindex)
        .table_id(policy.table);
    if let Some(metric) = policy.metric {
        default = default.priority(metric);
    }
    if let Err(error) = super::add_route_exclusive(handle, default.build()).await {
        report.errors.push(format!("default via {} table {}: {error}", policy.gateway, policy.table));
    }
    if let (true, Some(metric)) = (policy.main_default, policy.metric) {
        match lowest_default_metric(handle).await {
            Ok(lowest) if main_default_allowed(metric, lowest) => {
                // On-link: main has no route to the ENI's subnet (its addresses carry no
                // prefix route), and the router is on the NIC's link.
                let main = RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(policy.gateway)
                    .output_interface(ifindex)
                    .priority(metric)
                    .onlink()
                    .build();
                if let Err(error) = super::add_route_exclusive(handle, main).await {
                    report.errors.push(format!("default via {} metric {metric} (main): {error}", policy.gateway));
                }
            }
            Ok(lowest) => tracing::info!(
                ifindex,
                metric,
                ?lowest,
                "no default route in main with a lower metric than this ENI's: none added there (it would take the host's traffic)"
            ),
            Err(error) => report.errors.push(format!("reading main's default routes: {error}")),
        }
    }
}

/// The lowest metric of the IPv4 default routes in `main`, if there is one.
async fn lowest_default_metric(handle: &Handle) -> Result<Option<u32>, rtnetlink::Error> {
    let probe = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut routes = handle.route().get(probe).execute();
    let mut lowest: Option<u32> = None;
    while let Some(route) = routes.try_next().await? {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        if table != u32::from(libc::RT_TABLE_MAIN) || route.header.destination_prefix_length != 0 {
            continue;
        }
        let metric = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(0);
        lowest = Some(lowest.map_or(metric, |l| l.min(metric)));
    }
    Ok(lowest)
}

/// Adds the altnames the NIC does not have yet. One another interface has is an error naming it
/// (altnames and names share one namespace).
async fn add_altnames(handle: &Handle, ifindex: u32, altnames: &[String], report: &mut AttachReport) {
    if altnames.is_empty() {
        return;
    }
    let own = match handle.link().get().match_index(ifindex).execute().try_next().await {
        Ok(link) => link.as_ref().map(snapshot::link_altnames).unwrap_or_default(),
        Err(error) => {
            report.errors.push(format!("altnames: cannot read the link: {error}"));
            return;
        }
    };
    for altname in altnames.iter().filter(|a| !own.contains(a)) {
        let result = handle.link().property_add(ifindex).alt_ifname(&[altname.as_str()]).execute().await;
        match result {
            Ok(()) => {}
            Err(error) if super::failed_with(&error, libc::EEXIST) => {
                report
                    .errors
                    .push(format!("altname {altname}: another interface has this name or altname already"));
            }
            Err(error) => report.errors.push(format!("altname {altname}: {error}")),
        }
    }
}

/// Waits (at most [`ROUTER_WAIT`]) for the NIC's IPv6 router and puts the table's default route
/// via it.
async fn ipv6_default(handle: &Handle, ifindex: u32, policy: &PolicyRouting) {
    let started = tokio::time::Instant::now();
    let router = loop {
        // A dump can meet another on the agent's shared socket (EBUSY): asked again, like
        // "no router yet", until the wait is over.
        let found = ipv6_router(handle, ifindex).await;
        match found {
            Ok(Some(router)) => break router,
            _ if started.elapsed() < ROUTER_WAIT => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(None) => {
                tracing::warn!(ifindex, table = policy.table, "no IPv6 router advertised itself on the NIC within {} s: its table has no IPv6 default route, so IPv6 from its addresses goes by the main table (`hotplug-agent refresh` tries again)", ROUTER_WAIT.as_secs());
                return;
            }
            Err(error) => {
                tracing::warn!(ifindex, %error, "cannot read the NIC's IPv6 routes and neighbours: no IPv6 default route in its table (`hotplug-agent refresh` tries again)");
                return;
            }
        }
    };
    let mut route = RouteMessageBuilder::<Ipv6Addr>::new()
        .gateway(router)
        .output_interface(ifindex)
        .table_id(policy.table);
    if let Some(metric) = policy.metric {
        route = route.priority(metric);
    }
    match super::add_route_exclusive(handle, route.build()).await {
        Ok(()) => {
            tracing::info!(ifindex, table = policy.table, %router, "IPv6 default route via the advertised router")
        }
        Err(error) => {
            tracing::warn!(ifindex, table = policy.table, %router, %error, "IPv6 default route not added")
        }
    }
}

/// The NIC's IPv6 router: the gateway of the default route the kernel made from a router
/// advertisement on it, else a neighbour flagged as a router on it.
///
/// Kernel assumption: `addrconf` installs an RA's default route with `RTPROT_RA` in `main` (all
/// kernels since 2.6.x; with `accept_ra` on, the default where forwarding is off), and
/// `ndisc_router_discovery` sets `NTF_ROUTER` on the router's neighbour entry.
pub async fn ipv6_router(handle: &Handle, ifindex: u32) -> Result<Option<Ipv6Addr>, rtnetlink::Error> {
    let probe = RouteMessageBuilder::<Ipv6Addr>::new().build();
    let mut routes = handle.route().get(probe).execute();
    while let Some(route) = routes.try_next().await? {
        let oif = route.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex));
        let gateway = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet6(g)) => Some(*g),
            _ => None,
        });
        if oif && route.header.destination_prefix_length == 0 && route.header.protocol == RouteProtocol::Ra {
            if let Some(gateway) = gateway {
                return Ok(Some(gateway));
            }
        }
    }
    let mut neighbours =
        handle.neighbours().get().set_address_family(rtnetlink::packet_route::AddressFamily::Inet6).execute();
    while let Some(neighbour) = neighbours.try_next().await? {
        if neighbour.header.ifindex != ifindex || !neighbour.header.flags.contains(NeighbourFlags::Router) {
            continue;
        }
        let address = neighbour.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(*v6),
            _ => None,
        });
        // A router is on-link: its address is link-local (EC2's `fe80::1`).
        if let Some(address) = address.filter(|a| a.segments()[0] & 0xffc0 == 0xfe80) {
            return Ok(Some(address));
        }
    }
    Ok(None)
}

/// Removes the rules an attach added (routes in its table went with the device).
pub async fn detach(handle: &Handle, rules: &[Entry]) -> Vec<String> {
    let mut errors = Vec::new();
    for entry in rules {
        match snapshot::rule_message(entry) {
            Ok(message) => {
                if let Err(error) = handle.rule().del(message).execute().await {
                    let gone =
                        matches!(&error, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENOENT);
                    if !gone {
                        errors.push(format!("rule {}: {error}", entry.summary));
                    }
                }
            }
            Err(error) => errors.push(format!("rule {}: {error}", entry.summary)),
        }
    }
    errors
}

/// Removes addresses an attach added that IMDS no longer lists (a refresh), and the rules.
pub async fn remove(
    handle: &Handle,
    ifindex: u32,
    addresses: &[(IpAddr, u8)],
    rules: &[Entry],
) -> Vec<String> {
    let mut errors = detach(handle, rules).await;
    for (address, length) in addresses {
        let mut found = handle.address().get().set_link_index_filter(ifindex).execute();
        loop {
            match found.try_next().await {
                Ok(Some(message)) => {
                    let same = message.header.prefix_len == *length
                        && message.attributes.iter().any(|a| {
                            matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(ip) if ip == address)
                        });
                    if same {
                        if let Err(error) = handle.address().del(message).execute().await {
                            errors.push(format!("address {address}/{length}: {error}"));
                        }
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    errors.push(format!("address {address}/{length}: {error}"));
                    break;
                }
            }
        }
    }
    errors
}
