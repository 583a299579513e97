//! Every change of what the agent keeps about a NIC, in one place: [`step`] takes a NIC's record
//! and one input and returns the next record and the actions to carry out. The agent stores the
//! record, executes the actions, and never branches on a NIC's state itself.
//!
//! Besides the state machine of [`super::decide`], a step moves what cloud-init's gate and the
//! audit read: whether the NIC came back from its driver's leaving, the cause and name of its last
//! removal, and the reload halves cloud-init's hook may skip (credits). [`hold`] picks the snapshot
//! a leaving NIC is held with, and [`resync`] what to replay after lost kernel events.
use serde::{Deserialize, Serialize};

use super::{
    decide,
    gate::{Credits, RemoveHalf},
    missed_return, Action, Input, NicState,
};
use crate::{
    classify::{Action as NicAction, Cause},
    config::PolicyKind,
};

/// What the agent keeps about a NIC that decisions read and change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRecord {
    pub state: NicState,
    /// The NIC registered again after its driver had left (what cloud-init's gate asks).
    #[serde(default)]
    pub returned_from_driver_gone: bool,
    /// The cause of its last removal, and the name it had then.
    #[serde(default)]
    pub last_removal: Option<(Cause, String)>,
    /// Reload halves cloud-init's hook has not asked about yet.
    #[serde(default)]
    pub gate_credits: Credits,
}

impl NicRecord {
    pub fn new(state: NicState) -> Self {
        Self { state, returned_from_driver_gone: false, last_removal: None, gate_credits: Credits::default() }
    }
}

/// The policy a decision follows for one NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub kind: PolicyKind,
    /// How long a NIC whose driver left is expected back.
    pub return_timeout_ns: u64,
}

/// A step's outcome: the next record (`None`: the agent knows nothing of the NIC, and still does
/// not) and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub next: Option<NicRecord>,
    pub actions: Vec<Action>,
}

impl Step {
    /// Nothing changed and nothing is to be done.
    pub fn unchanged(&self, before: Option<&NicRecord>) -> bool {
        self.actions.is_empty() && self.next.as_ref() == before
    }

    /// The decision in one line, as [`super::Transition::describe`] gives it.
    pub fn describe(&self, before: Option<&NicRecord>) -> String {
        let transition = super::Transition {
            next: self.next.as_ref().map(|r| r.state.clone()),
            actions: self.actions.clone(),
        };
        transition.describe(before.map(|r| &r.state))
    }
}

/// The next record of a NIC, and the actions, for one input.
pub fn step(record: Option<&NicRecord>, input: &Input<'_>, policy: Policy) -> Step {
    let before = record.map(|r| &r.state);
    let transition = decide(before, input, policy.kind, policy.return_timeout_ns);
    let Some(state) = transition.next else {
        return Step { next: record.cloned(), actions: transition.actions };
    };
    // The moment of the input, by CLOCK_MONOTONIC: the kernel's timestamp of an event.
    let now_ns = match input {
        Input::Event(event) => event.timestamp_ns,
        Input::Tick { now_ns } => *now_ns,
    };
    let mut next = record.cloned().unwrap_or_else(|| NicRecord::new(state.clone()));
    next.gate_credits.expire(now_ns);
    let restores = transition.actions.iter().any(|a| matches!(a, Action::Restore { .. }));
    let attaches = transition.actions.iter().any(|a| matches!(a, Action::Attach { .. }));
    next.returned_from_driver_gone = match (before, &state) {
        (Some(NicState::DriverGone { .. }), NicState::Present { .. }) => restores,
        // Registered again under another ifindex (its removal was lost): a return only if
        // restored as one.
        (Some(NicState::Present { ifindex: was, .. }), NicState::Present { ifindex, .. })
            if was != ifindex =>
        {
            restores
        }
        (_, NicState::Present { .. }) => next.returned_from_driver_gone,
        _ => false,
    };
    // An attach is no reload's return: no add of an earlier registration is to be skipped.
    if attaches {
        next.gate_credits.clear_adds();
    }
    // Each removal is a `remove` uevent cloud-init's hook will ask about (skipped when the
    // agent holds the NIC for its return under policy restore); each return the agent restores
    // an `add` to skip, bound to the registration.
    if let Input::Event(event) = input {
        match event.action {
            NicAction::Removal => {
                next.last_removal = Some((event.cause, event.name.clone()));
                let held = matches!(state, NicState::DriverGone { .. });
                next.gate_credits.removed(RemoveHalf {
                    at_ns: now_ns,
                    name: event.name.clone(),
                    bus: event.bus.clone(),
                    cause: event.cause,
                    skip: held && event.cause.expects_return() && policy.kind == PolicyKind::Restore,
                });
                if !held {
                    next.gate_credits.clear_adds();
                }
            }
            NicAction::Registration => {
                if let (true, NicState::Present { ifindex, .. }) = (restores, &state) {
                    next.gate_credits.restored(now_ns, *ifindex);
                }
            }
        }
    }
    // The ifindex it had is no longer its own (gone, or registered again under another).
    let mut actions = transition.actions;
    if let Some(NicState::Present { ifindex: had, .. }) = before {
        if !matches!(state, NicState::Present { ifindex, .. } if ifindex == *had) {
            actions.insert(0, Action::Untrack { ifindex: *had });
        }
    }
    next.state = state;
    Step { next: Some(next), actions }
}

