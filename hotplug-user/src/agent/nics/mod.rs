//! The NIC manager: keeps each NIC's live snapshot current from rtnetlink notifications, feeds
//! classified events through the per-NIC state machine (`decide`), carries out its actions
//! (hold a snapshot, restore it, run a command, hand the NIC to the detach path, attach), and
//! persists every NIC's state so that a restarted agent still knows what to restore.
//!
//! `startup.rs` reconciles persisted state with the NICs present at start, `restore.rs` holds and
//! restores snapshots (after the NIC's own network manager where it has one), `attach.rs` talks
//! to IMDS for NICs really attached, `changes.rs` turns rtnetlink notifications into re-reads.
mod attach;
mod changes;
mod gate;
mod refresh;
mod reload;
mod restore;
mod startup;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use rtnetlink::Handle;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

pub use self::{attach::AttachResult, changes::config_changes};
use crate::{
    classify::{Cause, NicEvent, Source},
    clock::monotonic_ns,
    config::Config,
    control::{NicStatus, Request},
    decide::{self, Action, Input, NicState},
    imds::ImdsClient,
    kernel::rtnl::{self, RtnlError},
    managers::Host,
    reconfigure::{attach as attach_config, command},
    snapshot::{self, NicSnapshot},
    state::{
        store::{Store, StoreError},
        Nic as Managed, PendingReason,
    },
};

/// How long configuration changes settle before the NIC is read again.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Snapshots kept per NIC (the one to restore is chosen by time among them).
const HISTORY: usize = 8;
/// How recently networkd must have touched a link for routes it dropped there to go back.
const MANAGER_TOUCH: Duration = Duration::from_secs(5);
/// NICs that left for good kept in memory for `status`.
const REMOVED_KEPT: usize = 64;
/// A notification more than this long after the previous one starts a new burst (degraded mode
/// holds the snapshot from before the burst that ended in the NIC's removal).
const BURST_GAP_NS: u64 = 1_000_000_000;

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// What the agent's background tasks hand back to its loop.
pub enum Background {
    /// IMDS answered (or gave up) for a NIC really attached.
    Attach(AttachResult),
    /// Whether cloud-init's hotplug socket listens, for a NIC really attached.
    CloudInitHotplug {
        mac: String,
        ifindex: u32,
        event: Option<NicEvent>,
        hook: crate::decide::coexist::CloudInitHotplug,
    },
    /// The returning NIC's network manager is done with it (or the wait ran out).
    ManagerSettled(restore::Settled),
    /// IMDS answered (or failed) for a `refresh`.
    Refresh(refresh::RefreshResult),
    /// A `command` policy's hook ended (or was killed).
    Hook { mac: String, phase: &'static str, outcome: command::HookOutcome },
    /// A guided reload ended.
    ReloadDone(reload::Done),
    /// An interrupted reload's recovery ended: what it found first, and how it ended.
    RecoveryDone {
        first: crate::decide::recovery::Recovery,
        outcome: crate::decide::recovery::Recovery,
        audit: Box<crate::audit::Entry>,
    },
    /// These NICs' tuning (sysctls, queue settings, link attributes) changed since it was read.
    TuningChanged(Vec<u32>),
}

/// How long a link the agent does not know may wait for its registration record before the
/// agent looks for a missed one (records arrive within milliseconds).
const MISSED_GRACE: Duration = Duration::from_secs(2);

/// How often a state write that failed (a full disk) is tried again.
const UNSAVED_RETRY: Duration = Duration::from_secs(10);

pub struct NicManager {
    config: Config,
    store: Store,
    handle: Handle,
    /// The same requests' handle, and a strict one for filtered route dumps (snapshots).
    netlink: snapshot::Netlink,
    nics: HashMap<String, Managed>,
    by_ifindex: HashMap<u32, String>,
    dirty: HashSet<u32>,
    dirty_due: Option<tokio::time::Instant>,
    /// When to look for registrations the kernel probes did not report: a link the agent does
    /// not know changed while a NIC's driver is away (`check_missed_registrations`).
    missed_check_due: Option<tokio::time::Instant>,
    /// Links found at the last look with a driver-gone NIC's MAC and no registration record.
    missed_candidates: std::collections::HashSet<u32>,
    /// `remove` uevents the gate asked about before the agent saw their removal, and when first
    /// (memory only; see `settle_given_up_removes`).
    gate_unanswered: Vec<(String, u64)>,
    /// When the NICs' tuning is read again (`changes::TUNING_POLL`).
    tuning_due: tokio::time::Instant,
    /// NICs whose last state write failed (a full disk): written again at each wake-up, every
    /// `UNSAVED_RETRY` at least, whatever their state.
    unsaved: HashSet<String>,
    bursts: HashMap<u32, (u64, u64)>,
    imds: Option<Arc<ImdsClient>>,
    /// EC2 or not, read from the firmware once at start.
    platform: crate::platform::Platform,
    background: mpsc::Sender<Background>,
    /// Inode of the agent's own network namespace.
    own_netns: Option<u32>,
    /// Where the other network managers keep their state.
    host: Host,
    /// This boot's id, written into every state file.
    boot_id: String,
    /// Who did what, and what the agent made of it.
    audit: crate::audit::Sink,
    /// Every kernel hook attached: a reload's removals can be told from anything else.
    full_mode: bool,
    /// A guided reload is under way (one at a time).
    reload_running: bool,
    /// Each NIC's removals and restores, for a guided reload's task to follow.
    progress: tokio::sync::watch::Sender<reload::Progress>,
}

/// A registered link as `decide::resync` takes it: keyed as its NIC would be.
fn registered(link: &rtnl::LinkSnapshot) -> decide::step::Registered {
    decide::step::Registered {
        key: crate::identity::nic_key(
            link.permanent_mac.as_deref(),
            link.mac.as_deref().unwrap_or_default(),
            &link.name,
            link.kind.is_some(),
        ),
        ifindex: link.ifindex,
        name: link.name.clone(),
    }
}

fn key(mac: &str) -> String {
    mac.to_ascii_lowercase()
}

impl NicManager {
    /// How many NICs the agent manages (present or expected back).
    pub fn nic_count(&self) -> usize {
        self.nics.values().filter(|n| !matches!(n.record.state, NicState::Removed { .. })).count()
    }

