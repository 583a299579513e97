//! Where a decision is made: one state machine per NIC, keyed by its permanent MAC (names and
//! ifindexes change across a reload; the MAC does not). Decisions are pure functions of the
//! current state and one input, so they are tested without a kernel.
//!
//! ```text
//!   present ──removal: driver-unload | driver-unbind | unknown──▶ driver-gone ──registration──▶ present
//!      │  ▲                                                          │   (restore / command / ignore)
//!      │  └─registration under a new ifindex (its removal was lost: restore)
//!      └──removal: device-removed | link-deleted | netns-move──▶ removed ◀──return timeout──┘
//!                                                                   (handed to the detach path)
//! ```
//!
//! A removal of unknown cause (no kernel context explains it) is held like a driver's: if the NIC
//! comes back within the return timeout it is restored, else it goes to the detach path; losing a
//! NIC's configuration because a cause could not be read is the one outcome not allowed.
pub mod attach_plan;
pub mod coexist;
pub mod gate;
pub mod recovery;
pub mod reload;
pub mod startup;
pub mod step;

#[cfg(test)]
mod model;

pub use step::{hold, policy_name, resync, step, NicRecord, Policy, Step};

use serde::{Deserialize, Serialize};

use crate::{
    classify::{Action as NicAction, Cause, NicEvent},
    config::PolicyKind,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum NicState {
    /// The NIC is registered.
    Present { ifindex: u32, name: String },
    /// Its driver left; it is expected back by `deadline_ns` (CLOCK_MONOTONIC).
    DriverGone { cause: Cause, since_ns: u64, deadline_ns: u64 },
    /// It left for good (or did not come back in time).
    Removed { cause: Cause, since_ns: u64 },
}

#[derive(Clone, Debug)]
pub enum Input<'a> {
    Event(&'a NicEvent),
    /// The clock passed a deadline.
    Tick {
        now_ns: u64,
    },
}

/// What the agent must do after a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the last snapshot taken before this moment: it is what the NIC looked like.
    HoldSnapshot { before_ns: u64 },
    /// Put the held snapshot back on the NIC that registered with `ifindex`.
    Restore { ifindex: u32 },
    /// Run the configured command (`phase` says why).
    RunCommand { phase: &'static str },
    /// The NIC is not coming back: its configuration is the detach path's to clean up.
    HandToDetach { reason: String },
    /// Keep the NIC's live snapshot current.
    Track { ifindex: u32 },
    /// A NIC really attached: ask IMDS for it (it lags an attach) and configure it.
    Attach { ifindex: u32 },
    /// The NIC no longer has this ifindex: stop mapping it to the NIC (bookkeeping, not audited).
    Untrack { ifindex: u32 },
}

pub struct Transition {
    pub next: Option<NicState>,
    pub actions: Vec<Action>,
}

impl NicState {
    /// The state's name as `status` prints it.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Present { .. } => "present",
            Self::DriverGone { .. } => "driver-gone",
            Self::Removed { .. } => "removed",
        }
    }
}

impl Action {
    /// What the action does, for the audit trail.
    pub fn describe(&self) -> String {
        match self {
            Self::HoldSnapshot { .. } => "hold the last snapshot for the NIC's return".to_owned(),
            Self::Restore { ifindex } => format!("restore the held snapshot on ifindex {ifindex}"),
            Self::RunCommand { phase } => format!("run the policy's command ({phase})"),
            Self::HandToDetach { reason } => format!("hand to the detach path ({reason})"),
            Self::Track { .. } => "track its configuration".to_owned(),
            Self::Attach { .. } => "configure it from IMDS".to_owned(),
            Self::Untrack { ifindex } => format!("forget ifindex {ifindex}"),
        }
    }
}

impl Transition {
    /// The decision in one line: `present -> driver-gone: hold the last snapshot …`, from the
    /// state before it (none for a NIC the agent did not know).
    pub fn describe(&self, before: Option<&NicState>) -> String {
        let from = before.map_or("unknown", NicState::label);
        let to = self.next.as_ref().map_or("unknown", NicState::label);
        let actions: Vec<String> = self
            .actions
            .iter()
            .filter(|a| !matches!(a, Action::Untrack { .. }))
            .map(Action::describe)
            .collect();
        if actions.is_empty() {
            format!("{from} -> {to}: nothing to do")
        } else {
            format!("{from} -> {to}: {}", actions.join("; "))
        }
    }
}

fn no_change(state: Option<&NicState>) -> Transition {
    Transition { next: state.cloned(), actions: Vec::new() }
}

