//! Restores a NIC's snapshot onto the NIC that came back (same MAC, new ifindex), idempotently:
//! what is already there stays, nothing the snapshot does not name is removed. Then reads the NIC
//! back and reports every difference.
//!
//! Order matters: name, MTU and the link's tuned attributes (`reconfigure::tuning`) while the link
//! is still down (a rename needs it down), sysctls and queue settings, addresses, then admin state
//! up (the kernel installs no IPv4 route through a gateway on a down link), then
//! routes, then rules (rules are not bound to a device and usually survive a reload; a missing one
//! is added again).
//!
//! What the kernel or a lease made is not replayed as it was: transient address flags and route
//! flags (`linkdown`, `dead`: a route read while the NIC had no carrier carries them, and the
//! kernel refuses a new route that does) are stripped; an address with a lifetime (a DHCP or
//! SLAAC lease) is either left to the NIC's network manager, which renews it, or replayed with
//! what is left of its lifetime, never with the stale one.
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressMessage},
        link::LinkMessage,
        route::{RouteAttribute, RouteFlags, RouteMessage, RouteNextHopFlags, RouteProtocol},
        rule::RuleMessage,
        RouteNetlinkMessage,
    },
    LinkUnspec,
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::monotonic_ns,
    snapshot::{self, NicSnapshot},
};

/// Where a restore's time went, in microseconds: the agent's part before the replay (filled in by
/// the agent), then each phase of [`restore`]. `status --json` and the restore log line show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestorePhases {
    /// From the kernel's registration of the NIC to the agent's decision to restore it: ring
    /// buffer delivery, decoding, classification, the decision.
    pub to_decision_us: u64,
    /// Waiting for udev and the NIC's network manager to be done with it.
    pub waited_us: u64,
    /// Reading the link as it came back (its name, MTU, altnames and admin state decide the link
    /// changes), and the rules when the snapshot has some (none is added twice).
    pub pre_read_us: u64,
    /// Link changes: name, MTU, alternative names, tuned attributes (txqueuelen, alias, group,
    /// GSO/GRO limits, MAC, master), and admin state up, which runs the driver's own open (rings,
    /// interrupts, firmware): often most of a restore.
    pub link_us: u64,
    /// Per-interface sysctls and queue settings, written through their files.
    pub tuning_us: u64,
    pub addresses_us: u64,
    /// Routes, and rules: 0 when they sent nothing after the last acknowledgement (that time is
    /// the read-back's), so that the phases before the read-back add up to the latency.
    pub routes_us: u64,
    pub rules_us: u64,
    /// Reading the NIC back to compare with the snapshot: after the last acknowledgement, so not
    /// part of the restore latency.
    pub read_back_us: u64,
}

impl std::fmt::Display for RestorePhases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to-decision {} us, waited {} us, pre-read {} us, link {} us, tuning {} us, addresses {} us, \
             routes {} us, rules {} us, read-back {} us",
            self.to_decision_us,
            self.waited_us,
            self.pre_read_us,
            self.link_us,
            self.tuning_us,
            self.addresses_us,
            self.routes_us,
            self.rules_us,
            self.read_back_us
        )
    }
}

/// Microseconds since `since_ns` (CLOCK_MONOTONIC), and now.
fn lap(since_ns: u64) -> (u64, u64) {
    let now = monotonic_ns();
    (now.saturating_sub(since_ns) / 1000, now)
}

/// What a restore did and how the NIC looks afterwards.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    /// Netlink requests sent.
    pub requests: u32,
    /// Requests the kernel refused (other than "already exists").
    pub errors: Vec<String>,
    /// Differences between the snapshot and the NIC read back afterwards; empty when restored.
    pub differences: Vec<String>,
    /// CLOCK_MONOTONIC ns when the last request was acknowledged.
    pub last_ack_ns: u64,
    /// CLOCK_MONOTONIC ns when the restore began (its first phase's start): the agent's part
    /// before it ends here, so that the phases add up to the latency.
    #[serde(skip)]
    pub started_ns: u64,
    /// What was not replayed and why (leases left to the NIC's manager, expired ones).
    pub left_to_manager: Vec<String>,
    /// Where the time went (the agent fills in the part before the replay).
    pub phases: RestorePhases,
}

/// How to replay a snapshot.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Another manager (networkd's DHCP client) renews leases on this NIC: addresses with a
    /// lifetime and DHCP routes are its, not the snapshot's.
    pub leave_dynamic: bool,
    /// CLOCK_MONOTONIC ns now, to age the lifetimes of replayed addresses.
    pub now_ns: u64,
    /// Put back missing routes and rules only: the link (name, MTU, altnames, admin state) and
    /// its addresses are left as they are (another manager just configured them).
    pub routes_and_rules_only: bool,
}

