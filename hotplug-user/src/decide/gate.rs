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
/// Halves kept per NIC and kind (a NIC reloaded in a loop does not grow them).
const CREDIT_MAX: usize = 8;

/// A removal of the NIC whose `remove` uevent cloud-init's hook has not asked about yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveHalf {
    /// CLOCK_MONOTONIC ns of the kernel's removal.
    pub at_ns: u64,
    /// The name it left under (the uevent's DEVPATH ends with it).
    pub name: String,
    /// Its bus address (a PCI function), when it had one: the uevent's DEVPATH passes through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    pub cause: Cause,
    /// The agent holds its configuration for its return (a driver left, policy restore): the
    /// hook is to skip it.
    pub skip: bool,
}

/// A registration the agent restores whose `add` uevent the hook has not asked about yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddHalf {
    pub at_ns: u64,
    pub ifindex: u32,
}

/// The halves of a NIC's removals and returns that cloud-init's hook has not asked about yet.
/// Every removal is queued, skipped or not, so that the hook's questions, which come in the
/// kernel's order, are answered in that order: an old detach still in cloud-init's queue is
/// answered as the detach it was, not with a later reload's credit. Only returns the agent
/// restores are queued as adds, bound to the ifindex they registered with. A uevent with nothing
/// queued (`udevadm trigger`, a question an hour later) is cloud-init's, as it would be without
/// the agent. Release 0.1's credits (bare times) are not read: the halves they stood for go to
/// cloud-init.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credits {
    #[serde(default)]
    removes: Vec<RemoveHalf>,
    #[serde(default)]
    adds: Vec<AddHalf>,
}

impl Credits {
    pub fn removed(&mut self, half: RemoveHalf) {
        self.removes.push(half);
        if self.removes.len() > CREDIT_MAX {
            self.removes.remove(0);
        }
    }

    pub fn restored(&mut self, at_ns: u64, ifindex: u32) {
        self.adds.push(AddHalf { at_ns, ifindex });
        if self.adds.len() > CREDIT_MAX {
            self.adds.remove(0);
        }
    }

    /// Drops what is too old to be asked about any more.
    pub fn expire(&mut self, now_ns: u64) {
        self.removes.retain(|h| now_ns.saturating_sub(h.at_ns) < CREDIT_TTL_NS);
        self.adds.retain(|h| now_ns.saturating_sub(h.at_ns) < CREDIT_TTL_NS);
    }

    /// The removals not asked about yet, oldest first.
    pub fn removes(&self) -> &[RemoveHalf] {
        &self.removes
    }

    /// Takes the removal granted at `at_ns`.
    pub fn take_remove(&mut self, at_ns: u64) -> Option<RemoveHalf> {
        let i = self.removes.iter().position(|h| h.at_ns == at_ns)?;
        Some(self.removes.remove(i))
    }

    /// Whether an add for the device registered now with `ifindex` has a credit: one granted to
    /// that registration, else one of an earlier registration of this NIC (its add is still in
    /// cloud-init's queue: the hook reads the device as it is now). `current` is the NIC's
    /// ifindex now.
    fn add_credit(&self, ifindex: Option<u32>, current: Option<u32>) -> Option<usize> {
        let exact = ifindex.and_then(|i| self.adds.iter().position(|h| h.ifindex == i));
        exact.or_else(|| self.adds.iter().position(|h| Some(h.ifindex) != current))
    }

    pub fn has_adds(&self) -> bool {
        !self.adds.is_empty()
    }

    /// Forgets the adds (the NIC left for good: its registrations are over).
    pub fn clear_adds(&mut self) {
        self.adds.clear();
    }
}

