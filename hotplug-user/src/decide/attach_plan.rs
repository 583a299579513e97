//! What to configure for a NIC really attached, from what IMDS says about it -- checked for
//! meaning, not only for form: IMDS answers over the network, and a spoofed or broken answer must
//! not put a route on the host that captures traffic (`128.0.0.0/1`, a `::/0` prefix route that
//! beats the RA default) or a rule that captures another NIC's source address.
//!
//! Refused: a subnet EC2 could not have handed out (IPv4 /16../28, IPv6 /44../64, none in
//! special-purpose space: loopback, link-local where IMDS lives, multicast, EC2's fd00:ec2::/32),
//! an address outside its subnet or not usable as a host address (EC2 reserves the first four), an address another NIC has, more addresses
//! than an ENI can carry, a device number or network card out of range. Each IPv6 address gets
//! the prefix of the subnet block that contains it.
//!
//! The layout is Amazon Linux 2023's (amazon-ec2-net-utils v2, `lib/lib.sh`) unless configured
//! otherwise: table and rule priority `10000 + 100 × network-card + device-number`, route metric
//! `512 + 100 × network-card + device-number`, and no policy routing for the primary ENI
//! (device-number 0 on card 0: rules there broke Docker, its issues #97/#98).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::imds::{parse::Ipv6Net, NicMetadata};

/// First policy-routing table and rule priority.
pub const TABLE_BASE: u32 = 10_000;
/// First route metric of the Amazon Linux layout.
pub const METRIC_BASE: u32 = 512;
/// More private addresses than any instance type allows per ENI (50 today, either family).
pub const MAX_ADDRESSES: usize = 64;
/// Device numbers and network cards EC2 uses are far below these; above them tables would
/// collide with each other or leave the 10000 range.
pub const MAX_DEVICE_NUMBER: u32 = 99;
pub const MAX_NETWORK_CARD: u32 = 15;

/// How an attached ENI's tables, rules and metrics are numbered (`attach_layout` in the
/// configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Amazon Linux 2023's: `10000 + 100 × network-card + device-number`, metric `512 + …`.
    #[default]
    AmazonLinux,
    /// hotplug 0.1's: `10000 + device-number`, the kernel's default metric; one network card only.
    DeviceNumber,
}

impl Layout {
    /// The ENI's table (and rule priority), and the metric of the routes in it.
    pub fn numbers(self, network_card: u32, device_number: u32) -> Result<(u32, Option<u32>), String> {
        if device_number > MAX_DEVICE_NUMBER {
            return Err(format!("device-number {device_number} is out of range (0..={MAX_DEVICE_NUMBER})"));
        }
        if network_card > MAX_NETWORK_CARD {
            return Err(format!("network-card {network_card} is out of range (0..={MAX_NETWORK_CARD})"));
        }
        let slot = 100 * network_card + device_number;
        match self {
            Self::AmazonLinux => Ok((TABLE_BASE + slot, Some(METRIC_BASE + slot))),
            Self::DeviceNumber if network_card > 0 => Err(format!(
                "network-card {network_card}: the device-number layout numbers tables by device-number alone, \
                 and cards would collide; set attach_layout = \"amazon-linux\""
            )),
            Self::DeviceNumber => Ok((TABLE_BASE + device_number, None)),
        }
    }
}

/// How [`propagated`]'s reason ends (an answer to ask again, even in the start-up pass).
pub const NOT_PROPAGATED: &str = "not propagated yet";

