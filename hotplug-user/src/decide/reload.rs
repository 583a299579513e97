//! `hotplug-agent reload DRIVER`: whether a guided driver reload may start, over which NICs, and
//! what its outcome is, from facts the agent gathered. Pure: the agent runs the module commands,
//! waits and probes (`agent/nics/reload.rs`).
use serde::{Deserialize, Serialize};

use crate::config::PolicyKind;

/// The longest module name the kernel takes (`MODULE_NAME_LEN` - 1).
const MODULE_NAME_MAX: usize = 55;
/// The most parameters, and the longest name and value, a reload passes to modprobe (the whole
/// request fits in the control socket's 4 KiB).
const PARAMS_MAX: usize = 16;
const KEY_MAX: usize = 64;
const VALUE_MAX: usize = 64;

/// What the client asked for, checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRequest {
    pub driver: String,
    /// `KEY=VALUE`, in the order given.
    pub params: Vec<String>,
    pub dry_run: bool,
}

/// A NIC of the host (every one in sysfs) as the agent knows it when the request arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicFacts {
    pub mac: String,
    pub name: String,
    /// The module its device's driver belongs to (sysfs), when it has one.
    pub module: Option<String>,
    /// The agent manages it (knows it as present).
    pub managed: bool,
    /// A restore of it is still waiting (for its manager): a reload now would be confused with it.
    pub restore_pending: bool,
    /// A snapshot the agent holds, re-read since the last change the kernel reported.
    pub fresh_snapshot: bool,
    pub policy: PolicyKind,
    /// The default gateways its snapshot names (IPv4 and IPv6), for the reachability check.
    pub gateways: Vec<std::net::IpAddr>,
}

/// One NIC the reload takes down and expects back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNic {
    pub mac: String,
    pub name: String,
    pub gateways: Vec<std::net::IpAddr>,
}

/// What a reload will do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadPlan {
    pub driver: String,
    pub params: Vec<String>,
    pub nics: Vec<PlannedNic>,
    /// The commands, in order (`modprobe -r DRIVER`, `modprobe DRIVER PARAMS…`).
    pub steps: Vec<String>,
}

/// Checks the request's words: a module name and `KEY=VALUE` parameters with nothing modprobe
/// could read as an option or as more than one argument (no shell is ever used; this also keeps
/// the audit trail and the commands readable).
pub fn validate(driver: &str, params: &[String], dry_run: bool) -> Result<ReloadRequest, String> {
    // A leading '-' would be an option to modprobe.
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if driver.len() > MODULE_NAME_MAX || !name_ok(driver) {
        return Err(format!(
            "{driver:?} is not a module name (letters, digits, _ and -, not first, at most {MODULE_NAME_MAX})"
        ));
    }
    if params.len() > PARAMS_MAX {
        return Err(format!("{} parameters: at most {PARAMS_MAX}", params.len()));
    }
    for param in params {
        let Some((key, value)) = param.split_once('=') else {
            return Err(format!("--param {param:?}: not KEY=VALUE"));
        };
        if !name_ok(key) || key.len() > KEY_MAX {
            return Err(format!("--param {param:?}: {key:?} is not a parameter name"));
        }
        // Numbers, booleans, names, comma-separated arrays: nothing systemd or a shell would
        // read as a variable, a specifier or a quote.
        let value_ok = |c: char| c.is_ascii_alphanumeric() || "_.,:+-/".contains(c);
        if value.is_empty() || value.len() > VALUE_MAX || !value.chars().all(value_ok) {
            return Err(format!(
                "--param {param:?}: the value must be 1-{VALUE_MAX} characters among letters, digits and _ . , : + - /"
            ));
        }
    }
    Ok(ReloadRequest { driver: driver.to_owned(), params: params.to_vec(), dry_run })
}

/// Module names as the kernel compares them: `-` and `_` are the same.
pub fn same_module(a: &str, b: &str) -> bool {
    let dash = |c: u8| c == b'-' || c == b'_';
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| x == y || (dash(x) && dash(y)))
}

/// The plan, or why the reload must not start: the agent must be able to tell the reload's
/// removals from anything else (full mode), the driver must drive NICs, every one of them one the
/// agent manages and will restore, with a snapshot taken since its last change and no restore
/// still waiting, and no other reload may be under way.
/// What the agent and the kernel are doing when a reload is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Situation {
    /// Every kernel hook attached.
    pub full_mode: bool,
    /// Another reload is under way.
    pub busy: bool,
    /// The driver is built into the kernel (`/sys/module/NAME` without `initstate`).
    pub builtin: bool,
    /// Devices bound to the driver whose network interface is not in the agent's namespace
    /// (moved into a container's): the reload would destroy it, and it would come back
    /// unconfigured in the host's namespace, where the agent could not restore it.
    pub elsewhere: Vec<String>,
}

