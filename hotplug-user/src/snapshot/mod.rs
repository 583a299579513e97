//! A NIC's configuration as rtnetlink reports it: link settings, addresses, the routes whose output
//! device is the NIC (every table), and the ip rules that refer to its addresses or its tables.
//!
//! Each address, route and rule is kept twice: as the kernel's own netlink message (so a restore
//! re-sends exactly what the kernel had, every attribute included) and as a one-line summary
//! without ifindex or transient state (what is compared after a restore and shown to people).
mod compare;
pub mod tuning;

use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_core::{Emitable, Parseable},
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressMessage},
        link::{LinkAttribute, LinkFlags, LinkMessage, Prop},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol},
        rule::{RuleAttribute, RuleMessage},
        AddressFamily,
    },
    IpVersion,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::managers::Manager;
pub use tuning::Tuning;

mod netlink;
pub use netlink::Netlink;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("no link with ifindex {0}")]
    NoSuchLink(u32),
    #[error("stored netlink message is corrupt: {0}")]
    Corrupt(String),
}

/// The routing tables the kernel manages itself (`local`) or that mean "none" (`unspec`).
const TABLE_UNSPEC: u32 = 0;
const TABLE_DEFAULT: u32 = 253;
const TABLE_MAIN: u32 = 254;
const TABLE_LOCAL: u32 = 255;

/// One address, route or rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Human-readable, ifindex-free, compared after a restore.
    pub summary: String,
    /// The kernel's netlink message, hex-encoded.
    pub message: String,
}

impl Entry {
    /// Makes the summary again from the message's parsed fields (`parse`, then `summary`).
    fn refresh_with<M>(
        &mut self,
        parse: fn(&Self) -> Result<M, SnapshotError>,
        summary: fn(&M) -> String,
    ) -> Result<(), SnapshotError> {
        let message = parse(self)?;
        self.summary = summary(&message);
        Ok(())
    }

    /// [`Entry::refresh_with`] for an ip rule.
    pub fn refresh_rule_summary(&mut self) -> Result<(), SnapshotError> {
        self.refresh_with(rule_message, rule_summary)
    }
}

/// A NIC's configuration at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSnapshot {
    /// The NIC's identity (`classify::nic_key`): its permanent MAC; else its current one, with
    /// its name for a virtual link.
    pub mac: String,
    pub ifindex: u32,
    pub name: String,
    pub mtu: Option<u32>,
    pub up: bool,
    pub altnames: Vec<String>,
    pub addresses: Vec<Entry>,
    pub routes: Vec<Entry>,
    pub rules: Vec<Entry>,
    /// CLOCK_MONOTONIC ns when the dump that produced this snapshot had finished.
    pub taken_ns: u64,
    /// The network manager that configured the NIC besides the agent, when the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<Manager>,
    /// Link attributes, sysctls and queue settings the kernel drops with the netdev.
    #[serde(default, skip_serializing_if = "Tuning::is_empty")]
    pub tuning: Tuning,
}

