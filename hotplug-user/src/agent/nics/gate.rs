//! cloud-init's gate asks about a NIC uevent (`hotplug-agent cloud-init-gate`, through the
//! control socket): which NIC and which of its queued halves the uevent stands for, and the
//! answer (`decide::gate`). A skipped half is spent and the NIC's record saved.
use super::{key, monotonic_ns, NicManager};

/// How long the gate asks again about a `remove` the agent has not seen before it runs
/// cloud-init's hook (`managers::cloud_init`'s `UNKNOWN_RETRY`, 2 s), with a margin for its last
/// question in flight.
const GATE_GIVES_UP_NS: u64 = 2_500_000_000;
/// How long, and how many, unanswered `remove` questions are remembered.
const UNANSWERED_KEPT_NS: u64 = 600 * 1_000_000_000;
const UNANSWERED_MAX: usize = 64;
use crate::decide::{
    self,
    gate::{GateAnswer, Match, UeventAction, Verdict},
    NicState,
};

impl NicManager {
    pub(super) fn cloud_init_gate(
        &mut self,
        action: UeventAction,
        devpath: &str,
        mac: Option<&str>,
        ifindex: Option<u32>,
    ) -> GateAnswer {
        let name = devpath.rsplit('/').next().unwrap_or_default();
        let now_ns = monotonic_ns();
        // Saved only when a record changed (a half taken, credits expired): a gate asking again
        // every 100 ms while the agent has not read the event must not write state each time.
        let before: Vec<(String, decide::gate::Credits)> =
            self.nics.iter().map(|(k, n)| (k.clone(), n.record.gate_credits.clone())).collect();
        let (matched, answer) = match action {
            UeventAction::Remove => self.gate_remove(devpath, now_ns),
            UeventAction::Add => {
                let virtual_device = devpath.starts_with("/devices/virtual/");
                self.gate_add(name, mac, ifindex, virtual_device, now_ns)
            }
        };
        tracing::info!(
            mac = matched.as_deref().unwrap_or_default(),
            interface = name,
            action = "cloud-init-gate",
            verdict = ?answer.verdict,
            "cloud-init's hotplug hook asked about {action:?} of {name}: {:?}, {}",
            answer.verdict,
            answer.reason
        );
        let changed: Vec<String> = before
            .into_iter()
            .filter(|(k, credits)| self.nics.get(k).is_some_and(|n| n.record.gate_credits != *credits))
            .map(|(k, _)| k)
            .collect();
        for mac in changed {
            self.persist(&mac);
        }
        answer
    }

    /// A NIC's removal was just queued for the gate: if the gate asked about a `remove` it
    /// matches more than [`GATE_GIVES_UP_NS`] ago (and was told to ask again), the gate has
    /// given up and run cloud-init's hook; the half is taken, never to answer a later uevent (a
    /// real detach under the same name).
    pub(super) fn settle_given_up_removes(&mut self, mac: &str) {
        let now_ns = monotonic_ns();
        self.gate_unanswered.retain(|(_, asked)| now_ns.saturating_sub(*asked) < UNANSWERED_KEPT_NS);
        let Some(nic) = self.nics.get(mac) else { return };
        let halves: Vec<decide::gate::RemoveHalf> = nic.record.gate_credits.removes().to_vec();
        let mut taken = Vec::new();
        for half in &halves {
            let given_up = self.gate_unanswered.iter().position(|(devpath, asked)| {
                now_ns.saturating_sub(*asked) > GATE_GIVES_UP_NS
                    && decide::gate::match_remove(devpath, std::iter::once((mac, half))).is_some()
            });
            if let Some(i) = given_up {
                let (devpath, _) = self.gate_unanswered.remove(i);
                tracing::info!(%mac, devpath, "the gate had given up on this removal's uevent (cloud-init ran for it): its half is not kept");
                taken.push(half.at_ns);
            }
        }
        if taken.is_empty() {
            return;
        }
        if let Some(nic) = self.nics.get_mut(mac) {
            for at_ns in taken {
                nic.record.gate_credits.take_remove(at_ns);
            }
        }
        self.persist(mac);
    }

    /// A `remove`: the oldest removal not asked about yet under the uevent's name, of any NIC.
    fn gate_remove(&mut self, devpath: &str, now_ns: u64) -> (Option<String>, GateAnswer) {
        for nic in self.nics.values_mut() {
            nic.record.gate_credits.expire(now_ns);
        }
        let halves = self
            .nics
            .values()
            .flat_map(|n| n.record.gate_credits.removes().iter().map(move |h| (n.mac.as_str(), h)));
        let Some((mac, at_ns)) = decide::gate::match_remove(devpath, halves).map(|(m, at)| (key(m), at))
        else {
            // Not seen yet: the gate asks again for a while, then runs cloud-init's hook.
            if !self.gate_unanswered.iter().any(|(d, _)| d == devpath) {
                if self.gate_unanswered.len() >= UNANSWERED_MAX {
                    self.gate_unanswered.remove(0);
                }
                self.gate_unanswered.push((devpath.to_owned(), now_ns));
            }
            return (None, decide::gate::answer_remove(None, crate::config::PolicyKind::Restore));
        };
        let name = devpath.rsplit('/').next().unwrap_or_default();
        let policy = self.policy(&mac, name).kind;
        let half = self.nics.get_mut(&mac).and_then(|n| n.record.gate_credits.take_remove(at_ns));
        (Some(mac), decide::gate::answer_remove(half.as_ref(), policy))
    }

    /// An `add`: the NIC registered with the ifindex the hook read (or on its way back with the
    /// MAC it read, or last gone under the uevent's name when the device is gone again).
    fn gate_add(
        &mut self,
        name: &str,
        mac: Option<&str>,
        ifindex: Option<u32>,
        virtual_device: bool,
        now_ns: u64,
    ) -> (Option<String>, GateAnswer) {
        let candidates = self.nics.values().map(|n| decide::gate::Candidate {
            mac: n.mac.as_str(),
            ifindex: match n.record.state {
                NicState::Present { ifindex, .. } => Some(ifindex),
                _ => None,
            },
            removed_as: n.record.last_removal.as_ref().map(|(_, had)| had.as_str()),
            last_event_ns: n.last_event.as_ref().map_or(0, |e| e.timestamp_ns),
        });
        let uevent = decide::gate::Uevent { mac, ifindex, name, virtual_device };
        let matched = decide::gate::match_nic(uevent, candidates);
        let mac = match matched {
            Some(Match::Nic(mac)) => key(mac),
            Some(Match::SharesMacWith(parent)) => {
                let answer = GateAnswer {
                    verdict: Verdict::Handle,
                    reason: format!("not a NIC hotplug-agent manages: another device with {parent}'s MAC (a VLAN, bond or macvlan child)"),
                };
                return (None, answer);
            }
            None => return (None, decide::gate::answer_add(None)),
        };
        let policy = self.policy(&mac, name).kind;
        let Some(nic) = self.nics.get_mut(&mac) else { return (None, decide::gate::answer_add(None)) };
        let last = nic.last_event.as_ref().map(|e| (e.action, e.cause));
        let answer = decide::gate::ask_add(&mut nic.record, last, policy, ifindex, now_ns);
        (Some(mac), answer)
    }
}