/// The next state and the actions for one input.
pub fn decide(
    state: Option<&NicState>,
    input: &Input<'_>,
    policy: PolicyKind,
    return_timeout_ns: u64,
) -> Transition {
    match input {
        Input::Tick { now_ns } => match state {
            Some(NicState::DriverGone { cause, deadline_ns, .. }) if now_ns >= deadline_ns => Transition {
                next: Some(NicState::Removed { cause: *cause, since_ns: *now_ns }),
                actions: vec![Action::HandToDetach {
                    reason: format!(
                        "its driver left ({}) and it did not come back within {} s",
                        cause.as_str(),
                        return_timeout_ns / 1_000_000_000
                    ),
                }],
            },
            _ => no_change(state),
        },
        Input::Event(event) => match event.action {
            NicAction::Removal if holds_event(event) => {
                let mut actions = vec![Action::HoldSnapshot { before_ns: event.timestamp_ns }];
                if policy == PolicyKind::Command {
                    actions.push(Action::RunCommand { phase: "driver-gone" });
                }
                Transition {
                    next: Some(NicState::DriverGone {
                        cause: event.cause,
                        since_ns: event.timestamp_ns,
                        deadline_ns: event.timestamp_ns.saturating_add(return_timeout_ns),
                    }),
                    actions,
                }
            }
            NicAction::Removal => Transition {
                next: Some(NicState::Removed { cause: event.cause, since_ns: event.timestamp_ns }),
                actions: vec![Action::HandToDetach { reason: format!("removed ({})", event.cause.as_str()) }],
            },
            NicAction::Registration => {
                let ifindex = u32::try_from(event.ifindex).unwrap_or(0);
                let next = Some(NicState::Present { ifindex, name: event.name.clone() });
                let mut actions = Vec::new();
                match state {
                    // Registered again under another ifindex while the agent thought it present:
                    // its removal was lost (a full ring buffer, the agent not running). A NIC
                    // attached again is an attach; anything else a return.
                    Some(NicState::Present { ifindex: was, .. })
                        if *was != ifindex && ifindex != 0 && event.cause != Cause::DeviceAdded =>
                    {
                        match policy {
                            PolicyKind::Restore => {
                                actions.push(Action::HoldSnapshot { before_ns: event.timestamp_ns });
                                actions.push(Action::Restore { ifindex });
                            }
                            PolicyKind::Command => actions.push(Action::RunCommand { phase: "returned" }),
                            PolicyKind::Ignore => {}
                        }
                    }
                    Some(NicState::Present { ifindex: was, .. })
                        if *was != ifindex && policy != PolicyKind::Ignore =>
                    {
                        actions.push(Action::Attach { ifindex });
                    }
                    // Held for its driver's return, but its device was really attached again
                    // (the same ENI re-attached: same MAC): an attach, not a return; the held
                    // snapshot may be stale and IMDS has the truth.
                    Some(NicState::DriverGone { .. })
                        if event.cause == Cause::DeviceAdded && policy != PolicyKind::Ignore =>
                    {
                        actions.push(Action::Attach { ifindex });
                    }
                    Some(NicState::DriverGone { .. }) => match policy {
                        PolicyKind::Restore => actions.push(Action::Restore { ifindex }),
                        PolicyKind::Command => actions.push(Action::RunCommand { phase: "returned" }),
                        PolicyKind::Ignore => {}
                    },
                    None | Some(NicState::Removed { .. })
                        if event.cause == Cause::DeviceAdded && policy != PolicyKind::Ignore =>
                    {
                        actions.push(Action::Attach { ifindex });
                    }
                    _ => {}
                }
                actions.push(Action::Track { ifindex });
                Transition { next, actions }
            }
        },
    }
}

/// Whether a removal of this cause may hold the NIC's snapshot for its return: a driver's
/// leaving, and a removal nothing explains (restoring on a return beats losing the
/// configuration).
pub const fn holds(cause: Cause) -> bool {
    cause.expects_return() || matches!(cause, Cause::Unknown)
}

/// Whether this removal holds the snapshot: [`holds`], except that a virtual link (a container's
/// veth peer, torn down by a kworker with no context) that leaves for no known reason is gone.
fn holds_event(event: &NicEvent) -> bool {
    event.cause.expects_return() || (event.cause == Cause::Unknown && !event.key().contains('@'))
}

/// Whether `cause` names a NIC leaving for good (kept for the status output).
pub const fn is_final(cause: Cause) -> bool {
    !holds(cause)
}