/// The record of a NIC read under a new name (udev renamed it): a present NIC's name follows.
pub fn renamed(record: &NicRecord, name: &str) -> NicRecord {
    let mut next = record.clone();
    if let NicState::Present { name: had, .. } = &mut next.state {
        name.clone_into(had);
    }
    next
}

/// The name whose policy applies to a NIC: the name it is configured under (its snapshot's), else
/// the one it had when it last left, else the name an event or uevent gives (a returning NIC first
/// registers under the kernel's fresh ethN, before anything renames it).
pub fn policy_name<'a>(configured: Option<&'a str>, removed_as: Option<&'a str>, given: &'a str) -> &'a str {
    configured.or(removed_as).unwrap_or(given)
}

/// Where the snapshot held for a NIC's return comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldFrom {
    /// The restore still waiting for the NIC's manager when its driver left again: its snapshot.
    PendingReload,
    /// The snapshot of this index among the candidates: the last one read before the removal.
    Snapshot(usize),
    /// No snapshot from before the removal.
    Nothing,
}

/// What [`hold`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub from: HeldFrom,
    /// Routes and rules a manager's cycle dropped (waiting for it to finish) join what is held.
    pub merge_cycle: bool,
}

/// What a pending restore was waiting for when the driver left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingKind {
    Reload,
    ManagerCycle,
}

/// The snapshot to hold when a NIC's driver leaves: a reload's restore still pending keeps its
/// own; else the last snapshot taken before `removed_ns` (`taken_ns`: when each candidate was
/// read). Without kernel context (`heuristic`), the removal is seen after the teardown's own
/// notifications: the last snapshot from before the burst of changes that ended in it
/// (`burst_start_ns`).
pub fn hold(
    pending: Option<PendingKind>,
    taken_ns: &[u64],
    removed_ns: u64,
    heuristic: bool,
    burst_start_ns: Option<u64>,
) -> Hold {
    let before_ns = match (heuristic, burst_start_ns) {
        (true, Some(start)) => start.min(removed_ns),
        _ => removed_ns,
    };
    let merge_cycle = pending == Some(PendingKind::ManagerCycle);
    if pending == Some(PendingKind::Reload) {
        return Hold { from: HeldFrom::PendingReload, merge_cycle };
    }
    let from = taken_ns
        .iter()
        .enumerate()
        .filter(|(_, taken)| **taken < before_ns)
        // The newest; of equal times, the later candidate (the current snapshot comes last).
        .max_by_key(|(index, taken)| (**taken, *index))
        .map_or(HeldFrom::Nothing, |(index, _)| HeldFrom::Snapshot(index));
    Hold { from, merge_cycle }
}