    /// Takes a reloaded configuration (already validated). Where the state directory and the
    /// socket live cannot change under a running agent: those keep their values, and the returned
    /// lines say so.
    pub fn reconfigure(&mut self, mut config: Config) -> Vec<String> {
        let mut kept = Vec::new();
        if config.state_dir != self.config.state_dir {
            kept.push(format!(
                "state_dir stays {} until the agent restarts (the file says {})",
                self.config.state_dir.display(),
                config.state_dir.display()
            ));
            config.state_dir.clone_from(&self.config.state_dir);
        }
        if config.socket != self.config.socket {
            kept.push(format!(
                "socket stays {} until the agent restarts (the file says {})",
                self.config.socket.display(),
                config.socket.display()
            ));
            config.socket.clone_from(&self.config.socket);
        }
        if config.imds != self.config.imds {
            // Attaches under way keep the client they started with.
            self.imds = attach::imds_client(&config, &self.platform);
        }
        self.config = config;
        kept
    }

    /// Saves a NIC's state; a NIC that left for good leaves no state file behind.
    fn persist(&mut self, mac: &str) {
        let boot_id = self.boot_id.clone();
        let Some(nic) = self.nics.get_mut(mac) else { return };
        nic.boot_id = boot_id;
        let result = match nic.record.state {
            NicState::Removed { .. } => self.store.remove(mac),
            _ => self.store.save(mac, nic),
        };
        match result {
            Ok(()) => {
                self.unsaved.remove(mac);
            }
            Err(error) => {
                tracing::error!(%error, "cannot persist NIC state");
                self.unsaved.insert(mac.to_owned());
            }
        }
    }