/// Whether an answer is final. IMDS can list a secondary ENI before its device-number has
/// propagated, reading 0 (amazon-ec2-net-utils #90): device-number 0 on card 0 belongs to the
/// primary ENI only, so for another MAC it means "ask again".
pub fn propagated(nic: &NicMetadata) -> Result<(), String> {
    match &nic.primary_mac {
        Some(primary)
            if nic.device_number == 0 && nic.network_card == 0 && !primary.eq_ignore_ascii_case(&nic.mac) =>
        {
            Err(format!(
                "device-number 0 for {} though the primary ENI is {primary}: {NOT_PROPAGATED}",
                nic.mac
            ))
        }
        _ => Ok(()),
    }
}
/// An attach, ready to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPlan {
    /// Address and prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The NIC's altnames, as amazon-ec2-net-utils adds them: the ENI's id (`eni-…`) and
    /// `device-number-N` (`device-number-N.C` where IMDS has a `network-card` key). None in the
    /// device-number layout.
    pub altnames: Vec<String>,
    /// For a secondary ENI: its policy-routing table, the router in its subnet, and the
    /// addresses whose traffic the table carries (one `from ADDRESS lookup TABLE` rule each).
    pub policy: Option<PolicyRouting>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRouting {
    /// The table, and the priority of its rules.
    pub table: u32,
    /// The metric of the default routes (`None`: the kernel's default).
    pub metric: Option<u32>,
    pub gateway: Ipv4Addr,
    /// On-link routes in the table: the subnet's IPv4 block and, for an ENI with IPv6, its IPv6
    /// blocks (amazon-linux layout; amazon-ec2-net-utils' `Destination=` routes, no metric).
    pub subnets: Vec<(IpAddr, u8)>,
    /// A default route in the table via the IPv6 router the NIC learns from router
    /// advertisements (amazon-linux layout, an ENI with IPv6 addresses; `Gateway=_ipv6ra`).
    pub ipv6_default: bool,
    /// A default route in `main` via the subnet's router with `metric` (amazon-linux layout: what
    /// DHCP gives every ENI on Amazon Linux 2023, behind the primary's lower metric).
    pub main_default: bool,
    /// One `from SOURCE lookup TABLE` rule each: every private IPv4 (/32) and IPv6 (/128) address
    /// and every delegated prefix.
    pub sources: Vec<(IpAddr, u8)>,
}

/// What other NICs hold now, that an attach must never take over.
#[derive(Clone, Debug, Default)]
pub struct Taken {
    /// Addresses other NICs carry.
    pub addresses: Vec<IpAddr>,
    /// Policy-routing tables the agent configured for other NICs.
    pub tables: Vec<u32>,
    /// Prefixes other NICs' rules take traffic from (their delegated prefixes).
    pub prefixes: Vec<(IpAddr, u8)>,
}

/// Whether two prefixes overlap (one holds the other's network).
fn overlap(a: (IpAddr, u8), b: (IpAddr, u8)) -> bool {
    let shorter = a.1.min(b.1);
    match (a.0, b.0) {
        (IpAddr::V4(x), IpAddr::V4(y)) => {
            let mask = if shorter == 0 { 0 } else { u32::MAX << (32 - u32::from(shorter.min(32))) };
            u32::from(x) & mask == u32::from(y) & mask
        }
        (IpAddr::V6(x), IpAddr::V6(y)) => {
            let mask = if shorter == 0 { 0 } else { u128::MAX << (128 - u32::from(shorter.min(128))) };
            u128::from(x) & mask == u128::from(y) & mask
        }
        _ => false,
    }
}