impl NicSnapshot {
    /// The differences between `self` (what should be) and `other` (what is), ignoring ifindex
    /// and time: one line per difference, empty when they match.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut diffs = Vec::new();
        if self.name != other.name {
            diffs.push(format!("name: want {}, have {}", self.name, other.name));
        }
        if self.mtu != other.mtu {
            diffs.push(format!("mtu: want {:?}, have {:?}", self.mtu, other.mtu));
        }
        if self.up != other.up {
            diffs.push(format!("admin state: want {}, have {}", updown(self.up), updown(other.up)));
        }
        for (what, want, have) in [
            ("altname", summaries_of(&self.altnames), summaries_of(&other.altnames)),
            ("address", entry_summaries(&self.addresses), entry_summaries(&other.addresses)),
            ("route", entry_summaries(&self.routes), entry_summaries(&other.routes)),
            ("rule", entry_summaries(&self.rules), entry_summaries(&other.rules)),
        ] {
            for missing in want.iter().filter(|w| !have.contains(w)) {
                diffs.push(format!("{what} missing: {missing}"));
            }
            for extra in have.iter().filter(|h| !want.contains(h)) {
                diffs.push(format!("{what} extra: {extra}"));
            }
        }
        diffs.extend(self.tuning.differences(&other.tuning));
        diffs
    }

    /// What of this snapshot systemd-networkd would not re-create when it configures the link:
    /// routes and rules with a protocol other than its own (`static`, `dhcp`) and the kernel's.
    /// (Addresses carry no owner; networkd drops the ones it did not make, by design.)
    pub fn networkd_foreign(&self) -> Self {
        let foreign_route = |e: &Entry| {
            route_message(e).is_ok_and(|m| {
                !matches!(
                    m.header.protocol,
                    RouteProtocol::Static | RouteProtocol::Dhcp | RouteProtocol::Kernel | RouteProtocol::Ra
                )
            })
        };
        let foreign_rule = |e: &Entry| {
            rule_message(e).is_ok_and(|m| {
                !m.attributes.iter().any(|a| {
                    matches!(a, RuleAttribute::Protocol(RouteProtocol::Static | RouteProtocol::Kernel))
                })
            })
        };
        Self {
            addresses: Vec::new(),
            routes: self.routes.iter().filter(|e| foreign_route(e)).cloned().collect(),
            rules: self.rules.iter().filter(|e| foreign_rule(e)).cloned().collect(),
            ..self.clone()
        }
    }

    /// Adds `other`'s routes and rules that `self` lacks (the same summary is the same object).
    pub fn merge_routes_and_rules(&mut self, other: &Self) {
        for route in &other.routes {
            if !self.routes.iter().any(|r| r.summary == route.summary) {
                self.routes.push(route.clone());
            }
        }
        for rule in &other.rules {
            if !self.rules.iter().any(|r| r.summary == rule.summary) {
                self.rules.push(rule.clone());
            }
        }
    }

    /// The routes and rules of `self` that `now` lacks.
    pub fn lost_in(&self, now: &Self) -> usize {
        let lost = |want: &[Entry], have: &[Entry]| {
            want.iter().filter(|w| !have.iter().any(|h| h.summary == w.summary)).count()
        };
        lost(&self.routes, &now.routes) + lost(&self.rules, &now.rules)
    }

    /// Makes every object's summary again from its netlink message: summaries are what objects
    /// are compared by, and this agent's wording is the one to compare in (a snapshot read from
    /// a state file may have been written by another release). Returns the objects whose message
    /// does not parse (they keep the summary they had).
    pub fn refresh_summaries(&mut self) -> Vec<String> {
        let mut unreadable = Vec::new();
        for entry in &mut self.addresses {
            if let Err(error) = entry.refresh_with(address_message, address_summary) {
                unreadable.push(format!("address {}: {error}", entry.summary));
            }
        }
        for entry in &mut self.routes {
            if let Err(error) = entry.refresh_with(route_message, route_summary) {
                unreadable.push(format!("route {}: {error}", entry.summary));
            }
        }
        for entry in &mut self.rules {
            if let Err(error) = entry.refresh_rule_summary() {
                unreadable.push(format!("rule {}: {error}", entry.summary));
            }
        }
        unreadable
    }

    pub fn summary_line(&self) -> String {
        format!(
            "{} mtu {} {}, {} addresses, {} routes, {} rules",
            self.name,
            self.mtu.map_or_else(|| "-".to_owned(), |m| m.to_string()),
            updown(self.up),
            self.addresses.len(),
            self.routes.len(),
            self.rules.len()
        )
    }
}

fn updown(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "down"
    }
}

fn summaries_of(names: &[String]) -> Vec<String> {
    names.to_vec()
}

fn entry_summaries(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| e.summary.clone()).collect()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn to_hex<M: Emitable>(message: &M) -> String {
    let mut bytes = vec![0; message.buffer_len()];
    message.emit(&mut bytes);
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

fn from_hex(text: &str) -> Result<Vec<u8>, SnapshotError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(SnapshotError::Corrupt(format!("{:?} is not a hex digit", char::from(c)))),
    };
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return Err(SnapshotError::Corrupt("odd hex length".into()));
    }
    text.chunks_exact(2).map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