    /// After lost kernel events: a NIC registered now whose registration was lost (its driver had
    /// left, or it is known present under another ifindex: removal and registration both lost)
    /// gets that registration replayed; a NIC known present that is not registered any more gets
    /// its removal replayed, of unknown cause (held for its return, `decide::holds`). Every NIC
    /// is re-read.
    pub async fn resync(&mut self, links: &[rtnl::LinkSnapshot]) {
        let registered: Vec<decide::step::Registered> = links.iter().map(registered).collect();
        let replays =
            decide::resync(self.nics.iter().map(|(k, n)| (k.as_str(), &n.record.state)), &registered);
        for replay in replays {
            let (mac, ifindex) = (&replay.key, replay.ifindex);
            if replay.action == crate::classify::Action::Registration {
                tracing::warn!(%mac, ifindex, "registration lost with the kernel events: replaying it");
            } else {
                tracing::warn!(%mac, ifindex, "removal lost with the kernel events: holding its configuration for its return");
            }
            let event = lost_event(replay.action, mac, ifindex, &replay.name);
            self.on_event(&event).await;
        }
        self.note_change(None);
    }

    /// A link the agent does not know appeared while a NIC's driver is away, and the kernel
    /// probes reported no registration for it at two looks [`MISSED_GRACE`] apart: a probe run was missed
    /// (kretprobe instances exhausted, BPF recursion) or its record lost. A registered link whose
    /// permanent MAC is a driver-gone NIC's is that NIC's return, replayed as a registration
    /// (the NIC is restored, and never handed to the detach path at its deadline).
    async fn check_missed_registrations(&mut self) {
        if !self.nics.values().any(|n| matches!(n.record.state, NicState::DriverGone { .. })) {
            return;
        }
        let links = match rtnl::dump_links().await {
            Ok(links) => links,
            Err(error) => {
                tracing::warn!(%error, "cannot list the links to look for unreported registrations");
                return;
            }
        };
        let registered: Vec<decide::step::Registered> = links
            .iter()
            .filter(|link| !self.by_ifindex.contains_key(&link.ifindex))
            .map(registered)
            .collect();
        let gone = self
            .nics
            .iter()
            .filter(|(_, n)| matches!(n.record.state, NicState::DriverGone { .. }))
            .map(|(k, n)| (k.as_str(), &n.record.state));
        let replays = decide::resync(gone, &registered);
        // Replayed only when found at two looks in a row: a loop busy for longer than the grace
        // (a burst of restores under emulation) may not have read a record that is there.
        let seen_before = std::mem::take(&mut self.missed_candidates);
        for replay in replays.into_iter().filter(|r| r.action == crate::classify::Action::Registration) {
            let (mac, ifindex) = (&replay.key, replay.ifindex);
            if !seen_before.contains(&ifindex) {
                self.missed_candidates.insert(ifindex);
                self.missed_check_due = Some(tokio::time::Instant::now() + MISSED_GRACE);
                continue;
            }
            tracing::warn!(%mac, ifindex, "registered, and the kernel probes did not report it (a missed probe run?): replaying its registration");
            crate::metrics::global().missed_registration();
            let event = lost_event(replay.action, mac, ifindex, &replay.name);
            self.on_event(&event).await;
        }
    }

    /// Notes a configuration change of `ifindex` (`None`: could concern any NIC, e.g. a rule).
    pub fn note_change(&mut self, ifindex: Option<u32>) {
        let now = monotonic_ns();
        match ifindex {
            Some(ifindex) => {
                let burst = self.bursts.entry(ifindex).or_insert((now, now));
                if now.saturating_sub(burst.1) > BURST_GAP_NS {
                    burst.0 = now;
                }
                burst.1 = now;
                if self.by_ifindex.contains_key(&ifindex) {
                    self.dirty.insert(ifindex);
                } else if self.missed_check_due.is_none() {
                    // Whether a NIC is driver-gone is asked at the check: the link's notification
                    // can come before the removal's record.
                    self.missed_check_due = Some(tokio::time::Instant::now() + MISSED_GRACE);
                }
            }
            None => self.dirty.extend(self.by_ifindex.keys().copied()),
        }
        if !self.dirty.is_empty() && self.dirty_due.is_none() {
            self.dirty_due = Some(tokio::time::Instant::now() + DEBOUNCE);
        }
    }

