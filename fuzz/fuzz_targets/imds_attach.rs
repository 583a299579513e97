//! IMDS answers for an attached NIC (up to eleven values, separated by 0xff bytes; the last seven
//! may be absent: ipv6s, subnet-ipv6-cidr-blocks, network-card, the primary MAC, interface-id,
//! ipv4-prefix, ipv6-prefix) through the parser and `decide::attach_plan`, in both layouts: a
//! plan that comes out never holds an address outside its subnet or another NIC's, a prefix EC2
//! could not hand out, a delegated prefix outside the subnet or over another NIC's address, more
//! than the cap, a table outside the agent's range or another NIC's, an altname that is not
//! `eni-…` or `device-number-…`, or policy routing for the primary ENI.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use hotplug::{
    decide::attach_plan::{
        attach_plan, propagated, Layout, Taken, MAX_ADDRESSES, MAX_DEVICE_NUMBER, MAX_NETWORK_CARD,
        TABLE_BASE,
    },
    imds::{parse, NicMetadata, NicValues},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).collect();
    let part = |i: usize| parts.get(i).and_then(|p| parse::text("fuzz", p).ok());
    let (Some(mac), Some(device), Some(v4), Some(cidr)) = (part(0), part(1), part(2), part(3)) else {
        return;
    };
    let values = NicValues {
        mac,
        device_number: device,
        network_card: part(6),
        primary_mac: part(7),
        local_ipv4s: v4,
        subnet_ipv4_cidr_block: cidr,
        ipv6s: part(4),
        subnet_ipv6_cidr_blocks: part(5),
        interface_id: part(8),
        ipv4_prefix: part(9),
        ipv6_prefix: part(10),
    };
    let Ok(nic) = NicMetadata::parse(&values) else { return };
    let _ = propagated(&nic);
    let taken = Taken {
        addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))],
        tables: vec![TABLE_BASE + 1],
        prefixes: vec![(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 32)), 28)],
    };
    for layout in [Layout::AmazonLinux, Layout::DeviceNumber] {
        check(&nic, &taken, layout);
    }
});

fn check(nic: &NicMetadata, taken: &Taken, layout: Layout) {
    let Ok(plan) = attach_plan(nic, taken, layout) else { return };
    assert!(plan.addresses.len() <= 2 * MAX_ADDRESSES);
    for (address, prefix) in &plan.addresses {
        assert!(!taken.addresses.contains(address), "another NIC's address planned");
        match address {
            IpAddr::V4(a) => {
                assert!((16..=28).contains(prefix));
                assert!(nic.subnet_ipv4.contains(*a), "{a} outside its subnet");
            }
            IpAddr::V6(a) => {
                assert!((44..=64).contains(prefix));
                assert!(
                    nic.subnet_ipv6.iter().any(|b| b.prefix == *prefix && b.contains(*a)),
                    "{a} outside its block"
                );
            }
        }
    }
    if let Some(policy) = plan.policy {
        assert!(
            policy.table > TABLE_BASE
                && policy.table <= TABLE_BASE + 100 * MAX_NETWORK_CARD + MAX_DEVICE_NUMBER
        );
        assert!(!taken.tables.contains(&policy.table), "another NIC's table planned");
        assert!(nic.subnet_ipv4.contains(policy.gateway));
        assert!(nic.device_number != 0 || nic.network_card != 0, "policy routing for the primary ENI");
        for (source, length) in &policy.sources {
            let covers_taken = taken.addresses.iter().any(|t| match (t, source) {
                (IpAddr::V4(t), IpAddr::V4(s)) => {
                    *length < 32 && parse::Ipv4Net { network: *s, prefix: *length }.contains(*t)
                }
                _ => false,
            });
            assert!(!covers_taken, "a delegated prefix over another NIC's address");
            let over_taken_prefix = *length < 32
                && matches!(source, IpAddr::V4(s) if u32::from(*s) >> 4 == u32::from(Ipv4Addr::new(10, 0, 0, 32)) >> 4);
            assert!(!over_taken_prefix, "a delegated prefix over another NIC's prefix");
            if let IpAddr::V4(s) = source {
                assert!(nic.subnet_ipv4.contains(*s), "a rule source {s} outside the subnet");
            }
        }
    }
    for altname in &plan.altnames {
        assert!(altname.len() < 128, "altname too long");
        assert!(altname.starts_with("eni-") || altname.starts_with("device-number-"), "altname {altname:?}");
        assert!(
            altname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "altname {altname:?}"
        );
    }
}