pub fn address_message(entry: &Entry) -> Result<AddressMessage, SnapshotError> {
    let bytes = from_hex(&entry.message)?;
    AddressMessage::parse(bytes.as_slice()).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

pub fn route_message(entry: &Entry) -> Result<RouteMessage, SnapshotError> {
    let bytes = from_hex(&entry.message)?;
    RouteMessage::parse(bytes.as_slice()).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

pub fn rule_message(entry: &Entry) -> Result<RuleMessage, SnapshotError> {
    let bytes = from_hex(&entry.message)?;
    RuleMessage::parse(bytes.as_slice()).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

/// Address flags that describe the address's configuration (the rest is transient state).
fn lasting_address_flags(flags: AddressFlags) -> AddressFlags {
    flags
        & (AddressFlags::Secondary
            | AddressFlags::Nodad
            | AddressFlags::Homeaddress
            | AddressFlags::Managetempaddr
            | AddressFlags::Noprefixroute
            | AddressFlags::Mcautojoin)
}

pub fn address_summary(message: &AddressMessage) -> String {
    let mut address = None;
    let mut local = None;
    let mut label = None;
    let mut flags = AddressFlags::empty();
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Label(l) => label = Some(l.clone()),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    let shown = local.or(address).map_or_else(|| "?".to_owned(), |a| a.to_string());
    let mut text = format!("{shown}/{}", message.header.prefix_len);
    if let (Some(peer), Some(local)) = (address, local) {
        if peer != local {
            text.push_str(&format!(" peer {peer}"));
        }
    }
    let lasting = lasting_address_flags(flags);
    if !lasting.is_empty() {
        let names: Vec<&str> = lasting.iter_names().map(|(name, _)| name).collect();
        text.push_str(&format!(" flags {}", names.join(",")));
    }
    if let Some(label) = label {
        text.push_str(&format!(" label {label}"));
    }
    text
}

fn route_address(address: &RouteAddress) -> String {
    match address {
        RouteAddress::Inet(a) => a.to_string(),
        RouteAddress::Inet6(a) => a.to_string(),
        other => format!("{other:?}"),
    }
}

/// The route's table (the 32-bit attribute wins over the 8-bit header field).
pub fn route_table(message: &RouteMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(message.header.table))
}

/// The gateways of the snapshot's default routes (IPv4 and IPv6, any table), each once.
pub fn default_gateways(snapshot: &NicSnapshot) -> Vec<IpAddr> {
    let mut gateways = Vec::new();
    for entry in &snapshot.routes {
        let Ok(message) = route_message(entry) else { continue };
        if message.header.destination_prefix_length != 0 {
            continue;
        }
        let gateway = message.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        if let Some(gateway) = gateway.filter(|g| !gateways.contains(g)) {
            gateways.push(gateway);
        }
    }
    gateways
}

pub fn route_oif(message: &RouteMessage) -> Option<u32> {
    message.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
}

pub fn route_summary(message: &RouteMessage) -> String {
    let h = &message.header;
    let mut destination = None;
    let mut gateway = None;
    let mut metric = None;
    let mut source = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(d) => destination = Some(route_address(d)),
            RouteAttribute::Gateway(g) => gateway = Some(route_address(g)),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::PrefSource(s) => source = Some(route_address(s)),
            _ => {}
        }
    }
    let family = if h.address_family == AddressFamily::Inet6 { "inet6" } else { "inet" };
    let destination = match destination {
        Some(d) => format!("{d}/{}", h.destination_prefix_length),
        None => "default".to_owned(),
    };
    let mut text = format!("{family} table {} {destination}", route_table(message));
    if let Some(gateway) = gateway {
        text.push_str(&format!(" via {gateway}"));
    }
    text.push_str(&format!(" proto {:?} scope {:?} type {:?}", h.protocol, h.scope, h.kind));
    if let Some(source) = source {
        text.push_str(&format!(" src {source}"));
    }
    if let Some(metric) = metric {
        text.push_str(&format!(" metric {metric}"));
    }
    text
}

pub fn rule_table(message: &RuleMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| if let RuleAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(message.header.table))
}

pub(crate) fn rule_addresses(message: &RuleMessage) -> (Option<IpAddr>, Option<IpAddr>) {
    let mut source = None;
    let mut destination = None;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Source(a) => source = Some(*a),
            RuleAttribute::Destination(a) => destination = Some(*a),
            _ => {}
        }
    }
    (source, destination)
}

