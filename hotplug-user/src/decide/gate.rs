//! Whether cloud-init's hotplug hook should handle a NIC uevent. Not when the agent knows it for
//! half of a driver reload: the agent restores that NIC from its snapshot, without the metadata
//! service, and cloud-init would crawl IMDS for minutes and re-apply its own view. Yes for a NIC
//! really attached or detached (cloud-init configures it as at boot), for a NIC whose policy is
//! not `restore`, and whenever the agent cannot tell.
use serde::{Deserialize, Serialize};

use super::NicState;
use crate::{
    classify::{Action as NicAction, Cause},
    config::PolicyKind,
};

/// The uevent cloud-init's hook was started for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UeventAction {
    Add,
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// cloud-init handles it, as it would without hotplug-agent.
    Handle,
    /// Half of a driver reload: the agent restores the NIC; cloud-init is not run.
    Skip,
    /// The agent has not seen the kernel event for this NIC yet: ask again shortly.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateAnswer {
    pub verdict: Verdict,
    pub reason: String,
}

fn answer(verdict: Verdict, reason: impl Into<String>) -> GateAnswer {
    GateAnswer { verdict, reason: reason.into() }
}

/// What the agent knows of the NIC a uevent is about.
#[derive(Clone, Copy, Debug)]
pub struct GateFacts<'a> {
    pub state: &'a NicState,
    /// The last kernel event of the NIC.
    pub last: Option<(NicAction, Cause)>,
    /// The cause of its last removal, if it had one (cloud-init's hook may ask about a removal
    /// long after the NIC came back: it handles one uevent at a time, slowly).
    pub last_removal: Option<Cause>,
    /// It registered again after its driver had left (the registration the agent restores).
    pub returned_from_driver_gone: bool,
    pub policy: PolicyKind,
    /// A reload half of this uevent's kind is still unanswered (see [`Credits`]).
    pub credit: bool,
}

/// Credits older than this are spent: a reload's uevents reach cloud-init's hook within minutes
/// even when it is busy.
const CREDIT_TTL_NS: u64 = 600 * 1_000_000_000;
/// Credits kept per NIC and kind (a NIC reloaded in a loop does not grow them).
const CREDIT_MAX: usize = 8;

/// The reload halves of a NIC that cloud-init's hook has not asked about yet: each removal the
/// agent holds a snapshot for grants one `remove`, each return it restores one `add`; a `Skip`
/// spends one. A uevent with no credit left (`udevadm trigger`, a question an hour later) is
/// cloud-init's, as it would be without the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credits {
    /// CLOCK_MONOTONIC ns at which each `remove` credit was granted.
    remove: Vec<u64>,
    /// Likewise for `add`.
    add: Vec<u64>,
}

impl Credits {
    fn of(&mut self, action: UeventAction) -> &mut Vec<u64> {
        match action {
            UeventAction::Add => &mut self.add,
            UeventAction::Remove => &mut self.remove,
        }
    }

    pub fn grant(&mut self, action: UeventAction, now_ns: u64) {
        let credits = self.of(action);
        credits.push(now_ns);
        if credits.len() > CREDIT_MAX {
            credits.remove(0);
        }
    }

    /// Whether a live credit of `action` is left (expired ones are dropped).
    pub fn available(&mut self, action: UeventAction, now_ns: u64) -> bool {
        let credits = self.of(action);
        credits.retain(|&at| now_ns.saturating_sub(at) < CREDIT_TTL_NS);
        !credits.is_empty()
    }

    /// Spends the oldest credit of `action`.
    pub fn spend(&mut self, action: UeventAction) {
        let credits = self.of(action);
        if !credits.is_empty() {
            credits.remove(0);
        }
    }
}

/// The gate's answer about a NIC the agent knows (its record, its last kernel event and the
/// policy of the name it is configured under), spending the credit of a skipped half.
pub fn ask(
    record: &mut super::NicRecord,
    last: Option<(NicAction, Cause)>,
    policy: PolicyKind,
    action: UeventAction,
    now_ns: u64,
) -> GateAnswer {
    let credit = record.gate_credits.available(action, now_ns);
    let facts = GateFacts {
        state: &record.state,
        last,
        last_removal: record.last_removal.as_ref().map(|(cause, _)| *cause),
        returned_from_driver_gone: record.returned_from_driver_gone,
        policy,
        credit,
    };
    let answer = cloud_init_gate(action, Some(facts));
    if answer.verdict == Verdict::Skip {
        record.gate_credits.spend(action);
    }
    answer
}

