//! Whether two snapshots of a NIC hold the same configuration, ignoring what the kernel changes by
//! itself between two reads: counters and timestamps (`IFA_CACHEINFO`'s stamps, `RTA_CACHEINFO`'s
//! use counts), transient address flags (tentative, deprecated), and lifetimes counting down.
//! A lifetime is compared as the moment it ends (read time plus what was left), so a renewed lease
//! (DHCP, SLAAC: the lifetime starts again) is a change, and one merely counting down is not.
//!
//! The agent re-reads a NIC after every rtnetlink notification that concerns it and persists what
//! changed only: a re-read that finds the same configuration writes nothing.
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressMessage},
    route::{RouteAttribute, RouteMessage, RouteProtocol},
};

use super::{address_message, route_message, Entry, NicSnapshot};

/// Lifetime in seconds meaning "forever" (`INFINITY_LIFE_TIME`).
const FOREVER: u32 = u32::MAX;

/// How far apart two readings of one lifetime's end may be and still be the same lifetime: the
/// kernel reports whole seconds, and a read takes time.
const SLACK_S: u64 = 2;

/// `RTA_CACHEINFO`'s `rta_expires` unit: clock ticks (`USER_HZ`: 100 on x86_64 and arm64).
const TICKS_PER_S: u32 = 100;

impl NicSnapshot {
    /// What of `self` (a snapshot just restored) `now` lacks that no lease or the kernel would
    /// bring back: addresses without a lifetime (IPv6 link-local ones aside: the kernel's),
    /// routes but a DHCP client's, and rules. One line per object; a manager that tears the NIC
    /// down right after a restore (ifupdown's late `ifdown`) takes these.
    pub fn static_lost_in(&self, now: &Self) -> Vec<String> {
        let address_key = |e: &Entry| e.summary.split_whitespace().next().unwrap_or_default().to_owned();
        let have: Vec<String> = now.addresses.iter().map(address_key).collect();
        let static_address = |e: &Entry| {
            address_message(e).is_ok_and(|m| {
                let forever = !m
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::CacheInfo(c) if c.ifa_valid != FOREVER));
                let link_local = m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(std::net::IpAddr::V6(v6)) if v6.segments()[0] & 0xffc0 == 0xfe80)
                });
                forever && !link_local
            })
        };
        let mut lost: Vec<String> = self
            .addresses
            .iter()
            .filter(|e| static_address(e) && !have.contains(&address_key(e)))
            .map(|e| format!("address {}", e.summary))
            .collect();
        let not_a_lease =
            |e: &Entry| route_message(e).is_ok_and(|m| m.header.protocol != RouteProtocol::Dhcp);
        lost.extend(
            self.routes
                .iter()
                .filter(|e| not_a_lease(e) && !now.routes.iter().any(|h| h.summary == e.summary))
                .map(|e| format!("route {}", e.summary)),
        );
        // A rule from or to a lease's address follows the lease (a new one may differ).
        let leased: Vec<std::net::IpAddr> = self
            .addresses
            .iter()
            .filter_map(|e| address_message(e).ok())
            .filter(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::CacheInfo(c) if c.ifa_valid != FOREVER))
            })
            .flat_map(|m| {
                m.attributes.into_iter().filter_map(|a| match a {
                    AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(ip),
                    _ => None,
                })
            })
            .collect();
        let not_leased = |e: &Entry| {
            super::rule_message(e).is_ok_and(|m| {
                let (from, to) = super::rule_addresses(&m);
                ![from, to].iter().flatten().any(|ip| leased.contains(ip))
            })
        };
        lost.extend(
            self.rules
                .iter()
                .filter(|e| not_leased(e) && !now.rules.iter().any(|h| h.summary == e.summary))
                .map(|e| format!("rule {}", e.summary)),
        );
        lost
    }

    /// True when `other` holds the same configuration as `self` (see the module's comment); the
    /// ifindex and the read time do not count.
    pub fn same_configuration(&self, other: &Self) -> bool {
        let (a_s, b_s) = (self.taken_ns / 1_000_000_000, other.taken_ns / 1_000_000_000);
        self.mac == other.mac
            && self.name == other.name
            && self.mtu == other.mtu
            && self.up == other.up
            && self.altnames == other.altnames
            && self.manager == other.manager
            && self.tuning == other.tuning
            && self.rules == other.rules
            && same(&self.addresses, &other.addresses, |a, b| same_address(a, a_s, b, b_s))
            && same(&self.routes, &other.routes, |a, b| same_route(a, a_s, b, b_s))
    }
}