/// A link the kernel lists after lost events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub key: String,
    pub ifindex: u32,
    pub name: String,
}

/// An event the agent did not receive but must replay (cause unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    pub action: NicAction,
    pub key: String,
    pub ifindex: u32,
    pub name: String,
}

/// After kernel events were lost: the registrations and removals to replay through [`step`]. A
/// NIC registered now whose registration was lost (its driver had left, or it is known present
/// under another ifindex) gets it replayed; a NIC known present that is not registered any more
/// gets its removal replayed (held for its return). Physical NICs only for removals: a virtual
/// link's key holds its name and MAC, which change without it leaving.
pub fn resync<'a>(
    known: impl Iterator<Item = (&'a str, &'a NicState)> + Clone,
    links: &[Registered],
) -> Vec<Replay> {
    let state_of = |key: &str| known.clone().find(|(k, _)| *k == key).map(|(_, s)| s);
    let mut replays: Vec<Replay> = links
        .iter()
        .filter(|link| missed_return(state_of(&link.key), link.ifindex))
        .map(|link| Replay {
            action: NicAction::Registration,
            key: link.key.clone(),
            ifindex: link.ifindex,
            name: link.name.clone(),
        })
        .collect();
    let mut vanished: Vec<Replay> = known
        .filter(|(key, _)| !key.contains('@') && !links.iter().any(|l| l.key == *key))
        .filter_map(|(key, state)| match state {
            NicState::Present { ifindex, name } => Some(Replay {
                action: NicAction::Removal,
                key: key.to_owned(),
                ifindex: *ifindex,
                name: name.clone(),
            }),
            _ => None,
        })
        .collect();
    vanished.sort_by(|a, b| a.key.cmp(&b.key));
    replays.append(&mut vanished);
    replays
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::NicEvent;

    const TIMEOUT: u64 = 60_000_000_000;
    const RESTORE: Policy = Policy { kind: PolicyKind::Restore, return_timeout_ns: TIMEOUT };

    fn event(action: NicAction, cause: Cause, ifindex: u32, ts: u64) -> NicEvent {
        super::super::model::event(action, cause, "52:54:00:12:34:11", ifindex, ts)
    }

    fn present(ifindex: u32) -> NicRecord {
        NicRecord::new(NicState::Present { ifindex, name: "eth1".into() })
    }

    fn run(record: Option<&NicRecord>, e: &NicEvent) -> Step {
        step(record, &Input::Event(e), RESTORE)
    }

    #[test]
    fn a_reload_queues_both_halves_and_marks_the_return() {
        let start = present(3);
        let gone = run(Some(&start), &event(NicAction::Removal, Cause::DriverUnload, 3, 100));
        let Some(gone) = gone.next else { panic!("no record") };
        assert_eq!(gone.last_removal, Some((Cause::DriverUnload, "eth1".into())));
        assert!(!gone.returned_from_driver_gone);
        let removes = gone.gate_credits.removes();
        assert_eq!(removes.len(), 1);
        assert!(removes[0].skip && removes[0].name == "eth1" && removes[0].at_ns == 100);
        assert!(!gone.gate_credits.has_adds());
        let back = run(Some(&gone), &event(NicAction::Registration, Cause::DriverLoad, 7, 300));
        assert_eq!(back.actions, vec![Action::Restore { ifindex: 7 }, Action::Track { ifindex: 7 }]);
        let Some(back) = back.next else { panic!("no record") };
        assert!(back.returned_from_driver_gone);
        assert!(back.gate_credits.has_adds());
        assert_eq!(back.gate_credits.removes().len(), 1, "the removal's is kept");
        assert_eq!(back.last_removal, Some((Cause::DriverUnload, "eth1".into())), "kept for the gate");
        // A re-registration of a present NIC keeps the mark; a real removal clears it, queues a
        // remove cloud-init handles, and forgets the adds.
        let again = run(Some(&back), &event(NicAction::Registration, Cause::DriverLoad, 7, 500));
        assert!(again.next.as_ref().is_some_and(|r| r.returned_from_driver_gone));
        let removed = run(Some(&back), &event(NicAction::Removal, Cause::DeviceRemoved, 7, 600));
        let Some(removed) = removed.next else { panic!("no record") };
        assert!(!removed.returned_from_driver_gone);
        assert_eq!(removed.last_removal, Some((Cause::DeviceRemoved, "eth1".into())));
        assert_eq!(removed.gate_credits.removes().len(), 2);
        assert!(!removed.gate_credits.removes()[1].skip);
        assert!(!removed.gate_credits.has_adds());
        // `gone` was not changed by the steps after it.
        assert_eq!(gone.gate_credits.removes().len(), 1);
    }

    #[test]
    fn a_same_mac_re_attach_while_held_is_an_attach_not_a_return() {
        let gone = run(Some(&present(3)), &event(NicAction::Removal, Cause::DriverUnbind, 3, 100));
        let Some(gone) = gone.next else { panic!("no record") };
        let added = run(Some(&gone), &event(NicAction::Registration, Cause::DeviceAdded, 9, 200));
        assert_eq!(added.actions, vec![Action::Attach { ifindex: 9 }, Action::Track { ifindex: 9 }]);
        let Some(added) = added.next else { panic!("no record") };
        assert!(!added.returned_from_driver_gone, "the gate hands its add to cloud-init");
        assert!(!added.gate_credits.has_adds());
    }

    #[test]
    fn an_attach_after_a_lost_removal_clears_the_return() {
        let gone = run(Some(&present(3)), &event(NicAction::Removal, Cause::DriverUnload, 3, 100));
        let Some(gone) = gone.next else { panic!("no record") };
        let back = run(Some(&gone), &event(NicAction::Registration, Cause::DriverLoad, 7, 200));
        let Some(back) = back.next else { panic!("no record") };
        assert!(back.returned_from_driver_gone && back.gate_credits.has_adds());
        // Its next removal was lost; it is attached anew (another ifindex).
        let attached = run(Some(&back), &event(NicAction::Registration, Cause::DeviceAdded, 9, 300));
        assert!(attached.actions.contains(&Action::Attach { ifindex: 9 }));
        let Some(attached) = attached.next else { panic!("no record") };
        assert!(!attached.returned_from_driver_gone, "the gate hands its add to cloud-init");
        assert!(!attached.gate_credits.has_adds());
    }

    #[test]
    fn a_first_removal_of_an_unknown_nic_is_held_with_a_credit() {
        let t = run(None, &event(NicAction::Removal, Cause::DriverUnload, 3, 10));
        let Some(record) = t.next else { panic!("no record") };
        assert!(matches!(record.state, NicState::DriverGone { .. }));
        assert!(record.gate_credits.removes().first().is_some_and(|h| h.skip));
    }

    #[test]
    fn a_tick_changes_nothing_before_the_deadline_and_removes_after_it() {
        let mut gone =
            NicRecord::new(NicState::DriverGone { cause: Cause::DriverUnbind, since_ns: 0, deadline_ns: 50 });
        gone.returned_from_driver_gone = false;
        let early = step(Some(&gone), &Input::Tick { now_ns: 49 }, RESTORE);
        assert!(early.unchanged(Some(&gone)));
        let late = step(Some(&gone), &Input::Tick { now_ns: 50 }, RESTORE);
        assert!(!late.unchanged(Some(&gone)));
        assert!(matches!(late.next.as_ref().map(|r| &r.state), Some(NicState::Removed { .. })));
        assert!(matches!(late.actions.as_slice(), [Action::HandToDetach { .. }]));
        assert_eq!(
            late.describe(Some(&gone)),
            "driver-gone -> removed: hand to the detach path (its driver left (driver-unbind) and it did not come back within 60 s)"
        );
        // A tick for a NIC the agent never knew leaves it unknown.
        let none = step(None, &Input::Tick { now_ns: 1 }, RESTORE);
        assert_eq!(none, Step { next: None, actions: Vec::new() });
    }

    #[test]
    fn a_rename_moves_a_present_name_only() {
        let renamed = renamed(&present(3), "ens5");
        assert_eq!(renamed.state, NicState::Present { ifindex: 3, name: "ens5".into() });
        let gone = NicRecord::new(NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 });
        assert_eq!(super::renamed(&gone, "ens5"), gone);
        let leave = run(Some(&present(3)), &event(NicAction::Removal, Cause::DriverUnload, 3, 10));
        assert_eq!(
            leave.actions,
            vec![Action::Untrack { ifindex: 3 }, Action::HoldSnapshot { before_ns: 10 }],
            "the ifindex it had is forgotten"
        );
        assert_eq!(
            leave.describe(Some(&present(3))),
            "present -> driver-gone: hold the last snapshot for the NIC's return"
        );
        let again = run(Some(&present(3)), &event(NicAction::Registration, Cause::DriverLoad, 3, 10));
        assert_eq!(again.actions, vec![Action::Track { ifindex: 3 }], "the same ifindex stays tracked");
    }

    #[test]
    fn the_policy_follows_the_configured_name() {
        assert_eq!(policy_name(Some("ens5"), Some("ens6"), "eth0"), "ens5");
        assert_eq!(
            policy_name(None, Some("ens6"), "eth0"),
            "ens6",
            "a returning NIC's first name is the kernel's"
        );
        assert_eq!(policy_name(None, None, "eth0"), "eth0");
    }

    #[test]
    fn hold_picks_the_last_snapshot_before_the_removal() {
        // History 10, 20, 30; the current snapshot (last) taken at 40.
        let taken = [10, 20, 30, 40];
        assert_eq!(hold(None, &taken, 35, false, None).from, HeldFrom::Snapshot(2));
        assert_eq!(hold(None, &taken, 41, false, None).from, HeldFrom::Snapshot(3));
        assert_eq!(hold(None, &taken, 10, false, None).from, HeldFrom::Nothing);
        // Degraded mode: before the burst that ended in the removal.
        assert_eq!(hold(None, &taken, 41, true, Some(25)).from, HeldFrom::Snapshot(1));
        assert_eq!(
            hold(None, &taken, 41, false, Some(25)).from,
            HeldFrom::Snapshot(3),
            "kernel context knows"
        );
        // A reload's restore still waiting keeps its snapshot; a manager's cycle joins the held one.
        let pending = hold(Some(PendingKind::Reload), &taken, 41, false, None);
        assert_eq!(pending, Hold { from: HeldFrom::PendingReload, merge_cycle: false });
        let cycle = hold(Some(PendingKind::ManagerCycle), &taken, 41, false, None);
        assert_eq!(cycle, Hold { from: HeldFrom::Snapshot(3), merge_cycle: true });
        // Equal times: the later candidate (the current snapshot) wins.
        assert_eq!(hold(None, &[5, 5], 6, false, None).from, HeldFrom::Snapshot(1));
    }

    #[test]
    fn resync_replays_lost_registrations_and_removals() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        let a = NicState::Present { ifindex: 3, name: "eth1".into() };
        let b = NicState::Present { ifindex: 4, name: "eth2".into() };
        let veth = NicState::Present { ifindex: 9, name: "veth1".into() };
        let removed = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        let known = [("aa", &gone), ("bb", &a), ("cc", &b), ("dd@veth1", &veth), ("ee", &removed)];
        let links = [
            Registered { key: "aa".into(), ifindex: 7, name: "eth0".into() },
            Registered { key: "bb".into(), ifindex: 8, name: "eth1".into() },
            Registered { key: "ff".into(), ifindex: 10, name: "eth5".into() },
        ];
        let replays = resync(known.iter().map(|(k, s)| (*k, *s)), &links);
        let seen: Vec<(NicAction, &str, u32)> =
            replays.iter().map(|r| (r.action, r.key.as_str(), r.ifindex)).collect();
        assert_eq!(
            seen,
            vec![
                (NicAction::Registration, "aa", 7),
                (NicAction::Registration, "bb", 8),
                (NicAction::Removal, "cc", 4),
            ],
            "a NIC never known is only tracked; a vanished virtual link is not held"
        );
    }
}