pub fn plan(request: &ReloadRequest, situation: Situation, nics: &[NicFacts]) -> Result<ReloadPlan, String> {
    let Situation { full_mode, busy, builtin, elsewhere } = situation;
    if busy {
        return Err("another reload is under way; wait for its report".to_owned());
    }
    if !full_mode {
        return Err("the agent runs in degraded mode: it cannot tell this reload's removals from a real detach; reload by hand, or fix what `hotplug-agent features` names".to_owned());
    }
    let mut planned = Vec::new();
    let of_driver =
        nics.iter().filter(|n| n.module.as_deref().is_some_and(|m| same_module(m, &request.driver)));
    for nic in of_driver {
        if !nic.managed {
            return Err(format!(
                "{} ({}) is not a NIC the agent manages (yet): it could not restore it",
                nic.name, nic.mac
            ));
        }
        if nic.restore_pending {
            return Err(format!(
                "{} ({}): its last restore still waits for its network manager; try again when it is done",
                nic.name, nic.mac
            ));
        }
        if nic.policy != PolicyKind::Restore {
            return Err(format!(
                "{} ({}) has policy {:?}: the agent would not restore it; change its policy or reload by hand",
                nic.name, nic.mac, nic.policy
            ));
        }
        if !nic.fresh_snapshot {
            return Err(format!(
                "{} ({}): no current snapshot of its configuration (a change is not read yet); try again in a moment",
                nic.name, nic.mac
            ));
        }
        planned.push(PlannedNic {
            mac: nic.mac.clone(),
            name: nic.name.clone(),
            gateways: nic.gateways.clone(),
        });
    }
    if !elsewhere.is_empty() {
        return Err(format!(
            "{} bound to {} has its network interface in another network namespace (a container's?): the reload would destroy it and bring it back unconfigured in this one; move it back first, or reload by hand",
            elsewhere.join(", "),
            request.driver
        ));
    }
    if planned.is_empty() {
        return Err(format!(
            "no NIC uses {}: the agent guides reloads of NIC drivers only (unloading another module could take other devices with it)",
            request.driver
        ));
    }
    // Checked after the NICs: a driver that drives none is refused as such, built in or not.
    if builtin {
        return Err(format!("{} is built into the kernel: it cannot be unloaded", request.driver));
    }
    let mut load = format!("modprobe {}", request.driver);
    for param in &request.params {
        load.push(' ');
        load.push_str(param);
    }
    Ok(ReloadPlan {
        driver: request.driver.clone(),
        params: request.params.clone(),
        nics: planned,
        steps: vec![format!("modprobe -r {}", request.driver), load],
    })
}

/// One NIC's part of the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicReport {
    pub mac: String,
    pub name: String,
    /// From the kernel's removal to its registration again (ms), when both were seen.
    pub down_ms: Option<u64>,
    /// From the registration to the restore's last acknowledgement (ms).
    pub restore_ms: Option<u64>,
    /// `ok`, the read-back's differences and errors, or `not back` / `not restored`.
    pub read_back: String,
    /// Per gateway: `10.0.0.1 reachable`, `… failed`, or `no default gateway`.
    pub reachability: Vec<String>,
}

/// The reload's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub driver: String,
    pub params: Vec<String>,
    /// `planned` (dry run), `ok`, `unreachable` (every NIC back, a gateway not answering),
    /// `rolled-back` (the new load failed or a NIC did not return; the module loaded again
    /// without the new parameters, every NIC back), `failed` (say why in `errors`) or `refused`.
    pub status: String,
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<ReloadPlan>,
    pub nics: Vec<NicReport>,
    /// Each command run, with its outcome.
    pub steps: Vec<String>,
    pub errors: Vec<String>,
    /// From the unload's start to the last NIC restored (ms).
    pub total_ms: u64,
    /// When it ended, wall clock (RFC 3339).
    #[serde(default)]
    pub finished: String,
}

impl ReloadReport {
    /// A refusal, for the client.
    pub fn refused(request: &ReloadRequest, why: String) -> Self {
        Self {
            driver: request.driver.clone(),
            params: request.params.clone(),
            status: "refused".to_owned(),
            dry_run: request.dry_run,
            errors: vec![why],
            ..Self::default()
        }
    }
}

/// Whether a reachability line says the gateway is fine (answered, static, or none to ask).
pub fn gateway_fine(line: &str) -> bool {
    line.ends_with(" reachable") || line.ends_with("(static: not probed)") || line == "no default gateway"
}