/// Checks `nic` and plans its configuration in `layout`, against what other NICs hold (`taken`).
pub fn attach_plan(nic: &NicMetadata, taken: &Taken, layout: Layout) -> Result<AttachPlan, String> {
    let (table, metric) = layout.numbers(nic.network_card, nic.device_number)?;
    let primary = nic.device_number == 0 && nic.network_card == 0;
    if !primary && taken.tables.contains(&table) {
        return Err(format!(
            "device-number {} on network-card {} is another NIC's already (its table {table}): not yet propagated, or a spoofed answer",
            nic.device_number, nic.network_card
        ));
    }
    if !(16..=28).contains(&nic.subnet_ipv4.prefix) {
        return Err(format!(
            "subnet-ipv4-cidr-block {}/{} is no subnet EC2 hands out (/16 to /28)",
            nic.subnet_ipv4.network, nic.subnet_ipv4.prefix
        ));
    }
    if let Some(why) = special_ipv4(nic.subnet_ipv4.network) {
        return Err(format!(
            "subnet-ipv4-cidr-block {}/{} is {why}: no VPC subnet is",
            nic.subnet_ipv4.network, nic.subnet_ipv4.prefix
        ));
    }
    if nic.local_ipv4s.is_empty() {
        return Err("local-ipv4s is empty: an ENI has a primary private address".into());
    }
    if nic.local_ipv4s.len() > MAX_ADDRESSES || nic.ipv6s.len() > MAX_ADDRESSES {
        return Err(format!(
            "{} IPv4 and {} IPv6 addresses: more than an ENI can carry ({MAX_ADDRESSES})",
            nic.local_ipv4s.len(),
            nic.ipv6s.len()
        ));
    }
    let mut addresses = Vec::new();
    for address in &nic.local_ipv4s {
        let host = u32::from(*address) & !mask4(nic.subnet_ipv4.prefix);
        let broadcast = !mask4(nic.subnet_ipv4.prefix);
        if !nic.subnet_ipv4.contains(*address) {
            return Err(format!(
                "local-ipv4s {address} is outside its subnet {}/{}",
                nic.subnet_ipv4.network, nic.subnet_ipv4.prefix
            ));
        }
        if host == 0 || host == broadcast {
            return Err(format!(
                "local-ipv4s {address} is not a host address of its subnet {}/{}",
                nic.subnet_ipv4.network, nic.subnet_ipv4.prefix
            ));
        }
        if host <= 3 {
            return Err(format!(
                "local-ipv4s {address} is one of the addresses EC2 reserves in its subnet (router, DNS, future use)"
            ));
        }
        addresses.push((IpAddr::V4(*address), nic.subnet_ipv4.prefix));
    }
    for block in &nic.subnet_ipv6 {
        if !(44..=64).contains(&block.prefix) {
            return Err(format!(
                "subnet-ipv6-cidr-blocks {}/{} is no subnet EC2 hands out (/44 to /64)",
                block.network, block.prefix
            ));
        }
        if let Some(why) = special_ipv6(block.network) {
            return Err(format!(
                "subnet-ipv6-cidr-blocks {}/{} is {why}: no VPC subnet is",
                block.network, block.prefix
            ));
        }
    }
    for address in &nic.ipv6s {
        let block = containing(&nic.subnet_ipv6, *address).ok_or_else(|| {
            format!("ipv6s {address} is in none of its subnet's blocks (subnet-ipv6-cidr-blocks)")
        })?;
        if address.is_loopback() || address.is_multicast() || address.is_unspecified() {
            return Err(format!("ipv6s {address} is not a unicast host address"));
        }
        addresses.push((IpAddr::V6(*address), block.prefix));
    }
    if let Some((address, _)) = addresses.iter().find(|(a, _)| taken.addresses.contains(a)) {
        return Err(format!("{address} is another NIC's address already: refusing to take it over"));
    }
    let prefixes = delegated_prefixes(nic, taken)?;
    let amazon_linux = layout == Layout::AmazonLinux;
    let altnames = if amazon_linux { altnames(nic) } else { Vec::new() };
    let has_ipv6 = !nic.ipv6s.is_empty();
    let policy = (!primary).then(|| PolicyRouting {
        table,
        metric,
        gateway: nic.subnet_ipv4.gateway(),
        subnets: if amazon_linux {
            std::iter::once((IpAddr::V4(nic.subnet_ipv4.network), nic.subnet_ipv4.prefix))
                .chain(nic.subnet_ipv6.iter().filter(|_| has_ipv6).map(|b| (IpAddr::V6(b.network), b.prefix)))
                .collect()
        } else {
            Vec::new()
        },
        ipv6_default: amazon_linux && has_ipv6,
        main_default: amazon_linux,
        sources: nic
            .local_ipv4s
            .iter()
            .map(|a| (IpAddr::V4(*a), 32))
            .chain(nic.ipv6s.iter().map(|a| (IpAddr::V6(*a), 128)))
            .chain(prefixes)
            .collect(),
    });
    Ok(AttachPlan { addresses, altnames, policy })
}

/// What a refresh takes away: of what the agent configured before (`before`), what the new
/// plan's configuration (`now`) no longer holds. Only ever called with a plan made from a whole,
/// checked IMDS answer: an error, a timeout or a doubtful answer removes nothing (unlike
/// amazon-ec2-net-utils #161, where a transient IMDS error deleted the ENI's rules).
pub fn refresh_removals<T: PartialEq + Clone>(before: &[T], now: &[T]) -> Vec<T> {
    before.iter().filter(|b| !now.contains(b)).cloned().collect()
}

