//! The NIC manager: keeps each NIC's live snapshot current from rtnetlink notifications, feeds
//! classified events through the per-NIC state machine (`decide`), carries out its actions
//! (hold a snapshot, restore it, run a command, hand the NIC to the detach path), and persists
//! every NIC's state so that a restarted agent still knows what to restore.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{route::RouteAttribute, RouteNetlinkMessage},
    Handle, MulticastGroup,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;

use super::monotonic_ns;
use crate::{
    classify::{Cause, NicEvent, Source},
    config::{Config, PolicyKind},
    decide::{self, Action, Input, NicState},
    imds::{ImdsClient, ImdsError, NicMetadata},
    kernel::rtnl::{self, RtnlError},
    reconfigure::{attach, command, restore},
    snapshot::{
        self,
        store::{Store, StoreError},
        NicSnapshot,
    },
};

/// How long configuration changes settle before the NIC is read again.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Snapshots kept per NIC (the one to restore is chosen by time among them).
const HISTORY: usize = 8;
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

/// Where an attach stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachOutcome {
    /// `waiting-for-imds`, `configured` or `failed`.
    pub status: String,
    /// From the kernel's device-added timestamp to the end of the configuration.
    pub latency_ms: Option<u64>,
    /// IMDS requests this attach made (token requests included).
    pub imds_requests: u64,
    pub table: Option<u32>,
    pub errors: Vec<String>,
}

/// An attach's IMDS answer, back in the agent's loop.
pub struct AttachResult {
    mac: String,
    ifindex: u32,
    started_ns: u64,
    requests: u64,
    result: Result<NicMetadata, ImdsError>,
}

/// The outcome of the last restore of a NIC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// From the kernel's registration timestamp to the last netlink acknowledgement.
    pub latency_us: u64,
    pub requests: u32,
    pub errors: Vec<String>,
    pub differences: Vec<String>,
}

/// One NIC as the agent manages and persists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Managed {
    pub mac: String,
    pub state: NicState,
    /// While present: the latest snapshot; after the driver left: the one to restore.
    pub snapshot: Option<NicSnapshot>,
    pub last_event: Option<NicEvent>,
    pub last_restore: Option<RestoreOutcome>,
    #[serde(default)]
    pub attach: Option<AttachOutcome>,
    /// Rules the agent added on attach (the detach path removes exactly these).
    #[serde(default)]
    pub configured_rules: Vec<snapshot::Entry>,
    #[serde(skip)]
    history: VecDeque<NicSnapshot>,
}

impl Managed {
    fn new(mac: &str, state: NicState) -> Self {
        Self {
            mac: mac.to_owned(),
            state,
            snapshot: None,
            last_event: None,
            last_restore: None,
            attach: None,
            configured_rules: Vec::new(),
            history: VecDeque::new(),
        }
    }
}

/// What `hotplug-agent status` shows for a NIC.
#[derive(Debug, Serialize, Deserialize)]
pub struct NicStatus {
    pub mac: String,
    #[serde(flatten)]
    pub state: NicState,
    pub snapshot: Option<String>,
    pub last_event: Option<String>,
    pub last_restore: Option<RestoreOutcome>,
    #[serde(default)]
    pub attach: Option<AttachOutcome>,
}

pub struct NicManager {
    config: Config,
    store: Store,
    handle: Handle,
    nics: HashMap<String, Managed>,
    by_ifindex: HashMap<u32, String>,
    dirty: HashSet<u32>,
    dirty_due: Option<tokio::time::Instant>,
    bursts: HashMap<u32, (u64, u64)>,
    imds: Option<Arc<ImdsClient>>,
    attach_tx: mpsc::Sender<AttachResult>,
    /// Inode of the agent's own network namespace.
    own_netns: Option<u32>,
}

fn key(mac: &str) -> String {
    mac.to_ascii_lowercase()
}

