//! `hotplug-agent refresh IFACE`: one IMDS look-up for an ENI the agent configured, then the NIC
//! brought in line with it -- what IMDS lists now (a secondary address, an IPv6 address, a
//! delegated prefix assigned since the attach) is added, and what the agent had added and IMDS
//! no longer lists is removed (an address that was there before the agent's is never the
//! agent's). An IMDS error, a not-yet-propagated or refused answer changes nothing.
use tokio::sync::oneshot;

use super::{Background, NicManager};
use crate::{
    control::{AttachStatus, RefreshOutcome},
    decide::{
        self,
        attach_plan::{attach_plan, refresh_addresses, refresh_removals},
        NicState,
    },
    imds::{ImdsError, NicMetadata},
    reconfigure::attach as attach_config,
};

/// A refresh's IMDS answer, back in the agent's loop with the client waiting for it.
pub struct RefreshResult {
    iface: String,
    mac: String,
    ifindex: u32,
    requests: u64,
    result: Result<Option<NicMetadata>, ImdsError>,
    reply: oneshot::Sender<Vec<u8>>,
}

fn send(reply: oneshot::Sender<Vec<u8>>, outcome: &RefreshOutcome) {
    let _ = reply.send(serde_json::to_vec(outcome).unwrap_or_default());
}

impl NicManager {
    /// Starts a refresh of the NIC named `iface`, or answers at once why it cannot.
    pub(super) fn refresh_eni(&mut self, iface: &str, reply: oneshot::Sender<Vec<u8>>) {
        let mut outcome =
            RefreshOutcome { iface: iface.to_owned(), status: "failed".into(), ..Default::default() };
        let found = self.nics.values().find_map(|n| match &n.record.state {
            NicState::Present { ifindex, name } if name == iface => {
                Some((n.mac.clone(), *ifindex, n.attach.clone()))
            }
            _ => None,
        });
        let Some((mac, ifindex, attach)) = found else {
            outcome
                .errors
                .push(format!("no NIC named {iface} is present (`hotplug-agent status` lists them)"));
            return send(reply, &outcome);
        };
        outcome.mac.clone_from(&mac);
        let Some(imds) = self.imds.clone() else {
            outcome.errors.push(
                "IMDS is off (disabled, unusable, or this host is not EC2: see the start-up log)".into(),
            );
            return send(reply, &outcome);
        };
        let configured = attach.as_ref().is_some_and(|a| a.status.from_imds());
        if !configured {
            let status = attach.map_or("none", |a| a.status.as_str());
            outcome.errors.push(format!(
                "{iface} was not configured from IMDS by the agent (its attach: {status}): nothing to refresh"
            ));
            return send(reply, &outcome);
        }
        tracing::info!(%mac, ifindex, action = "refresh", "refresh asked: one IMDS look-up");
        let tx = self.background.clone();
        let iface = iface.to_owned();
        tokio::spawn(async move {
            let before = imds.requests();
            let result = imds.nic(&mac).await;
            let requests = imds.requests().saturating_sub(before);
            let _ = tx
                .send(Background::Refresh(RefreshResult { iface, mac, ifindex, requests, result, reply }))
                .await;
        });
    }

    pub(super) async fn on_refresh_result(&mut self, result: RefreshResult) {
        let RefreshResult { iface, mac, ifindex, requests, result, reply } = result;
        let mut outcome = RefreshOutcome {
            iface,
            mac: mac.clone(),
            status: "failed".into(),
            imds_requests: requests,
            ..Default::default()
        };
        if !decide::attach_result_applies(self.nics.get(&mac).map(|n| &n.record.state), ifindex) {
            outcome.errors.push("the NIC left or was re-registered meanwhile: nothing changed".into());
            return send(reply, &outcome);
        }
        let taken = self.taken(&mac);
        let planned = match result {
            Ok(Some(metadata)) => decide::attach_plan::propagated(&metadata)
                .and_then(|()| attach_plan(&metadata, &taken, self.config.attach_layout)),
            Ok(None) => {
                Err("IMDS does not list the NIC (now): if it was detached, its removal will follow".into())
            }
            Err(error) => Err(error.to_string()),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(error) => {
                tracing::warn!(%mac, ifindex, action = "refresh", %error, imds_requests = requests, "refresh failed: nothing changed");
                outcome.errors.push(format!("{error}: nothing changed"));
                return send(reply, &outcome);
            }
        };
        let Some(nic) = self.nics.get(&mac) else { return send(reply, &outcome) };
        let (old_addresses, old_rules) = (nic.configured_addresses.clone(), nic.configured_rules.clone());
        let report = attach_config::configure(&self.handle, ifindex, &plan).await;
        let (addresses, stale_addresses) =
            refresh_addresses(&old_addresses, &plan.addresses, &report.addresses);
        let stale_rules = refresh_removals(&old_rules, &report.rules);
        let mut errors = report.errors.clone();
        errors.extend(attach_config::remove(&self.handle, ifindex, &stale_addresses, &stale_rules).await);
        let show = |(a, l): &(std::net::IpAddr, u8)| format!("address {a}/{l}");
        outcome.added = report.addresses.iter().map(show).collect();
        outcome.added.extend(refresh_removals(&report.rules, &old_rules).into_iter().map(|r| r.summary));
        outcome.removed = stale_addresses.iter().map(show).collect();
        outcome.removed.extend(stale_rules.into_iter().map(|r| r.summary));
        let changed = !outcome.added.is_empty() || !outcome.removed.is_empty();
        outcome.status = match (errors.is_empty(), changed) {
            (false, true) => "partial".into(),
            (false, false) => "failed".into(),
            (true, true) => "refreshed".into(),
            (true, false) => "unchanged".into(),
        };
        outcome.errors = errors;
        tracing::info!(%mac, ifindex, action = "refresh", status = %outcome.status, added = ?outcome.added, removed = ?outcome.removed, errors = ?outcome.errors, imds_requests = requests, "ENI refreshed from IMDS");
        if let Some(nic) = self.nics.get_mut(&mac) {
            nic.configured_rules = report.rules;
            nic.configured_addresses = addresses;
            if let Some(attach) = nic.attach.as_mut() {
                attach.imds_requests += requests;
                attach.table = report.table;
                // What `status` shows is the NIC's configuration now: the refresh's outcome.
                attach.status =
                    if outcome.errors.is_empty() { AttachStatus::Configured } else { AttachStatus::Failed };
                attach.errors.clone_from(&outcome.errors);
            }
        }
        self.persist(&mac);
        self.note_change(Some(ifindex));
        send(reply, &outcome);
    }
}
