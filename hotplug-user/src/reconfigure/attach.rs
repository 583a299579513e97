//! Configures a really attached NIC from what IMDS says about it, the way users know from
//! amazon-ec2-net-utils: its private IPv4 addresses (primary and secondary) and IPv6 addresses;
//! for a secondary NIC (device-number > 0) a policy-routing table `10000 + device-number` with a
//! default route via the subnet's router and one rule per address. The main table's default route
//! is never touched. Then [`detach`] undoes exactly the rules it added.
use std::net::IpAddr;

use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::{
    imds::NicMetadata,
    snapshot::{self, Entry},
};

/// First policy-routing table and rule priority: `10000 + device-number`.
pub const TABLE_BASE: u32 = 10_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttachReport {
    /// The rules the agent added (the detach path removes exactly these).
    pub rules: Vec<Entry>,
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

pub async fn configure(handle: &Handle, ifindex: u32, nic: &NicMetadata) -> AttachReport {
    let mut report = AttachReport::default();
    let up = handle.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await;
    note(&mut report, "link up".into(), up);
    for address in &nic.local_ipv4s {
        let result = handle
            .address()
            .add(ifindex, IpAddr::V4(*address), nic.subnet_ipv4.prefix)
            .replace()
            .execute()
            .await;
        note(&mut report, format!("address {address}/{}", nic.subnet_ipv4.prefix), result);
    }
    for address in &nic.ipv6s {
        let prefix = nic.subnet_ipv6.first().map_or(128, |n| n.prefix);
        let result = handle.address().add(ifindex, IpAddr::V6(*address), prefix).replace().execute().await;
        note(&mut report, format!("address {address}/{prefix}"), result);
    }
    if nic.device_number == 0 {
        return report;
    }
    let table = TABLE_BASE + nic.device_number;
    report.table = Some(table);
    let gateway = nic.subnet_ipv4.gateway();
    let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(ifindex)
        .table_id(table)
        .build();
    let result = handle.route().add(route).replace().execute().await;
    note(&mut report, format!("default via {gateway} table {table}"), result);
    for address in &nic.local_ipv4s {
        let mut request =
            handle.rule().add().v4().source_prefix(*address, 32).table_id(table).priority(table);
        let message = request.message_mut().clone();
        let result = request.execute().await;
        note(&mut report, format!("rule from {address} lookup {table}"), result);
        report
            .rules
            .push(Entry { summary: snapshot::rule_summary(&message), message: snapshot::to_hex(&message) });
    }
    report
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
