//! Unloading and loading a kernel module for a guided reload: `modprobe`, never through a shell
//! or found through PATH, with a deadline.
//!
//! An agent that may load modules itself (root outside a sandbox) runs modprobe directly. The
//! packaged service may not (no `CAP_SYS_MODULE`, `ProtectKernelModules=yes`), and is not
//! given the right: it asks systemd for a transient unit that runs modprobe outside its sandbox
//! (`systemd-run --wait --pipe`, over the D-Bus system bus), so the agent's own process never
//! holds the power to load code into the kernel, and each module command shows in the journal as
//! a unit of its own. (That a root process with D-Bus access can ask systemd to run commands
//! outside its sandbox is systemd's design, true of any root service; the sandbox bounds what
//! the agent's process does by itself.)
use std::{path::Path, process::Stdio, time::Duration};

use crate::decide::recovery::{ModuleState, RunningCommand};

/// Where distributions put modprobe (kmod's, or busybox's).
const MODPROBE: [&str; 4] = ["/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe", "/bin/modprobe"];
const SYSTEMD_RUN: [&str; 2] = ["/usr/bin/systemd-run", "/bin/systemd-run"];
const SYSTEMCTL: [&str; 2] = ["/usr/bin/systemctl", "/bin/systemctl"];
const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// A modprobe that has not finished by then is given up on (a driver's remove or probe can hang).
pub const MODPROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// How the agent can run modprobe, if at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// This process has `CAP_SYS_MODULE`: modprobe as its child.
    Direct(&'static str),
    /// Under systemd without it: modprobe in a transient unit (`systemd-run`, then modprobe).
    TransientUnit(&'static str, &'static str),
}

fn first(paths: &[&'static str]) -> Option<&'static str> {
    paths.iter().copied().find(|p| Path::new(p).exists())
}

/// How modprobe can be run here, or why it cannot.
pub fn runner() -> Result<Runner, String> {
    let modprobe =
        first(&MODPROBE).ok_or_else(|| format!("no modprobe in {}: install kmod", MODPROBE.join(", ")))?;
    if may_manage_modules() {
        return Ok(Runner::Direct(modprobe));
    }
    // INVOCATION_ID: systemd started this process as (part of) a unit; systemd-run --wait
    // reaches it over the system bus.
    match (std::env::var_os("INVOCATION_ID"), first(&SYSTEMD_RUN)) {
        (Some(_), Some(_)) if !Path::new(SYSTEM_BUS).exists() => Err(format!(
            "this agent may not load modules (no CAP_SYS_MODULE), and systemd cannot run modprobe for it without the D-Bus system bus ({SYSTEM_BUS} is missing)"
        )),
        (Some(_), Some(systemd_run)) => Ok(Runner::TransientUnit(systemd_run, modprobe)),
        _ => Err("this agent may not load modules (no CAP_SYS_MODULE) and does not run under systemd, which could run modprobe for it; run it as root".to_owned()),
    }
}

/// Whether this process may load and unload modules: `CAP_SYS_MODULE` (bit 16) in its effective
/// set.
fn may_manage_modules() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 16) != 0)
}

/// Whether the module is loaded now (`/sys/module/NAME/initstate`; a built-in one has none).
pub fn loaded(module: &str) -> bool {
    Path::new("/sys/module").join(module.replace('-', "_")).join("initstate").exists()
}

/// The module's state now (`/sys/module/NAME` and its `initstate`: live, coming or going).
pub fn state(module: &str) -> ModuleState {
    let dir = Path::new("/sys/module").join(module.replace('-', "_"));
    let initstate = std::fs::read_to_string(dir.join("initstate")).ok();
    ModuleState::read(dir.exists(), initstate.as_deref())
}

/// The devices bound to `module`'s drivers whose network interface this process cannot see: a
/// device with a `net/` directory that is empty here had its interface moved into another
/// network namespace (sysfs shows a network interface only in its own namespace). A device
/// without `net/` drives no interface and is not counted.
pub fn devices_elsewhere(module: &str) -> Vec<String> {
    let drivers = Path::new("/sys/module").join(module.replace('-', "_")).join("drivers");
    let mut elsewhere = Vec::new();
    for driver in std::fs::read_dir(&drivers).into_iter().flatten().flatten() {
        for device in std::fs::read_dir(driver.path()).into_iter().flatten().flatten() {
            // The driver's directory holds its devices as symbolic links, beside its attributes.
            let is_link = device.file_type().is_ok_and(|t| t.is_symlink());
            let net = device.path().join("net");
            if is_link && net.is_dir() && std::fs::read_dir(&net).is_ok_and(|mut d| d.next().is_none()) {
                elsewhere.push(device.file_name().to_string_lossy().into_owned());
            }
        }
    }
    elsewhere.sort();
    elsewhere
}