impl NicManager {
    /// Loads persisted state, reads every NIC present now, and reconciles the two. The receiver
    /// yields attach results for [`NicManager::on_attach_result`].
    pub async fn start(config: Config) -> Result<(Self, mpsc::Receiver<AttachResult>), ManagerError> {
        let store = Store::open(&config.state_dir)?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let imds = imds_client(&config);
        let (attach_tx, attach_rx) = mpsc::channel(64);
        let own_netns = std::fs::metadata("/proc/self/ns/net")
            .ok()
            .and_then(|m| u32::try_from(std::os::unix::fs::MetadataExt::ino(&m)).ok());
        let mut manager = Self {
            own_netns,
            imds,
            attach_tx,
            config,
            store,
            handle,
            nics: HashMap::new(),
            by_ifindex: HashMap::new(),
            dirty: HashSet::new(),
            dirty_due: None,
            bursts: HashMap::new(),
        };
        let (persisted, problems): (Vec<Managed>, _) = manager.store.load_all()?;
        let known: HashSet<String> = persisted.iter().map(|n| key(&n.mac)).collect();
        for problem in problems {
            tracing::warn!("{problem}");
        }
        for nic in persisted {
            manager.nics.insert(key(&nic.mac), nic);
        }
        let now = monotonic_ns();
        let mut present = HashSet::new();
        for link in rtnl::dump_links().await? {
            if link.name == "lo" {
                continue;
            }
            match snapshot::capture(&manager.handle, link.ifindex).await {
                Ok(snapshot) if !snapshot.mac.is_empty() => {
                    let mac = key(&snapshot.mac);
                    present.insert(mac.clone());
                    let restore_due =
                        matches!(manager.nics.get(&mac).map(|n| &n.state), Some(NicState::DriverGone { .. }));
                    if restore_due {
                        // It came back while the agent was not running: restore now.
                        let event = synthetic_return(&snapshot);
                        manager.on_event(&event).await;
                    } else {
                        let nic = manager.nics.entry(mac.clone()).or_insert_with(|| {
                            Managed::new(
                                &mac,
                                NicState::Present { ifindex: link.ifindex, name: snapshot.name.clone() },
                            )
                        });
                        nic.state = NicState::Present { ifindex: link.ifindex, name: snapshot.name.clone() };
                        nic.history.push_back(snapshot.clone());
                        nic.snapshot = Some(snapshot);
                        manager.by_ifindex.insert(link.ifindex, mac.clone());
                        manager.persist(&mac);
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(ifindex = link.ifindex, %error, "cannot read a NIC's configuration")
                }
            }
        }
        let timeout = u64::try_from(manager.config.return_timeout().as_nanos()).unwrap_or(u64::MAX);
        let absent: Vec<String> = manager.nics.keys().filter(|m| !present.contains(*m)).cloned().collect();
        for mac in absent {
            let Some(nic) = manager.nics.get_mut(&mac) else { continue };
            match &nic.state {
                NicState::Present { .. } | NicState::DriverGone { .. } => {
                    let name = match &nic.state {
                        NicState::Present { name, .. } => name.clone(),
                        _ => nic.snapshot.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                    };
                    tracing::warn!(%mac, %name, "NIC absent at start-up: expecting it back within {} s", timeout / 1_000_000_000);
                    let cause = match nic.state {
                        NicState::DriverGone { cause, .. } => cause,
                        _ => Cause::Unknown,
                    };
                    nic.state = NicState::DriverGone {
                        cause,
                        since_ns: now,
                        deadline_ns: now.saturating_add(timeout),
                    };
                    manager.persist(&mac);
                }
                NicState::Removed { .. } => {}
            }
        }
        // NICs the agent has never seen and that nobody configured yet are learned the way an attach
        // is, in one pass: one IMDS look-up each, no retries (a NIC IMDS does not list is left alone).
        let unconfigured: Vec<(String, u32)> = manager
            .nics
            .iter()
            .filter(|(mac, _)| !known.contains(*mac) && !mac.contains('@'))
            .filter_map(|(mac, nic)| match (&nic.state, &nic.snapshot) {
                (NicState::Present { ifindex, .. }, Some(s))
                    if !s.addresses.iter().any(|a| is_configured_address(&a.summary)) =>
                {
                    Some((mac.clone(), *ifindex))
                }
                _ => None,
            })
            .collect();
        for (mac, ifindex) in unconfigured {
            let name = manager
                .nics
                .get(&mac)
                .and_then(|n| n.snapshot.as_ref())
                .map(|s| s.name.clone())
                .unwrap_or_default();
            if manager.config.policy_for(&mac, &name).policy != PolicyKind::Ignore {
                manager.start_attach(&mac, ifindex, None, Duration::ZERO);
            }
        }
        Ok((manager, attach_rx))
    }

    /// How many NICs the agent manages (present or expected back).
    pub fn nic_count(&self) -> usize {
        self.nics.values().filter(|n| !matches!(n.state, NicState::Removed { .. })).count()
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
            self.imds = imds_client(&config);
        }
        self.config = config;
        kept
    }