/// Refuses a delegated prefix over another NIC's address, or overlapping a prefix another NIC's
/// rules take traffic from: its `from` rule would take their traffic.
fn claimed(taken: &Taken, key: &str, prefix: (IpAddr, u8)) -> Result<(), String> {
    let full = |a: &IpAddr| (*a, if a.is_ipv4() { 32 } else { 128 });
    if let Some(other) = taken.addresses.iter().find(|a| overlap(full(a), prefix)) {
        return Err(format!(
            "{key} {}/{} covers {other}, another NIC's address: refusing to take its traffic",
            prefix.0, prefix.1
        ));
    }
    match taken.prefixes.iter().find(|other| overlap(**other, prefix)) {
        Some((network, length)) => Err(format!(
            "{key} {}/{} overlaps {network}/{length}, another NIC's delegated prefix: refusing to take its traffic",
            prefix.0, prefix.1
        )),
        None => Ok(()),
    }
}

/// Whether a secondary ENI's default route (with `metric`) may go into `main`, given the lowest
/// metric of the defaults there now: only behind another one (the primary's; 512 on Amazon
/// Linux). Without one, or behind a higher one (networkd's 1024, dhcpcd's 1000+), it would win,
/// and replies from the primary's address would leave through this ENI.
pub fn main_default_allowed(metric: u32, lowest_there: Option<u32>) -> bool {
    lowest_there.is_some_and(|lowest| lowest < metric)
}

/// An address or prefix and its length.
pub type Prefixed = (IpAddr, u8);

/// A refresh's addresses: (the agent's now, the agent's to remove). The agent's earlier ones the
/// new plan still lists are kept (by address: a new prefix length does not make it another),
/// and those this refresh `added`; the rest of its earlier ones go. Addresses that were on the
/// NIC before the agent's are in neither list, so they are never removed.
pub fn refresh_addresses(
    before: &[Prefixed],
    planned: &[Prefixed],
    added: &[Prefixed],
) -> (Vec<Prefixed>, Vec<Prefixed>) {
    let (mut now, stale): (Vec<_>, Vec<_>) =
        before.iter().copied().partition(|(a, _)| planned.iter().any(|(p, _)| p == a));
    let new: Vec<_> = added.iter().copied().filter(|(a, _)| !now.iter().any(|(k, _)| k == a)).collect();
    now.extend(new);
    (now, stale)
}

/// `eni-…` and `device-number-N[.C]`, as amazon-ec2-net-utils' `add_altnames` names them.
fn altnames(nic: &NicMetadata) -> Vec<String> {
    let device = if nic.network_card_listed {
        format!("device-number-{}.{}", nic.device_number, nic.network_card)
    } else {
        format!("device-number-{}", nic.device_number)
    };
    nic.interface_id.iter().cloned().chain(std::iter::once(device)).collect()
}

