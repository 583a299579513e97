//! `hotplug-agent reload DRIVER`: a driver reload the agent itself carries out, so that it does
//! not ride on the caller's SSH session. The loop checks and plans (`decide::reload`); a task of
//! its own unloads and loads the module, waits for every NIC to come back and be restored (it
//! follows the loop's restores through a watch channel), probes each NIC's gateway, and rolls
//! back (the module loaded again without the new parameters) when the load fails or a NIC does
//! not return. The client that asked gets the report if it is still there; `status` keeps each
//! NIC's part.
use std::{collections::HashMap, time::Duration};

use tokio::sync::{oneshot, watch};

use super::{Background, NicManager};
use crate::{
    decide::{
        reload::{self, NicFacts, NicReport, ReloadPlan, ReloadReport, ReloadRequest},
        NicState,
    },
    reconfigure::{module, neighbour},
};

/// How long each NIC may take to come back and be restored after the load.
const RETURN_WAIT: Duration = Duration::from_secs(60);

/// What the reload task follows of each NIC (published by the loop).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicProgress {
    /// The kernel's timestamp of its last removal.
    pub removed_ns: Option<u64>,
    /// Restores finished so far, and the last one's facts.
    pub restores: u64,
    pub registered_ns: u64,
    pub latency_us: u64,
    pub problems: Vec<String>,
    pub ifindex: Option<u32>,
}

pub type Progress = HashMap<String, NicProgress>;

impl NicManager {
    /// The facts `decide::reload::plan` needs, for every NIC present or known.
    fn reload_facts(&self) -> Vec<NicFacts> {
        self.nics
            .values()
            .filter_map(|nic| {
                let NicState::Present { ifindex, name } = &nic.state else { return None };
                let module = std::fs::read_link(format!("/sys/class/net/{name}/device/driver/module"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
                Some(NicFacts {
                    mac: nic.mac.clone(),
                    name: name.clone(),
                    module,
                    present: true,
                    fresh_snapshot: nic.snapshot.is_some() && !self.dirty.contains(ifindex),
                    policy: self.config.policy_for(&nic.mac, name).policy,
                    gateways: nic
                        .snapshot
                        .as_ref()
                        .map(crate::snapshot::default_gateways)
                        .unwrap_or_default(),
                })
            })
            .collect()
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
        // A change the kernel reported but the agent has not read yet: read it now, so that the
        // snapshot the reload relies on is current.
        let pending: Vec<u32> = self.dirty.iter().copied().collect();
        for ifindex in pending {
            self.dirty.remove(&ifindex);
            self.refresh(ifindex).await;
        }
        let planned = reload::plan(&request, self.full_mode, self.reload_running, &self.reload_facts())
            .and_then(|plan| {
                if !dry_run && !module::may_manage_modules() {
                    return Err("this agent may not load modules (no CAP_SYS_MODULE: the packaged service's sandbox has ProtectKernelModules=yes); run `hotplug-agent run` as root outside it, or reload by hand".to_owned());
                }
                Ok(plan)
            });
        let plan = match planned {
            Ok(plan) => plan,
            Err(why) => {
                tracing::warn!(driver, action = "reload", "reload refused: {why}");
                let _ = reply.send(answer(&ReloadReport::refused(&request, why)));
                return;
            }
        };
        if dry_run {
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
        }
        tracing::info!(
            driver,
            action = "reload",
            nics = plan.nics.len(),
            "guided reload: {}",
            plan.steps.join(", then ")
        );
        self.reload_running = true;
        let (handle, progress, tx) =
            (self.handle.clone(), self.progress.subscribe(), self.background.clone());
        tokio::spawn(async move {
            let report = carry_out(plan, &handle, progress).await;
            // The client may be gone (its SSH session dropped): the reload went on regardless.
            let _ = reply.send(serde_json::to_vec(&report).unwrap_or_default());
            let _ = tx.send(Background::ReloadDone(report)).await;
        });
    }

    /// A reload ended: its report goes into each NIC's status and the audit trail.
    pub(super) fn finish_reload(&mut self, report: ReloadReport) {
        self.reload_running = false;
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
        entry.outcome = Some(format!(
            "{} in {} ms: {}{}",
            report.status,
            report.total_ms,
            nics.join("; "),
            if report.errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {}", report.errors.join("; "))
            }
        ));
        self.audit(&entry);
    }

    /// Publishes a NIC's progress for a reload under way.
    pub(super) fn publish_progress(&self, mac: &str, update: impl FnOnce(&mut NicProgress)) {
        self.progress.send_modify(|all| update(all.entry(mac.to_owned()).or_default()));
    }
}

/// The reload itself.
async fn carry_out(
    plan: ReloadPlan,
    handle: &rtnetlink::Handle,
    mut progress: watch::Receiver<Progress>,
) -> ReloadReport {
    let started = tokio::time::Instant::now();
    let mut report = ReloadReport {
        driver: plan.driver.clone(),
        params: plan.params.clone(),
        dry_run: false,
        ..ReloadReport::default()
    };
    let before: HashMap<String, u64> = {
        let now = progress.borrow();
        plan.nics.iter().map(|n| (n.mac.clone(), now.get(&n.mac).map_or(0, |p| p.restores))).collect()
    };
    let mut loaded = false;
    let mut rolled_back = false;
    let unload = vec!["-r".to_owned(), plan.driver.clone()];
    match module::run(&unload).await {
        Ok(_) => report.steps.push(format!("modprobe -r {}: ok", plan.driver)),
        Err(error) => {
            // Nothing was unloaded (or the driver refused): nothing to roll back.
            report.steps.push(format!("modprobe -r {}: failed", plan.driver));
            report.errors.push(error);
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
    }
    let mut load = vec![plan.driver.clone()];
    load.extend(plan.params.iter().cloned());
    match module::run(&load).await {
        Ok(_) => {
            loaded = true;
            report.steps.push(format!("modprobe {}: ok", load.join(" ")));
        }
        Err(error) => {
            report.steps.push(format!("modprobe {}: failed", load.join(" ")));
            report.errors.push(error);
        }
    }
    let back = loaded && wait_back(&plan, &before, &mut progress).await;
    if !back {
        // The new load failed, or a NIC did not return under it: the module as it was.
        rolled_back = true;
        if loaded {
            match module::run(&unload).await {
                Ok(_) => report.steps.push(format!("rollback: modprobe -r {}: ok", plan.driver)),
                Err(error) => {
                    report.steps.push(format!("rollback: modprobe -r {}: failed", plan.driver));
                    report.errors.push(error);
                }
            }
        }
        match module::run(std::slice::from_ref(&plan.driver)).await {
            Ok(_) => report
                .steps
                .push(format!("rollback: modprobe {} (its configured parameters): ok", plan.driver)),
            Err(error) => {
                report.steps.push(format!("rollback: modprobe {}: failed", plan.driver));
                report.errors.push(error);
            }
        }
        // Whether they came back this time is each NIC's part of the report.
        wait_back(&plan, &before, &mut progress).await;
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

/// Until every planned NIC has been restored once more than before (true), or the wait ends.
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