/// After kernel events were lost, whether a NIC found registered under `ifindex` missed its
/// registration (its driver had left) or a removal and a registration (it is known present under
/// another ifindex): then a registration is replayed through [`decide`].
pub fn missed_return(state: Option<&NicState>, ifindex: u32) -> bool {
    match state {
        Some(NicState::DriverGone { .. }) => true,
        Some(NicState::Present { ifindex: was, .. }) => *was != ifindex,
        Some(NicState::Removed { .. }) | None => false,
    }
}

/// Whether an IMDS answer for an attach still concerns the NIC: the same registration (not gone,
/// not re-registered meanwhile, when it would be another attach or a restore).
pub fn attach_result_applies(state: Option<&NicState>, ifindex: u32) -> bool {
    matches!(state, Some(NicState::Present { ifindex: i, .. }) if *i == ifindex)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: u64 = 60_000_000_000;

    fn event(action: NicAction, cause: Cause, ifindex: u32, ts: u64) -> NicEvent {
        super::model::event(action, cause, "52:54:00:12:34:11", ifindex, ts)
    }

    #[test]
    fn a_driver_reload_holds_then_restores() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        let gone = decide(
            Some(&present),
            &Input::Event(&event(NicAction::Removal, Cause::DriverUnload, 3, 100)),
            PolicyKind::Restore,
            TIMEOUT,
        );
        assert_eq!(gone.actions, vec![Action::HoldSnapshot { before_ns: 100 }]);
        let Some(state) = gone.next else { panic!("no state") };
        assert_eq!(
            state,
            NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 100, deadline_ns: 100 + TIMEOUT }
        );
        let back = decide(
            Some(&state),
            &Input::Event(&event(NicAction::Registration, Cause::DriverLoad, 7, 200)),
            PolicyKind::Restore,
            TIMEOUT,
        );
        assert_eq!(back.actions, vec![Action::Restore { ifindex: 7 }, Action::Track { ifindex: 7 }]);
        assert_eq!(back.next, Some(NicState::Present { ifindex: 7, name: "eth1".into() }));
    }

    #[test]
    fn policies_choose_what_happens_on_return() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnbind, since_ns: 1, deadline_ns: 2 };
        let back = event(NicAction::Registration, Cause::DriverBind, 9, 5);
        let ignore = decide(Some(&gone), &Input::Event(&back), PolicyKind::Ignore, TIMEOUT);
        assert_eq!(ignore.actions, vec![Action::Track { ifindex: 9 }]);
        let command = decide(Some(&gone), &Input::Event(&back), PolicyKind::Command, TIMEOUT);
        assert_eq!(
            command.actions,
            vec![Action::RunCommand { phase: "returned" }, Action::Track { ifindex: 9 }]
        );
        let leave = decide(
            None,
            &Input::Event(&event(NicAction::Removal, Cause::DriverUnload, 9, 5)),
            PolicyKind::Command,
            TIMEOUT,
        );
        assert_eq!(
            leave.actions,
            vec![Action::HoldSnapshot { before_ns: 5 }, Action::RunCommand { phase: "driver-gone" }]
        );
    }

    #[test]
    fn real_removals_and_timeouts_go_to_the_detach_path() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        for cause in [Cause::DeviceRemoved, Cause::LinkDeleted, Cause::NetnsMove] {
            let t = decide(
                Some(&present),
                &Input::Event(&event(NicAction::Removal, cause, 3, 10)),
                PolicyKind::Restore,
                TIMEOUT,
            );
            assert_eq!(t.next, Some(NicState::Removed { cause, since_ns: 10 }));
            assert!(matches!(t.actions.as_slice(), [Action::HandToDetach { .. }]));
            assert!(is_final(cause));
        }
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 0, deadline_ns: 50 };
        assert_eq!(
            decide(Some(&gone), &Input::Tick { now_ns: 49 }, PolicyKind::Restore, TIMEOUT).next,
            Some(gone.clone())
        );
        let late = decide(Some(&gone), &Input::Tick { now_ns: 50 }, PolicyKind::Restore, TIMEOUT);
        assert_eq!(late.next, Some(NicState::Removed { cause: Cause::DriverUnload, since_ns: 50 }));
        assert!(
            matches!(late.actions.as_slice(), [Action::HandToDetach { reason }] if reason.contains("60 s"))
        );
    }

    #[test]
    fn a_real_attach_asks_imds_and_anything_else_is_only_tracked() {
        let removed = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        let added = event(NicAction::Registration, Cause::DeviceAdded, 4, 2);
        let attach = vec![Action::Attach { ifindex: 4 }, Action::Track { ifindex: 4 }];
        assert_eq!(
            decide(Some(&removed), &Input::Event(&added), PolicyKind::Restore, TIMEOUT).actions,
            attach
        );
        assert_eq!(decide(None, &Input::Event(&added), PolicyKind::Restore, TIMEOUT).actions, attach);
        let ignored = decide(None, &Input::Event(&added), PolicyKind::Ignore, TIMEOUT);
        assert_eq!(ignored.actions, vec![Action::Track { ifindex: 4 }], "ignore: another manager owns it");
        let present = NicState::Present { ifindex: 4, name: "eth1".into() };
        let again = decide(Some(&present), &Input::Event(&added), PolicyKind::Restore, TIMEOUT);
        assert_eq!(again.actions, vec![Action::Track { ifindex: 4 }]);
        let loaded = event(NicAction::Registration, Cause::DriverLoad, 4, 2);
        let unseen = decide(None, &Input::Event(&loaded), PolicyKind::Restore, TIMEOUT);
        assert_eq!(
            unseen.actions,
            vec![Action::Track { ifindex: 4 }],
            "no snapshot to restore for a NIC never seen"
        );
    }

    #[test]
    fn an_unexplained_removal_is_held_not_detached() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        let t = decide(
            Some(&present),
            &Input::Event(&event(NicAction::Removal, Cause::Unknown, 3, 10)),
            PolicyKind::Restore,
            TIMEOUT,
        );
        assert_eq!(t.actions, vec![Action::HoldSnapshot { before_ns: 10 }]);
        let Some(gone) = t.next else { panic!("no state") };
        assert!(matches!(gone, NicState::DriverGone { cause: Cause::Unknown, .. }));
        let back = decide(
            Some(&gone),
            &Input::Event(&event(NicAction::Registration, Cause::Unknown, 8, 20)),
            PolicyKind::Restore,
            TIMEOUT,
        );
        assert_eq!(back.actions, vec![Action::Restore { ifindex: 8 }, Action::Track { ifindex: 8 }]);
        assert!(!is_final(Cause::Unknown));
    }

    #[test]
    fn an_unexplained_removal_of_a_virtual_link_is_final() {
        let present = NicState::Present { ifindex: 3, name: "veth1".into() };
        let mut veth = event(NicAction::Removal, Cause::Unknown, 3, 10);
        veth.permanent_mac = None;
        veth.driver = Some("veth".into());
        assert!(veth.key().contains('@'));
        let t = decide(Some(&present), &Input::Event(&veth), PolicyKind::Restore, TIMEOUT);
        assert_eq!(t.next, Some(NicState::Removed { cause: Cause::Unknown, since_ns: 10 }));
    }

    #[test]
    fn a_lost_removal_is_recovered_from_the_new_ifindex() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        let reloaded = event(NicAction::Registration, Cause::DriverLoad, 9, 50);
        let t = decide(Some(&present), &Input::Event(&reloaded), PolicyKind::Restore, TIMEOUT);
        assert_eq!(
            t.actions,
            vec![
                Action::HoldSnapshot { before_ns: 50 },
                Action::Restore { ifindex: 9 },
                Action::Track { ifindex: 9 }
            ]
        );
        let attached = event(NicAction::Registration, Cause::DeviceAdded, 9, 50);
        let t = decide(Some(&present), &Input::Event(&attached), PolicyKind::Restore, TIMEOUT);
        assert_eq!(t.actions, vec![Action::Attach { ifindex: 9 }, Action::Track { ifindex: 9 }]);
        let same = event(NicAction::Registration, Cause::DriverLoad, 3, 50);
        let t = decide(Some(&present), &Input::Event(&same), PolicyKind::Restore, TIMEOUT);
        assert_eq!(t.actions, vec![Action::Track { ifindex: 3 }], "the same registration seen twice");

        assert!(missed_return(Some(&present), 9));
        assert!(!missed_return(Some(&present), 3));
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        assert!(missed_return(Some(&gone), 3));
        assert!(!missed_return(Some(&NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 }), 3));
        assert!(!missed_return(None, 3));
    }

    #[test]
    fn a_late_imds_answer_applies_only_to_the_same_registration() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        assert!(attach_result_applies(Some(&present), 3));
        assert!(!attach_result_applies(Some(&present), 4), "re-registered meanwhile");
        let gone = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        assert!(!attach_result_applies(Some(&gone), 3));
        assert!(!attach_result_applies(None, 3));
    }
}