/// The ENI's delegated prefixes, checked: each inside its subnet (IPv4) or one of its subnet's
/// blocks (IPv6), no wider than EC2 delegates (/28, /80) and never over another NIC's address --
/// a `from PREFIX` rule would take that address's traffic.
fn delegated_prefixes(nic: &NicMetadata, taken: &Taken) -> Result<Vec<(IpAddr, u8)>, String> {
    if nic.ipv4_prefixes.len() > MAX_ADDRESSES || nic.ipv6_prefixes.len() > MAX_ADDRESSES {
        return Err(format!(
            "{} IPv4 and {} IPv6 delegated prefixes: more than an ENI can carry ({MAX_ADDRESSES})",
            nic.ipv4_prefixes.len(),
            nic.ipv6_prefixes.len()
        ));
    }
    let mut prefixes = Vec::new();
    for prefix in &nic.ipv4_prefixes {
        let inside = prefix.prefix >= nic.subnet_ipv4.prefix && nic.subnet_ipv4.contains(prefix.network);
        if !inside || !(28..=32).contains(&prefix.prefix) {
            return Err(format!(
                "ipv4-prefix {}/{} is not a /28 (or longer) inside its subnet {}/{}",
                prefix.network, prefix.prefix, nic.subnet_ipv4.network, nic.subnet_ipv4.prefix
            ));
        }
        claimed(taken, "ipv4-prefix", (IpAddr::V4(prefix.network), prefix.prefix))?;
        prefixes.push((IpAddr::V4(prefix.network), prefix.prefix));
    }
    for prefix in &nic.ipv6_prefixes {
        let inside = nic.subnet_ipv6.iter().any(|b| prefix.prefix >= b.prefix && b.contains(prefix.network));
        let network_only = prefix.contains(prefix.network) && {
            let host_bits = u128::MAX.checked_shr(u32::from(prefix.prefix)).unwrap_or(0);
            u128::from(prefix.network) & host_bits == 0
        };
        if !inside || !network_only || !(80..=128).contains(&prefix.prefix) {
            return Err(format!(
                "ipv6-prefix {}/{} is not an /80 (or longer) network inside one of its subnet's blocks",
                prefix.network, prefix.prefix
            ));
        }
        claimed(taken, "ipv6-prefix", (IpAddr::V6(prefix.network), prefix.prefix))?;
        prefixes.push((IpAddr::V6(prefix.network), prefix.prefix));
    }
    Ok(prefixes)
}

/// Address space no VPC subnet can be in: what a spoofed answer would use to capture the host's
/// own or the metadata service's traffic.
fn special_ipv4(network: Ipv4Addr) -> Option<&'static str> {
    let octets = network.octets();
    match octets[0] {
        0 => Some("in 0.0.0.0/8 (this network)"),
        127 => Some("loopback"),
        224..=239 => Some("multicast"),
        240..=255 => Some("reserved (240.0.0.0/4)"),
        169 if octets[1] == 254 => Some("link-local (where the metadata service is)"),
        _ => None,
    }
}

fn special_ipv6(network: Ipv6Addr) -> Option<&'static str> {
    let first = network.segments()[0];
    match first {
        0x0000..=0x00ff => Some("in ::/8 (unspecified, loopback, IPv4-mapped)"),
        0xfe80..=0xfebf => Some("link-local"),
        0xff00..=0xffff => Some("multicast"),
        0xfd00 if network.segments()[1] == 0x0ec2 => Some("EC2's own services' prefix (fd00:ec2::/32)"),
        _ => None,
    }
}