/// Lifetime in seconds meaning "forever" (`INFINITY_LIFE_TIME`).
const FOREVER: u32 = u32::MAX;

/// An address ready to replay: transient flags stripped, its lifetime aged by the time since the
/// snapshot; `Err` says why it is not replayed.
fn replayable_address(
    mut message: AddressMessage,
    snapshot_age_s: u32,
    options: RestoreOptions,
) -> Result<AddressMessage, &'static str> {
    for attribute in &mut message.attributes {
        match attribute {
            // Transient state is the kernel's to set again.
            AddressAttribute::Flags(flags) => flags.remove(
                AddressFlags::Tentative
                    | AddressFlags::Dadfailed
                    | AddressFlags::Deprecated
                    | AddressFlags::Optimistic,
            ),
            AddressAttribute::CacheInfo(info) if info.ifa_valid != FOREVER => {
                if options.leave_dynamic {
                    return Err("a lease's, renewed by the NIC's network manager");
                }
                let valid = info.ifa_valid.saturating_sub(snapshot_age_s);
                if valid == 0 {
                    return Err("its lifetime ran out since the snapshot");
                }
                let preferred = if info.ifa_preferred == FOREVER {
                    FOREVER
                } else {
                    info.ifa_preferred.saturating_sub(snapshot_age_s)
                };
                info.ifa_preferred = preferred;
                info.ifa_valid = valid;
            }
            _ => {}
        }
    }
    Ok(message)
}

/// A route ready to replay on `ifindex`: the kernel's state flags stripped; `Err` says why not.
fn replayable_route(
    mut message: RouteMessage,
    ifindex: u32,
    options: RestoreOptions,
) -> Result<RouteMessage, &'static str> {
    if options.leave_dynamic && message.header.protocol == RouteProtocol::Dhcp {
        return Err("a lease's, renewed by the NIC's network manager");
    }
    // Of the header's flags only `onlink` is configuration; `linkdown`, `dead`, offload and trap
    // are the kernel's (and a request carrying `linkdown` or `dead` is refused with EINVAL).
    message.header.flags &= RouteFlags::Onlink;
    message.attributes.retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
    for attribute in &mut message.attributes {
        match attribute {
            RouteAttribute::Oif(index) => *index = ifindex,
            RouteAttribute::MultiPath(hops) => {
                for hop in hops {
                    hop.flags &= RouteNextHopFlags::Onlink;
                }
            }
            _ => {}
        }
    }
    Ok(message)
}

/// The addresses, routes and rules a restore sends, worked out from the snapshot alone (pure:
/// what a state file read back from disk turns into).
#[derive(Clone, Debug, Default)]
pub struct ReplayPlan {
    /// (summary, message) of each address to add, on `ifindex`.
    pub addresses: Vec<(String, AddressMessage)>,
    /// (summary, message) of each route to add, through `ifindex`.
    pub routes: Vec<(String, RouteMessage)>,
    /// (summary, message) of each rule.
    pub rules: Vec<(String, RuleMessage)>,
    /// What is not replayed, and why.
    pub left_to_manager: Vec<String>,
    /// The read-back differences that what was left explains.
    pub expected_missing: Vec<String>,
    /// Entries of the snapshot that do not make a message.
    pub errors: Vec<String>,
}

