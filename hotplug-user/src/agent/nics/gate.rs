//! cloud-init's gate asks about a NIC uevent (`hotplug-agent cloud-init-gate`, through the
//! control socket): which NIC and which of its queued halves the uevent stands for, and the
//! answer (`decide::gate`). A skipped half is spent and the NIC's record saved.
use super::{key, monotonic_ns, NicManager};
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
        if let Some(mac) = matched {
            self.persist(&mac);
        }
        answer
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
