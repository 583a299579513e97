//! IMDS answers for an attached NIC (six values, separated by 0xff bytes; the last two may be
//! absent) through the parser and `decide::attach_plan`: a plan that comes out never holds an
//! address outside its subnet or another NIC's, a prefix EC2 could not hand out, more than the
//! cap, or a table outside the agent's range.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use hotplug::{
    decide::attach_plan::{attach_plan, Taken, MAX_ADDRESSES, MAX_DEVICE_NUMBER, TABLE_BASE},
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
        local_ipv4s: v4,
        subnet_ipv4_cidr_block: cidr,
        ipv6s: part(4),
        subnet_ipv6_cidr_blocks: part(5),
    };
    let Ok(nic) = NicMetadata::parse(&values) else { return };
    let taken = Taken { addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))], tables: vec![TABLE_BASE + 1] };
    let Ok(plan) = attach_plan(&nic, &taken) else { return };
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
        assert!(policy.table > TABLE_BASE && policy.table <= TABLE_BASE + MAX_DEVICE_NUMBER);
        assert!(!taken.tables.contains(&policy.table), "another NIC's table planned");
        assert!(nic.subnet_ipv4.contains(policy.gateway));
    }
});