fn same(a: &[Entry], b: &[Entry], equal: impl Fn(&Entry, &Entry) -> bool) -> bool {
    // Equal text is not enough: the same lifetime left at two read times is a renewal.
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.summary == y.summary && equal(x, y))
}

/// When a lifetime ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Never,
    /// It has ended (the kernel reports 0 left, or a negative expiry, until it acts on it): two
    /// reads of an ended lifetime are the same however far apart.
    Passed,
    /// At this second of CLOCK_MONOTONIC.
    At(u64),
}

/// When a lifetime of `left` seconds, read at `read_s`, ends.
fn end(read_s: u64, left: u32) -> End {
    match left {
        FOREVER => End::Never,
        0 => End::Passed,
        left => End::At(read_s + u64::from(left)),
    }
}

fn same_end(a: End, b: End) -> bool {
    match (a, b) {
        (End::At(a), End::At(b)) => a.abs_diff(b) <= SLACK_S,
        (a, b) => a == b,
    }
}

/// An address without what the kernel changes by itself, and when its lifetimes end.
fn lasting_address(entry: &Entry, read_s: u64) -> Option<(AddressMessage, End, End)> {
    let mut message = address_message(entry).ok()?;
    let mut ends = (End::Never, End::Never);
    message.attributes.retain(|attribute| match attribute {
        AddressAttribute::CacheInfo(info) => {
            ends = (end(read_s, info.ifa_valid), end(read_s, info.ifa_preferred));
            false
        }
        // The lasting flags are in the summary, compared already.
        AddressAttribute::Flags(_) => false,
        _ => true,
    });
    message.header.flags = Default::default();
    Some((message, ends.0, ends.1))
}

fn same_address(a: &Entry, a_s: u64, b: &Entry, b_s: u64) -> bool {
    match (lasting_address(a, a_s), lasting_address(b, b_s)) {
        (Some((a, a_valid, a_preferred)), Some((b, b_valid, b_preferred))) => {
            a == b && same_end(a_valid, b_valid) && same_end(a_preferred, b_preferred)
        }
        _ => false,
    }
}

/// A route without its cache information, and when it expires.
fn lasting_route(entry: &Entry, read_s: u64) -> Option<(RouteMessage, End)> {
    let mut message = route_message(entry).ok()?;
    let mut expires = End::Never;
    message.attributes.retain(|attribute| match attribute {
        RouteAttribute::CacheInfo(info) => {
            // `rta_expires` is signed: 0 is no expiry, below 0 an expiry passed.
            let ticks = info.expires.cast_signed();
            expires = match ticks {
                0 => End::Never,
                ..0 => End::Passed,
                _ => End::At(read_s + u64::from(ticks.unsigned_abs() / TICKS_PER_S)),
            };
            false
        }
        _ => true,
    });
    // Linkdown and dead come and go with the carrier.
    message.header.flags &= rtnetlink::packet_route::route::RouteFlags::Onlink;
    Some((message, expires))
}

