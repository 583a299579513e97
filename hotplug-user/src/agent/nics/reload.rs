//! `hotplug-agent reload DRIVER`: a driver reload the agent itself carries out, so that it does
//! not ride on the caller's SSH session. The loop checks and plans (`decide::reload`); a task of
//! its own unloads and loads the module (`reconfigure::module`: directly, or through a transient
//! systemd unit under the service's sandbox), waits for every NIC to come back and be restored
//! (it follows the loop's restores through a watch channel), probes each NIC's gateway, and
//! rolls back (the module loaded again without the new parameters) when the load fails or a NIC
//! does not return. The loop records the report (each NIC's status, the audit trail) and then
//! answers the client, if it is still there.
use std::{collections::HashMap, path::Path, time::Duration};

use tokio::sync::{oneshot, watch};

use super::{Background, NicManager};
use crate::{
    decide::{
        recovery::{self, Marker, ModuleState, Recovery, RunningCommand},
        reload::{self, NicFacts, NicReport, ReloadPlan, ReloadReport, ReloadRequest},
    },
    reconfigure::{
        module::{self, Runner},
        neighbour,
    },
};

/// How long the NICs may take to come back and be restored after a load.
const RETURN_WAIT: Duration = Duration::from_secs(60);

/// In the state directory while a reload's module is (possibly) unloaded: the driver's name. An
/// agent that starts and finds it loads the module again if it is missing (the agent stopped,
/// or the host's service manager restarted it, between the unload and the load).
pub const IN_PROGRESS: &str = "reload-in-progress";

/// What the reload task follows of each NIC (published by the loop).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicProgress {
    /// The kernel's timestamp of its last removal.
    pub removed_ns: Option<u64>,
    /// Restores after a driver's return finished so far, and the last one's facts.
    pub restores: u64,
    pub registered_ns: u64,
    pub latency_us: u64,
    pub problems: Vec<String>,
    pub ifindex: Option<u32>,
}

pub type Progress = HashMap<String, NicProgress>;

/// The reload's answer for the loop: the report, and the client waiting for it.
pub struct Done {
    pub report: ReloadReport,
    pub reply: oneshot::Sender<Vec<u8>>,
}