/// The gate's answer about a `remove` uevent: the queued removal it stands for (the oldest under
/// its name, see [`match_remove`]), if any, under the NIC's policy now.
pub fn answer_remove(half: Option<&RemoveHalf>, policy: PolicyKind) -> GateAnswer {
    match half {
        None => answer(Verdict::Unknown, "the kernel event for this uevent has not been seen yet"),
        Some(_) if policy != PolicyKind::Restore => {
            answer(Verdict::Handle, "its policy is not restore: hotplug-agent leaves it to others")
        }
        Some(half) if half.skip => answer(
            Verdict::Skip,
            format!(
                "its driver left ({}): hotplug-agent holds its configuration for its return",
                half.cause.as_str()
            ),
        ),
        Some(half) => answer(Verdict::Handle, format!("it left for good ({})", half.cause.as_str())),
    }
}

/// The queued removal a `remove` uevent for DEVPATH stands for: the oldest, among every NIC's,
/// that left under the uevent's name (through the uevent's bus address, when it had one). Never
/// by the device there now: a NIC registered since under that name is another removal's return,
/// or another NIC. Returns the NIC's MAC and the removal's time.
pub fn match_remove<'a>(
    devpath: &str,
    halves: impl Iterator<Item = (&'a str, &'a RemoveHalf)>,
) -> Option<(&'a str, u64)> {
    let name = devpath.rsplit('/').next().unwrap_or_default();
    halves
        .filter(|(_, h)| h.name == name)
        .filter(|(_, h)| h.bus.as_deref().is_none_or(|bus| devpath.contains(&format!("/{bus}/"))))
        .min_by_key(|(_, h)| h.at_ns)
        .map(|(mac, h)| (mac, h.at_ns))
}