pub fn rule_summary(message: &RuleMessage) -> String {
    let h = &message.header;
    let priority = message
        .attributes
        .iter()
        .find_map(|a| if let RuleAttribute::Priority(p) = a { Some(*p) } else { None })
        .unwrap_or(0);
    let (source, destination) = rule_addresses(message);
    let mut text = format!("pref {priority}");
    match source {
        Some(s) => text.push_str(&format!(" from {s}/{}", h.src_len)),
        None => text.push_str(" from all"),
    }
    if let Some(d) = destination {
        text.push_str(&format!(" to {d}/{}", h.dst_len));
    }
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Iifname(n) => text.push_str(&format!(" iif {n}")),
            RuleAttribute::Oifname(n) => text.push_str(&format!(" oif {n}")),
            RuleAttribute::FwMark(m) => text.push_str(&format!(" fwmark {m:#x}")),
            _ => {}
        }
    }
    text.push_str(&format!(" lookup {} action {:?}", rule_table(message), h.action));
    text
}

/// The altnames in a link's property list.
fn altnames_of(props: &[Prop]) -> impl Iterator<Item = String> + '_ {
    props.iter().filter_map(|p| match p {
        Prop::AltIfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// A link's altnames.
pub fn link_altnames(link: &LinkMessage) -> Vec<String> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::PropList(props) => Some(altnames_of(props)),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A link's own settings, as one `RTM_GETLINK` reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub mtu: Option<u32>,
    pub up: bool,
    pub altnames: Vec<String>,
    /// Its identity (`identity::nic_key`), empty for a link without a MAC.
    pub key: String,
    /// Its tuned attributes (the master as an ifindex here, by name in a snapshot).
    pub tuning: tuning::LinkTuning,
    /// The ifindex of the bond or bridge it is a port of.
    pub master: Option<u32>,
}

/// The link's settings.
fn link_settings(link: &LinkMessage) -> LinkState {
    let mut name = String::new();
    let mut mtu = None;
    let mut altnames = Vec::new();
    let mut permanent = None;
    let mut current = String::new();
    let mut is_virtual = false;
    let mut tuned = tuning::LinkTuning::default();
    let mut master = None;
    for attribute in &link.attributes {
        match attribute {
            // Each kept only off the kernel's default for a new device (`ether_setup`,
            // `GSO_LEGACY_MAX_SIZE`, `GSO_MAX_SEGS`, `GRO_LEGACY_MAX_SIZE`): what an operator set,
            // not what a driver's new load may set otherwise.
            LinkAttribute::TxQueueLen(n) if *n != tuning::DEFAULT_TXQUEUELEN => tuned.txqueuelen = Some(*n),
            LinkAttribute::IfAlias(a) if !a.is_empty() => tuned.alias = Some(a.clone()),
            LinkAttribute::Group(g) if *g != 0 => tuned.group = Some(*g),
            LinkAttribute::GsoMaxSize(n) if *n != tuning::DEFAULT_GSO_MAX_SIZE => {
                tuned.gso_max_size = Some(*n)
            }
            LinkAttribute::GsoMaxSegs(n) if *n != tuning::DEFAULT_GSO_MAX_SEGS => {
                tuned.gso_max_segs = Some(*n)
            }
            LinkAttribute::GroMaxSize(n) if *n != tuning::DEFAULT_GRO_MAX_SIZE => {
                tuned.gro_max_size = Some(*n)
            }
            LinkAttribute::Controller(m) if *m != 0 => master = Some(*m),
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            LinkAttribute::PropList(props) => altnames.extend(altnames_of(props)),
            LinkAttribute::PermAddress(a) if a.iter().any(|&b| b != 0) => {
                permanent = Some(crate::identity::format_mac(a, a.len()));
            }
            LinkAttribute::Address(a) => current = crate::identity::format_mac(a, a.len()),
            LinkAttribute::LinkInfo(infos) => {
                is_virtual |=
                    infos.iter().any(|i| matches!(i, rtnetlink::packet_route::link::LinkInfo::Kind(_)));
            }
            _ => {}
        }
    }
    let up = link.header.flags.contains(LinkFlags::Up);
    let key = if current.is_empty() && permanent.is_none() {
        String::new()
    } else {
        crate::identity::nic_key(permanent.as_deref(), &current, &name, is_virtual)
    };
    // A MAC set over the permanent one is the operator's.
    if permanent.as_deref().is_some_and(|p| !current.is_empty() && p != current) {
        tuned.address = Some(current.clone());
    }
    LinkState { name, mtu, up, altnames, key, tuning: tuned, master }
}

/// The tuning of the link read as `link`: its attributes, sysctls and queue settings.
pub async fn tuning_of(netlink: &Netlink, link: &LinkState) -> Tuning {
    Tuning::read(&tuning::Root::default(), &link.name, link_tuning(netlink, link).await)
}

/// The link's tuned attributes, its master by name (one more request when it has one).
pub async fn link_tuning(netlink: &Netlink, link: &LinkState) -> tuning::LinkTuning {
    let mut attributes = link.tuning.clone();
    if let Some(master) = link.master {
        // A master that went meanwhile is no master to restore.
        attributes.master = netlink.link(master).await.ok().map(|m| m.name);
    }
    attributes
}

/// Reads the NIC with `ifindex` from the kernel: its link, addresses, the routes through it (a
/// dump the kernel filters, `Netlink::routes_through`) and the rules that refer to its addresses
/// or to the tables of its routes. A NIC gone during the read is an error, never an empty one.
pub async fn capture(netlink: &Netlink, ifindex: u32) -> Result<NicSnapshot, SnapshotError> {
    let rules = all_rules(netlink).await?;
    capture_with(netlink, ifindex, &rules).await
}

/// Every ip rule of both families: what a snapshot picks its NIC's from. Rules are bound to no
/// device, so one read serves every NIC re-read at the same wake-up.
pub async fn all_rules(netlink: &Netlink) -> Result<Vec<RuleMessage>, SnapshotError> {
    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let found: Vec<RuleMessage> = netlink.handle.rule().get(version).execute().try_collect().await?;
        rules.extend(found);
    }
    Ok(rules)
}

