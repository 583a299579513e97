//! Start-up reconciliation: what the agent does with each NIC when it starts, from the state it
//! persisted (if any, and only if written in this boot) and whether the NIC is registered now.
//! A restart must neither lose a NIC whose driver left while the agent was down nor replay a
//! snapshot onto a NIC that never left.
use super::{NicRecord, NicState};
use crate::classify::Cause;

/// What was persisted about a NIC, as far as the decision goes.
#[derive(Clone, Copy, Debug)]
pub struct Persisted<'a> {
    pub state: &'a NicState,
    /// A restore was waiting for udev or the NIC's manager when the agent stopped.
    pub pending_restore: bool,
    /// An attach was waiting for IMDS when the agent stopped.
    pub attach_waiting: bool,
    /// The NIC registered now carries addresses somebody configured, and no network manager
    /// of the host claims it: an operator's configuration, not to be overlaid with an old one.
    pub configured_by_hand: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reconcile {
    /// Registered and nothing is owed: follow its configuration from now on.
    Track,
    /// It came back while the agent was not running (its driver had left, or it is registered
    /// under another ifindex than the one persisted: a reload the agent did not see): restore.
    Restore,
    /// The same registration, with a restore that was waiting for udev or its manager: finish it.
    ResumeRestore,
    /// An attach was waiting for IMDS (the NIC was never configured): ask again.
    ResumeAttach,
    /// Not registered now, though it was present or its driver had left: expect it back within
    /// the return timeout (counted from now), as after a driver unload.
    ExpectBack,
    /// Not registered, and it had left for good: nothing to do.
    Keep,
}

/// The record of a NIC found registered at start-up that is tracked from now on (`Track`,
/// `ResumeRestore`, `ResumeAttach`): present under its ifindex and name now; what the gate reads
/// is kept.
pub fn tracked(record: Option<&NicRecord>, ifindex: u32, name: &str) -> NicRecord {
    let state = NicState::Present { ifindex, name: name.to_owned() };
    match record {
        Some(record) => NicRecord { state, ..record.clone() },
        None => NicRecord::new(state),
    }
}

/// The record of a NIC absent at start-up that is expected back (`ExpectBack`): its driver gone
/// since `now_ns`, of the cause persisted (unknown if it was believed present).
pub fn expected_back(record: &NicRecord, now_ns: u64, return_timeout_ns: u64) -> NicRecord {
    let cause = match record.state {
        NicState::DriverGone { cause, .. } => cause,
        _ => Cause::Unknown,
    };
    let state = NicState::DriverGone {
        cause,
        since_ns: now_ns,
        deadline_ns: now_ns.saturating_add(return_timeout_ns),
    };
    NicRecord { state, ..record.clone() }
}

/// The decision for one NIC. `persisted` is `None` for a NIC the agent has no state for (or state
/// from another boot, which is forgotten first); `registered` is its ifindex now, if registered.
pub fn reconcile(persisted: Option<Persisted<'_>>, registered: Option<u32>) -> Reconcile {
    let Some(persisted) = persisted else {
        return if registered.is_some() { Reconcile::Track } else { Reconcile::Keep };
    };
    match (persisted.state, registered) {
        (NicState::DriverGone { .. }, Some(_)) => Reconcile::Restore,
        // Never configured yet: nothing to restore, whatever its ifindex now.
        (NicState::Present { .. }, Some(_)) if persisted.attach_waiting => Reconcile::ResumeAttach,
        // Registered again while the agent was down, with nobody's configuration on it yet.
        (NicState::Present { ifindex, .. }, Some(now))
            if *ifindex != now && !persisted.configured_by_hand =>
        {
            Reconcile::Restore
        }
        (NicState::Present { .. }, Some(_)) if persisted.pending_restore => Reconcile::ResumeRestore,
        (NicState::Present { .. } | NicState::Removed { .. }, Some(_)) => Reconcile::Track,
        (NicState::Present { .. } | NicState::DriverGone { .. }, None) => Reconcile::ExpectBack,
        (NicState::Removed { .. }, None) => Reconcile::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persisted(state: &NicState) -> Persisted<'_> {
        Persisted { state, pending_restore: false, attach_waiting: false, configured_by_hand: false }
    }

    #[test]
    fn every_persisted_state_against_registered_or_not() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        let removed = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        let cases = [
            (None, Some(3), Reconcile::Track),
            (None, None, Reconcile::Keep),
            (Some(persisted(&gone)), Some(7), Reconcile::Restore),
            (Some(persisted(&gone)), None, Reconcile::ExpectBack),
            (Some(persisted(&present)), Some(3), Reconcile::Track),
            (Some(persisted(&present)), Some(8), Reconcile::Restore),
            (Some(persisted(&present)), None, Reconcile::ExpectBack),
            (
                Some(Persisted { pending_restore: true, ..persisted(&present) }),
                Some(3),
                Reconcile::ResumeRestore,
            ),
            (
                Some(Persisted { attach_waiting: true, ..persisted(&present) }),
                Some(3),
                Reconcile::ResumeAttach,
            ),
            (Some(persisted(&removed)), Some(3), Reconcile::Track),
            (Some(persisted(&removed)), None, Reconcile::Keep),
            // An operator configured it anew while the agent was down: theirs stands.
            (Some(Persisted { configured_by_hand: true, ..persisted(&present) }), Some(8), Reconcile::Track),
        ];
        for (state, registered, want) in cases {
            assert_eq!(reconcile(state, registered), want, "{state:?} registered {registered:?}");
        }
    }

    #[test]
    fn a_new_registration_wins_over_a_pending_restore_but_not_over_an_attach() {
        let present = NicState::Present { ifindex: 3, name: "eth1".into() };
        let pending = Persisted { pending_restore: true, ..persisted(&present) };
        assert_eq!(
            reconcile(Some(pending), Some(4)),
            Reconcile::Restore,
            "reloaded while the agent was down"
        );
        let attach = Persisted { attach_waiting: true, ..persisted(&present) };
        assert_eq!(reconcile(Some(attach), Some(4)), Reconcile::ResumeAttach, "nothing was configured yet");
    }

    #[test]
    fn start_up_records_keep_what_the_gate_reads() {
        let mut gone =
            NicRecord::new(NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 });
        gone.last_removal = Some((Cause::DriverUnload, "ens5".into()));
        let back = expected_back(&gone, 100, 50);
        assert_eq!(
            back.state,
            NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 100, deadline_ns: 150 }
        );
        assert_eq!(back.last_removal, gone.last_removal);
        let present = NicRecord::new(NicState::Present { ifindex: 3, name: "ens5".into() });
        let absent = expected_back(&present, 100, u64::MAX);
        assert_eq!(
            absent.state,
            NicState::DriverGone { cause: Cause::Unknown, since_ns: 100, deadline_ns: u64::MAX }
        );
        let tracked = tracked(Some(&back), 9, "ens5");
        assert_eq!(tracked.state, NicState::Present { ifindex: 9, name: "ens5".into() });
        assert_eq!(tracked.last_removal, gone.last_removal);
        assert_eq!(
            super::tracked(None, 4, "eth0"),
            NicRecord::new(NicState::Present { ifindex: 4, name: "eth0".into() })
        );
    }
}
