//! A state-machine test of `decide` against a model of the world: NICs really leaving and
//! registering (under fresh ifindexes, as the kernel hands them out), kernel events that get lost,
//! the clock passing deadlines, resyncs after a loss, agent restarts (state kept) and reboots
//! (state from the previous boot forgotten). After every step the invariants hold:
//!
//! - a snapshot is only restored to the MAC it was taken from, onto that NIC's current ifindex;
//! - nothing is restored that was not snapshotted in this boot;
//! - the detach path (which deletes only what the agent added) is never taken for a NIC that is
//!   registered;
//! - after the resync that follows every loss, each NIC the agent tracks is present under its
//!   real ifindex, or held if it is not registered;
//! - a driver reload whose two events both arrive, within the return timeout, is restored.
use std::collections::HashMap;

use proptest::prelude::*;

use super::{
    resync,
    startup::{expected_back, reconcile, tracked, Persisted, Reconcile},
    step,
    step::Registered,
    Action, Input, NicRecord, NicState, Policy,
};
use crate::{
    classify::{Action as NicAction, Cause, NicEvent, Source},
    config::PolicyKind,
};

const TIMEOUT: u64 = 60_000_000_000;
const NICS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// NIC `nic` leaves for `cause`; the kernel event is lost if `lost`.
    Leave { nic: usize, cause: Cause, lost: bool },
    /// NIC `nic` registers again for `cause`.
    Register { nic: usize, cause: Cause, lost: bool },
    /// The clock moves on.
    Tick { ns: u64 },
    /// A loss was noticed: the agent re-reads the links.
    Resync,
    /// The agent restarts (persisted state kept).
    Restart,
    /// The host reboots: new ifindexes, state from before is forgotten.
    Reboot,
}