/// [`capture`] with the rules already read ([`all_rules`]).
pub async fn capture_with(
    netlink: &Netlink,
    ifindex: u32,
    all_rules: &[RuleMessage],
) -> Result<NicSnapshot, SnapshotError> {
    let handle = &netlink.handle;
    let link = netlink.link(ifindex).await?;
    let tuning = tuning_of(netlink, &link).await;
    let LinkState { name, mtu, up, altnames, key: mac, .. } = link;

    let mut addresses = Vec::new();
    let mut own_addresses = Vec::new();
    let found: Vec<AddressMessage> =
        handle.address().get().set_link_index_filter(ifindex).execute().try_collect().await?;
    for message in found.iter().filter(|m| m.header.index == ifindex) {
        for attribute in &message.attributes {
            if let AddressAttribute::Local(a) | AddressAttribute::Address(a) = attribute {
                own_addresses.push(*a);
            }
        }
        addresses.push(Entry { summary: address_summary(message), message: to_hex(message) });
    }

    let mut routes = Vec::new();
    let mut tables = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // Filtered in the kernel; what has no RTA_OIF (a multipath route) is not the NIC's here,
        // nor is another family's (an IPv6 dump on a host without IPv6 answers with IPv4's), nor
        // a cached exception (`RTM_F_CLONED`: a PMTU or a redirect, the kernel's, not
        // configuration; an unfiltered dump includes them).
        let found = netlink.routes_through(family, ifindex).await?;
        let mine = |m: &&RouteMessage| {
            route_oif(m) == Some(ifindex)
                && m.header.address_family == family
                && !m.header.flags.contains(RouteFlags::Cloned)
        };
        for message in found.iter().filter(mine) {
            let table = route_table(message);
            // Routes the kernel makes for addresses and the link itself come back on their own.
            let kernel_made = matches!(message.header.protocol, RouteProtocol::Kernel | RouteProtocol::Ra)
                || table == TABLE_LOCAL
                || message.header.address_family == AddressFamily::Inet6
                    && message.header.kind == rtnetlink::packet_route::route::RouteType::Multicast;
            if kernel_made {
                continue;
            }
            if ![TABLE_UNSPEC, TABLE_DEFAULT, TABLE_MAIN, TABLE_LOCAL].contains(&table)
                && !tables.contains(&table)
            {
                tables.push(table);
            }
            routes.push(Entry { summary: route_summary(message), message: to_hex(message) });
        }
    }

    let mut rules = Vec::new();
    for message in all_rules {
        let (source, destination) = rule_addresses(message);
        let mine = tables.contains(&rule_table(message))
            || source.is_some_and(|s| own_addresses.contains(&s))
            || destination.is_some_and(|d| own_addresses.contains(&d));
        if mine {
            rules.push(Entry { summary: rule_summary(message), message: to_hex(message) });
        }
    }
    // The NIC may have gone while it was read (its routes then read as none): such a read is
    // not its configuration.
    netlink.link(ifindex).await?;
    Ok(NicSnapshot {
        mac,
        ifindex,
        name,
        mtu,
        up,
        altnames,
        addresses,
        routes,
        rules,
        taken_ns: crate::clock::monotonic_ns(),
        manager: None,
        tuning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(summary: &str) -> Entry {
        Entry { summary: summary.into(), message: String::new() }
    }

    fn snapshot() -> NicSnapshot {
        NicSnapshot {
            mac: "52:54:00:12:34:11".into(),
            ifindex: 3,
            name: "eth1".into(),
            mtu: Some(9000),
            up: true,
            altnames: vec!["eni-1".into()],
            addresses: vec![entry("10.0.1.5/24"), entry("10.0.1.6/24 flags Secondary")],
            routes: vec![entry(
                "inet table 10001 default via 10.0.1.1 proto Static scope Universe type Unicast",
            )],
            rules: vec![entry("pref 10001 from 10.0.1.5/32 lookup 10001 action ToTable")],
            taken_ns: 1,
            manager: None,
            tuning: Tuning::default(),
        }
    }

    #[test]
    fn differences_ignore_ifindex_and_time_and_name_each_change() {
        let want = snapshot();
        let mut have = want.clone();
        have.ifindex = 8;
        have.taken_ns = 99;
        assert!(want.differences(&have).is_empty());
        have.mtu = Some(1500);
        have.up = false;
        have.addresses.pop();
        have.rules.push(entry("pref 5 from all lookup 7 action ToTable"));
        let diffs = want.differences(&have);
        assert_eq!(diffs.len(), 4, "{diffs:?}");
        assert!(diffs.iter().any(|d| d == "mtu: want Some(9000), have Some(1500)"));
        assert!(diffs.iter().any(|d| d == "admin state: want up, have down"));
        assert!(diffs.iter().any(|d| d == "address missing: 10.0.1.6/24 flags Secondary"));
        assert!(diffs.iter().any(|d| d.starts_with("rule extra: pref 5")));
    }

    #[test]
    fn netlink_messages_round_trip_through_hex() -> Result<(), SnapshotError> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = 24;
        message.header.index = 3;
        message.attributes.push(AddressAttribute::Local(
            "10.0.1.5".parse().map_err(|_| SnapshotError::Corrupt("ip".into()))?,
        ));
        message.attributes.push(AddressAttribute::Flags(AddressFlags::Permanent | AddressFlags::Secondary));
        let entry = Entry { summary: address_summary(&message), message: to_hex(&message) };
        assert_eq!(
            entry.summary, "10.0.1.5/24 flags Secondary",
            "permanent is state, secondary is configuration"
        );
        assert_eq!(address_message(&entry)?, message);
        assert!(address_message(&Entry { summary: String::new(), message: "zz".into() }).is_err());
        assert!(
            address_message(&Entry { summary: String::new(), message: "aé".into() }).is_err(),
            "no panic on non-ASCII"
        );
        assert_eq!(from_hex("00ff0A7f")?, [0, 255, 10, 127]);
        assert!(from_hex("abc").is_err() && from_hex("0g").is_err() && from_hex("+1").is_err());
        assert!(entry.message.starts_with("02180000"), "family, prefix, flags, scope: {}", entry.message);
        Ok(())
    }
}
