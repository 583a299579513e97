//! Real attaches: a NIC the agent has no state for is looked up in IMDS in the background (it
//! lags an attach), then configured -- unless cloud-init's hotplug hook configures attaches here.
use std::{sync::Arc, time::Duration};

use super::{Background, NicManager};
use crate::{
    classify::NicEvent,
    clock::monotonic_ns,
    config::Config,
    control::{AttachOutcome, AttachStatus},
    decide::{
        self,
        attach_plan::attach_plan,
        coexist::{attach_owner, AttachOwner, CloudInitHotplug},
    },
    imds::{ImdsClient, ImdsError, NicMetadata},
    managers::cloud_init,
    platform::Platform,
    reconfigure::attach as attach_config,
};

/// An attach's IMDS answer, back in the agent's loop.
pub struct AttachResult {
    mac: String,
    ifindex: u32,
    started_ns: u64,
    requests: u64,
    /// The start-up pass's single look-up (a NIC IMDS does not list is simply not an ENI).
    startup: bool,
    result: Result<NicMetadata, ImdsError>,
}

impl NicManager {
    /// A NIC really attached: configured by the agent through IMDS, or left to cloud-init. With
    /// cloud-init's hook installed, whether its socket listens is asked first, in the background
    /// (`Background::CloudInitHotplug`).
    pub(super) fn attach(&mut self, mac: &str, ifindex: u32, event: Option<&NicEvent>) {
        if cloud_init::Hotplug::detect(&self.host).is_none() {
            self.attach_by(mac, ifindex, event, CloudInitHotplug::Absent);
            return;
        }
        let tx = self.background.clone();
        let (mac, event) = (mac.to_owned(), event.cloned());
        tokio::spawn(async move {
            let hook = if cloud_init::socket_listening().await {
                CloudInitHotplug::Listening
            } else {
                CloudInitHotplug::NotListening
            };
            let _ = tx.send(Background::CloudInitHotplug { mac, ifindex, event, hook }).await;
        });
    }

    /// An attach once it is known whether cloud-init's hook is there to take it.
    pub(super) fn attach_by(
        &mut self,
        mac: &str,
        ifindex: u32,
        event: Option<&NicEvent>,
        hook: CloudInitHotplug,
    ) {
        let name = event.map_or("", |e| e.name.as_str());
        let policy = self.config.policy_for(mac, name).policy;
        match attach_owner(policy, hook) {
            AttachOwner::Agent => {
                if hook == CloudInitHotplug::NotListening {
                    tracing::warn!(%mac, ifindex, action = "attach", "NIC attached, and cloud-init's hotplug hook is installed but {} is not listening (failed? systemctl status {0}): the agent configures the NIC itself", cloud_init::SOCKET);
                }
                let deadline = self.imds.as_ref().map_or(Duration::ZERO, |i| i.attach_deadline());
                self.start_attach(mac, ifindex, event, deadline);
            }
            AttachOwner::CloudInit => {
                tracing::info!(%mac, ifindex, action = "attach", "NIC attached: cloud-init's hotplug hook configures it");
                if let Some(nic) = self.nics.get_mut(mac) {
                    nic.attach = Some(AttachOutcome {
                        status: AttachStatus::LeftToCloudInit,
                        latency_ms: None,
                        imds_requests: 0,
                        table: None,
                        errors: Vec::new(),
                    });
                }
            }
            AttachOwner::None => {}
        }
    }

    /// Asks IMDS for a really attached NIC in the background; the answer comes back through the
    /// attach channel so the agent keeps handling other NICs meanwhile.
    /// `deadline` zero: a single look-up (the start-up pass).
    pub(super) fn start_attach(
        &mut self,
        mac: &str,
        ifindex: u32,
        event: Option<&NicEvent>,
        deadline: Duration,
    ) {
        let Some(nic) = self.nics.get_mut(mac) else { return };
        let Some(imds) = self.imds.clone() else {
            tracing::info!(%mac, action = "attach", "NIC attached; IMDS is off (disabled, unusable, or not EC2: see the start-up log), so the agent does not configure it");
            nic.attach = Some(AttachOutcome {
                status: AttachStatus::ImdsOff,
                latency_ms: None,
                imds_requests: 0,
                table: None,
                errors: vec!["IMDS off (disabled, unusable, or this host is not EC2)".into()],
            });
            return;
        };
        nic.attach = Some(AttachOutcome {
            status: AttachStatus::WaitingForImds,
            latency_ms: None,
            imds_requests: 0,
            table: None,
            errors: Vec::new(),
        });
        tracing::info!(%mac, ifindex, action = "attach", "NIC attached: asking IMDS for it");
        let started_ns = event.map_or_else(monotonic_ns, |e| e.timestamp_ns);
        let tx = self.background.clone();
        let mac = mac.to_owned();
        tokio::spawn(async move {
            let before = imds.requests();
            let result = imds.nic_until_published(&mac, deadline, decide::attach_plan::propagated).await;
            let requests = imds.requests().saturating_sub(before);
            let startup = deadline.is_zero();
            let attach = AttachResult { mac, ifindex, started_ns, requests, startup, result };
            let _ = tx.send(Background::Attach(attach)).await;
        });
    }