fn cause() -> impl Strategy<Value = Cause> {
    prop_oneof![
        Just(Cause::Unknown),
        Just(Cause::DriverUnload),
        Just(Cause::DriverUnbind),
        Just(Cause::DeviceRemoved),
        Just(Cause::LinkDeleted),
        Just(Cause::NetnsMove),
        Just(Cause::DriverLoad),
        Just(Cause::DriverBind),
        Just(Cause::DeviceAdded),
        Just(Cause::LinkCreated),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let lost = prop::bool::weighted(0.15);
    prop_oneof![
        4 => (0..NICS, cause(), lost).prop_map(|(nic, cause, lost)| Op::Leave { nic, cause, lost }),
        4 => (0..NICS, cause(), lost).prop_map(|(nic, cause, lost)| Op::Register { nic, cause, lost }),
        2 => (0..2 * TIMEOUT).prop_map(|ns| Op::Tick { ns }),
        1 => Just(Op::Resync),
        1 => Just(Op::Restart),
        1 => Just(Op::Reboot),
    ]
}

#[derive(Default)]
struct World {
    now: u64,
    next_ifindex: u32,
    /// Each NIC's ifindex while it is registered.
    registered: [Option<u32>; NICS],
    /// The agent's record per MAC.
    state: HashMap<String, NicRecord>,
    /// Per MAC: the MAC whose configuration its latest snapshot holds, taken in this boot.
    snapshot: HashMap<String, String>,
    /// A reload in flight whose removal event arrived: (MAC, deadline).
    reload: Option<(String, u64)>,
    restores: usize,
    /// A kernel event was lost: the agent resyncs before it handles anything else (it notices
    /// the loss when it next reads the ring).
    resync_due: bool,
}

fn mac(nic: usize) -> String {
    format!("02:00:00:00:00:{nic:02x}")
}

/// A kernel NIC event of `mac` named eth1 (the decide unit tests build theirs here too).
pub(super) fn event(action: NicAction, cause: Cause, mac: &str, ifindex: u32, ts: u64) -> NicEvent {
    NicEvent {
        action,
        cause,
        source: Source::Kernel,
        ifindex: i32::try_from(ifindex).unwrap_or(0),
        name: "eth1".into(),
        mac: mac.into(),
        permanent_mac: Some(mac.into()),
        bus: None,
        driver: None,
        module: None,
        context_module: None,
        task: None,
        timestamp_ns: ts,
        netns: None,
    }
}

impl World {
    fn state_of(&self, mac: &str) -> Option<&NicState> {
        self.state.get(mac).map(|r| &r.state)
    }

    /// Feeds one input for `mac` through `step`, checks the invariants on the actions, and
    /// carries them out on the model.
    fn apply(&mut self, mac: &str, input: &Input<'_>) -> Result<Vec<Action>, TestCaseError> {
        let record = self.state.get(mac).cloned();
        let before = record.as_ref().map(|r| r.state.clone());
        let policy = Policy { kind: PolicyKind::Restore, return_timeout_ns: TIMEOUT };
        let transition = step(record.as_ref(), input, policy);
        let nic = (0..NICS).find(|n| self::mac(*n) == mac).unwrap_or(0);
        for action in &transition.actions {
            match action {
                Action::Restore { ifindex } => {
                    prop_assert_eq!(Some(*ifindex), self.registered[nic], "restored onto another ifindex");
                    let from = self.snapshot.get(mac);
                    prop_assert_eq!(
                        from.map(String::as_str),
                        Some(mac),
                        "restored without this boot's snapshot of it"
                    );
                    self.restores += 1;
                }
                Action::HandToDetach { .. } => {
                    prop_assert!(
                        !matches!(before, Some(NicState::Present { .. }))
                            || matches!(input, Input::Event(e) if e.action == NicAction::Removal),
                        "detach path for a NIC believed present: {before:?} {input:?}"
                    );
                }
                Action::Track { .. } => {
                    self.snapshot.insert(mac.to_owned(), mac.to_owned());
                }
                _ => {}
            }
        }
        match transition.next {
            Some(next) => self.state.insert(mac.to_owned(), next),
            None => self.state.remove(mac),
        };
        Ok(transition.actions)
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        self.now += 1_000;
        // The agent notices a loss when it next reads the ring: before the next event it receives
        // (lost ones pile up meanwhile) or the next tick.
        let reads =
            matches!(op, Op::Tick { .. } | Op::Leave { lost: false, .. } | Op::Register { lost: false, .. });
        if self.resync_due && reads {
            self.step(Op::Resync)?;
        }
        match op {
            Op::Leave { nic, cause, lost } => {
                let Some(ifindex) = self.registered[nic].take() else { return Ok(()) };
                if lost {
                    self.reload = None;
                    self.resync_due = true;
                    return Ok(());
                }
                let m = mac(nic);
                let e = event(NicAction::Removal, cause, &m, ifindex, self.now);
                let held = matches!(self.state_of(&m), Some(NicState::Present { .. }));
                self.apply(&m, &Input::Event(&e))?;
                self.reload = (held && super::holds(cause)).then(|| (m, self.now + TIMEOUT));
            }
            Op::Register { nic, cause, lost } => {
                if self.registered[nic].is_some() {
                    return Ok(());
                }
                self.next_ifindex += 1;
                self.registered[nic] = Some(self.next_ifindex);
                let m = mac(nic);
                let due = self.reload.take().filter(|(r, deadline)| *r == m && self.now < *deadline);
                if lost {
                    self.resync_due = true;
                    return Ok(());
                }
                let e = event(NicAction::Registration, cause, &m, self.next_ifindex, self.now);
                let restores = self.restores;
                self.apply(&m, &Input::Event(&e))?;
                if due.is_some() && cause != Cause::DeviceAdded {
                    prop_assert_eq!(self.restores, restores + 1, "a reload seen whole was not restored");
                }
            }
            Op::Tick { ns } => {
                self.now += ns;
                for nic in 0..NICS {
                    self.apply(&mac(nic), &Input::Tick { now_ns: self.now })?;
                }
                self.reload = self.reload.take().filter(|(_, deadline)| self.now < *deadline);
            }
            Op::Resync => {
                self.reload = None;
                self.resync_due = false;
                // The agent's own rule (`decide::resync`), fed what the kernel lists.
                let links: Vec<Registered> = (0..NICS)
                    .filter_map(|nic| {
                        self.registered[nic].map(|ifindex| Registered {
                            key: mac(nic),
                            ifindex,
                            name: "eth1".into(),
                        })
                    })
                    .collect();
                let replays = resync(self.state.iter().map(|(k, r)| (k.as_str(), &r.state)), &links);
                for replay in replays {
                    let e = event(replay.action, Cause::Unknown, &replay.key, replay.ifindex, self.now);
                    self.apply(&replay.key, &Input::Event(&e))?;
                }
                for nic in 0..NICS {
                    let m = mac(nic);
                    match (self.registered[nic], self.state_of(&m)) {
                        (Some(ifindex), Some(NicState::Present { ifindex: believed, .. })) => {
                            prop_assert_eq!(
                                *believed,
                                ifindex,
                                "after the resync, present under a stale ifindex"
                            );
                        }
                        (Some(_), Some(NicState::DriverGone { .. })) => {
                            prop_assert!(false, "after the resync, registered but still believed gone");
                        }
                        (None, Some(NicState::Present { .. })) => {
                            prop_assert!(false, "after the resync, believed present but not registered");
                        }
                        _ => {}
                    }
                }
            }
            Op::Restart => {
                self.reload = None;
                self.resync_due = false;
                for nic in 0..NICS {
                    let m = mac(nic);
                    let registered = self.registered[nic];
                    let persisted = self.state.get(&m).cloned();
                    let decision = reconcile(
                        persisted.as_ref().map(|record| Persisted {
                            state: &record.state,
                            pending_restore: false,
                            attach_waiting: false,
                            configured_by_hand: false,
                        }),
                        registered,
                    );
                    match (decision, registered) {
                        (Reconcile::Restore, Some(ifindex)) => {
                            let e = event(NicAction::Registration, Cause::Unknown, &m, ifindex, self.now);
                            let restores = self.restores;
                            self.apply(&m, &Input::Event(&e))?;
                            prop_assert_eq!(
                                self.restores,
                                restores + 1,
                                "came back while the agent was down, not restored"
                            );
                        }
                        (
                            Reconcile::Track | Reconcile::ResumeRestore | Reconcile::ResumeAttach,
                            Some(ifindex),
                        ) => {
                            self.state.insert(m.clone(), tracked(persisted.as_ref(), ifindex, "eth1"));
                            self.snapshot.insert(m.clone(), m);
                        }
                        (Reconcile::ExpectBack, None) => {
                            if let Some(record) = persisted {
                                self.state.insert(m, expected_back(&record, self.now, TIMEOUT));
                            }
                        }
                        (Reconcile::Keep, None) => {}
                        (decision, registered) => {
                            prop_assert!(false, "{decision:?} for a NIC registered as {registered:?}");
                        }
                    }
                }
            }
            Op::Reboot => {
                // Every NIC registers afresh; the agent forgets the previous boot's state and
                // snapshots (`coexist::same_boot`) and tracks what it finds.
                self.reload = None;
                self.state.clear();
                self.snapshot.clear();
                for nic in 0..NICS {
                    self.next_ifindex += 1;
                    self.registered[nic] = Some(self.next_ifindex);
                    let m = mac(nic);
                    prop_assert_eq!(reconcile(None, self.registered[nic]), Reconcile::Track);
                    self.state.insert(
                        m.clone(),
                        NicRecord::new(NicState::Present { ifindex: self.next_ifindex, name: "eth1".into() }),
                    );
                    self.snapshot.insert(m.clone(), m);
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decisions_keep_their_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let mut world = World::default();
        for nic in 0..NICS {
            world.next_ifindex += 1;
            world.registered[nic] = Some(world.next_ifindex);
            let m = mac(nic);
            let e = event(NicAction::Registration, Cause::DriverLoad, &m, world.next_ifindex, 0);
            world.apply(&m, &Input::Event(&e))?;
        }
        for op in ops {
            world.step(op)?;
        }
    }
}