impl NicManager {
    /// The facts `decide::reload::plan` needs, for every NIC of the host (sysfs), managed or not.
    fn reload_facts(&self) -> Vec<NicFacts> {
        let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
        let mut facts = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let module = std::fs::read_link(dir.join("device/driver/module"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            let ifindex = read_u32(&dir.join("ifindex"));
            let managed = ifindex.and_then(|i| self.by_ifindex.get(&i)).and_then(|mac| self.nics.get(mac));
            let Some(nic) = managed else {
                let mac = std::fs::read_to_string(dir.join("address")).unwrap_or_default().trim().to_owned();
                facts.push(NicFacts {
                    mac,
                    name,
                    module,
                    managed: false,
                    restore_pending: false,
                    fresh_snapshot: false,
                    policy: self.config.policy_for("", &entry.file_name().to_string_lossy()).policy,
                    gateways: Vec::new(),
                });
                continue;
            };
            facts.push(NicFacts {
                mac: nic.mac.clone(),
                policy: self.config.policy_for(&nic.mac, &name).policy,
                name,
                module,
                managed: true,
                restore_pending: nic.pending_restore.is_some(),
                fresh_snapshot: nic.snapshot.is_some() && ifindex.is_some_and(|i| !self.dirty.contains(&i)),
                gateways: nic.snapshot.as_ref().map(crate::snapshot::default_gateways).unwrap_or_default(),
            });
        }
        facts
    }

    /// Answers a reload request: a refusal or the plan at once, else the report when done.
    pub(super) async fn start_reload(
        &mut self,
        driver: &str,
        params: &[String],
        dry_run: bool,
        reply: oneshot::Sender<Vec<u8>>,
    ) {
        let answer = |report: &ReloadReport| serde_json::to_vec(report).unwrap_or_default();
        let request = match reload::validate(driver, params, dry_run) {
            Ok(request) => request,
            Err(why) => {
                let request = ReloadRequest { driver: driver.to_owned(), params: params.to_vec(), dry_run };
                let _ = reply.send(answer(&ReloadReport::refused(&request, why)));
                return;
            }
        };
        // A change the kernel reported but the agent has not read yet, or tuning changed since
        // the last poll (sysctls change without a notification): read it now, so that the
        // snapshot the reload relies on is current.
        self.poll_tuning_now().await;
        let pending: Vec<u32> = self.dirty.iter().copied().collect();
        for ifindex in pending {
            self.dirty.remove(&ifindex);
            self.refresh(ifindex, None).await;
        }
        let situation = reload::Situation {
            full_mode: self.full_mode,
            busy: self.reload_running,
            builtin: module::builtin(&request.driver),
            elsewhere: module::devices_elsewhere(&request.driver),
        };
        let planned = reload::plan(&request, situation, &self.reload_facts());
        let runner = planned.and_then(|plan| {
            if dry_run {
                return Ok((plan, None));
            }
            module::runner().map(|runner| (plan, Some(runner)))
        });
        let (plan, runner) = match runner {
            Ok(ready) => ready,
            Err(why) => {
                tracing::warn!(driver, action = "reload", "reload refused: {why}");
                let _ = reply.send(answer(&ReloadReport::refused(&request, why)));
                return;
            }
        };
        let Some(runner) = runner else {
            let report = ReloadReport {
                driver: plan.driver.clone(),
                params: plan.params.clone(),
                status: "planned".to_owned(),
                dry_run: true,
                plan: Some(plan),
                ..ReloadReport::default()
            };
            let _ = reply.send(answer(&report));
            return;
        };
        tracing::info!(
            driver,
            action = "reload",
            nics = plan.nics.len(),
            ?runner,
            "guided reload: {}",
            plan.steps.join(", then ")
        );
        self.reload_running = true;
        // Counted here, in the loop, before anything is unloaded: only restores after this count.
        let before = restores_of(&plan, &self.progress.borrow());
        let marker = MarkerFile {
            path: self.config.state_dir.join(IN_PROGRESS),
            marker: std::sync::Mutex::new(Marker {
                driver: plan.driver.clone(),
                boot_id: boot_id(),
                nics: plan.nics.iter().map(|n| n.mac.clone()).collect(),
                running: None,
            }),
        };
        marker.write();
        let (handle, progress, tx) =
            (self.handle.clone(), self.progress.subscribe(), self.background.clone());
        tokio::spawn(async move {
            let (driver, params) = (plan.driver.clone(), plan.params.clone());
            // In a task of its own: a panic in it still ends the reload (and frees the next one).
            let report = match tokio::spawn(async move {
                carry_out(plan, runner, &marker, before, &handle, progress).await
            })
            .await
            {
                Ok(report) => report,
                Err(error) => ReloadReport {
                    driver,
                    params,
                    status: "failed".to_owned(),
                    errors: vec![format!("the reload's task ended abnormally: {error}")],
                    finished: now_rfc3339(),
                    ..ReloadReport::default()
                },
            };
            let _ = tx.send(Background::ReloadDone(Done { report, reply })).await;
        });
    }

    /// A reload ended: its report goes into each NIC's status and the audit trail, then to the
    /// client (which may be gone: the reload went on regardless).
    pub(super) fn finish_reload(&mut self, done: Done) {
        let Done { report, reply } = done;
        self.reload_running = false;
        let _ = std::fs::remove_file(self.config.state_dir.join(IN_PROGRESS));
        for nic_report in &report.nics {
            if let Some(nic) = self.nics.get_mut(&nic_report.mac) {
                nic.last_reload = Some(nic_report.clone());
            }
            self.persist(&nic_report.mac.clone());
        }
        let mut entry = crate::audit::Entry::now(crate::audit::Kind::Reload, &report.status);
        entry.module = Some(report.driver.clone());
        entry.decision = Some(report.steps.join("; "));
        let nics: Vec<String> = report
            .nics
            .iter()
            .map(|n| format!("{} {} ({})", n.name, n.read_back, n.reachability.join(", ")))
            .collect();
        let errors = if report.errors.is_empty() {
            String::new()
        } else {
            format!("; errors: {}", report.errors.join("; "))
        };
        entry.outcome =
            Some(format!("{} in {} ms: {}{errors}", report.status, report.total_ms, nics.join("; ")));
        self.audit(&entry);
        let _ = reply.send(serde_json::to_vec(&report).unwrap_or_default());
    }

    /// Publishes a NIC's progress for a reload under way.
    pub(super) fn publish_progress(&self, mac: &str, update: impl FnOnce(&mut NicProgress)) {
        self.progress.send_modify(|all| update(all.entry(mac.to_owned()).or_default()));
    }

    /// At start: a reload an earlier agent left unfinished (its marker in the state directory)
    /// is finished in a task of its own (start-up does not wait for modprobe): its module
    /// command waited for if it still runs, the module loaded again as the host configures it
    /// (`modprobe -b`) if it is gone, the marker kept until the NICs are back
    /// (`decide::recovery`). No guided reload starts meanwhile. The NICs that register are
    /// restored as after any reload.
    pub fn recover_interrupted_reload(&mut self) {
        let path = self.config.state_dir.join(IN_PROGRESS);
        let Ok(text) = std::fs::read_to_string(&path) else { return };
        let marker = match Marker::parse(&text) {
            Ok(marker) => marker,
            Err(why) => {
                tracing::warn!(marker = %path.display(), "reload marker removed: {why}");
                let _ = std::fs::remove_file(&path);
                return;
            }
        };
        let driver = marker.driver.clone();
        let mut entry = crate::audit::Entry::now(crate::audit::Kind::Reload, "interrupted");
        entry.module = Some(driver.clone());
        entry.decision = Some(format!(
            "an earlier agent stopped mid-reload of {driver}{}: finishing it (its command waited for, modprobe -b {driver} if it is gone, its NICs awaited)",
            marker.running.as_ref().map(|r| format!(" during `{}`", r.command)).unwrap_or_default()
        ));
        self.reload_running = true;
        let tx = self.background.clone();
        tokio::spawn(async move {
            // In a task of its own: a panic in it still ends the recovery (and frees reloads).
            let (first, outcome) = match tokio::spawn(async move { recover(&marker, &path).await }).await {
                Ok(ended) => ended,
                Err(error) => {
                    let why = format!("the recovery's task ended abnormally: {error}");
                    (Recovery::GiveUp(why.clone()), Recovery::GiveUp(why))
                }
            };
            let _ = tx.send(Background::RecoveryDone { first, outcome, audit: Box::new(entry) }).await;
        });
    }

    /// A recovery ended: a guided reload may start again; the audit trail says what it found
    /// (only when there was something to finish).
    pub(super) fn finish_recovery(
        &mut self,
        first: Recovery,
        outcome: Recovery,
        mut entry: crate::audit::Entry,
    ) {
        self.reload_running = false;
        if matches!(first, Recovery::Forget(_) | Recovery::Done(_)) {
            return;
        }
        entry.outcome = Some(match outcome {
            Recovery::Done(why) => format!("finished: {why}"),
            Recovery::Forget(why) => format!("nothing to finish: {why}"),
            Recovery::GiveUp(why) | Recovery::Wait(why) => format!("not finished: {why}"),
            Recovery::Load => "not finished".to_owned(),
        });
        self.audit(&entry);
    }

    /// Forgets the progress of NICs the agent forgot.
    pub(super) fn prune_progress(&self) {
        self.progress.send_if_modified(|all| {
            let before = all.len();
            all.retain(|mac, _| self.nics.contains_key(mac));
            all.len() != before
        });
    }
}

fn read_u32(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Each planned NIC's restores so far.
fn restores_of(plan: &ReloadPlan, now: &Progress) -> HashMap<String, u64> {
    plan.nics.iter().map(|n| (n.mac.clone(), now.get(&n.mac).map_or(0, |p| p.restores))).collect()
}

/// Carries a reload's marker out: each step of a recovery, from the first look at the module to
/// `Done`, `Forget` or `GiveUp`. Returns the first step (was there anything to do?) and the last.
async fn recover(marker: &Marker, path: &Path) -> (Recovery, Recovery) {
    let driver = marker.driver.clone();
    let started = tokio::time::Instant::now();
    let mut loaded_once = false;
    let mut last_read: Option<ModuleState> = None;
    let mut first = None;
    let mut said = String::new();
    loop {
        let command_running = match &marker.running {
            Some(RunningCommand { unit: Some(unit), .. }) => module::unit_running(unit).await,
            Some(RunningCommand { pid: Some(pid), start_ticks, .. }) => {
                start_ticks.is_some() && module::start_ticks(*pid) == *start_ticks
            }
            _ => false,
        };
        // Built-in only when read so twice in a row: a module on its way in or out shows the
        // same for a moment.
        let read = module::state(&driver);
        let previous = last_read.replace(read);
        let module = if read == ModuleState::Builtin && previous != Some(ModuleState::Builtin) {
            ModuleState::Coming
        } else {
            read
        };
        let facts = recovery::Facts {
            boot_id: boot_id(),
            module,
            command_running,
            loaded_once,
            nics_back: nics_back(&marker.nics),
            waited: started.elapsed(),
        };
        let next = recovery::next(marker, &facts);
        first.get_or_insert_with(|| next.clone());
        match &next {
            Recovery::Wait(why) => {
                if *why != said {
                    tracing::warn!(driver, action = "reload", "interrupted reload: {why}");
                    said.clone_from(why);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Recovery::Load => {
                loaded_once = true;
                let runner = match module::runner() {
                    Ok(runner) => runner,
                    Err(why) => {
                        let why =
                            format!("{driver} is unloaded, and {why}: load it by hand (modprobe {driver})");
                        tracing::error!(driver, action = "reload", "interrupted reload: {why}");
                        return (first.unwrap_or(Recovery::Load), Recovery::GiveUp(why));
                    }
                };
                let args = vec!["-b".to_owned(), driver.clone()];
                match module::run(runner, &driver, &args, |_| ()).await {
                    Ok(_) => tracing::warn!(
                        driver,
                        action = "reload",
                        "interrupted reload: {driver} was left unloaded: loaded it again"
                    ),
                    Err(error) => tracing::error!(
                        driver,
                        action = "reload",
                        "interrupted reload: loading {driver} failed: {error}"
                    ),
                }
            }
            Recovery::Forget(why) | Recovery::Done(why) => {
                tracing::info!(driver, action = "reload", "interrupted reload: {why}; marker removed");
                let _ = std::fs::remove_file(path);
                return (first.unwrap_or_else(|| next.clone()), next);
            }
            Recovery::GiveUp(why) => {
                tracing::error!(
                    driver,
                    action = "reload",
                    "interrupted reload: {why}; the marker stays ({}) for the next agent",
                    path.display()
                );
                return (first.unwrap_or_else(|| next.clone()), next);
            }
        }
    }
}

/// This boot's id.
fn boot_id() -> Option<String> {
    Some(super::startup::boot_id()).filter(|id| !id.is_empty())
}

/// How many of these MACs a registered NIC has now (a driver registers its NIC with its
/// permanent address: the MAC the agent keys it by).
fn nics_back(macs: &[String]) -> usize {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return 0 };
    let present: std::collections::HashSet<String> = entries
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("address")).ok())
        .map(|address| address.trim().to_owned())
        .collect();
    macs.iter().filter(|mac| present.contains(*mac)).count()
}

/// The marker a reload keeps up to date in the state directory (written whole, then renamed).
struct MarkerFile {
    path: std::path::PathBuf,
    marker: std::sync::Mutex<Marker>,
}

impl MarkerFile {
    fn write(&self) {
        let Ok(marker) = self.marker.lock() else { return };
        let text = serde_json::to_vec(&*marker).unwrap_or_default();
        let tmp = self.path.with_extension("tmp");
        if let Err(error) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path)) {
            // Only a restart in the middle would miss it; the reload itself does not need it.
            tracing::warn!(driver = marker.driver, %error, "cannot write {}: an agent restarted mid-reload would not finish it", self.path.display());
        }
    }

    fn running(&self, running: RunningCommand) {
        if let Ok(mut marker) = self.marker.lock() {
            marker.running = Some(running);
        }
        self.write();
    }
}