    /// Saves a NIC's state; a NIC that left for good leaves no state file behind.
    fn persist(&self, mac: &str) {
        let Some(nic) = self.nics.get(mac) else { return };
        let result = match nic.state {
            NicState::Removed { .. } => self.store.remove(mac),
            _ => self.store.save(mac, nic),
        };
        if let Err(error) = result {
            tracing::error!(%error, "cannot persist NIC state");
        }
    }

    /// After lost kernel events: a NIC whose driver had left and that is registered again by now
    /// lost its registration event; restore it as if it had come. Every NIC is re-read.
    /// (A lost removal cannot be told apart from a NIC that is still there: it stays `present`.)
    pub async fn resync(&mut self, links: &[rtnl::LinkSnapshot]) {
        for link in links {
            let key = crate::classify::nic_key(
                link.permanent_mac.as_deref(),
                link.mac.as_deref().unwrap_or_default(),
                &link.name,
                link.kind.is_some(),
            );
            let waiting = matches!(self.nics.get(&key).map(|n| &n.state), Some(NicState::DriverGone { .. }));
            if waiting {
                tracing::warn!(mac = %key, ifindex = link.ifindex, "registration lost with the kernel events: restoring now");
                let event = NicEvent {
                    action: crate::classify::Action::Registration,
                    cause: Cause::Unknown,
                    source: Source::Heuristic,
                    ifindex: i32::try_from(link.ifindex).unwrap_or(0),
                    name: link.name.clone(),
                    mac: key.clone(),
                    permanent_mac: Some(key.clone()),
                    bus: None,
                    driver: None,
                    module: None,
                    context_module: None,
                    task: None,
                    timestamp_ns: monotonic_ns(),
                    netns: None,
                };
                self.on_event(&event).await;
            }
        }
        self.note_change(None);
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
            .filter_map(|n| match n.state {
                NicState::DriverGone { deadline_ns, .. } => Some(deadline_ns),
                _ => None,
            })
            .min()
            .map(|d| tokio::time::Instant::now() + Duration::from_nanos(d.saturating_sub(now_ns)));
        match (self.dirty_due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Re-reads NICs whose configuration changed and checks return deadlines.
    pub async fn wake(&mut self) {
        if self.dirty_due.is_some_and(|due| due <= tokio::time::Instant::now()) {
            self.dirty_due = None;
            let dirty: Vec<u32> = self.dirty.drain().collect();
            for ifindex in dirty {
                self.refresh(ifindex).await;
            }
        }
        let now_ns = monotonic_ns();
        let macs: Vec<String> = self.nics.keys().cloned().collect();
        for mac in macs {
            self.apply(&mac, &Input::Tick { now_ns }, None).await;
        }
    }

    async fn refresh(&mut self, ifindex: u32) {
        let Some(mac) = self.by_ifindex.get(&ifindex).cloned() else { return };
        let present = matches!(self.nics.get(&mac).map(|n| &n.state), Some(NicState::Present { ifindex: i, .. }) if *i == ifindex);
        if !present {
            return;
        }
        match snapshot::capture(&self.handle, ifindex).await {
            Ok(snapshot) if key(&snapshot.mac) == mac => {
                if let Some(nic) = self.nics.get_mut(&mac) {
                    if let NicState::Present { name, .. } = &mut nic.state {
                        name.clone_from(&snapshot.name);
                    }
                    nic.history.push_back(snapshot.clone());
                    while nic.history.len() > HISTORY {
                        nic.history.pop_front();
                    }
                    nic.snapshot = Some(snapshot);
                }
                self.persist(&mac);
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
        self.apply(&mac, &Input::Event(event), Some(event)).await;
    }

    async fn apply(&mut self, mac: &str, input: &Input<'_>, event: Option<&NicEvent>) {
        // A name-keyed policy means the name the NIC had (a returning NIC first registers under
        // the kernel's fresh ethN, before anything renames it).
        let known_name = self.nics.get(mac).and_then(|n| n.snapshot.as_ref()).map(|s| s.name.clone());
        let name = known_name.or_else(|| event.map(|e| e.name.clone())).unwrap_or_default();
        let policy = self.config.policy_for(mac, &name).policy;
        let timeout = u64::try_from(self.config.return_timeout().as_nanos()).unwrap_or(u64::MAX);
        let state = self.nics.get(mac).map(|n| n.state.clone());
        let transition = decide::decide(state.as_ref(), input, policy, timeout);
        if transition.next == state && transition.actions.is_empty() {
            return;
        }
        let Some(next) = transition.next else { return };
        let nic = self.nics.entry(mac.to_owned()).or_insert_with(|| Managed::new(mac, next.clone()));
        if let Some(NicState::Present { ifindex, .. }) = &state {
            if !matches!(next, NicState::Present { .. }) {
                self.by_ifindex.remove(ifindex);
                self.dirty.remove(ifindex);
            }
        }
        nic.state = next;
        if let Some(event) = event {
            nic.last_event = Some(event.clone());
        }
        for action in transition.actions {
            self.act(mac, action, event).await;
        }
        self.persist(mac);
        self.forget_old_removals();
    }

    /// Keeps the memory of NICs that left for good bounded (hosts that churn links, containers):
    /// the newest [`REMOVED_KEPT`] stay visible in `status`, older ones are forgotten.
    fn forget_old_removals(&mut self) {
        let mut removed: Vec<(u64, String)> = self
            .nics
            .iter()
            .filter_map(|(mac, n)| match n.state {
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
        // Burst records only matter for links that still exist.
        let live: HashSet<u32> = self.by_ifindex.keys().copied().collect();
        self.bursts.retain(|ifindex, _| live.contains(ifindex));
    }

    async fn act(&mut self, mac: &str, action: Action, event: Option<&NicEvent>) {
        match action {
            Action::HoldSnapshot { before_ns } => {
                // Degraded mode sees a removal after the teardown notifications: hold what the
                // NIC looked like before the burst of changes that ended in its removal.
                let before_ns = match event {
                    Some(e) if e.source == Source::Heuristic => {
                        let ifindex = u32::try_from(e.ifindex).unwrap_or(0);
                        self.bursts.get(&ifindex).map_or(before_ns, |b| b.0.min(before_ns))
                    }
                    _ => before_ns,
                };
                let Some(nic) = self.nics.get_mut(mac) else { return };
                let candidate = nic
                    .history
                    .iter()
                    .chain(nic.snapshot.iter())
                    .filter(|s| s.taken_ns < before_ns)
                    .max_by_key(|s| s.taken_ns)
                    .cloned();
                match candidate {
                    Some(snapshot) => {
                        tracing::info!(%mac, interface = %snapshot.name, action = "hold", "driver left: holding {}", snapshot.summary_line());
                        nic.snapshot = Some(snapshot);
                    }
                    None => {
                        tracing::warn!(%mac, action = "hold", "driver left, but no snapshot from before it: nothing to restore")
                    }
                }
                nic.history.clear();
            }
            Action::Restore { ifindex } => {
                let Some(want) = self.nics.get(mac).and_then(|n| n.snapshot.clone()) else {
                    tracing::warn!(%mac, ifindex, action = "restore", "NIC is back but there is no snapshot to restore");
                    return;
                };
                let report = restore::restore(&self.handle, &want, ifindex).await;
                let registered_ns = event.map_or(report.last_ack_ns, |e| e.timestamp_ns);
                let latency_us = report.last_ack_ns.saturating_sub(registered_ns) / 1000;
                if report.errors.is_empty() && report.differences.is_empty() {
                    tracing::info!(%mac, interface = %want.name, ifindex, action = "restore", latency_us, requests = report.requests, "restored {}", want.summary_line());
                } else {
                    tracing::warn!(%mac, interface = %want.name, ifindex, action = "restore", latency_us, errors = ?report.errors, differences = ?report.differences, "restore incomplete");
                }
                if let Some(nic) = self.nics.get_mut(mac) {
                    nic.last_restore = Some(RestoreOutcome {
                        latency_us,
                        requests: report.requests,
                        errors: report.errors,
                        differences: report.differences,
                    });
                }
            }
            Action::RunCommand { phase } => {
                let command = self.config.policy_for(mac, event.map_or("", |e| e.name.as_str())).command;
                if let (Some(event), false) = (event, command.is_empty()) {
                    match command::run(&command, event, phase).await {
                        Ok(status) => {
                            tracing::info!(%mac, action = "command", phase, %status, "policy command ran")
                        }
                        Err(error) => {
                            tracing::error!(%mac, action = "command", phase, %error, "policy command failed to start")
                        }
                    }
                }
            }
            Action::HandToDetach { reason } => {
                // The kernel is authoritative: clean up at once, no IMDS round trip.
                let Some(nic) = self.nics.get_mut(mac) else { return };
                let rules = std::mem::take(&mut nic.configured_rules);
                nic.snapshot = None;
                nic.history.clear();
                let errors = attach::detach(&self.handle, &rules).await;
                if errors.is_empty() {
                    tracing::info!(%mac, action = "detach", rules = rules.len(), "NIC left for good: {reason}; removed the rules the agent had added");
                } else {
                    tracing::warn!(%mac, action = "detach", ?errors, "NIC left for good: {reason}; cleanup incomplete");
                }
            }
            Action::Attach { ifindex } => {
                let deadline = self.imds.as_ref().map_or(Duration::ZERO, |i| i.attach_deadline());
                self.start_attach(mac, ifindex, event, deadline);
            }
            Action::Track { ifindex } => {
                self.by_ifindex.insert(ifindex, mac.to_owned());
                self.dirty.insert(ifindex);
                if self.dirty_due.is_none() {
                    self.dirty_due = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
            }
        }
    }

    /// Asks IMDS for a really attached NIC in the background; the answer comes back through the
    /// attach channel so the agent keeps handling other NICs meanwhile.
    /// `deadline` zero: a single look-up (the start-up pass).
    fn start_attach(&mut self, mac: &str, ifindex: u32, event: Option<&NicEvent>, deadline: Duration) {
        let Some(nic) = self.nics.get_mut(mac) else { return };
        let Some(imds) = self.imds.clone() else {
            tracing::warn!(%mac, action = "attach", "NIC attached, but IMDS is disabled or unusable: not configuring it");
            nic.attach = Some(AttachOutcome {
                status: "failed".into(),
                latency_ms: None,
                imds_requests: 0,
                table: None,
                errors: vec!["IMDS disabled".into()],
            });
            return;
        };
        nic.attach = Some(AttachOutcome {
            status: "waiting-for-imds".into(),
            latency_ms: None,
            imds_requests: 0,
            table: None,
            errors: Vec::new(),
        });
        tracing::info!(%mac, ifindex, action = "attach", "NIC attached: asking IMDS for it");
        let started_ns = event.map_or_else(monotonic_ns, |e| e.timestamp_ns);
        let tx = self.attach_tx.clone();
        let mac = mac.to_owned();
        tokio::spawn(async move {
            let before = imds.requests();
            let result = imds.nic_until_published(&mac, deadline).await;
            let requests = imds.requests().saturating_sub(before);
            let _ = tx.send(AttachResult { mac, ifindex, started_ns, requests, result }).await;
        });
    }

    /// Configures an attached NIC once IMDS answered (if it is still there).
    pub async fn on_attach_result(&mut self, result: AttachResult) {
        let AttachResult { mac, ifindex, started_ns, requests, result } = result;
        let still_there = matches!(self.nics.get(&mac).map(|n| &n.state), Some(NicState::Present { ifindex: i, .. }) if *i == ifindex);
        if !still_there {
            tracing::info!(%mac, action = "attach", "IMDS answered for a NIC that is gone or was re-registered: not configuring it");
            if let Some(attach) = self.nics.get_mut(&mac).and_then(|n| n.attach.as_mut()) {
                attach.status = "abandoned".into();
                attach.imds_requests = requests;
            }
            return;
        }
        let outcome = match result {
            Ok(metadata) => {
                let report = attach::configure(&self.handle, ifindex, &metadata).await;
                let latency_ms = monotonic_ns().saturating_sub(started_ns) / 1_000_000;
                tracing::info!(%mac, ifindex, action = "attach", latency_ms, imds_requests = requests, table = ?report.table, errors = ?report.errors, "attached NIC configured from IMDS");
                if let Some(nic) = self.nics.get_mut(&mac) {
                    nic.configured_rules = report.rules;
                }
                AttachOutcome {
                    status: if report.errors.is_empty() { "configured".into() } else { "failed".into() },
                    latency_ms: Some(latency_ms),
                    imds_requests: requests,
                    table: report.table,
                    errors: report.errors,
                }
            }
            Err(error) => {
                tracing::error!(%mac, action = "attach", %error, "attached NIC not configured");
                AttachOutcome {
                    status: "failed".into(),
                    latency_ms: None,
                    imds_requests: requests,
                    table: None,
                    errors: vec![error.to_string()],
                }
            }
        };
        if let Some(nic) = self.nics.get_mut(&mac) {
            nic.attach = Some(outcome);
        }
        self.persist(&mac);
        self.note_change(Some(ifindex));
    }

    pub fn status(&self) -> Vec<NicStatus> {
        let mut nics: Vec<NicStatus> = self
            .nics
            .values()
            .map(|n| NicStatus {
                mac: n.mac.clone(),
                state: n.state.clone(),
                snapshot: n.snapshot.as_ref().map(NicSnapshot::summary_line),
                last_event: n.last_event.as_ref().map(|e| {
                    format!("{:?} {} ({:?}) ifindex {}", e.action, e.cause.as_str(), e.source, e.ifindex)
                        .to_lowercase()
                }),
                last_restore: n.last_restore.clone(),
                attach: n.attach.clone(),
            })
            .collect();
        nics.sort_by(|a, b| a.mac.cmp(&b.mac));
        nics
    }
}

/// The IMDS client the configuration asks for, if any.
fn imds_client(config: &Config) -> Option<Arc<ImdsClient>> {
    if !config.imds.enabled {
        return None;
    }
    match ImdsClient::new(&config.imds) {
        Ok(client) => Some(Arc::new(client)),
        Err(error) => {
            tracing::error!(%error, "IMDS unusable: real attaches will not be configured");
            None
        }
    }
}

/// Whether an address summary is one somebody configured (not IPv6 link-local).
fn is_configured_address(summary: &str) -> bool {
    !summary.starts_with("fe80:")
}

/// A registration event for a NIC found present at start-up while its state said its driver was
/// gone (it came back while the agent was not running).
fn synthetic_return(snapshot: &NicSnapshot) -> NicEvent {
    // `permanent_mac` carries the snapshot's key so that `NicEvent::key` gives it back.
    NicEvent {
        action: crate::classify::Action::Registration,
        cause: Cause::Unknown,
        source: Source::Heuristic,
        ifindex: i32::try_from(snapshot.ifindex).unwrap_or(0),
        name: snapshot.name.clone(),
        mac: snapshot.mac.clone(),
        permanent_mac: Some(snapshot.mac.clone()),
        bus: None,
        driver: None,
        module: None,
        context_module: None,
        task: None,
        timestamp_ns: monotonic_ns(),
        netns: None,
    }
}

/// rtnetlink notifications that can change a NIC's configuration: the ifindex they concern, or
/// `None` for rules (not bound to one NIC).
pub fn config_changes() -> Result<impl Stream<Item = Option<u32>>, ManagerError> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ];
    let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&groups)?;
    tokio::spawn(connection);
    Ok(messages.filter_map(|(message, _)| async move {
        match message.payload {
            NetlinkPayload::InnerMessage(message) => match message {
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                    Some(Some(l.header.index))
                }
                RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                    Some(Some(a.header.index))
                }
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                    Some(r.attributes.iter().find_map(|a| {
                        if let RouteAttribute::Oif(i) = a {
                            Some(*i)
                        } else {
                            None
                        }
                    }))
                }
                RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_) => Some(None),
                _ => None,
            },
            // The socket's buffer overflowed: notifications were lost, re-read every NIC.
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("rtnetlink notifications lost (buffer overrun): re-reading every NIC");
                Some(None)
            }
            _ => None,
        }
    }))
}