/// One NIC the agent knows, as the gate matches it to a uevent.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub mac: &'a str,
    /// Its ifindex, while it is registered.
    pub ifindex: Option<u32>,
    /// The name it had when it last left.
    pub removed_as: Option<&'a str>,
    /// When its last kernel event came.
    pub last_event_ns: u64,
}

/// What the gate could read of a uevent's device.
#[derive(Clone, Copy, Debug)]
pub struct Uevent<'a> {
    /// Its MAC now (an added device is there to read, perhaps renamed; a removed one is not).
    pub mac: Option<&'a str>,
    /// Its ifindex now: what a rename leaves alone, and what an operator's MAC change does too.
    pub ifindex: Option<u32>,
    /// The name in the uevent's DEVPATH: the kernel's first name for an `add` that udev renamed
    /// since (cloud-init 26.x), the name it had for a `remove`.
    pub name: &'a str,
}

/// Which NIC a uevent is about: by ifindex, then MAC, when the hook could read the device (never
/// by the uevent's name then: it may be the kernel's `eth0` of a NIC renamed since); else the NIC
/// that most recently left under the uevent's name (it may be back under that name by the time
/// cloud-init asks).
pub fn match_nic<'a>(uevent: Uevent<'_>, nics: impl Iterator<Item = Candidate<'a>>) -> Option<&'a str> {
    let nics: Vec<Candidate<'a>> = nics.collect();
    if let Some(found) = uevent.ifindex.and_then(|i| nics.iter().find(|n| n.ifindex == Some(i))) {
        return Some(found.mac);
    }
    match (uevent.mac, uevent.ifindex) {
        (Some(mac), _) => nics.iter().find(|n| n.mac.eq_ignore_ascii_case(mac)).map(|n| n.mac),
        (None, Some(_)) => None,
        (None, None) => nics
            .iter()
            .filter(|n| n.removed_as == Some(uevent.name))
            .max_by_key(|n| n.last_event_ns)
            .map(|n| n.mac),
    }
}

pub fn cloud_init_gate(action: UeventAction, facts: Option<GateFacts<'_>>) -> GateAnswer {
    let Some(facts) = facts else {
        return answer(Verdict::Unknown, "hotplug-agent knows no such NIC (yet)");
    };
    if facts.policy != PolicyKind::Restore {
        return answer(Verdict::Handle, "its policy is not restore: hotplug-agent leaves it to others");
    }
    let verdict = reload_half(action, facts);
    if verdict.verdict == Verdict::Skip && !facts.credit {
        return answer(
            Verdict::Handle,
            "hotplug-agent already answered for every reload of this NIC: this uevent is not one of them",
        );
    }
    verdict
}