fn mask4(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

fn containing(blocks: &[Ipv6Net], address: Ipv6Addr) -> Option<Ipv6Net> {
    blocks.iter().copied().filter(|b| b.contains(address)).max_by_key(|b| b.prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::parse::Ipv4Net;

    fn nic() -> NicMetadata {
        NicMetadata {
            mac: "52:54:00:12:34:11".into(),
            device_number: 1,
            network_card: 0,
            primary_mac: Some("52:54:00:12:34:10".into()),
            local_ipv4s: vec![Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 6)],
            subnet_ipv4: Ipv4Net { network: Ipv4Addr::new(10, 0, 1, 0), prefix: 24 },
            ipv6s: vec![
                "2001:db8:1:1::5".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
                "2001:db8:1:2::5".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
            ],
            subnet_ipv6: vec![
                Ipv6Net { network: "2001:db8:1:1::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED), prefix: 64 },
                Ipv6Net { network: "2001:db8:1:2::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED), prefix: 56 },
            ],
            network_card_listed: true,
            interface_id: Some("eni-0123456789abcdef0".into()),
            ipv4_prefixes: vec![],
            ipv6_prefixes: vec![],
        }
    }

    fn v6net(text: &str, prefix: u8) -> Ipv6Net {
        Ipv6Net { network: text.parse().unwrap_or(Ipv6Addr::UNSPECIFIED), prefix }
    }

    #[test]
    fn prefixes_get_rules_subnets_get_routes_and_the_nic_its_altnames() -> Result<(), String> {
        let with_prefixes = NicMetadata {
            ipv4_prefixes: vec![Ipv4Net { network: Ipv4Addr::new(10, 0, 1, 32), prefix: 28 }],
            ipv6_prefixes: vec![v6net("2001:db8:1:1:5::", 80)],
            ..nic()
        };
        let plan = attach_plan(&with_prefixes, &Taken::default(), Layout::AmazonLinux)?;
        assert_eq!(plan.altnames, ["eni-0123456789abcdef0", "device-number-1.0"]);
        let policy = plan.policy.ok_or("no policy routing")?;
        assert_eq!(policy.sources.len(), 6, "{policy:?}");
        assert!(policy.sources.contains(&(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 32)), 28)));
        assert!(policy.sources.contains(&(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)), 32)));
        assert!(policy.sources.contains(&(IpAddr::V6(v6net("2001:db8:1:1:5::", 80).network), 80)));
        assert_eq!(policy.subnets.len(), 3, "the IPv4 subnet and both IPv6 blocks: {policy:?}");
        assert!(policy.ipv6_default && policy.main_default);
        // No network-card key: `device-number-N`, as on instance types without one.
        let old_type = NicMetadata { network_card_listed: false, interface_id: None, ..nic() };
        assert_eq!(
            attach_plan(&old_type, &Taken::default(), Layout::AmazonLinux)?.altnames,
            ["device-number-1"]
        );
        // The old layout keeps its objects (only the prefixes' rules are new): no altnames, subnet routes or main-table default.
        let old = attach_plan(&with_prefixes, &Taken::default(), Layout::DeviceNumber)?;
        let old_policy = old.policy.ok_or("no policy routing")?;
        assert!(old.altnames.is_empty() && old_policy.subnets.is_empty() && !old_policy.main_default);
        // An IPv4-only ENI: no IPv6 routes in its table.
        let v4_only = NicMetadata { ipv6s: vec![], subnet_ipv6: vec![], ..nic() };
        let v4_policy =
            attach_plan(&v4_only, &Taken::default(), Layout::AmazonLinux)?.policy.ok_or("none")?;
        assert_eq!((v4_policy.subnets.len(), v4_policy.ipv6_default), (1, false));
        Ok(())
    }

    #[test]
    fn prefixes_outside_the_subnet_too_wide_or_over_another_nic_are_refused() {
        let v4 = |a: [u8; 4], prefix| Ipv4Net { network: Ipv4Addr::from(a), prefix };
        let other = Taken {
            addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 1, 40))],
            tables: vec![],
            prefixes: vec![],
        };
        let other_prefix = Taken {
            prefixes: vec![(IpAddr::V6(v6net("2001:db8:1:1:5::", 80).network), 80)],
            ..Taken::default()
        };
        let cases = [
            (
                "not a /28",
                NicMetadata { ipv4_prefixes: vec![v4([10, 0, 2, 0], 28)], ..nic() },
                Taken::default(),
            ),
            (
                "not a /28",
                NicMetadata { ipv4_prefixes: vec![v4([10, 0, 1, 0], 24)], ..nic() },
                Taken::default(),
            ),
            (
                "another NIC's address",
                NicMetadata { ipv4_prefixes: vec![v4([10, 0, 1, 32], 28)], ..nic() },
                other,
            ),
            (
                "not an /80",
                NicMetadata { ipv6_prefixes: vec![v6net("2001:db8:9::", 80)], ..nic() },
                Taken::default(),
            ),
            (
                "another NIC's delegated prefix",
                NicMetadata { ipv6_prefixes: vec![v6net("2001:db8:1:1:5::", 96)], ..nic() },
                other_prefix,
            ),
            (
                "not an /80",
                NicMetadata { ipv6_prefixes: vec![v6net("2001:db8:1:1::", 64)], ..nic() },
                Taken::default(),
            ),
            (
                "not an /80",
                NicMetadata { ipv6_prefixes: vec![v6net("2001:db8:1:1:5::1", 80)], ..nic() },
                Taken::default(),
            ),
        ];
        for (why, metadata, taken) in cases {
            match attach_plan(&metadata, &taken, Layout::AmazonLinux) {
                Ok(plan) => panic!("accepted ({why}): {plan:?}"),
                Err(error) => assert!(error.contains(why), "{why}: {error}"),
            }
        }
    }

    #[test]
    fn a_good_answer_is_planned_with_each_ipv6_address_in_its_own_block() -> Result<(), String> {
        let plan = attach_plan(&nic(), &Taken::default(), Layout::AmazonLinux)?;
        assert_eq!(plan.addresses.len(), 4);
        assert!(plan.addresses.contains(&("2001:db8:1:2::5".parse().map_err(|_| "ip")?, 56)), "{plan:?}");
        assert!(plan.addresses.contains(&("2001:db8:1:1::5".parse().map_err(|_| "ip")?, 64)));
        let policy = plan.policy.ok_or("no policy routing for a secondary ENI")?;
        assert_eq!(policy.sources.len(), 4, "a rule for each IPv4 and IPv6 address: {policy:?}");
        assert_eq!(
            (policy.table, policy.metric, policy.gateway),
            (10_001, Some(513), Ipv4Addr::new(10, 0, 1, 1))
        );
        let primary = NicMetadata { device_number: 0, mac: "52:54:00:12:34:10".into(), ..nic() };
        assert_eq!(
            attach_plan(&primary, &Taken::default(), Layout::AmazonLinux)?.policy,
            None,
            "no rules for the primary ENI"
        );
        Ok(())
    }

    #[test]
    fn tables_and_metrics_follow_amazon_linux_or_the_old_layout() {
        let cases = [
            // (layout, card, device) -> (table, metric), as amazon-ec2-net-utils numbers them.
            (Layout::AmazonLinux, 0, 1, (10_001, Some(513))),
            (Layout::AmazonLinux, 1, 0, (10_100, Some(612))),
            (Layout::AmazonLinux, 1, 3, (10_103, Some(615))),
            (Layout::AmazonLinux, 15, 99, (11_599, Some(2_111))),
            (Layout::DeviceNumber, 0, 2, (10_002, None)),
        ];
        for (layout, card, device, expected) in cases {
            assert_eq!(layout.numbers(card, device), Ok(expected), "{layout:?} {card} {device}");
        }
        for (layout, card, device, why) in [
            (Layout::DeviceNumber, 1, 0, "cards would collide"),
            (Layout::AmazonLinux, 16, 0, "network-card 16 is out of range"),
            (Layout::AmazonLinux, 0, 100, "device-number 100 is out of range"),
        ] {
            let error = layout.numbers(card, device).err().unwrap_or_default();
            assert!(error.contains(why), "{layout:?} {card} {device}: {error}");
        }
        // The first ENI of the second card has its own table and rules; only card 0's 0 is primary.
        let second_card = NicMetadata { device_number: 0, network_card: 1, ..nic() };
        let plan = attach_plan(&second_card, &Taken::default(), Layout::AmazonLinux);
        assert_eq!(plan.ok().and_then(|p| p.policy).map(|p| p.table), Some(10_100));
    }

    #[test]
    fn a_main_default_goes_only_behind_a_lower_one_and_a_refresh_removes_only_the_agents() {
        assert!(main_default_allowed(513, Some(512)));
        assert!(!main_default_allowed(513, Some(1024)), "networkd's primary would lose");
        assert!(!main_default_allowed(513, Some(513)));
        assert!(!main_default_allowed(513, None), "no default: this one would take everything");
        let a = |last: u8, length| (IpAddr::V4(Ipv4Addr::new(10, 0, 1, last)), length);
        // Before: .5 and .6 the agent's; plan: .5 (now /25), .7; this refresh added .7.
        let (now, stale) = refresh_addresses(&[a(5, 24), a(6, 24)], &[a(5, 25), a(7, 24)], &[a(7, 24)]);
        assert_eq!(now, [a(5, 24), a(7, 24)]);
        assert_eq!(stale, [a(6, 24)]);
        // An address already there at attach (not added, so not the agent's) is never stale.
        let (now, stale) = refresh_addresses(&[], &[a(7, 24)], &[]);
        assert!(now.is_empty() && stale.is_empty());
    }

    #[test]
    fn device_number_zero_for_a_secondary_mac_is_not_final() {
        assert!(propagated(&nic()).is_ok());
        let premature = NicMetadata { device_number: 0, ..nic() };
        assert!(propagated(&premature).is_err_and(|e| e.ends_with(NOT_PROPAGATED)));
        let primary = NicMetadata { device_number: 0, mac: "52:54:00:12:34:10".into(), ..nic() };
        assert!(propagated(&primary).is_ok());
        let second_card = NicMetadata { device_number: 0, network_card: 1, ..nic() };
        assert!(propagated(&second_card).is_ok());
        // Without the primary's MAC there is nothing to tell by.
        assert!(propagated(&NicMetadata { primary_mac: None, ..premature }).is_ok());
    }

    #[test]
    fn hostile_answers_are_refused_with_a_reason() {
        let v4 = |a: [u8; 4]| Ipv4Addr::from(a);
        let none = Taken::default();
        let address_taken =
            Taken { addresses: vec![IpAddr::V4(v4([10, 0, 1, 6]))], tables: vec![], prefixes: vec![] };
        let table_taken = Taken { addresses: vec![], tables: vec![TABLE_BASE + 1], prefixes: vec![] };
        let cases: Vec<(&str, NicMetadata, &Taken)> = vec![
            ("outside", NicMetadata { local_ipv4s: vec![v4([192, 168, 0, 5])], ..nic() }, &none),
            (
                "EC2 hands out",
                NicMetadata {
                    subnet_ipv4: Ipv4Net { network: v4([128, 0, 0, 0]), prefix: 1 },
                    local_ipv4s: vec![v4([128, 0, 0, 5])],
                    ..nic()
                },
                &none,
            ),
            ("host address", NicMetadata { local_ipv4s: vec![v4([10, 0, 1, 0])], ..nic() }, &none),
            ("host address", NicMetadata { local_ipv4s: vec![v4([10, 0, 1, 255])], ..nic() }, &none),
            (
                "EC2 hands out",
                NicMetadata {
                    subnet_ipv6: vec![Ipv6Net { network: Ipv6Addr::UNSPECIFIED, prefix: 0 }],
                    ipv6s: vec![],
                    ..nic()
                },
                &none,
            ),
            (
                "none of its subnet",
                NicMetadata {
                    ipv6s: vec!["2001:db8:9::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)],
                    ..nic()
                },
                &none,
            ),
            (
                "more than",
                NicMetadata { local_ipv4s: (1..=70).map(|i| v4([10, 0, 1, i])).collect(), ..nic() },
                &none,
            ),
            ("device-number", NicMetadata { device_number: 4000, ..nic() }, &none),
            ("network-card", NicMetadata { network_card: 99, ..nic() }, &none),
            (
                "link-local",
                NicMetadata {
                    subnet_ipv4: Ipv4Net { network: v4([169, 254, 169, 0]), prefix: 24 },
                    local_ipv4s: vec![v4([169, 254, 169, 254])],
                    ..nic()
                },
                &none,
            ),
            (
                "loopback",
                NicMetadata {
                    subnet_ipv4: Ipv4Net { network: v4([127, 0, 0, 0]), prefix: 16 },
                    local_ipv4s: vec![v4([127, 0, 0, 5])],
                    ..nic()
                },
                &none,
            ),
            ("EC2 reserves", NicMetadata { local_ipv4s: vec![v4([10, 0, 1, 1])], ..nic() }, &none),
            (
                "fd00:ec2::/32",
                NicMetadata {
                    subnet_ipv6: vec![Ipv6Net {
                        network: "fd00:ec2::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
                        prefix: 64,
                    }],
                    ipv6s: vec!["fd00:ec2::254".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)],
                    ..nic()
                },
                &none,
            ),
            ("another NIC's address", nic(), &address_taken),
            ("another NIC's already", nic(), &table_taken),
            ("empty", NicMetadata { local_ipv4s: vec![], ..nic() }, &none),
        ];
        for (why, metadata, taken) in cases {
            match attach_plan(&metadata, taken, Layout::AmazonLinux) {
                Ok(plan) => panic!("accepted ({why}): {plan:?}"),
                Err(error) => assert!(error.contains(why), "{why}: {error}"),
            }
        }
    }
}