/// The gate's answer about an `add` uevent for a NIC the agent knows (its record, its last kernel
/// event, the policy of the name it is configured under, the ifindex the hook read), spending the
/// credit of a skipped half.
pub fn ask_add(
    record: &mut super::NicRecord,
    last: Option<(NicAction, Cause)>,
    policy: PolicyKind,
    ifindex: Option<u32>,
    now_ns: u64,
) -> GateAnswer {
    record.gate_credits.expire(now_ns);
    let current = match record.state {
        NicState::Present { ifindex, .. } => Some(ifindex),
        _ => None,
    };
    if let (Some(asked), Some(now)) = (ifindex, current) {
        if asked != now {
            let why =
                format!("the NIC registered again (ifindex {asked}) and the agent has not read that yet");
            return answer(Verdict::Unknown, why);
        }
    }
    let credit = record.gate_credits.add_credit(ifindex, current);
    let facts = GateFacts {
        state: &record.state,
        last,
        last_removal: record.last_removal.as_ref().map(|(cause, _)| *cause),
        returned_from_driver_gone: record.returned_from_driver_gone,
        policy,
        credit: credit.is_some(),
    };
    let answer = answer_add(Some(facts));
    if let (Verdict::Skip, Some(i)) = (answer.verdict, credit) {
        record.gate_credits.adds.remove(i);
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
    /// Its DEVPATH is under `/devices/virtual/`: a VLAN, bond or macvlan, never a NIC's own.
    pub virtual_device: bool,
}

/// Which NIC an `add` uevent is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match<'a> {
    Nic(&'a str),
    /// Another device with this NIC's MAC (a VLAN, bond or macvlan child): not the NIC.
    SharesMacWith(&'a str),
}

/// Which NIC an `add` uevent is about: by ifindex when the hook could read the device (never by
/// the uevent's name then: it may be the kernel's `eth0` of a NIC renamed since), or by MAC for
/// a NIC not registered yet as far as the agent knows (its registration is on its way; a
/// registered NIC with that MAC and another ifindex makes the device another one, a child sharing
/// the MAC); else the NIC that most recently left under the uevent's name (it may be back under
/// that name by the time cloud-init asks).
pub fn match_nic<'a>(uevent: Uevent<'_>, nics: impl Iterator<Item = Candidate<'a>>) -> Option<Match<'a>> {
    let nics: Vec<Candidate<'a>> = nics.collect();
    if let Some(found) = uevent.ifindex.and_then(|i| nics.iter().find(|n| n.ifindex == Some(i))) {
        return Some(Match::Nic(found.mac));
    }
    match uevent.mac {
        // A registered NIC with the MAC and another ifindex: a virtual device is a child sharing
        // its MAC; a device of its own is the NIC registered again (another reload) before the
        // agent read that registration (`ask_add` answers `Unknown`: ask again).
        Some(mac) => {
            nics.iter().find(|n| n.mac.eq_ignore_ascii_case(mac)).map(|n| match (n.ifindex, uevent.ifindex) {
                (Some(_), Some(_)) if uevent.virtual_device => Match::SharesMacWith(n.mac),
                _ => Match::Nic(n.mac),
            })
        }
        None if uevent.ifindex.is_some() => None,
        None => nics
            .iter()
            .filter(|n| n.removed_as == Some(uevent.name))
            .max_by_key(|n| n.last_event_ns)
            .map(|n| Match::Nic(n.mac)),
    }
}

/// The gate's answer about an `add` uevent from what the agent knows of its NIC (`None`: no NIC).
pub fn answer_add(facts: Option<GateFacts<'_>>) -> GateAnswer {
    let Some(facts) = facts else {
        return answer(Verdict::Unknown, "hotplug-agent knows no such NIC (yet)");
    };
    if facts.policy != PolicyKind::Restore {
        return answer(Verdict::Handle, "its policy is not restore: hotplug-agent leaves it to others");
    }
    let verdict = return_half(facts);
    if verdict.verdict == Verdict::Skip && !facts.credit {
        return answer(
            Verdict::Handle,
            "hotplug-agent already answered for every reload of this NIC: this uevent is not one of them",
        );
    }
    verdict
}

fn return_half(facts: GateFacts<'_>) -> GateAnswer {
    match (facts.last, facts.state) {
        // A return after a removal of unknown cause (which cloud-init was let handle) is
        // cloud-init's too.
        (Some((NicAction::Registration, cause)), NicState::Present { .. })
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
        (Some((NicAction::Registration, Cause::DeviceAdded)), _) => {
            answer(Verdict::Handle, "a NIC really attached")
        }
        (Some((NicAction::Registration, cause)), _) => answer(
            Verdict::Handle,
            format!("registered ({}) with nothing for hotplug-agent to restore", cause.as_str()),
        ),
        // The registration this uevent stands for has not reached the agent yet.
        (_, _) => answer(Verdict::Unknown, "the kernel event for this uevent has not been seen yet"),
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

    fn half(at_ns: u64, name: &str, bus: Option<&str>, cause: Cause) -> RemoveHalf {
        RemoveHalf { at_ns, name: name.into(), bus: bus.map(Into::into), cause, skip: cause.expects_return() }
    }

    #[test]
    fn a_driver_reload_is_not_cloud_inits_a_real_attach_or_detach_is() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        let back = NicState::Present { ifindex: 7, name: "eth0".into() };
        let unload = (NicAction::Removal, Cause::DriverUnload);
        let load = (NicAction::Registration, Cause::DriverLoad);
        let cases = [
            (facts(&back, load, true), Verdict::Skip),
            (facts(&back, (NicAction::Registration, Cause::DriverBind), true), Verdict::Skip),
            (facts(&back, (NicAction::Registration, Cause::DeviceAdded), false), Verdict::Handle),
            // A driver loaded for a NIC the agent held nothing for (first load after boot).
            (facts(&back, load, false), Verdict::Handle),
            // The uevent is ahead of the kernel event the agent reads.
            (facts(&gone, unload, false), Verdict::Unknown),
        ];
        for (facts, want) in cases {
            let got = answer_add(Some(facts));
            assert_eq!(got.verdict, want, "{:?} {:?}: {}", facts.state, facts.last, got.reason);
            assert!(!got.reason.is_empty());
        }
        assert_eq!(answer_add(None).verdict, Verdict::Unknown);
        let unload = half(1, "eth0", None, Cause::DriverUnload);
        assert_eq!(answer_remove(Some(&unload), PolicyKind::Restore).verdict, Verdict::Skip);
        let detach = half(1, "eth0", None, Cause::DeviceRemoved);
        assert_eq!(answer_remove(Some(&detach), PolicyKind::Restore).verdict, Verdict::Handle);
        assert_eq!(answer_remove(None, PolicyKind::Restore).verdict, Verdict::Unknown);
    }

    #[test]
    fn both_halves_of_an_unexplained_removal_and_return_are_cloud_inits() {
        let back = NicState::Present { ifindex: 8, name: "eth1".into() };
        let removal = half(1, "eth1", None, Cause::Unknown);
        assert_eq!(answer_remove(Some(&removal), PolicyKind::Restore).verdict, Verdict::Handle);
        let ret = GateFacts {
            last_removal: Some(Cause::Unknown),
            ..facts(&back, (NicAction::Registration, Cause::Unknown), true)
        };
        assert_eq!(answer_add(Some(ret)).verdict, Verdict::Handle);
    }

    #[test]
    fn a_nic_the_agent_does_not_restore_is_left_to_cloud_init() {
        let back = NicState::Present { ifindex: 7, name: "eth0".into() };
        for policy in [PolicyKind::Ignore, PolicyKind::Command] {
            let unload = half(1, "eth0", None, Cause::DriverUnload);
            assert_eq!(answer_remove(Some(&unload), policy).verdict, Verdict::Handle);
            let facts =
                GateFacts { policy, ..facts(&back, (NicAction::Registration, Cause::DriverLoad), true) };
            assert_eq!(answer_add(Some(facts)).verdict, Verdict::Handle);
        }
    }

    fn returned(ifindex: u32) -> crate::decide::NicRecord {
        let mut record = crate::decide::NicRecord::new(NicState::Present { ifindex, name: "eth0".into() });
        record.returned_from_driver_gone = true;
        record.last_removal = Some((Cause::DriverUnload, "eth0".into()));
        record
    }

    #[test]
    fn each_return_is_skipped_once_bound_to_its_registration_and_credits_expire() {
        let load = Some((NicAction::Registration, Cause::DriverLoad));
        let mut record = returned(7);
        record.gate_credits.restored(1_000, 7);
        let ask = |r: &mut crate::decide::NicRecord, ifindex, now| {
            ask_add(r, load, PolicyKind::Restore, ifindex, now).verdict
        };
        assert_eq!(ask(&mut record, Some(7), 2_000), Verdict::Skip);
        assert_eq!(
            ask(&mut record, Some(7), 2_000),
            Verdict::Handle,
            "udevadm trigger after the reload was answered"
        );
        // Two reloads back to back, both adds asked late: each reads the device as it is now
        // (ifindex 9), and each is skipped once.
        record.gate_credits.restored(3_000, 8);
        record.gate_credits.restored(4_000, 9);
        record.state = NicState::Present { ifindex: 9, name: "eth0".into() };
        assert_eq!(ask(&mut record, Some(9), 5_000), Verdict::Skip);
        assert_eq!(ask(&mut record, Some(9), 5_000), Verdict::Skip);
        assert_eq!(ask(&mut record, Some(9), 5_000), Verdict::Handle);
        // Asked while the NIC's next registration (ifindex 10) is not read yet: ask again.
        record.gate_credits.restored(5_500, 9);
        assert_eq!(ask(&mut record, Some(10), 5_600), Verdict::Unknown);
        assert_eq!(ask(&mut record, Some(9), 5_600), Verdict::Skip, "the credit was kept");
        record.gate_credits.restored(6_000, 9);
        assert_eq!(ask(&mut record, Some(9), 6_000 + CREDIT_TTL_NS), Verdict::Handle, "expired");
        for at in 0..20 {
            record.gate_credits.restored(10_000 + at, 9);
        }
        let mut left = 0;
        while ask(&mut record, Some(9), 20_000) == Verdict::Skip {
            left += 1;
        }
        assert_eq!(left, CREDIT_MAX, "a NIC reloaded in a loop keeps a bounded number");
    }

    #[test]
    fn removes_are_answered_in_the_kernels_order_never_by_the_device_there_now() {
        // ens6 was detached for real (A), then another NIC (B) took the name and its driver was
        // reloaded; cloud-init's slow queue still holds A's remove, ahead of B's.
        let a = half(100, "ens6", Some("0000:00:06.0"), Cause::DeviceRemoved);
        let b = half(200, "ens6", Some("0000:00:07.0"), Cause::DriverUnload);
        let all = [("02:00:00:00:00:0a", &a), ("02:00:00:00:00:0b", &b)];
        let first = match_remove("/devices/pci0000:00/0000:00:06.0/net/ens6", all.iter().copied());
        assert_eq!(first, Some(("02:00:00:00:00:0a", 100)));
        assert_eq!(answer_remove(Some(&a), PolicyKind::Restore).verdict, Verdict::Handle);
        // The same slot reused: the name alone, the oldest first.
        let c = half(300, "ens6", Some("0000:00:06.0"), Cause::DriverUnload);
        let all = [("02:00:00:00:00:0a", &a), ("02:00:00:00:00:0c", &c)];
        let first = match_remove("/devices/pci0000:00/0000:00:06.0/net/ens6", all.iter().copied());
        assert_eq!(first, Some(("02:00:00:00:00:0a", 100)));
        // Through its bus address only: virtio's DEVPATH has a virtio device between.
        assert_eq!(
            match_remove("/devices/pci0000:00/0000:00:07.0/virtio1/net/ens6", [("b", &b)].into_iter()),
            Some(("b", 200))
        );
        assert_eq!(match_remove("/devices/pci0000:00/0000:00:08.0/net/ens6", [("b", &b)].into_iter()), None);
        assert_eq!(match_remove("/devices/virtual/net/ens7", [("b", &b)].into_iter()), None);
    }

    #[test]
    fn adds_match_by_ifindex_an_unregistered_nics_mac_or_the_name_it_left_under() {
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
        let ask = |mac, ifindex, name: &str| {
            let virtual_device = name.contains('.');
            match_nic(Uevent { mac, ifindex, name, virtual_device }, nics.into_iter())
        };
        assert_eq!(ask(Some("02:00:00:00:00:01"), Some(11), "x"), Some(Match::Nic("02:00:00:00:00:01")));
        assert_eq!(ask(Some("02:00:00:00:00:0A"), None, "ens5"), None, "a MAC never falls back");
        assert_eq!(ask(None, None, "ens5"), Some(Match::Nic("02:00:00:00:00:02")), "the latest to leave");
        assert_eq!(ask(None, None, "ens6"), None);
        // cloud-init 26.x hands the hook the kernel's first name of a NIC udev renamed since: the
        // gate read the device it is now (its ifindex; the operator changed its MAC meanwhile).
        assert_eq!(ask(Some("02:00:00:00:00:99"), Some(7), "eth0"), Some(Match::Nic("02:00:00:00:00:03")));
        assert_eq!(ask(None, Some(7), "eth0"), Some(Match::Nic("02:00:00:00:00:03")));
        assert_eq!(ask(None, Some(8), "eth0"), None, "an ifindex no NIC has: not by name either");
        // A VLAN child of the registered NIC (a virtual device): its MAC, another ifindex.
        assert_eq!(
            ask(Some("02:00:00:00:00:03"), Some(12), "eth0.100"),
            Some(Match::SharesMacWith("02:00:00:00:00:03"))
        );
        // The NIC itself registered again under ifindex 12, not read by the agent yet: the NIC
        // (and `ask_add` says to ask again).
        assert_eq!(ask(Some("02:00:00:00:00:03"), Some(12), "eth0"), Some(Match::Nic("02:00:00:00:00:03")));
    }
}