/// Runs one module command and notes it in the report (and what runs in the marker).
async fn step(
    report: &mut ReloadReport,
    runner: Runner,
    marker: &MarkerFile,
    label: &str,
    args: &[String],
) -> bool {
    let driver = report.driver.clone();
    match module::run(runner, &driver, args, |running| marker.running(running)).await {
        Ok(_) => {
            report.steps.push(format!("{label}: ok"));
            true
        }
        Err(error) => {
            report.steps.push(format!("{label}: failed"));
            report.errors.push(error);
            false
        }
    }
}

/// The reload itself.
async fn carry_out(
    plan: ReloadPlan,
    runner: Runner,
    marker: &MarkerFile,
    mut before: HashMap<String, u64>,
    handle: &rtnetlink::Handle,
    mut progress: watch::Receiver<Progress>,
) -> ReloadReport {
    let started = tokio::time::Instant::now();
    let mut report =
        ReloadReport { driver: plan.driver.clone(), params: plan.params.clone(), ..ReloadReport::default() };
    let driver = plan.driver.clone();
    let unload = vec!["-r".to_owned(), driver.clone()];
    let mut load = vec![driver.clone()];
    load.extend(plan.params.iter().cloned());
    let mut loaded = false;
    let mut rolled_back = false;
    let unloaded = step(&mut report, runner, marker, &format!("modprobe -r {driver}"), &unload).await;
    if !unloaded && module::loaded(&driver) {
        // Refused (in use, say), nothing changed: the NICs are as they were.
        report.status = "failed".to_owned();
        report.nics = plan
            .nics
            .iter()
            .map(|n| NicReport {
                mac: n.mac.clone(),
                name: n.name.clone(),
                read_back: "not reloaded".to_owned(),
                ..NicReport::default()
            })
            .collect();
        report.total_ms = millis(started.elapsed());
        report.finished = now_rfc3339();
        return report;
    }
    // Unloaded (or gone although modprobe failed): load it, with the new parameters if that went well.
    if unloaded {
        loaded = step(&mut report, runner, marker, &format!("modprobe {}", load.join(" ")), &load).await;
    }
    let back = loaded && wait_back(&plan, &before, &mut progress).await;
    if !back {
        // The new load failed, or a NIC did not return under it: the module as the host
        // configures it.
        let mut unloaded_again = true;
        if module::loaded(&driver) {
            let label = format!("rollback: modprobe -r {driver}");
            unloaded_again =
                step(&mut report, runner, marker, &label, &unload).await || !module::loaded(&driver);
        }
        if unloaded_again {
            // Only restores from here on count (one under the new load that ends during the
            // unload must not pass for a return).
            before = restores_of(&plan, &progress.borrow());
            let plain = vec![driver.clone()];
            let label = format!("rollback: modprobe {driver} (its configured parameters)");
            rolled_back = step(&mut report, runner, marker, &label, &plain).await;
            // Whether they came back this time is each NIC's part of the report.
            wait_back(&plan, &before, &mut progress).await;
        }
        // Else the module stays loaded with the new parameters: the NICs are reported as the
        // first load left them, and the status is `failed`.
    }
    report.total_ms = millis(started.elapsed());
    let now = progress.borrow().clone();
    for nic in &plan.nics {
        let mut nic_report =
            NicReport { mac: nic.mac.clone(), name: nic.name.clone(), ..NicReport::default() };
        let seen = now.get(&nic.mac).cloned().unwrap_or_default();
        let restored = seen.restores > before.get(&nic.mac).copied().unwrap_or(0);
        if restored {
            nic_report.down_ms =
                seen.removed_ns.map(|removed| seen.registered_ns.saturating_sub(removed) / 1_000_000);
            nic_report.restore_ms = Some(seen.latency_us / 1000);
            nic_report.read_back =
                if seen.problems.is_empty() { "ok".to_owned() } else { seen.problems.join("; ") };
            if let Some(ifindex) = seen.ifindex {
                if nic.gateways.is_empty() {
                    nic_report.reachability.push("no default gateway".to_owned());
                }
                for gateway in &nic.gateways {
                    nic_report.reachability.push(neighbour::probe(handle, ifindex, *gateway).await);
                }
            }
        } else {
            nic_report.read_back = "not back".to_owned();
        }
        report.nics.push(nic_report);
    }
    report.status = reload::verdict(loaded, rolled_back, &report.nics).to_owned();
    report.finished = now_rfc3339();
    report
}

/// Until every planned NIC has been restored once more than `before` (true), or the wait ends.
async fn wait_back(
    plan: &ReloadPlan,
    before: &HashMap<String, u64>,
    progress: &mut watch::Receiver<Progress>,
) -> bool {
    let all_back = |now: &Progress| {
        plan.nics
            .iter()
            .all(|n| now.get(&n.mac).is_some_and(|p| p.restores > before.get(&n.mac).copied().unwrap_or(0)))
    };
    let wait = async {
        loop {
            if all_back(&progress.borrow_and_update()) {
                return true;
            }
            if progress.changed().await.is_err() {
                return false;
            }
        }
    };
    tokio::time::timeout(RETURN_WAIT, wait).await.unwrap_or(false)
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
