//! A driver reload's two halves: the snapshot held when the driver leaves, replayed when the NIC
//! registers again. Where udev runs, the replay waits until udev is done with the returning NIC
//! (it renames it, and starts what other tools hang on its uevent: renaming it under udev, or
//! setting it up before udev renames it, would fail one of the two). Where another manager
//! configures the NIC (`decide::coexist::restore_plan`), the replay also waits until that manager
//! is done -- networkd deletes, when it configures a link, whatever it finds there that it did not
//! make -- and leaves leases to it.
use std::time::Duration;

use super::NicManager;
use crate::snapshot::NicSnapshot;
use crate::{
    classify::{NicEvent, Source},
    clock::monotonic_ns,
    control::RestoreOutcome,
    decide::{
        self,
        coexist::{restore_plan, RestorePlan},
        step::HeldFrom,
        NicState,
    },
    reconfigure::restore::{self, RestoreOptions},
    state::{Pending, PendingReason},
};

/// How long after a driver reload's restore a loss is taken for a peer's teardown (ifupdown's
/// late `ifdown`), not for the operator's new configuration.
const SETTLE_AFTER_RESTORE_NS: u64 = 30 * 1_000_000_000;
/// How long a restore waits for udev to be done with the NIC.
const UDEV_WAIT: Duration = Duration::from_secs(3);
/// How often udev's and the manager's state are looked at meanwhile.
const MANAGER_POLL: Duration = Duration::from_millis(10);

/// A returning NIC's manager is done with it, or the wait ran out.
pub struct Settled {
    mac: String,
    ifindex: u32,
    registered_ns: u64,
    /// When the agent decided to restore (CLOCK_MONOTONIC ns).
    decided_ns: u64,
    plan: RestorePlan,
    waited: Duration,
    /// False: the wait ran out.
    settled: bool,
    round: Round,
}

/// Which restore of a NIC's return (or of a networkd cycle) this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// The restore itself.
    First,
    /// What a restore ahead of a late manager could not put back.
    LateManager,
    /// What a peer tore down right after the restore.
    Teardown,
}

impl NicManager {
    /// The driver left: keep the last snapshot from before `before_ns` as the one to restore.
    pub(super) fn hold_snapshot(&mut self, mac: &str, before_ns: u64, event: Option<&NicEvent>) {
        let heuristic = event.is_some_and(|e| e.source == Source::Heuristic);
        let burst_start = event
            .and_then(|e| u32::try_from(e.ifindex).ok())
            .and_then(|ifindex| self.bursts.get(&ifindex))
            .map(|b| b.0);
        let Some(nic) = self.nics.get_mut(mac) else { return };
        nic.settling = None;
        // A restore still waiting for the manager when the driver left again keeps its snapshot;
        // routes and rules waiting for networkd to finish a reconfigure join the one held.
        let pending = nic.pending_restore.take();
        let kind = pending.as_ref().map(|p| match p.reason {
            // A restore being finished holds its whole snapshot, as one waiting for the manager.
            PendingReason::Reload | PendingReason::Restored => decide::step::PendingKind::Reload,
            PendingReason::ManagerCycle => decide::step::PendingKind::ManagerCycle,
        });
        let candidates: Vec<&NicSnapshot> = nic.history.iter().chain(nic.snapshot.iter()).collect();
        let taken: Vec<u64> = candidates.iter().map(|s| s.taken_ns).collect();
        let choice = decide::hold(kind, &taken, before_ns, heuristic, burst_start);
        let held = match choice.from {
            HeldFrom::PendingReload => pending.as_ref().map(|p| p.snapshot.clone()),
            HeldFrom::Snapshot(index) => candidates.get(index).map(|s| (*s).clone()),
            HeldFrom::Nothing => None,
        };
        let candidate = held.map(|mut held| {
            if let (true, Some(cycle)) = (choice.merge_cycle, &pending) {
                held.merge_routes_and_rules(&cycle.snapshot);
            }
            held
        });
        match candidate {
            Some(snapshot) => {
                let why = match event {
                    Some(e) if e.cause == crate::classify::Cause::Unknown => {
                        "left for no known reason (or its removal was lost)"
                    }
                    _ => "driver left",
                };
                tracing::info!(%mac, interface = %snapshot.name, action = "hold", "{why}: holding {}", snapshot.summary_line());
                nic.snapshot = Some(snapshot);
            }
            None => {
                tracing::warn!(%mac, action = "hold", "driver left, but no snapshot from before it: nothing to restore")
            }
        }
        nic.history.clear();
    }