/// Works out what replaying `want` onto `ifindex` sends.
pub fn replay_plan(want: &NicSnapshot, ifindex: u32, options: RestoreOptions) -> ReplayPlan {
    let mut plan = ReplayPlan::default();
    let snapshot_age_s =
        u32::try_from(options.now_ns.saturating_sub(want.taken_ns) / 1_000_000_000).unwrap_or(u32::MAX);
    if !options.routes_and_rules_only {
        for entry in &want.addresses {
            let message = match snapshot::address_message(entry) {
                Ok(m) => m,
                Err(e) => {
                    plan.errors.push(format!("address {}: {e}", entry.summary));
                    continue;
                }
            };
            match replayable_address(message, snapshot_age_s, options) {
                Ok(mut message) => {
                    message.header.index = ifindex;
                    plan.addresses.push((entry.summary.clone(), message));
                }
                Err(why) => {
                    plan.left_to_manager.push(format!("address {}: {why}", entry.summary));
                    plan.expected_missing.push(format!("address missing: {}", entry.summary));
                }
            }
        }
    }
    for entry in &want.routes {
        let message = match snapshot::route_message(entry) {
            Ok(m) => m,
            Err(e) => {
                plan.errors.push(format!("route {}: {e}", entry.summary));
                continue;
            }
        };
        match replayable_route(message, ifindex, options) {
            Ok(message) => plan.routes.push((entry.summary.clone(), message)),
            Err(why) => {
                plan.left_to_manager.push(format!("route {}: {why}", entry.summary));
                plan.expected_missing.push(format!("route missing: {}", entry.summary));
            }
        }
    }
    // On-link routes first (stable: otherwise the snapshot's order): a route through a gateway
    // needs one to the gateway, in its own table, and an ENI's addresses carry no prefix route
    // to stand in (the kernel dumps a table's default before its subnet).
    plan.routes.sort_by_key(|(_, message)| through_gateway(message));
    for entry in &want.rules {
        match snapshot::rule_message(entry) {
            Ok(message) => plan.rules.push((entry.summary.clone(), message)),
            Err(e) => plan.errors.push(format!("rule {}: {e}", entry.summary)),
        }
    }
    plan
}

/// Whether a route goes through a gateway (or several).
fn through_gateway(message: &RouteMessage) -> bool {
    use rtnetlink::packet_route::route::RouteAttribute;
    message.attributes.iter().any(|a| {
        matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_))
    })
}

struct Sender<'a> {
    netlink: &'a snapshot::Netlink,
    report: RestoreReport,
    /// The read-back differences that what was left to the manager explains.
    expected_missing: Vec<String>,
}

impl Sender<'_> {
    fn outcome(&mut self, what: &str, result: Result<(), super::SendError>) {
        self.report.requests += 1;
        self.report.last_ack_ns = crate::clock::monotonic_ns();
        if let Err(error) = result {
            if !error.is_errno(libc::EEXIST) {
                self.report.errors.push(format!("{what}: {error}"));
            }
        }
    }

    /// Link changes count every error, EEXIST included (a rename onto a taken name fails so).
    /// Sent as rtnetlink's link set is (`RTM_NEWLINK`, create-exclusive flags), on the connection
    /// that hands over acknowledgements.
    async fn set_link(&mut self, what: &str, message: LinkMessage) {
        let mut sent = super::send_pipelined(
            self.netlink,
            vec![RouteNetlinkMessage::SetLink(message)],
            super::Create::Exclusive,
        )
        .await;
        self.report.requests += 1;
        self.report.last_ack_ns = crate::clock::monotonic_ns();
        if let Some(Err(error)) = sent.pop() {
            self.report.errors.push(format!("{what}: {error}"));
        }
    }
}