/// The status of a finished reload: `ok` when the new load worked and every NIC came back with
/// nothing missing and its gateways answering, `unreachable` when a gateway did not answer,
/// `rolled-back` when the agent loaded the module again without the new parameters and every NIC
/// came back, else `failed`.
pub fn verdict(loaded: bool, rolled_back: bool, nics: &[NicReport]) -> &'static str {
    let all_back = nics.iter().all(|n| n.read_back == "ok");
    let reachable = nics.iter().all(|n| n.reachability.iter().all(|r| gateway_fine(r)));
    match (loaded, rolled_back, all_back, reachable) {
        (true, false, true, true) => "ok",
        (true, false, true, false) => "unreachable",
        (_, true, true, _) => "rolled-back",
        _ => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(module: &str) -> NicFacts {
        NicFacts {
            mac: "52:54:00:12:34:11".into(),
            name: "eth1".into(),
            module: Some(module.into()),
            managed: true,
            restore_pending: false,
            fresh_snapshot: true,
            policy: PolicyKind::Restore,
            gateways: vec![],
        }
    }

    #[test]
    fn words_that_could_be_more_than_one_argument_are_refused() {
        assert!(validate("e1000e", &["InterruptThrottleRate=3000".into()], false).is_ok());
        for driver in ["", "e1000e; reboot", "../x", "a b", &"x".repeat(56), "-C", "-d"] {
            assert!(validate(driver, &[], false).is_err(), "{driver:?}");
        }
        for param in
            ["x", "=1", "a=", "a=1 b=2", "a=\"1\"", "a=\u{1b}", "-a=1", "a b=1", "a=$HOME", "a=%n", "a=1;b"]
        {
            assert!(validate("e1000e", &[param.into()], false).is_err(), "{param:?}");
        }
    }

    #[test]
    fn a_reload_starts_only_when_every_nic_of_the_driver_can_be_restored() -> Result<(), String> {
        let request = validate("e1000e", &["debug=1".into()], false)?;
        let plan = plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[nic("e1000e"), nic("virtio_net")],
        )?;
        assert_eq!(plan.nics.len(), 1);
        assert_eq!(plan.steps, ["modprobe -r e1000e", "modprobe e1000e debug=1"]);
        assert!(super::plan(
            &request,
            Situation { full_mode: false, busy: false, builtin: false, elsewhere: Vec::new() },
            &[]
        )
        .is_err_and(|e| e.contains("degraded")));
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: true, builtin: false, elsewhere: Vec::new() },
            &[]
        )
        .is_err_and(|e| e.contains("under way")));
        let builtin = Situation { full_mode: true, busy: false, builtin: true, elsewhere: Vec::new() };
        assert!(
            super::plan(&request, builtin.clone(), &[]).is_err_and(|e| e.contains("no NIC uses")),
            "a driver that drives no NIC is refused as such first"
        );
        assert!(super::plan(&request, builtin, &[nic("e1000e")])
            .is_err_and(|e| e.contains("built into the kernel")));
        let moved =
            Situation { full_mode: true, elsewhere: vec!["0000:00:05.0".into()], ..Situation::default() };
        assert!(super::plan(&request, moved, &[nic("e1000e")])
            .is_err_and(|e| e.contains("0000:00:05.0") && e.contains("another network namespace")));
        let mut stale = nic("e1000e");
        stale.fresh_snapshot = false;
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[stale]
        )
        .is_err_and(|e| e.contains("snapshot")));
        let mut ignored = nic("e1000e");
        ignored.policy = PolicyKind::Ignore;
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[ignored]
        )
        .is_err_and(|e| e.contains("policy")));
        let mut unmanaged = nic("e1000e");
        unmanaged.managed = false;
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[unmanaged]
        )
        .is_err_and(|e| e.contains("manages")));
        let mut pending = nic("e1000e");
        pending.restore_pending = true;
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[pending]
        )
        .is_err_and(|e| e.contains("waits")));
        // No NIC of the driver: nothing to guide (and maybe a disk's driver).
        assert!(super::plan(
            &request,
            Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
            &[nic("virtio_net")]
        )
        .is_err_and(|e| e.contains("no NIC")));
        // The kernel's names: virtio-net is virtio_net.
        let hyphen = validate("virtio-net", &[], false)?;
        assert_eq!(
            super::plan(
                &hyphen,
                Situation { full_mode: true, busy: false, builtin: false, elsewhere: Vec::new() },
                &[nic("virtio_net")]
            )?
            .nics
            .len(),
            1
        );
        Ok(())
    }

    #[test]
    fn the_verdict_needs_every_nic_back_and_its_gateway_answering() {
        let back = NicReport {
            read_back: "ok".into(),
            reachability: vec!["10.0.1.1 reachable".into()],
            ..NicReport::default()
        };
        let missing = NicReport { read_back: "not back".into(), ..NicReport::default() };
        let silent = NicReport {
            read_back: "ok".into(),
            reachability: vec!["10.0.1.1 failed (no answer on the link to 3 resolutions)".into()],
            ..NicReport::default()
        };
        assert_eq!(verdict(true, false, std::slice::from_ref(&back)), "ok");
        assert_eq!(verdict(false, true, std::slice::from_ref(&back)), "rolled-back");
        assert_eq!(verdict(true, false, &[back.clone(), missing]), "failed");
        assert_eq!(verdict(true, false, &[back, silent]), "unreachable");
    }
}