fn same_route(a: &Entry, a_s: u64, b: &Entry, b_s: u64) -> bool {
    match (lasting_route(a, a_s), lasting_route(b, b_s)) {
        (Some((a, a_expires)), Some((b, b_expires))) => a == b && same_end(a_expires, b_expires),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::{
        address::CacheInfo,
        route::{RouteCacheInfo, RouteFlags},
    };

    use super::*;
    use crate::snapshot::to_hex;

    fn address(valid: u32, preferred: u32, stamp: u32) -> Entry {
        let mut message = AddressMessage::default();
        message.header.prefix_len = 24;
        message.attributes.push(AddressAttribute::Address([10, 0, 0, 5].into()));
        let mut info = CacheInfo::default();
        info.ifa_valid = valid;
        info.ifa_preferred = preferred;
        info.cstamp = 7;
        info.tstamp = stamp;
        message.attributes.push(AddressAttribute::CacheInfo(info));
        Entry { summary: "10.0.0.5/24".into(), message: to_hex(&message) }
    }

    fn route(used: u32, expires_ticks: u32, linkdown: bool, metric: u32) -> Entry {
        let mut message = RouteMessage::default();
        message.header.destination_prefix_length = 24;
        if linkdown {
            message.header.flags = RouteFlags::Linkdown;
        }
        message.attributes.push(RouteAttribute::Priority(metric));
        // clntref, last_use, expires, error, used, id, ts, ts_age (struct rta_cacheinfo).
        let fields = [0, 0, expires_ticks, 0, used, 0, 0, 0];
        let bytes: Vec<u8> = fields.iter().flat_map(|f: &u32| f.to_ne_bytes()).collect();
        let Ok(info) = RouteCacheInfo::parse(&bytes) else { panic!("rta_cacheinfo of 32 bytes") };
        message.attributes.push(RouteAttribute::CacheInfo(info));
        Entry { summary: "192.168.50.0/24".into(), message: to_hex(&message) }
    }

    fn snapshot(at_s: u64, addresses: Vec<Entry>, routes: Vec<Entry>) -> NicSnapshot {
        NicSnapshot {
            mac: "02:00:00:00:00:01".into(),
            ifindex: 2,
            name: "eth0".into(),
            mtu: Some(1500),
            up: true,
            altnames: Vec::new(),
            addresses,
            routes,
            rules: Vec::new(),
            taken_ns: at_s * 1_000_000_000,
            manager: None,
            tuning: Default::default(),
        }
    }

    #[test]
    fn a_teardown_loses_static_objects_and_leases_are_not_counted() {
        let mut lease = address(3600, 1800, 50);
        lease.summary = "10.0.0.5/24 label eth0".into();
        let mut fixed = AddressMessage::default();
        fixed.header.prefix_len = 24;
        fixed.attributes.push(AddressAttribute::Address([10, 0, 0, 50].into()));
        let fixed = Entry { summary: "10.0.0.50/24 label eth0".into(), message: to_hex(&fixed) };
        let mut link_local = AddressMessage::default();
        link_local.header.prefix_len = 64;
        link_local
            .attributes
            .push(AddressAttribute::Address(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).into()));
        let link_local = Entry { summary: "fe80::1/64".into(), message: to_hex(&link_local) };
        let mut operator = RouteMessage::default();
        operator.header.destination_prefix_length = 24;
        operator.header.protocol = RouteProtocol::Boot;
        let operator =
            Entry { summary: "inet 192.168.82.0/24 proto Boot".into(), message: to_hex(&operator) };
        let mut leased = RouteMessage::default();
        leased.header.protocol = RouteProtocol::Dhcp;
        let leased = Entry { summary: "inet default proto Dhcp".into(), message: to_hex(&leased) };
        let rule = |from: [u8; 4], summary: &str| {
            let mut m = rtnetlink::packet_route::rule::RuleMessage::default();
            m.header.src_len = 32;
            m.attributes.push(rtnetlink::packet_route::rule::RuleAttribute::Source(from.into()));
            Entry { summary: summary.into(), message: to_hex(&m) }
        };
        let mut restored =
            snapshot(100, vec![lease.clone(), fixed.clone(), link_local], vec![operator.clone(), leased]);
        restored.rules = vec![
            rule([10, 0, 0, 50], "pref 10001 from 10.0.0.50"),
            rule([10, 0, 0, 5], "pref 10002 from 10.0.0.5"),
        ];
        // ifdown flushed everything; ifup put back only what the lease and kernel make.
        let torn = snapshot(110, vec![lease], Vec::new());
        let lost = restored.static_lost_in(&torn);
        assert_eq!(
            lost,
            [
                "address 10.0.0.50/24 label eth0",
                "route inet 192.168.82.0/24 proto Boot",
                "rule pref 10001 from 10.0.0.50",
            ],
            "not the lease, its route or its rule, nor the kernel's link-local address"
        );
        let mut whole = restored.clone();
        whole.addresses[0] = address(3000, 1200, 70);
        assert!(restored.static_lost_in(&whole).is_empty(), "a renewed lease is no loss");
        let mut relabelled = restored.clone();
        relabelled.addresses[1].summary = "10.0.0.50/24 flags Secondary label eth0".into();
        assert!(restored.static_lost_in(&relabelled).is_empty(), "addresses compare by address and prefix");
    }

    #[test]
    fn a_lease_counting_down_is_no_change_and_a_renewed_one_is() {
        let first = snapshot(100, vec![address(3600, 1800, 50)], Vec::new());
        let later = snapshot(110, vec![address(3590, 1790, 51)], Vec::new());
        assert!(first.same_configuration(&later), "ten seconds later, ten seconds less");
        let renewed = snapshot(110, vec![address(3600, 1800, 109)], Vec::new());
        assert!(!first.same_configuration(&renewed), "a renewal moves the lifetime's end");
        let preferred_only = snapshot(110, vec![address(3590, 1800, 51)], Vec::new());
        assert!(!first.same_configuration(&preferred_only));
        let deprecated = snapshot(100, vec![address(3600, 0, 50)], Vec::new());
        assert!(
            deprecated.same_configuration(&snapshot(400, vec![address(3300, 0, 51)], Vec::new())),
            "a preferred lifetime that has passed stays passed"
        );
        assert!(!deprecated.same_configuration(&first));
        let forever = snapshot(100, vec![address(FOREVER, FOREVER, 1)], Vec::new());
        assert!(forever.same_configuration(&snapshot(
            5000,
            vec![address(FOREVER, FOREVER, 4000)],
            Vec::new()
        )));
        assert!(!forever.same_configuration(&first), "static against a lease");
    }

    #[test]
    fn route_counters_and_carrier_flags_are_no_change() {
        let first = snapshot(100, Vec::new(), vec![route(1, 0, false, 100)]);
        assert!(first.same_configuration(&snapshot(200, Vec::new(), vec![route(90, 0, true, 100)])));
        assert!(!first.same_configuration(&snapshot(200, Vec::new(), vec![route(1, 0, false, 200)])));
        let expiring = snapshot(100, Vec::new(), vec![route(1, 30_000, false, 100)]);
        assert!(expiring.same_configuration(&snapshot(150, Vec::new(), vec![route(1, 25_000, false, 100)])));
        assert!(!expiring.same_configuration(&snapshot(150, Vec::new(), vec![route(1, 30_000, false, 100)])));
        let expired = snapshot(100, Vec::new(), vec![route(1, (-300_i32).cast_unsigned(), false, 100)]);
        assert!(expired.same_configuration(&snapshot(
            150,
            Vec::new(),
            vec![route(1, (-5300_i32).cast_unsigned(), false, 100)]
        )));
        assert!(!expired.same_configuration(&expiring));
    }

    #[test]
    fn the_link_and_the_set_of_objects_count() {
        let first = snapshot(100, vec![address(FOREVER, FOREVER, 1)], Vec::new());
        let mut mtu = first.clone();
        mtu.mtu = Some(9001);
        assert!(!first.same_configuration(&mtu));
        let mut down = first.clone();
        down.up = false;
        assert!(!first.same_configuration(&down));
        assert!(!first.same_configuration(&snapshot(100, Vec::new(), Vec::new())));
        let mut corrupt = first.clone();
        corrupt.addresses[0].message = "zz".into();
        assert!(!first.same_configuration(&corrupt), "unreadable is a change");
        // (The messages carry the ifindex too: a NIC back under another one reads as changed, so
        // the snapshot held gets the new ifindex; the field alone is not compared.)
        let mut moved = first.clone();
        moved.ifindex = 9;
        assert!(first.same_configuration(&moved), "the top-level ifindex is not compared");
    }
}