/// Restores `want` onto the link `ifindex`.
///
/// What is read first is the link alone (one request): the addresses are sent as replacements
/// and the routes exclusively, so neither needs to know what is there, and a NIC that just came
/// back holds nothing of its own yet (a full read would also walk every route of the host).
/// Rules are not bound to the NIC and survive it: when the snapshot has any, the rules are read
/// so that none is added twice. Each phase's requests are pipelined (`send_pipelined`).
pub async fn restore(
    netlink: &snapshot::Netlink,
    want: &NicSnapshot,
    ifindex: u32,
    options: RestoreOptions,
) -> RestoreReport {
    let handle = &netlink.handle;
    let mut tx = Sender { netlink, report: RestoreReport::default(), expected_missing: Vec::new() };
    let mut phases = RestorePhases::default();
    let mut mark = monotonic_ns();
    let started_ns = mark;
    let have = netlink.link(ifindex).await.ok();
    // Rules that cannot be read are taken as none: one already there then fails its request
    // with EEXIST, which is no error.
    let have_rules: Vec<String> = if want.rules.is_empty() {
        Vec::new()
    } else {
        snapshot::all_rules(netlink).await.unwrap_or_default().iter().map(snapshot::rule_summary).collect()
    };
    // The master the snapshot names, by its ifindex now.
    let master_index = match &want.tuning.link.master {
        Some(name) => netlink.index_of(name).await,
        None => None,
    };
    (phases.pre_read_us, mark) = lap(mark);
    let link_too = !options.routes_and_rules_only;
    if let Some(have) = have.as_ref().filter(|_| link_too) {
        if have.name != want.name {
            if have.up {
                let down = LinkUnspec::new_with_index(ifindex).down().build();
                tx.set_link("link down for rename", down).await;
            }
            let rename = LinkUnspec::new_with_index(ifindex).name(want.name.clone()).build();
            tx.set_link(&format!("rename to {}", want.name), rename).await;
        }
        if let Some(mtu) = want.mtu.filter(|&m| Some(m) != have.mtu) {
            let message = LinkUnspec::new_with_index(ifindex).mtu(mtu).build();
            tx.set_link(&format!("mtu {mtu}"), message).await;
        }
        // One request per name: udev may add some of them meanwhile (its alternative names
        // policy), and one that exists fails a request that holds several.
        for missing in want.altnames.iter().filter(|a| !have.altnames.contains(a)) {
            let result = handle.link().property_add(ifindex).alt_ifname(&[missing.as_str()]).execute().await;
            tx.outcome(&format!("altname {missing}"), result.map_err(super::SendError::from));
        }
        // A snapshot that read no tuning (release 0.1.0's) changes none.
        if want.tuning.read {
            let mut now = have.tuning.clone();
            now.master = want
                .tuning
                .link
                .master
                .clone()
                .filter(|_| have.master.is_some() && have.master == master_index);
            let (changes, errors) =
                super::tuning::link_changes(ifindex, &want.tuning.link, &now, master_index);
            tx.report.errors.extend(errors);
            for super::tuning::LinkChange { what, message } in changes {
                tx.set_link(&what, message).await;
            }
        }
    }

    let link_us;
    (link_us, mark) = lap(mark);
    phases.link_us = link_us;

    // Sysctls and queues, on the name the link has now (read again by its ifindex: renamed above,
    // or not), never on a name the snapshot gives.
    if link_too && want.tuning.read && !(want.tuning.sysctls.is_empty() && want.tuning.queues.is_empty()) {
        match netlink.link(ifindex).await {
            Ok(link) => {
                let root = snapshot::tuning::Root::default();
                let written = super::tuning::write_settings(
                    &root,
                    &link.name,
                    &want.tuning,
                    &snapshot::Tuning::default(),
                );
                for (what, result) in written {
                    // A file write, not a netlink request; done when written.
                    tx.report.last_ack_ns = crate::clock::monotonic_ns();
                    if let Err(error) = result {
                        tx.report.errors.push(format!("{what}: {error}"));
                    }
                }
            }
            Err(error) => {
                tx.report.errors.push(format!("sysctls and queue settings: the link is gone? {error}"))
            }
        }
    }
    (phases.tuning_us, mark) = lap(mark);

    let plan = replay_plan(want, ifindex, options);
    tx.report.errors.extend(plan.errors);
    tx.report.left_to_manager.extend(plan.left_to_manager);
    tx.expected_missing.extend(plan.expected_missing);
    let (summaries, messages): (Vec<String>, Vec<_>) =
        plan.addresses.into_iter().map(|(s, m)| (s, RouteNetlinkMessage::NewAddress(m))).unzip();
    let sent = super::send_pipelined(netlink, messages, super::Create::Replace).await;
    for (summary, result) in summaries.iter().zip(sent) {
        tx.outcome(&format!("address {summary}"), result);
    }

    (phases.addresses_us, mark) = lap(mark);

    if link_too && want.up && !have.as_ref().is_some_and(|h| h.up && h.name == want.name) {
        let up = LinkUnspec::new_with_index(ifindex).up().build();
        tx.set_link("link up", up).await;
    }
    let link_up_us;
    (link_up_us, mark) = lap(mark);
    phases.link_us += link_up_us;

    let routes_start_ns = mark;
    let (summaries, messages): (Vec<String>, Vec<RouteMessage>) = plan.routes.into_iter().unzip();
    let sent = super::add_routes_exclusive(netlink, messages).await;
    for (summary, result) in summaries.iter().zip(sent) {
        tx.report.requests += 1;
        tx.report.last_ack_ns = crate::clock::monotonic_ns();
        if let Err(error) = result {
            tx.report.errors.push(format!("route {summary}: {error}"));
        }
    }

    (phases.routes_us, mark) = lap(mark);

    let rules_start_ns = mark;
    let (summaries, messages): (Vec<String>, Vec<_>) = plan
        .rules
        .into_iter()
        .filter(|(summary, _)| !have_rules.contains(summary))
        .map(|(s, m)| (s, RouteNetlinkMessage::NewRule(m)))
        .unzip();
    let sent = super::send_pipelined(netlink, messages, super::Create::Exclusive).await;
    for (summary, result) in summaries.iter().zip(sent) {
        tx.outcome(&format!("rule {summary}"), result);
    }

    (phases.rules_us, mark) = lap(mark);
    // A trailing phase that sent nothing ended after the last acknowledgement: its time (a rules
    // phase with every rule still there, 9 ms once under emulation) goes with the read-back, so
    // that the phases up to the last acknowledgement add up to the latency.
    let mut trailing_us = 0;
    if tx.report.last_ack_ns < rules_start_ns {
        trailing_us += std::mem::take(&mut phases.rules_us);
    }
    if tx.report.last_ack_ns < routes_start_ns {
        trailing_us += std::mem::take(&mut phases.routes_us);
    }

    let last_ack_ns = tx.report.last_ack_ns;
    let expected_missing = tx.expected_missing;
    let mut report = tx.report;
    match snapshot::capture(netlink, ifindex).await {
        // What was left to the manager is not missing.
        Ok(now) => {
            report.differences =
                want.differences(&now).into_iter().filter(|d| !expected_missing.contains(d)).collect();
            if !link_too {
                // Only routes and rules were put back: the rest of the NIC (its addresses
                // included: the manager's) is not compared.
                report
                    .differences
                    .retain(|d| d.starts_with("route missing: ") || d.starts_with("rule missing: "));
            }
        }
        Err(error) => report.errors.push(format!("reading the NIC back: {error}")),
    }
    (phases.read_back_us, _) = lap(mark);
    phases.read_back_us += trailing_us;
    report.last_ack_ns = last_ack_ns;
    report.started_ns = started_ns;
    report.phases = phases;
    report
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::address::CacheInfo;

    use super::*;

    fn address(valid: u32, preferred: u32) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.attributes.push(AddressAttribute::Flags(AddressFlags::Tentative | AddressFlags::Secondary));
        let mut info = CacheInfo::default();
        info.ifa_preferred = preferred;
        info.ifa_valid = valid;
        message.attributes.push(AddressAttribute::CacheInfo(info));
        message
    }

    fn cache_info(message: &AddressMessage) -> Option<CacheInfo> {
        message.attributes.iter().find_map(|a| {
            if let AddressAttribute::CacheInfo(c) = a {
                Some(*c)
            } else {
                None
            }
        })
    }

    #[test]
    fn a_leases_address_is_aged_or_left_never_replayed_stale() -> Result<(), &'static str> {
        let replay = RestoreOptions { leave_dynamic: false, ..RestoreOptions::default() };
        let aged = replayable_address(address(3600, 1800), 600, replay)?;
        let info = cache_info(&aged).ok_or("no cache info")?;
        assert_eq!(
            (info.ifa_valid, info.ifa_preferred),
            (3000, 1200),
            "lifetimes aged by the snapshot's age"
        );
        let flags =
            aged.attributes
                .iter()
                .find_map(|a| if let AddressAttribute::Flags(f) = a { Some(*f) } else { None });
        assert_eq!(flags, Some(AddressFlags::Secondary), "tentative is the kernel's");
        assert!(replayable_address(address(3600, 1800), 3600, replay).is_err(), "expired meanwhile");
        let forever = replayable_address(address(FOREVER, FOREVER), 10_000, replay)?;
        assert_eq!(
            cache_info(&forever).map(|c| c.ifa_valid),
            Some(FOREVER),
            "a static address keeps forever"
        );
        let leave = RestoreOptions { leave_dynamic: true, ..RestoreOptions::default() };
        assert!(replayable_address(address(3600, 1800), 0, leave).is_err(), "networkd's DHCP renews it");
        assert!(replayable_address(address(FOREVER, FOREVER), 0, leave).is_ok());
        Ok(())
    }

    #[test]
    fn a_route_read_without_carrier_is_replayed_without_the_kernels_flags() -> Result<(), &'static str> {
        let mut message = RouteMessage::default();
        message.header.flags = RouteFlags::Linkdown | RouteFlags::Dead | RouteFlags::Onlink;
        message.attributes.push(RouteAttribute::Oif(3));
        let replay = RestoreOptions::default();
        let route = replayable_route(message.clone(), 9, replay)?;
        assert_eq!(route.header.flags, RouteFlags::Onlink);
        assert!(route.attributes.contains(&RouteAttribute::Oif(9)));
        message.header.protocol = RouteProtocol::Dhcp;
        assert!(replayable_route(message.clone(), 9, replay).is_ok(), "no manager: replayed");
        assert!(replayable_route(
            message,
            9,
            RestoreOptions { leave_dynamic: true, ..RestoreOptions::default() }
        )
        .is_err());
        Ok(())
    }
}