    /// The NIC is back: restore its held snapshot now, or once udev and its manager are done.
    pub(super) async fn begin_restore(&mut self, mac: &str, ifindex: u32, event: Option<&NicEvent>) {
        let registered_ns = event.map_or_else(monotonic_ns, |e| e.timestamp_ns);
        let udev_running = self.host.udev_running();
        let Some(nic) = self.nics.get_mut(mac) else { return };
        // A restore a restarted agent found pending keeps the plan it was begun with.
        let pending = nic.pending_restore.clone().filter(|p| p.reason == PendingReason::Reload);
        let (want, plan) = match (pending, nic.snapshot.clone()) {
            (Some(p), _) => (p.snapshot, p.plan),
            (None, Some(snapshot)) => {
                let mode = self.config.policy_for(mac, &snapshot.name).manager;
                let plan = restore_plan(snapshot.manager, mode, udev_running);
                (snapshot, plan)
            }
            (None, None) => {
                tracing::warn!(%mac, ifindex, action = "restore", "NIC is back but there is no snapshot to restore");
                let outcome = "failed: no snapshot from before its driver left".to_owned();
                self.audit_outcome(crate::audit::Kind::Restore, mac, "nothing-held", outcome);
                return;
            }
        };
        nic.pending_restore = Some(Pending { snapshot: want.clone(), reason: PendingReason::Reload, plan });
        if !plan.wait_for_manager && !plan.wait_for_udev {
            let settled = Settled {
                mac: mac.to_owned(),
                ifindex,
                registered_ns,
                decided_ns: monotonic_ns(),
                plan,
                waited: Duration::ZERO,
                settled: true,
                round: Round::First,
            };
            self.finish_restore(settled).await;
            return;
        }
        if plan.wait_for_manager {
            let manager = want.manager.map_or("its manager", |m| m.as_str());
            tracing::info!(%mac, interface = %want.name, ifindex, action = "restore", "NIC is back: restoring once {manager} has configured it");
        }
        self.persist(mac);
        self.wait_for_manager(mac, ifindex, registered_ns, plan, Round::First);
    }

    /// networkd reconfigured the link and dropped routes and rules that are not its own: they go
    /// back once it is done (its own, and addresses, it re-creates or drops as it means to).
    pub(super) fn restore_after_manager(
        &mut self,
        mac: &str,
        ifindex: u32,
        foreign: NicSnapshot,
        plan: RestorePlan,
    ) {
        let Some(nic) = self.nics.get_mut(mac) else { return };
        tracing::info!(%mac, interface = %foreign.name, ifindex, action = "restore", "networkd reconfigured the NIC and dropped routes or rules it does not own: restoring them once it is done");
        nic.pending_restore = Some(Pending { snapshot: foreign, reason: PendingReason::ManagerCycle, plan });
        self.persist(mac);
        self.wait_for_manager(mac, ifindex, monotonic_ns(), plan, Round::First);
    }