    /// When the manager next has something to do on its own.
    pub fn next_wakeup(&self) -> Option<tokio::time::Instant> {
        let now_ns = monotonic_ns();
        let deadline = self
            .nics
            .values()
            .filter_map(|n| match n.record.state {
                NicState::DriverGone { deadline_ns, .. } => Some(deadline_ns),
                _ => None,
            })
            .min()
            .map(|d| tokio::time::Instant::now() + Duration::from_nanos(d.saturating_sub(now_ns)));
        // A state write that failed is tried again every UNSAVED_RETRY.
        let retry = (!self.unsaved.is_empty()).then(|| tokio::time::Instant::now() + UNSAVED_RETRY);
        let tuning = (!self.by_ifindex.is_empty()).then_some(self.tuning_due);
        [self.dirty_due, deadline, retry, tuning, self.missed_check_due].into_iter().flatten().min()
    }

    /// Re-reads NICs whose configuration changed and checks return deadlines.
    pub async fn wake(&mut self) {
        if self.missed_check_due.is_some_and(|due| due <= tokio::time::Instant::now()) {
            self.missed_check_due = None;
            self.check_missed_registrations().await;
        }
        if self.tuning_due <= tokio::time::Instant::now() {
            self.tuning_due = tokio::time::Instant::now() + changes::TUNING_POLL;
            self.poll_tuning();
        }
        if self.dirty_due.is_some_and(|due| due <= tokio::time::Instant::now()) {
            self.dirty_due = None;
            let dirty: Vec<u32> = self.dirty.drain().collect();
            // One read of the rules for every NIC of this wake-up (each NIC's routes are read
            // with a dump the kernel filters by device: cheaper, with a large table, than one
            // read of every route shared by all).
            if !dirty.is_empty() {
                let rules = snapshot::all_rules(&self.netlink).await.ok();
                for ifindex in dirty {
                    self.refresh(ifindex, rules.as_deref()).await;
                }
            }
        }
        // State writes that failed (a full disk) are tried again, whatever the NIC's state: the
        // snapshot held while a driver is away is the one a restarted agent needs.
        let unsaved: Vec<String> = self.unsaved.iter().cloned().collect();
        for mac in unsaved {
            self.persist(&mac);
        }
        let now_ns = monotonic_ns();
        let macs: Vec<String> = self.nics.keys().cloned().collect();
        for mac in macs {
            self.apply(&mac, &Input::Tick { now_ns }, None).await;
        }
    }