    /// Configures an attached NIC once IMDS answered (if it is still there).
    pub(super) async fn on_attach_result(&mut self, result: AttachResult) {
        let AttachResult { mac, ifindex, started_ns, requests, startup, result } = result;
        if !decide::attach_result_applies(self.nics.get(&mac).map(|n| &n.record.state), ifindex) {
            tracing::info!(%mac, action = "attach", "IMDS answered for a NIC that is gone or was re-registered: not configuring it");
            if let Some(attach) = self.nics.get_mut(&mac).and_then(|n| n.attach.as_mut()) {
                attach.status = AttachStatus::Abandoned;
                attach.imds_requests = requests;
            }
            let outcome =
                format!("abandoned ({requests} IMDS requests): the NIC is gone or was re-registered");
            self.audit_outcome(crate::audit::Kind::Attach, &mac, "abandoned", outcome);
            crate::metrics::global().attach(AttachStatus::Abandoned.as_str());
            return;
        }
        // The start-up pass asks once; a NIC IMDS lists but has not propagated yet is asked again
        // as for an attach, rather than left failed.
        if startup {
            if let (Err(ImdsError::Deadline { last, .. }), Some(imds)) = (&result, &self.imds) {
                if last.ends_with(decide::attach_plan::NOT_PROPAGATED) {
                    tracing::info!(%mac, action = "attach", "IMDS lists this NIC but has not propagated its device-number yet: asking again");
                    let deadline = imds.attach_deadline();
                    self.start_attach(&mac, ifindex, None, deadline);
                    return;
                }
            }
        }
        let taken = self.taken(&mac);
        let planned = result
            .map_err(|e| e.to_string())
            .and_then(|metadata| attach_plan(&metadata, &taken, self.config.attach_layout));
        let outcome = match planned {
            Ok(plan) => {
                let report = attach_config::configure(&self.handle, ifindex, &plan).await;
                let latency_ms = monotonic_ns().saturating_sub(started_ns) / 1_000_000;
                tracing::info!(%mac, ifindex, action = "attach", latency_ms, imds_requests = requests, table = ?report.table, errors = ?report.errors, "attached NIC configured from IMDS");
                if let Some(nic) = self.nics.get_mut(&mac) {
                    nic.configured_rules = report.rules;
                    nic.configured_addresses = report.addresses;
                }
                AttachOutcome {
                    status: if report.errors.is_empty() {
                        AttachStatus::Configured
                    } else {
                        AttachStatus::Failed
                    },
                    latency_ms: Some(latency_ms),
                    imds_requests: requests,
                    table: report.table,
                    errors: report.errors,
                }
            }
            Err(error) => {
                if startup {
                    tracing::info!(%mac, action = "attach", %error, "a NIC nobody configured is not in IMDS (or IMDS did not answer): left alone");
                } else {
                    tracing::error!(%mac, action = "attach", %error, "attached NIC not configured");
                }
                AttachOutcome {
                    status: AttachStatus::Failed,
                    latency_ms: None,
                    imds_requests: requests,
                    table: None,
                    errors: vec![error.to_string()],
                }
            }
        };
        let summary = match (&outcome.latency_ms, outcome.errors.is_empty()) {
            (Some(ms), true) => format!("ok: configured in {ms} ms, {} IMDS requests", outcome.imds_requests),
            _ => format!("failed ({} IMDS requests): {}", outcome.imds_requests, outcome.errors.join("; ")),
        };
        self.audit_outcome(crate::audit::Kind::Attach, &mac, outcome.status.as_str(), summary);
        crate::metrics::global().attach(outcome.status.as_str());
        if let Some(nic) = self.nics.get_mut(&mac) {
            nic.attach = Some(outcome);
        }
        self.persist(&mac);
        self.note_change(Some(ifindex));
    }
}

impl NicManager {
    /// What NICs other than `mac` carry now: an attach never takes one of their addresses or
    /// tables.
    pub(super) fn taken(&self, mac: &str) -> decide::attach_plan::Taken {
        let others = || self.nics.iter().filter(|(other, _)| *other != mac).map(|(_, n)| n);
        decide::attach_plan::Taken {
            addresses: others()
                .filter_map(|n| n.snapshot.as_ref())
                .flat_map(|s| s.addresses.iter())
                .filter_map(|a| a.summary.split('/').next().and_then(|ip| ip.parse().ok()))
                .collect(),
            tables: others()
                .filter(|n| {
                    matches!(
                        n.record.state,
                        decide::NicState::Present { .. } | decide::NicState::DriverGone { .. }
                    )
                })
                .filter_map(|n| n.attach.as_ref().and_then(|a| a.table))
                .collect(),
            prefixes: others()
                .flat_map(|n| n.configured_rules.iter())
                .filter_map(|entry| crate::snapshot::rule_message(entry).ok())
                .filter_map(|rule| {
                    let length = rule.header.src_len;
                    rule.attributes.iter().find_map(|a| match a {
                        rtnetlink::packet_route::rule::RuleAttribute::Source(source) => {
                            Some((*source, length))
                        }
                        _ => None,
                    })
                })
                // A single address's rule (/32, /128) is the address itself: `addresses` has it.
                .filter(|(source, length)| *length < if source.is_ipv4() { 32 } else { 128 })
                .collect(),
        }
    }
}

/// The IMDS client the configuration asks for, if any: none where IMDS is disabled, or where
/// the platform is not EC2 (one INFO line, not an error per NIC).
pub(super) fn imds_client(config: &Config, platform: &Platform) -> Option<Arc<ImdsClient>> {
    if !config.imds.enabled {
        tracing::info!("IMDS off (imds.enabled = false): real attaches are not configured by the agent");
        return None;
    }
    if config.imds.require_ec2 {
        match platform {
            Platform::Ec2(evidence) => tracing::debug!(%evidence, "EC2: IMDS on"),
            Platform::Other(seen) => {
                tracing::info!(%seen, "IMDS off: this host is not an EC2 instance (set imds.require_ec2 = false to use an IMDS-compatible service anyway); driver reloads are restored as always");
                return None;
            }
        }
    }
    match ImdsClient::new(&config.imds) {
        Ok(client) => Some(Arc::new(client)),
        Err(error) => {
            tracing::error!(%error, "IMDS unusable: real attaches will not be configured");
            None
        }
    }
}