/// The transient unit a module command for `driver` runs in: named, so that an agent started
/// after this one was killed can find it and wait for it. One at a time per driver (a reload's
/// commands run in turn, and a recovery waits for a left-over one before running its own).
pub fn unit_name(driver: &str) -> String {
    // A module name is letters, digits, '_' and '-' (`decide::reload::validate`): a unit name's
    // characters already.
    format!("hotplug-modprobe-{driver}.service")
}

/// Whether a unit is still running or on its way in or out (`ActiveState` active, activating,
/// deactivating, reloading or refreshing; not inactive, failed, or unknown).
pub async fn unit_running(unit: &str) -> bool {
    let Some(systemctl) = first(&SYSTEMCTL) else { return false };
    let output = tokio::process::Command::new(systemctl)
        .args(["show", "--property=ActiveState", "--value", unit])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), output).await {
        Ok(Ok(output)) => matches!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "active" | "activating" | "deactivating" | "reloading" | "refreshing"
        ),
        _ => false,
    }
}

/// A process's start time (clock ticks since boot: /proc/PID/stat's 22nd field), which tells it
/// from a later process given the same pid.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (2nd field) is in parentheses and may hold spaces and parentheses: the
    // fields after it are counted from its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What `run` says of a module command once it started.
pub fn describe(runner: Runner, driver: &str, args: &[String], pid: Option<u32>) -> RunningCommand {
    let command = format!("modprobe {}", args.join(" "));
    match runner {
        Runner::Direct(_) => {
            RunningCommand { command, unit: None, pid, start_ticks: pid.and_then(start_ticks) }
        }
        Runner::TransientUnit(..) => {
            RunningCommand { command, unit: Some(unit_name(driver)), pid: None, start_ticks: None }
        }
    }
}

/// Whether the driver is built into the kernel (`/sys/module/NAME` without `initstate`): it
/// cannot be unloaded.
pub fn builtin(module: &str) -> bool {
    let dir = Path::new("/sys/module").join(module.replace('-', "_"));
    dir.exists() && !dir.join("initstate").exists()
}

/// Runs `modprobe ARGS` for `driver` the way `runner` says; `Ok` with what it printed, `Err`
/// with its exit status and message. `started` is told what runs (its unit, or its pid) as soon
/// as it does.
pub async fn run(
    runner: Runner,
    driver: &str,
    args: &[String],
    started: impl FnOnce(RunningCommand),
) -> Result<String, String> {
    let (program, line, mut command) = match runner {
        Runner::Direct(modprobe) => {
            let mut command = tokio::process::Command::new(modprobe);
            command.args(args);
            (modprobe, format!("{modprobe} {}", args.join(" ")), command)
        }
        Runner::TransientUnit(systemd_run, modprobe) => {
            let mut command = tokio::process::Command::new(systemd_run);
            // --wait: its exit status is modprobe's; --pipe: modprobe's messages come back here;
            // --collect: the unit goes away even when modprobe failed; killed at the deadline
            // (SIGKILL 5 s after SIGTERM); no environment expansion by systemd (v254+; the
            // parameters' characters are checked so that older ones expand nothing either).
            command
                .args(["--quiet", "--wait", "--pipe", "--collect", "--service-type=exec"])
                .arg(format!("--unit={}", unit_name(driver)))
                .arg("--description=hotplug-agent reload: modprobe")
                .arg(format!("--property=RuntimeMaxSec={}", MODPROBE_TIMEOUT.as_secs()))
                .arg("--property=TimeoutStopSec=5")
                .arg(modprobe)
                .args(args);
            (systemd_run, format!("{modprobe} {} (in a transient unit)", args.join(" ")), command)
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // A modprobe (or systemd-run) given up on is killed, not left running beside the next.
        .kill_on_drop(true);
    let child = command.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    started(describe(runner, driver, args, child.id()));
    // A little longer than the unit's own limit, so that its verdict comes first.
    match tokio::time::timeout(MODPROBE_TIMEOUT + Duration::from_secs(5), child.wait_with_output()).await {
        Err(_) => Err(format!("{line}: no answer after {} s", MODPROBE_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(format!("{line}: {e}")),
        Ok(Ok(output)) => {
            let said = crate::classify::sanitize(
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )
                .trim(),
            );
            if output.status.success() {
                Ok(said)
            } else {
                Err(format!(
                    "{line}: {}{}",
                    output.status,
                    if said.is_empty() { String::new() } else { format!(": {said}") }
                ))
            }
        }
    }
}