    /// Re-reads a NIC (with `rules` when they were read for this wake-up already).
    async fn refresh(&mut self, ifindex: u32, rules: Option<&[rtnetlink::packet_route::rule::RuleMessage]>) {
        let Some(mac) = self.by_ifindex.get(&ifindex).cloned() else { return };
        let present = matches!(self.nics.get(&mac).map(|n| &n.record.state), Some(NicState::Present { ifindex: i, .. }) if *i == ifindex);
        if !present {
            return;
        }
        let read = match rules {
            Some(rules) => snapshot::capture_with(&self.netlink, ifindex, rules).await,
            None => snapshot::capture(&self.netlink, ifindex).await,
        };
        match read {
            Ok(mut snapshot) if key(&snapshot.mac) == mac => {
                snapshot.manager = self.host.nic_manager(ifindex, &snapshot.name);
                // networkd reconfigured the link and dropped routes and rules it does not own?
                let dropped = self.nics.get(&mac).and_then(|nic| {
                    let previous = nic.snapshot.as_ref()?;
                    let foreign = previous.networkd_foreign();
                    let cycle = decide::coexist::ManagerCycle {
                        manager: previous.manager,
                        mode: self.config.policy_for(&mac, &previous.name).manager,
                        lost_foreign: foreign.lost_in(&snapshot),
                        networkd_touched: self.host.networkd_touched(ifindex, MANAGER_TOUCH),
                        admin_up: snapshot.up,
                        restoring: nic.pending_restore.is_some(),
                    };
                    decide::coexist::restore_after_manager(cycle).map(|plan| (foreign, plan))
                });
                // Shortly after a restore, a peer's teardown is undone, not adopted.
                let now_ns = monotonic_ns();
                let teardown = self.nics.get(&mac).filter(|_| dropped.is_none()).and_then(|nic| {
                    let settling = nic.settling.as_ref()?;
                    let lost = settling.restored.static_lost_in(&snapshot);
                    let after = decide::coexist::AfterRestore {
                        mode: self.config.policy_for(&mac, &snapshot.name).manager,
                        settling: now_ns < settling.until_ns,
                        lost: lost.len(),
                        admin_up: snapshot.up,
                        restoring: nic.pending_restore.is_some(),
                        manager: snapshot.manager.or(settling.restored.manager),
                    };
                    decide::coexist::teardown_after_restore(after).map(|plan| (lost, plan))
                });
                if let Some((lost, plan)) = teardown {
                    self.undo_teardown(&mac, ifindex, &lost, plan);
                    return;
                }
                // Not adopted either: a read while a restore is being finished (the restored
                // snapshot stays the NIC's), and a torn-down link set down within the settle
                // window (ifupdown's `ifdown` ends so; its `ifup` follows).
                let held_back = self.nics.get(&mac).is_some_and(|nic| {
                    nic.pending_restore.as_ref().is_some_and(|p| p.reason == PendingReason::Restored)
                        || nic.settling.as_ref().is_some_and(|s| {
                            now_ns < s.until_ns
                                && !snapshot.up
                                && !s.restored.static_lost_in(&snapshot).is_empty()
                        })
                });
                if held_back {
                    return;
                }
                if let Some(nic) = self.nics.get_mut(&mac) {
                    nic.settling = nic.settling.take().filter(|s| now_ns < s.until_ns);
                }
                // The same configuration read again (a counter, a lease counting down) is
                // neither history nor worth a write: the snapshot held ages its lifetimes itself.
                let changed = self.nics.get_mut(&mac).is_some_and(|nic| {
                    if nic.snapshot.as_ref().is_some_and(|held| held.same_configuration(&snapshot)) {
                        return false;
                    }
                    nic.record = decide::step::renamed(&nic.record, &snapshot.name);
                    nic.history.push_back(snapshot.clone());
                    while nic.history.len() > HISTORY {
                        nic.history.pop_front();
                    }
                    nic.snapshot = Some(snapshot);
                    true
                });
                if changed {
                    self.persist(&mac);
                }
                if let Some((foreign, plan)) = dropped {
                    self.restore_after_manager(&mac, ifindex, foreign, plan);
                }
            }
            Ok(_) | Err(_) => {} // gone or replaced meanwhile: the kernel events will say why
        }
    }

    /// Feeds one classified NIC event through the state machine.
    pub async fn on_event(&mut self, event: &NicEvent) {
        if let (Some(theirs), Some(ours)) = (event.netns, self.own_netns) {
            if theirs != ours {
                // Another namespace's NIC (a container's): its ifindex means nothing here.
                tracing::debug!(name = %event.name, netns = theirs, "NIC event in another network namespace: ignored");
                return;
            }
        }
        let mac = event.key();
        if mac.is_empty() || event.name == "lo" {
            return;
        }
        crate::metrics::global().nic_event(
            &format!("{:?}", event.action).to_lowercase(),
            event.cause.as_str(),
            event.source.as_str(),
        );
        self.apply(&mac, &Input::Event(event), Some(event)).await;
        if event.action == crate::classify::Action::Removal && !self.gate_unanswered.is_empty() {
            self.settle_given_up_removes(&mac);
        }
    }

    /// The `hotplug_nics` gauge, from the NICs' states now.
    pub fn count_states(&self) {
        let count = |label: &str| self.nics.values().filter(|n| n.record.state.label() == label).count();
        crate::metrics::global().set_nics(count("present"), count("driver-gone"), count("removed"));
    }

    /// Every kernel hook attached (a guided reload needs it).
    pub fn set_full_mode(&mut self, full: bool) {
        self.full_mode = full;
    }

    /// Adds an entry to the audit trail.
    pub fn audit(&mut self, entry: &crate::audit::Entry) {
        self.audit.record(entry.clone());
    }

    /// An audit entry whose task is completed from `/proc` by the trail's writer (never on the
    /// event's path).
    pub fn audit_by(
        &mut self,
        entry: crate::audit::Entry,
        task: Option<&crate::classify::Task>,
        event_ns: u64,
    ) {
        self.audit.record_by(entry, task, event_ns);
    }

    /// Writes the audit entries still waiting (at stop).
    pub async fn flush_audit(&mut self) {
        self.audit.flush().await;
    }