    /// A peer tore the NIC down right after its restore: the restored snapshot stays the NIC's,
    /// and what went is put back once the manager is done (see `refresh`). Once: the undo arms no
    /// new settle window.
    pub(super) fn undo_teardown(&mut self, mac: &str, ifindex: u32, lost: &[String], plan: RestorePlan) {
        let Some(nic) = self.nics.get_mut(mac) else { return };
        let Some(settling) = nic.settling.take() else { return };
        let manager = settling.restored.manager.map_or("another tool", |m| m.as_str());
        tracing::warn!(%mac, interface = %settling.restored.name, ifindex, action = "restore", lost = ?lost, "right after its restore, {manager} took {} objects from the NIC: not taken as its configuration; putting them back{}", lost.len(), if plan.wait_for_manager { " once it is done" } else { "" });
        nic.pending_restore =
            Some(Pending { snapshot: settling.restored, reason: PendingReason::Restored, plan });
        self.persist(mac);
        self.wait_for_manager(mac, ifindex, settling.registered_ns, plan, Round::Teardown);
    }

    /// Waits (in a task) for udev and the NIC's manager as `plan` says, then hands the restore
    /// back to the event loop (`Background::ManagerSettled`).
    pub(super) fn wait_for_manager(
        &self,
        mac: &str,
        ifindex: u32,
        registered_ns: u64,
        plan: RestorePlan,
        round: Round,
    ) {
        let manager_wait = self.config.manager_wait();
        let tx = self.background.clone();
        let host = self.host.clone();
        // Which manager, and the name udev gives the NIC back (ifupdown's unit is named by it).
        let (manager, name) = self
            .nics
            .get(mac)
            .and_then(|n| n.pending_restore.as_ref())
            .map(|p| (p.snapshot.manager, p.snapshot.name.clone()))
            .unwrap_or_default();
        let mac = mac.to_owned();
        let decided_ns = monotonic_ns();
        // The registration on the wall clock (ifupdown's state file has a modification time).
        let registered = std::time::SystemTime::now()
            .checked_sub(Duration::from_nanos(decided_ns.saturating_sub(registered_ns)))
            .unwrap_or(std::time::UNIX_EPOCH);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut settled = true;
            if plan.wait_for_udev {
                settled &= wait_until(UDEV_WAIT, || !host.udev_running() || host.udev_done(ifindex)).await;
            }
            if plan.wait_for_manager {
                settled &=
                    wait_until(manager_wait, || host.manager_done(manager, ifindex, &name, registered)).await;
            }
            let waited = started.elapsed();
            let settled = Settled { mac, ifindex, registered_ns, decided_ns, plan, waited, settled, round };
            let _ = tx.send(super::Background::ManagerSettled(settled)).await;
        });
    }

    /// Replays the pending snapshot on the NIC, if it is still the one that registered.
    pub(super) async fn finish_restore(&mut self, settled: Settled) {
        let Settled { mac, ifindex, registered_ns, decided_ns, plan, waited, settled, round } = settled;
        let Some(nic) = self.nics.get_mut(&mac) else { return };
        let same = matches!(nic.record.state, NicState::Present { ifindex: i, .. } if i == ifindex);
        if !same {
            tracing::info!(%mac, ifindex, action = "restore", "the NIC left again before its manager was done: the restore waits for its return");
            return;
        }
        let Some(Pending { snapshot: want, reason, .. }) = nic.pending_restore.take() else { return };
        let after_reload = reason == PendingReason::Reload;
        if !settled {
            tracing::warn!(%mac, ifindex, action = "restore", "udev or the NIC's manager did not finish within {} s (manager_wait_seconds): restoring anyway", waited.as_secs());
        }
        let options = RestoreOptions {
            leave_dynamic: plan.leave_dynamic,
            now_ns: monotonic_ns(),
            routes_and_rules_only: plan.routes_and_rules_only,
        };
        let mut report = restore::restore(&self.netlink, &want, ifindex, options).await;
        report.phases.to_decision_us = decided_ns.saturating_sub(registered_ns) / 1000;
        // To the restore's first phase: the wait, and whatever the agent did before it began (the
        // first run of its code can fault its pages in: over 100 us under emulation).
        report.phases.waited_us = report.started_ns.saturating_sub(decided_ns) / 1000;
        let phases = report.phases;
        let latency_us = report.last_ack_ns.saturating_sub(registered_ns) / 1000;
        if report.errors.is_empty() && report.differences.is_empty() {
            tracing::info!(%mac, interface = %want.name, ifindex, action = "restore", latency_us, requests = report.requests, left_to_manager = ?report.left_to_manager, %phases, "restored {}", want.summary_line());
        } else {
            tracing::warn!(%mac, interface = %want.name, ifindex, action = "restore", latency_us, errors = ?report.errors, differences = ?report.differences, %phases, "restore incomplete");
        }
        let (action, outcome) = if report.errors.is_empty() && report.differences.is_empty() {
            let done = if report.requests == 0 {
                "nothing was missing".to_owned()
            } else {
                format!("restored in {} ms, {} netlink requests", latency_us / 1000, report.requests)
            };
            ("restored", format!("ok: {done}"))
        } else {
            let problems: Vec<String> = report.errors.iter().chain(&report.differences).cloned().collect();
            ("incomplete", format!("failed: {}", problems.join("; ")))
        };
        self.audit_outcome(crate::audit::Kind::Restore, &mac, action, outcome);
        let problems: Vec<String> = report.errors.iter().chain(&report.differences).cloned().collect();
        let complete = problems.is_empty();
        let again = decide::coexist::replay_when_manager_done(decide::coexist::Replayed {
            plan,
            manager_done: settled,
            incomplete: !problems.is_empty(),
            replay: round != Round::First,
        });
        // A guided reload follows the restores of a driver's return, not a manager's cycle.
        self.publish_progress(&mac, |p| {
            if !after_reload {
                return;
            }
            p.restores += 1;
            p.registered_ns = registered_ns;
            p.latency_us = latency_us;
            p.problems = problems;
            p.ifindex = Some(ifindex);
        });
        crate::metrics::global().restore(
            if action == "restored" { "ok" } else { "incomplete" },
            if after_reload { "driver-reload" } else { "manager-cycle" },
            latency_us,
        );
        let waited_for_manager_ms =
            plan.wait_for_manager.then(|| u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
        if let Some(nic) = self.nics.get_mut(&mac) {
            nic.last_restore = Some(RestoreOutcome {
                latency_us,
                requests: report.requests,
                errors: report.errors,
                differences: report.differences,
                left_to_manager: report.left_to_manager,
                waited_for_manager_ms,
                phases: Some(phases),
            });
        }
        // A driver reload's restore that put everything back settles for a while: a peer's
        // teardown then is undone, not adopted (`refresh`, `decide::coexist::teardown_after_restore`).
        // Not after an undo: once per restore.
        if complete && again.is_none() && (after_reload || round == Round::LateManager) {
            if let Some(nic) = self.nics.get_mut(&mac) {
                nic.settling = Some(crate::state::Settling {
                    until_ns: monotonic_ns().saturating_add(SETTLE_AFTER_RESTORE_NS),
                    registered_ns,
                    restored: want.clone(),
                });
            }
        }
        if let Some(again) = again {
            // The snapshot re-read meanwhile lacks what failed: the pending replay keeps it (and a
            // driver leaving again merges it into the snapshot held, as a manager cycle's).
            tracing::info!(%mac, interface = %want.name, ifindex, action = "restore", "the NIC's manager was not done: what could not go back is replayed once it is");
            if let Some(nic) = self.nics.get_mut(&mac) {
                nic.pending_restore =
                    Some(Pending { snapshot: want, reason: PendingReason::Restored, plan: again });
            }
            self.persist(&mac);
            self.wait_for_manager(&mac, ifindex, registered_ns, again, Round::LateManager);
        } else {
            self.persist(&mac);
        }
        self.note_change(Some(ifindex));
    }
}

/// Polls `done` until it holds (true) or `limit` passes (false).
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let started = tokio::time::Instant::now();
    loop {
        if done() {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(MANAGER_POLL).await;
    }
}
