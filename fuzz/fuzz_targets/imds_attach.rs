//! IMDS answers for an attached NIC (up to eight values, separated by 0xff bytes; the last four
//! may be absent: ipv6s, subnet-ipv6-cidr-blocks, network-card, the primary MAC) through the
//! parser and `decide::attach_plan`, in both layouts: a plan that comes out never holds an address
//! outside its subnet or another NIC's, a prefix EC2 could not hand out, more than the cap, a
//! table outside the agent's range or another NIC's, or policy routing for the primary ENI.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use hotplug::{
    decide::attach_plan::{
        attach_plan, propagated, Layout, Taken, MAX_ADDRESSES, MAX_DEVICE_NUMBER, MAX_NETWORK_CARD, TABLE_BASE,
    },
    imds::{parse, NicMetadata, NicValues},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).collect();
    let part = |i: usize| parts.get(i).and_then(|p| parse::text("fuzz", p).ok());
    let (Some(mac), Some(device), Some(v4), Some(cidr)) = (part(0), part(1), part(2), part(3)) else { return };
    let values = NicValues {
        mac,
        device_number: device,
        network_card: part(6),
        primary_mac: part(7),
        local_ipv4s: v4,
        subnet_ipv4_cidr_block: cidr,
        ipv6s: part(4),
        subnet_ipv6_cidr_blocks: part(5),
    };
    let Ok(nic) = NicMetadata::parse(&values) else { return };
    let _ = propagated(&nic);
    let taken = Taken { addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))], tables: vec![TABLE_BASE + 1] };
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
                assert!(nic.subnet_ipv6.iter().any(|b| b.prefix == *prefix && b.contains(*a)), "{a} outside its block");
            }
        }
    }
    if let Some(policy) = plan.policy {
        assert!(policy.table > TABLE_BASE && policy.table <= TABLE_BASE + 100 * MAX_NETWORK_CARD + MAX_DEVICE_NUMBER);
        assert!(!taken.tables.contains(&policy.table), "another NIC's table planned");
        assert!(nic.subnet_ipv4.contains(policy.gateway));
        assert!(nic.device_number != 0 || nic.network_card != 0, "policy routing for the primary ENI");
    }
}