    /// The audit entry of a NIC event (before the agent acts on it), with its decision.
    fn audit_event(&mut self, mac: &str, event: &NicEvent, decision: String) {
        let action = format!("{:?}", event.action).to_lowercase();
        let mut entry = crate::audit::Entry::now(crate::audit::Kind::Nic, &action);
        entry.mac = Some(mac.to_owned());
        entry.interface = Some(event.name.clone());
        entry.module = event.context_module.clone().or_else(|| event.module.clone());
        entry.cause = Some(event.cause.as_str().to_owned());
        entry.source = Some(event.source.as_str().to_owned());
        entry.decision = Some(decision);
        self.audit.record_by(entry, event.task.as_ref(), event.timestamp_ns);
    }

    /// An audit entry for how something the agent did ended.
    fn audit_outcome(&mut self, kind: crate::audit::Kind, mac: &str, action: &str, outcome: String) {
        let mut entry = crate::audit::Entry::now(kind, action);
        entry.mac = Some(mac.to_owned());
        entry.interface = self.nics.get(mac).and_then(|n| match &n.record.state {
            NicState::Present { name, .. } => Some(name.clone()),
            _ => n.snapshot.as_ref().map(|s| s.name.clone()),
        });
        entry.outcome = Some(outcome);
        self.audit.record(entry);
    }

    /// The configured policy of `mac`, under the name `decide::policy_name` picks (`given`: the
    /// name an event or a uevent carries).
    fn configured_policy(&self, mac: &str, given: &str) -> crate::config::Policy {
        let nic = self.nics.get(mac);
        let configured = nic.and_then(|n| n.snapshot.as_ref()).map(|s| s.name.as_str());
        let removed_as = nic.and_then(|n| n.record.last_removal.as_ref()).map(|(_, had)| had.as_str());
        self.config.policy_for(mac, decide::policy_name(configured, removed_as, given))
    }