fn reload_half(action: UeventAction, facts: GateFacts<'_>) -> GateAnswer {
    match (action, facts.last, facts.state) {
        (UeventAction::Remove, Some((NicAction::Removal, cause)), NicState::DriverGone { .. })
            if cause.expects_return() =>
        {
            answer(
                Verdict::Skip,
                format!(
                    "its driver left ({}): hotplug-agent holds its configuration until it returns",
                    cause.as_str()
                ),
            )
        }
        (UeventAction::Remove, Some((NicAction::Removal, cause)), _) => {
            answer(Verdict::Handle, format!("it left for good ({})", cause.as_str()))
        }
        // The removal half of a reload the agent has completed since.
        (UeventAction::Remove, Some((NicAction::Registration, _)), NicState::Present { .. })
            if facts.returned_from_driver_gone && facts.last_removal.is_some_and(Cause::expects_return) =>
        {
            answer(Verdict::Skip, "its driver left and came back: hotplug-agent restored its configuration")
        }
        // Both halves alike: a return after a removal of unknown cause (which cloud-init was
        // let handle) is cloud-init's too.
        (UeventAction::Add, Some((NicAction::Registration, cause)), NicState::Present { .. })
            if facts.returned_from_driver_gone && facts.last_removal.is_some_and(Cause::expects_return) =>
        {
            answer(
                Verdict::Skip,
                format!(
                    "its driver came back ({}): hotplug-agent restores its configuration",
                    cause.as_str()
                ),
            )
        }
        (UeventAction::Add, Some((NicAction::Registration, Cause::DeviceAdded)), _) => {
            answer(Verdict::Handle, "a NIC really attached")
        }
        (UeventAction::Add, Some((NicAction::Registration, cause)), _) => answer(
            Verdict::Handle,
            format!("registered ({}) with nothing for hotplug-agent to restore", cause.as_str()),
        ),
        // The event this uevent stands for has not reached the agent yet.
        (_, _, _) => answer(Verdict::Unknown, "the kernel event for this uevent has not been seen yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: &NicState, last: (NicAction, Cause), returned: bool) -> GateFacts<'_> {
        GateFacts {
            state,
            last: Some(last),
            // A NIC that returned left before: by a driver unload unless a case says otherwise.
            last_removal: match (last.0, returned) {
                (NicAction::Removal, _) => Some(last.1),
                (NicAction::Registration, true) => Some(Cause::DriverUnload),
                (NicAction::Registration, false) => None,
            },
            returned_from_driver_gone: returned,
            policy: PolicyKind::Restore,
            credit: true,
        }
    }

    #[test]
    fn a_driver_reload_is_not_cloud_inits_a_real_attach_or_detach_is() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        let back = NicState::Present { ifindex: 7, name: "eth0".into() };
        let removed = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        let unload = (NicAction::Removal, Cause::DriverUnload);
        let load = (NicAction::Registration, Cause::DriverLoad);
        let cases = [
            (UeventAction::Remove, facts(&gone, unload, false), Verdict::Skip),
            (UeventAction::Add, facts(&back, load, true), Verdict::Skip),
            (
                UeventAction::Add,
                facts(&back, (NicAction::Registration, Cause::DriverBind), true),
                Verdict::Skip,
            ),
            (
                UeventAction::Remove,
                facts(&removed, (NicAction::Removal, Cause::DeviceRemoved), false),
                Verdict::Handle,
            ),
            (
                UeventAction::Add,
                facts(&back, (NicAction::Registration, Cause::DeviceAdded), false),
                Verdict::Handle,
            ),
            // A driver loaded for a NIC the agent held nothing for (first load after boot).
            (UeventAction::Add, facts(&back, load, false), Verdict::Handle),
            // The uevent is ahead of the kernel event the agent reads.
            (UeventAction::Add, facts(&gone, unload, false), Verdict::Unknown),
            (
                UeventAction::Remove,
                GateFacts { last_removal: None, ..facts(&back, load, true) },
                Verdict::Unknown,
            ),
            // cloud-init asks about the removal after the NIC came back and was restored.
            (
                UeventAction::Remove,
                GateFacts { last_removal: Some(Cause::DriverUnload), ..facts(&back, load, true) },
                Verdict::Skip,
            ),
            (
                UeventAction::Remove,
                GateFacts {
                    last_removal: Some(Cause::DeviceRemoved),
                    ..facts(&back, (NicAction::Registration, Cause::DeviceAdded), false)
                },
                Verdict::Unknown,
            ),
        ];
        for (action, facts, want) in cases {
            let got = cloud_init_gate(action, Some(facts));
            assert_eq!(got.verdict, want, "{action:?} {:?} {:?}: {}", facts.state, facts.last, got.reason);
            assert!(!got.reason.is_empty());
        }
        assert_eq!(cloud_init_gate(UeventAction::Add, None).verdict, Verdict::Unknown);
    }

    #[test]
    fn both_halves_of_an_unexplained_removal_and_return_are_cloud_inits() {
        let gone = NicState::DriverGone { cause: Cause::Unknown, since_ns: 1, deadline_ns: 2 };
        let back = NicState::Present { ifindex: 8, name: "eth1".into() };
        let removal = facts(&gone, (NicAction::Removal, Cause::Unknown), false);
        assert_eq!(cloud_init_gate(UeventAction::Remove, Some(removal)).verdict, Verdict::Handle);
        let ret = GateFacts {
            last_removal: Some(Cause::Unknown),
            ..facts(&back, (NicAction::Registration, Cause::Unknown), true)
        };
        assert_eq!(cloud_init_gate(UeventAction::Add, Some(ret)).verdict, Verdict::Handle);
    }

    #[test]
    fn a_nic_the_agent_does_not_restore_is_left_to_cloud_init() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        for policy in [PolicyKind::Ignore, PolicyKind::Command] {
            let facts = GateFacts {
                state: &gone,
                last: Some((NicAction::Removal, Cause::DriverUnload)),
                last_removal: Some(Cause::DriverUnload),
                returned_from_driver_gone: false,
                policy,
                credit: true,
            };
            assert_eq!(cloud_init_gate(UeventAction::Remove, Some(facts)).verdict, Verdict::Handle);
        }
    }

    #[test]
    fn each_reload_half_is_skipped_once_and_credits_expire() {
        let back = NicState::Present { ifindex: 7, name: "eth0".into() };
        let load = (NicAction::Registration, Cause::DriverLoad);
        let spent = GateFacts { credit: false, ..facts(&back, load, true) };
        let got = cloud_init_gate(UeventAction::Add, Some(spent));
        assert_eq!(
            got.verdict,
            Verdict::Handle,
            "udevadm trigger after the reload was answered: {}",
            got.reason
        );

        let mut credits = Credits::default();
        assert!(!credits.available(UeventAction::Add, 0));
        credits.grant(UeventAction::Add, 1_000);
        assert!(credits.available(UeventAction::Add, 2_000));
        assert!(!credits.available(UeventAction::Remove, 2_000), "kinds are separate");
        credits.spend(UeventAction::Add);
        assert!(!credits.available(UeventAction::Add, 2_000), "spent");
        credits.grant(UeventAction::Remove, 1_000);
        assert!(!credits.available(UeventAction::Remove, 1_000 + CREDIT_TTL_NS), "expired");
        for at in 0..20 {
            credits.grant(UeventAction::Remove, at);
        }
        let mut left = 0;
        while credits.available(UeventAction::Remove, 100) {
            credits.spend(UeventAction::Remove);
            left += 1;
        }
        assert_eq!(left, CREDIT_MAX, "a NIC reloaded in a loop keeps a bounded number");
    }

    #[test]
    fn uevents_match_by_ifindex_mac_or_the_name_the_nic_left_under() {
        let nics = [
            Candidate {
                mac: "02:00:00:00:00:01",
                ifindex: None,
                removed_as: Some("ens5"),
                last_event_ns: 10,
            },
            Candidate {
                mac: "02:00:00:00:00:02",
                ifindex: None,
                removed_as: Some("ens5"),
                last_event_ns: 20,
            },
            Candidate { mac: "02:00:00:00:00:03", ifindex: Some(7), removed_as: None, last_event_ns: 30 },
        ];
        let ask = |mac, ifindex, name| match_nic(Uevent { mac, ifindex, name }, nics.into_iter());
        assert_eq!(ask(Some("02:00:00:00:00:03"), None, "x"), Some("02:00:00:00:00:03"));
        assert_eq!(ask(Some("02:00:00:00:00:0A"), None, "ens5"), None, "a MAC never falls back");
        assert_eq!(ask(None, None, "ens5"), Some("02:00:00:00:00:02"), "the latest to leave");
        assert_eq!(ask(None, None, "ens6"), None);
        // cloud-init 26.x hands the hook the kernel's first name of a NIC udev renamed since: the
        // gate read the device it is now (its ifindex; the operator changed its MAC meanwhile).
        assert_eq!(ask(Some("02:00:00:00:00:99"), Some(7), "eth0"), Some("02:00:00:00:00:03"));
        assert_eq!(ask(None, Some(7), "eth0"), Some("02:00:00:00:00:03"));
        assert_eq!(ask(None, Some(8), "eth0"), None, "an ifindex no NIC has: not by name either");
    }
}
