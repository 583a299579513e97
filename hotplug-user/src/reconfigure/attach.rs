//! Applies an attach plan (`decide::attach_plan`: what IMDS says about a NIC really attached,
//! checked for meaning) the way users know from amazon-ec2-net-utils: its private IPv4 addresses
//! (primary and secondary) and IPv6 addresses; for any ENI but the primary a policy-routing table
//! with a default route via the subnet's router and one rule per address (IPv4 and IPv6). The main table's default route
//! is never touched, and nothing that is there is replaced. Then [`detach`] undoes exactly the
//! rules it added.
use std::net::IpAddr;

use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::{
    decide::attach_plan::AttachPlan,
    snapshot::{self, Entry},
};

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

pub async fn configure(handle: &Handle, ifindex: u32, plan: &AttachPlan) -> AttachReport {
    let mut report = AttachReport::default();
    let up = handle.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await;
    note(&mut report, "link up".into(), up);
    for (address, prefix) in &plan.addresses {
        // Added, not replaced: an address already there (on this NIC) stays as it is.
        let result = handle.address().add(ifindex, *address, *prefix).execute().await;
        note(&mut report, format!("address {address}/{prefix}"), result);
    }
    let Some(policy) = &plan.policy else { return report };
    report.table = Some(policy.table);
    let mut route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .gateway(policy.gateway)
        .output_interface(ifindex)
        .table_id(policy.table);
    if let Some(metric) = policy.metric {
        route = route.priority(metric);
    }
    let route = route.build();
    if let Err(error) = super::add_route_exclusive(handle, route).await {
        report.errors.push(format!("default via {} table {}: {error}", policy.gateway, policy.table));
    }
    for address in &policy.sources {
        // One rule per address, of its family (`ip rule add from ADDRESS lookup TABLE priority TABLE`).
        let (result, message) = match address {
            IpAddr::V4(v4) => {
                let mut request = handle
                    .rule()
                    .add()
                    .v4()
                    .source_prefix(*v4, 32)
                    .table_id(policy.table)
                    .priority(policy.table);
                let message = request.message_mut().clone();
                (request.execute().await, message)
            }
            IpAddr::V6(v6) => {
                let mut request = handle
                    .rule()
                    .add()
                    .v6()
                    .source_prefix(*v6, 128)
                    .table_id(policy.table)
                    .priority(policy.table);
                let message = request.message_mut().clone();
                (request.execute().await, message)
            }
        };
        note(&mut report, format!("rule from {address} lookup {}", policy.table), result);
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