    /// The policy a decision about `mac` follows.
    fn policy(&self, mac: &str, given: &str) -> decide::Policy {
        decide::Policy {
            kind: self.configured_policy(mac, given).policy,
            return_timeout_ns: u64::try_from(self.config.return_timeout().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// One input through `decide::step`: the NIC's next record is stored and its actions carried
    /// out, in order; the decision is audited.
    async fn apply(&mut self, mac: &str, input: &Input<'_>, event: Option<&NicEvent>) {
        let policy = self.policy(mac, event.map_or("", |e| e.name.as_str()));
        let before = self.nics.get(mac).map(|n| n.record.clone());
        let step = decide::step(before.as_ref(), input, policy);
        let unchanged = step.unchanged(before.as_ref());
        match event {
            Some(event) => self.audit_event(mac, event, step.describe(before.as_ref())),
            None if !unchanged => {
                let kind = if step.actions.iter().any(|a| matches!(a, Action::HandToDetach { .. })) {
                    crate::audit::Kind::Detach
                } else {
                    crate::audit::Kind::Nic
                };
                self.audit_outcome(kind, mac, "deadline", step.describe(before.as_ref()));
            }
            None => {}
        }
        if unchanged {
            return;
        }
        let Some(next) = step.next else { return };
        let nic = self.nics.entry(mac.to_owned()).or_insert_with(|| Managed::new(mac, next.state.clone()));
        nic.record = next;
        if let Some(event) = event {
            nic.last_event = Some(event.clone());
            let removal = event.action == crate::classify::Action::Removal;
            let (timestamp_ns, ifindex) = (event.timestamp_ns, u32::try_from(event.ifindex).ok());
            self.publish_progress(mac, |p| {
                if removal {
                    p.removed_ns = Some(timestamp_ns);
                    p.ifindex = None;
                } else {
                    p.ifindex = ifindex;
                }
            });
        }
        for action in step.actions {
            self.act(mac, action, event).await;
        }
        self.persist(mac);
        self.forget_old_removals();
        self.count_states();
    }
    /// Keeps the memory of NICs that left for good bounded (hosts that churn links, containers):
    /// the newest [`REMOVED_KEPT`] stay visible in `status`, older ones are forgotten.
    fn forget_old_removals(&mut self) {
        let mut removed: Vec<(u64, String)> = self
            .nics
            .iter()
            .filter_map(|(mac, n)| match n.record.state {
                NicState::Removed { since_ns, .. } => Some((since_ns, mac.clone())),
                _ => None,
            })
            .collect();
        if removed.len() <= REMOVED_KEPT {
            return;
        }
        removed.sort_unstable();
        for (_, mac) in &removed[..removed.len() - REMOVED_KEPT] {
            self.nics.remove(mac);
        }
        self.prune_progress();
        // Burst records only matter for links that still exist.
        let live: HashSet<u32> = self.by_ifindex.keys().copied().collect();
        self.bursts.retain(|ifindex, _| live.contains(ifindex));
    }

    async fn act(&mut self, mac: &str, action: Action, event: Option<&NicEvent>) {
        match action {
            Action::HoldSnapshot { before_ns } => self.hold_snapshot(mac, before_ns, event),
            Action::Restore { ifindex } => self.begin_restore(mac, ifindex, event).await,
            Action::RunCommand { phase } => {
                let command = self.configured_policy(mac, event.map_or("", |e| e.name.as_str())).command;
                if let (Some(event), false) = (event, command.is_empty()) {
                    // In a task of its own: a hook that hangs holds up nothing but itself.
                    let timeout = self.config.hook_timeout();
                    let (event, mac, tx) = (event.clone(), mac.to_owned(), self.background.clone());
                    tracing::info!(%mac, action = "command", phase, "running {}", command.join(" "));
                    tokio::spawn(async move {
                        let outcome = command::run(&command, &event, phase, timeout).await;
                        let _ = tx.send(Background::Hook { mac, phase, outcome }).await;
                    });
                }
            }
            Action::HandToDetach { reason } => {
                // The kernel is authoritative: clean up at once, no IMDS round trip.
                let Some(nic) = self.nics.get_mut(mac) else { return };
                let interface = nic.snapshot.as_ref().map(|s| s.name.clone());
                let rules = std::mem::take(&mut nic.configured_rules);
                nic.configured_addresses.clear();
                // Gone for good: nothing waits to be replayed on it any more.
                nic.pending_restore = None;
                nic.snapshot = None;
                nic.history.clear();
                let errors = attach_config::detach(&self.handle, &rules).await;
                let outcome = if errors.is_empty() {
                    tracing::info!(%mac, action = "detach", rules = rules.len(), "NIC left for good: {reason}; removed the rules the agent had added");
                    format!("ok: {} rules the agent had added removed", rules.len())
                } else {
                    tracing::warn!(%mac, action = "detach", ?errors, "NIC left for good: {reason}; cleanup incomplete");
                    format!("failed: {}", errors.join("; "))
                };
                let mut entry = crate::audit::Entry::now(crate::audit::Kind::Detach, "cleaned-up");
                entry.mac = Some(mac.to_owned());
                entry.interface = interface;
                entry.outcome = Some(outcome);
                self.audit(&entry);
            }
            Action::Attach { ifindex } => self.attach(mac, ifindex, event),
            Action::Track { ifindex } => {
                self.by_ifindex.insert(ifindex, mac.to_owned());
                self.dirty.insert(ifindex);
                if self.dirty_due.is_none() {
                    self.dirty_due = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
            }
            Action::Untrack { ifindex } => {
                // Unless the kernel has handed the ifindex to another NIC meanwhile.
                if self.by_ifindex.get(&ifindex).is_some_and(|m| m == mac) {
                    self.by_ifindex.remove(&ifindex);
                    self.dirty.remove(&ifindex);
                }
            }
        }
    }

    /// The agent's answer to a control request (the body the client reads).
    /// Answers a control request: at once, or (a refresh) once its IMDS look-up is back.
    pub async fn query(&mut self, request: Request, reply: oneshot::Sender<Vec<u8>>) {
        match request {
            Request::Refresh { iface } => self.refresh_eni(&iface, reply),
            Request::Reload { driver, params, dry_run } => {
                self.start_reload(&driver, &params, dry_run, reply).await;
            }
            request => {
                let _ = reply.send(self.answer(&request));
            }
        }
    }

    pub fn answer(&mut self, request: &Request) -> Vec<u8> {
        let body = match request {
            Request::Refresh { iface } => serde_json::to_vec(
                &serde_json::json!({ "error": format!("refresh {iface}: ask through query()") }),
            ),
            Request::Reload { driver, .. } => serde_json::to_vec(
                &serde_json::json!({ "error": format!("reload {driver}: ask through query()") }),
            ),
            Request::Status => serde_json::to_vec_pretty(&self.status()),
            Request::CloudInitGate { action, devpath, mac, ifindex } => {
                let answer = self.cloud_init_gate(*action, devpath, mac.as_deref(), *ifindex);
                serde_json::to_vec(&answer)
            }
        };
        body.unwrap_or_default()
    }

    pub fn status(&self) -> Vec<NicStatus> {
        let mut nics: Vec<NicStatus> = self
            .nics
            .values()
            .map(|n| NicStatus {
                mac: n.mac.clone(),
                name: match &n.record.state {
                    NicState::Present { name, .. } => Some(name.clone()),
                    _ => n.snapshot.as_ref().map(|s| s.name.clone()),
                },
                last_event_age_ms: n
                    .last_event
                    .as_ref()
                    .map(|e| monotonic_ns().saturating_sub(e.timestamp_ns) / 1_000_000),
                state: n.record.state.clone(),
                manager: n.snapshot.as_ref().and_then(|s| s.manager).map(|m| m.as_str().to_owned()),
                snapshot: n.snapshot.as_ref().map(NicSnapshot::summary_line),
                last_event: n.last_event.as_ref().map(|e| {
                    format!("{:?} {} ({:?}) ifindex {}", e.action, e.cause.as_str(), e.source, e.ifindex)
                        .to_lowercase()
                }),
                last_restore: n.last_restore.clone(),
                attach: n.attach.clone(),
                last_reload: n.last_reload.clone(),
            })
            .collect();
        nics.sort_by(|a, b| a.mac.cmp(&b.mac));
        nics
    }

    /// A background task's result, back in the loop.
    pub async fn on_background(&mut self, message: Background) {
        match message {
            Background::Attach(result) => self.on_attach_result(result).await,
            Background::CloudInitHotplug { mac, ifindex, event, hook } => {
                // Unless the NIC left or registered again meanwhile.
                if decide::attach_result_applies(self.nics.get(&mac).map(|n| &n.record.state), ifindex) {
                    self.attach_by(&mac, ifindex, event.as_ref(), hook);
                }
            }
            Background::ManagerSettled(settled) => self.finish_restore(settled).await,
            Background::Refresh(result) => self.on_refresh_result(result).await,
            Background::ReloadDone(done) => self.finish_reload(done),
            Background::RecoveryDone { first, outcome, audit } => {
                self.finish_recovery(first, outcome, *audit)
            }
            Background::TuningChanged(ifindexes) => {
                for ifindex in ifindexes {
                    tracing::debug!(ifindex, "tuning changed: reading the NIC again");
                    self.note_change(Some(ifindex));
                }
            }
            Background::Hook { mac, phase, outcome } => {
                let command::HookOutcome { status, succeeded, stdout, stderr } = outcome;
                if succeeded {
                    tracing::info!(%mac, action = "command", phase, %status, %stdout, %stderr, "policy command ran");
                } else {
                    tracing::error!(%mac, action = "command", phase, %status, %stdout, %stderr, "policy command failed");
                }
            }
        }
    }
}

/// A NIC event the agent did not receive but knows happened (cause unknown): one lost before a
/// resync, or a return while the agent was not running.
pub(super) fn lost_event(action: crate::classify::Action, key: &str, ifindex: u32, name: &str) -> NicEvent {
    NicEvent {
        action,
        cause: Cause::Unknown,
        source: Source::Heuristic,
        ifindex: i32::try_from(ifindex).unwrap_or(0),
        name: name.to_owned(),
        mac: key.to_owned(),
        // Carries the key so that `NicEvent::key` gives it back.
        permanent_mac: Some(key.to_owned()),
        bus: None,
        driver: None,
        module: None,
        context_module: None,
        task: None,
        timestamp_ns: monotonic_ns(),
        netns: None,
    }
}
