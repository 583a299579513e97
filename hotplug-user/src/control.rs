//! The control socket's protocol and its clients. The socket is root-only (0600, in a 0700
//! directory); a client writes one request, a JSON object on one line, and reads one JSON
//! document back. A client that writes nothing gets the status (what `hotplug-agent status`
//! asks). The agent's side is `agent/control.rs`.
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::decide::{
    gate::{GateAnswer, UeventAction},
    NicState,
};

/// The longest request the agent reads.
pub const MAX_REQUEST_BYTES: u64 = 4096;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(
        "no agent answers on {path} ({source}): is `hotplug-agent run` running (systemctl status hotplug-agent), with the same --config?"
    )]
    NoAgent { path: String, source: std::io::Error },
    #[error("the agent's answer is not valid JSON: {0}")]
    Answer(#[from] serde_json::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Each NIC's state, snapshot summary, last event, restore and attach.
    Status,
    /// cloud-init's hotplug hook asks whether a NIC uevent is its to handle.
    CloudInitGate {
        action: UeventAction,
        /// The uevent's DEVPATH (`/devices/.../net/NAME`).
        devpath: String,
        /// The NIC's MAC as sysfs shows it now (an `add`'s device is there to read).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// Ask IMDS again for an attached ENI and bring its configuration in line.
    Refresh { iface: String },
}

/// What a refresh did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshOutcome {
    pub iface: String,
    pub mac: String,
    /// `refreshed` (something changed), `unchanged`, `partial` (some changes made, some failed:
    /// see `errors`) or `failed` (nothing changed).
    pub status: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// IMDS requests this refresh made (token requests included).
    pub imds_requests: u64,
    pub errors: Vec<String>,
}

/// The outcome of the last restore of a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// From the kernel's registration timestamp to the last netlink acknowledgement.
    pub latency_us: u64,
    pub requests: u32,
    pub errors: Vec<String>,
    pub differences: Vec<String>,
    /// What the restore left to the NIC's network manager (a DHCP lease's address, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_to_manager: Vec<String>,
    /// How long the restore waited for the NIC's network manager to configure it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_for_manager_ms: Option<u64>,
}

/// Where an attach stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachOutcome {
    /// `waiting-for-imds`, `configured`, `failed`, `abandoned`, `left-to-cloud-init` or `imds-off`.
    pub status: String,
    /// From the kernel's device-added timestamp to the end of the configuration.
    pub latency_ms: Option<u64>,
    /// IMDS requests this attach made (token requests included).
    pub imds_requests: u64,
    pub table: Option<u32>,
    pub errors: Vec<String>,
}

/// What `hotplug-agent status` shows for a NIC.
#[derive(Debug, Serialize, Deserialize)]
pub struct NicStatus {
    pub mac: String,
    #[serde(flatten)]
    pub state: NicState,
    /// The network manager that configures it besides hotplug-agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    pub snapshot: Option<String>,
    pub last_event: Option<String>,
    pub last_restore: Option<RestoreOutcome>,
    #[serde(default)]
    pub attach: Option<AttachOutcome>,
}

/// Sends `request` and returns the agent's answer.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Vec<u8>, ControlError> {
    let path = socket.display().to_string();
    let no_agent = |source| ControlError::NoAgent { path: path.clone(), source };
    let mut stream = UnixStream::connect(socket).map_err(no_agent)?;
    stream.set_read_timeout(Some(timeout)).map_err(no_agent)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_agent)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(no_agent)?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).map_err(no_agent)?;
    Ok(body)
}

/// Asks the agent whether cloud-init should handle a uevent.
pub fn ask_gate(socket: &Path, request: &Request, timeout: Duration) -> Result<GateAnswer, ControlError> {
    Ok(serde_json::from_slice(&ask(socket, request, timeout)?)?)
}

/// `hotplug-agent refresh IFACE`: asks the running agent to refresh the NIC and prints what
/// changed; an error (nothing changed) when it failed.
pub fn print_refresh(socket: &Path, iface: &str, json: bool) -> Result<bool, ControlError> {
    // One IMDS look-up, within the client's request budget: well under a minute.
    let body = ask(socket, &Request::Refresh { iface: iface.to_owned() }, Duration::from_secs(60))?;
    if let Ok(serde_json::Value::Object(answer)) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
            // An agent that does not know the request (an older one), or refused it as malformed.
            eprintln!("hotplug-agent: the agent refused the refresh: {error}");
            return Ok(false);
        }
    }
    let outcome: RefreshOutcome = serde_json::from_slice(&body)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = out.write_all(&body);
        let _ = writeln!(out);
        return Ok(outcome.status == "refreshed" || outcome.status == "unchanged");
    }
    let _ = writeln!(
        out,
        "{} ({}): {}, {} IMDS requests",
        outcome.iface, outcome.mac, outcome.status, outcome.imds_requests
    );
    for added in &outcome.added {
        let _ = writeln!(out, "  + {added}");
    }
    for removed in &outcome.removed {
        let _ = writeln!(out, "  - {removed}");
    }
    for error in &outcome.errors {
        let _ = writeln!(out, "  error: {error}");
    }
    Ok(outcome.status == "refreshed" || outcome.status == "unchanged")
}

/// `hotplug-agent status`: asks the running agent and prints its answer.
pub fn print_status(socket: &Path, json: bool) -> Result<(), ControlError> {
    let body = ask(socket, &Request::Status, Duration::from_secs(10))?;
    let status: Vec<NicStatus> = serde_json::from_slice(&body)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = out.write_all(&body);
        let _ = writeln!(out);
        return Ok(());
    }
    let managers = crate::managers::Host::default().detect();
    if managers.any() || managers.cloud_init_hotplug.is_some() {
        let names = managers.names().join(", ");
        let _ = writeln!(out, "other network managers: {names}");
    }
    for nic in status {
        let state = serde_json::to_value(&nic.state).ok();
        let state_name = state.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("?").to_owned();
        let manager = nic.manager.as_deref().map(|m| format!("  (with {m})")).unwrap_or_default();
        let _ = writeln!(out, "{}  {state_name}{manager}", nic.mac);
        if let Some(snapshot) = &nic.snapshot {
            let _ = writeln!(out, "    config: {snapshot}");
        }
        if let Some(event) = &nic.last_event {
            let _ = writeln!(out, "    last event: {event}");
        }
        if let Some(attach) = &nic.attach {
            let _ = writeln!(
                out,
                "    attach: {}, {} IMDS requests{}{}",
                attach.status,
                attach.imds_requests,
                attach.latency_ms.map(|l| format!(", {l} ms")).unwrap_or_default(),
                attach.table.map(|t| format!(", table {t}")).unwrap_or_default()
            );
            for error in &attach.errors {
                let _ = writeln!(out, "      error: {error}");
            }
        }
        if let Some(restore) = &nic.last_restore {
            let _ = writeln!(
                out,
                "    last restore: {} us, {} requests, {} errors, {} differences{}",
                restore.latency_us,
                restore.requests,
                restore.errors.len(),
                restore.differences.len(),
                restore
                    .waited_for_manager_ms
                    .map(|w| format!(", waited {w} ms for its manager"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
