//! Restores a NIC's snapshot onto the NIC that came back (same MAC, new ifindex), idempotently:
//! what is already there stays, nothing the snapshot does not name is removed. Then reads the NIC
//! back and reports every difference.
//!
//! Order matters: name and MTU while the link is still down (a rename needs it down), addresses,
//! then admin state up (the kernel installs no IPv4 route through a gateway on a down link), then
//! routes, then rules (rules are not bound to a device and usually survive a reload; a missing one
//! is added again).
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::LinkMessage,
        route::RouteAttribute,
    },
    Handle, LinkUnspec,
};
use serde::Serialize;

use crate::snapshot::{self, NicSnapshot};

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
}

struct Sender<'a> {
    handle: &'a Handle,
    report: RestoreReport,
}

impl Sender<'_> {
    fn outcome(&mut self, what: &str, result: Result<(), rtnetlink::Error>) {
        self.report.requests += 1;
        self.report.last_ack_ns = crate::agent::monotonic_ns();
        if let Err(error) = result {
            if !super::failed_with(&error, libc::EEXIST) {
                self.report.errors.push(format!("{what}: {error}"));
            }
        }
    }

    /// Link changes count every error, EEXIST included (a rename onto a taken name fails so).
    async fn set_link(&mut self, what: &str, message: LinkMessage) {
        let result = self.handle.link().set(message).execute().await;
        self.report.requests += 1;
        self.report.last_ack_ns = crate::agent::monotonic_ns();
        if let Err(error) = result {
            self.report.errors.push(format!("{what}: {error}"));
        }
    }
}

/// Restores `want` onto the link `ifindex`.
pub async fn restore(handle: &Handle, want: &NicSnapshot, ifindex: u32) -> RestoreReport {
    let mut tx = Sender { handle, report: RestoreReport::default() };
    let have = snapshot::capture(handle, ifindex).await.ok();

    if let Some(have) = &have {
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
        let missing: Vec<&str> =
            want.altnames.iter().filter(|a| !have.altnames.contains(a)).map(String::as_str).collect();
        if !missing.is_empty() {
            let result = handle.link().property_add(ifindex).alt_ifname(&missing).execute().await;
            tx.outcome(&format!("altnames {}", missing.join(" ")), result);
        }
    }

    for entry in &want.addresses {
        let mut message = match snapshot::address_message(entry) {
            Ok(m) => m,
            Err(e) => {
                tx.report.errors.push(format!("address {}: {e}", entry.summary));
                continue;
            }
        };
        message.header.index = ifindex;
        for attribute in &mut message.attributes {
            if let AddressAttribute::Flags(flags) = attribute {
                // Transient state is the kernel's to set again.
                flags.remove(
                    AddressFlags::Tentative
                        | AddressFlags::Dadfailed
                        | AddressFlags::Deprecated
                        | AddressFlags::Optimistic,
                );
            }
        }
        let mut request = handle.address().add(ifindex, std::net::IpAddr::from([0, 0, 0, 0]), 0).replace();
        *request.message_mut() = message;
        let result = request.execute().await;
        tx.outcome(&format!("address {}", entry.summary), result);
    }

    if want.up && !have.as_ref().is_some_and(|h| h.up && h.name == want.name) {
        let up = LinkUnspec::new_with_index(ifindex).up().build();
        tx.set_link("link up", up).await;
    }

    for entry in &want.routes {
        let mut message = match snapshot::route_message(entry) {
            Ok(m) => m,
            Err(e) => {
                tx.report.errors.push(format!("route {}: {e}", entry.summary));
                continue;
            }
        };
        message.attributes.retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
        for attribute in &mut message.attributes {
            if let RouteAttribute::Oif(index) = attribute {
                *index = ifindex;
            }
        }
        let mut request = handle.route().add(message.clone()).replace();
        *request.message_mut() = message;
        let result = request.execute().await;
        tx.outcome(&format!("route {}", entry.summary), result);
    }

    let have_rules: Vec<String> =
        have.as_ref().map(|h| h.rules.iter().map(|r| r.summary.clone()).collect()).unwrap_or_default();
    for entry in want.rules.iter().filter(|r| !have_rules.contains(&r.summary)) {
        let message = match snapshot::rule_message(entry) {
            Ok(m) => m,
            Err(e) => {
                tx.report.errors.push(format!("rule {}: {e}", entry.summary));
                continue;
            }
        };
        let mut request = handle.rule().add();
        *request.message_mut() = message;
        let result = request.execute().await;
        tx.outcome(&format!("rule {}", entry.summary), result);
    }

    let last_ack_ns = tx.report.last_ack_ns;
    let mut report = tx.report;
    match snapshot::capture(handle, ifindex).await {
        Ok(now) => report.differences = want.differences(&now),
        Err(error) => report.errors.push(format!("reading the NIC back: {error}")),
    }
    report.last_ack_ns = last_ack_ns;
    report
}
