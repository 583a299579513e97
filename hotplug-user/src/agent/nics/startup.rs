//! Start-up: persisted state reconciled with the NICs present now. A NIC whose driver was away
//! when the agent stopped and that is back is restored; one that is gone is expected back; a NIC
//! nobody configured may be looked up once in IMDS (`decide::coexist::startup_lookup`).
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::sync::mpsc;

use super::{attach::imds_client, key, Background, Managed, ManagerError, NicManager};
use crate::{
    classify::NicEvent,
    clock::monotonic_ns,
    config::Config,
    decide::{self, NicState},
    kernel::rtnl,
    managers::Host,
    snapshot::{self, NicSnapshot},
    state::store::{Found, Migrated, Store},
};

impl NicManager {
    /// Loads persisted state, reads every NIC present now, and reconciles the two. The receiver
    /// yields what background tasks hand back, for [`NicManager::on_background`].
    pub async fn start(config: Config) -> Result<(Self, mpsc::Receiver<Background>), ManagerError> {
        let store = Store::open(&config.state_dir)?;
        let netlink = snapshot::Netlink::connect()?;
        let handle = netlink.handle.clone();
        let platform = crate::platform::detect(std::path::Path::new("/"));
        let imds = imds_client(&config, &platform);
        let (background, background_rx) = mpsc::channel(64);
        let own_netns = crate::kernel::probes::own_netns();
        let mut manager = Self {
            boot_id: boot_id(),
            own_netns,
            imds,
            platform,
            background,
            host: Host::default(),
            audit: crate::audit::Sink::start(&config.state_dir),
            full_mode: false,
            reload_running: false,
            progress: tokio::sync::watch::Sender::new(super::reload::Progress::default()),
            config,
            store,
            handle,
            netlink,
            nics: HashMap::new(),
            by_ifindex: HashMap::new(),
            dirty: HashSet::new(),
            unsaved: HashSet::new(),
            dirty_due: None,
            missed_check_due: None,
            missed_candidates: std::collections::HashSet::new(),
            gate_unanswered: Vec::new(),
            bursts: HashMap::new(),
            tuning_due: tokio::time::Instant::now() + super::changes::TUNING_POLL,
        };
        let (persisted, problems): (Vec<Found<Managed>>, _) = manager.store.load_all()?;
        for problem in problems {
            tracing::warn!("{problem}");
        }
        let boot = boot_id();
        let mut known = HashSet::new();
        for mut found in persisted {
            let mac = key(&found.value.mac);
            // State written before a reboot describes NICs of another boot: nothing left then is
            // coming back now (state without a boot id was written by an older agent, this boot).
            if !decide::coexist::same_boot(&found.value.boot_id, &boot) {
                tracing::info!(%mac, "state from before the last reboot: not restored, forgotten");
                let _ = std::fs::remove_file(&found.path);
                continue;
            }
            // Objects are compared by this release's summaries, not those the file holds.
            let unreadable = found.value.refresh_summaries();
            if !unreadable.is_empty() {
                tracing::warn!(%mac, path = %found.path.display(), ?unreadable, "objects in the state file whose netlink message does not parse: a restore will report each");
            }
            match manager.store.migrate(&mac, &found) {
                Ok(Migrated::Superseded) => continue,
                Ok(Migrated::Rewritten) => {
                    tracing::info!(%mac, from = found.format, to = crate::state::FORMAT, "state file written again in the current format");
                }
                Ok(Migrated::Current | Migrated::Renamed) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot write a state file of an older naming or format in the current one")
                }
            }
            let nic = found.value;
            // A NIC that left for good and is back is new to the agent.
            if !matches!(nic.record.state, NicState::Removed { .. }) {
                known.insert(mac.clone());
            }
            manager.nics.insert(mac, nic);
        }
        let now = monotonic_ns();
        let mut present = HashSet::new();
        for link in rtnl::dump_links().await? {
            if link.name == "lo" {
                continue;
            }
            match snapshot::capture(&manager.netlink, link.ifindex).await {
                Ok(mut snapshot) if !snapshot.mac.is_empty() => {
                    snapshot.manager = manager.host.nic_manager(link.ifindex, &snapshot.name);
                    let mac = key(&snapshot.mac);
                    present.insert(mac.clone());
                    let persisted = manager.nics.get(&mac).map(|n| {
                        let waiting = n
                            .attach
                            .as_ref()
                            .is_some_and(|a| a.status == crate::control::AttachStatus::WaitingForImds);
                        let pending = n.pending_restore.is_some();
                        (n.record.state.clone(), pending, waiting, n.pending_restore.as_ref().map(|p| p.plan))
                    });
                    let configured_by_hand = snapshot.manager.is_none()
                        && snapshot.addresses.iter().any(|a| is_configured_address(&a.summary));
                    let decision = decide::startup::reconcile(
                        persisted.as_ref().map(|(state, pending_restore, attach_waiting, _)| {
                            decide::startup::Persisted {
                                state,
                                pending_restore: *pending_restore,
                                attach_waiting: *attach_waiting,
                                configured_by_hand,
                            }
                        }),
                        Some(link.ifindex),
                    );
                    if configured_by_hand
                        && matches!(&persisted, Some((NicState::Present { ifindex, .. }, ..)) if *ifindex != link.ifindex)
                    {
                        tracing::info!(%mac, interface = %snapshot.name, "registered again while the agent was not running, and configured since: its configuration now is kept, the old one not restored");
                    }
                    if decision == decide::startup::Reconcile::Restore {
                        // It came back while the agent was not running: restore now.
                        tracing::info!(%mac, interface = %snapshot.name, ifindex = link.ifindex, "NIC came back while the agent was not running: restoring");
                        let event = synthetic_return(&snapshot);
                        manager.on_event(&event).await;
                        continue;
                    }
                    let record = decide::startup::tracked(
                        manager.nics.get(&mac).map(|n| &n.record),
                        link.ifindex,
                        &snapshot.name,
                    );
                    let nic = manager
                        .nics
                        .entry(mac.clone())
                        .or_insert_with(|| Managed::new(&mac, record.state.clone()));
                    nic.record = record;
                    nic.history.push_back(snapshot.clone());
                    nic.snapshot = Some(snapshot);
                    manager.by_ifindex.insert(link.ifindex, mac.clone());
                    manager.persist(&mac);
                    match decision {
                        decide::startup::Reconcile::ResumeRestore => {
                            // The restore finishes once udev and the NIC's manager are done, as
                            // it would have, with the plan it was begun with.
                            if let Some((.., Some(plan))) = persisted {
                                manager.wait_for_manager(
                                    &mac,
                                    link.ifindex,
                                    now,
                                    plan,
                                    super::restore::Round::First,
                                );
                            }
                        }
                        decide::startup::Reconcile::ResumeAttach => {
                            tracing::info!(%mac, ifindex = link.ifindex, action = "attach", "an attach was waiting for IMDS when the agent stopped: asking again");
                            let deadline =
                                manager.imds.as_ref().map_or(Duration::ZERO, |i| i.attach_deadline());
                            manager.start_attach(&mac, link.ifindex, None, deadline);
                            manager.persist(&mac);
                        }
                        _ => {}
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
            let persisted = decide::startup::Persisted {
                state: &nic.record.state,
                pending_restore: nic.pending_restore.is_some(),
                attach_waiting: false,
                configured_by_hand: false,
            };
            if decide::startup::reconcile(Some(persisted), None) == decide::startup::Reconcile::ExpectBack {
                let name = match &nic.record.state {
                    NicState::Present { name, .. } => name.clone(),
                    _ => nic.snapshot.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                };
                tracing::warn!(%mac, %name, "NIC absent at start-up: expecting it back within {} s", timeout / 1_000_000_000);
                nic.record = decide::startup::expected_back(&nic.record, now, timeout);
                manager.persist(&mac);
            }
        }
        // NICs the agent has never seen and that nobody configured yet are learned the way an attach
        // is, in one pass: one IMDS look-up each, no retries (a NIC IMDS does not list is left alone)
        // -- unless another manager configures NICs here: at boot the agent starts before it.
        let other_managers = manager.host.detect().any();
        let unconfigured: Vec<(String, u32)> = manager
            .nics
            .iter()
            .filter_map(|(mac, nic)| match (&nic.record.state, &nic.snapshot) {
                (NicState::Present { ifindex, .. }, Some(s)) => {
                    let lookup = decide::coexist::startup_lookup(decide::coexist::Unconfigured {
                        known: known.contains(mac),
                        configured: s.addresses.iter().any(|a| is_configured_address(&a.summary)),
                        virtual_link: mac.contains('@'),
                        policy: manager.config.policy_for(mac, &s.name).policy,
                        other_managers,
                    });
                    lookup.then(|| (mac.clone(), *ifindex))
                }
                _ => None,
            })
            .collect();
        if other_managers && !manager.nics.is_empty() {
            tracing::info!(
                "other network managers here ({}): NICs nobody configured yet are theirs, not looked up in IMDS",
                manager.host.detect().names().join(", ")
            );
        }
        // Without IMDS (off, or not EC2) the start-up log already said so once.
        if manager.imds.is_some() {
            for (mac, ifindex) in unconfigured {
                manager.start_attach(&mac, ifindex, None, Duration::ZERO);
            }
        }
        Ok((manager, background_rx))
    }
}

/// Whether an address summary is one somebody configured (not IPv6 link-local).
fn is_configured_address(summary: &str) -> bool {
    !summary.starts_with("fe80:")
}

/// A registration event for a NIC found present at start-up while its state said its driver was
/// gone (it came back while the agent was not running).
fn synthetic_return(snapshot: &NicSnapshot) -> NicEvent {
    super::lost_event(crate::classify::Action::Registration, &snapshot.mac, snapshot.ifindex, &snapshot.name)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty if it cannot be read.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
