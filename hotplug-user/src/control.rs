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
    #[error("the agent on {path} did not answer within {seconds} s; what it was asked goes on without this client (`hotplug-agent status --detail`, `hotplug-agent history`)")]
    Timeout { path: String, seconds: u64 },
    #[error(
        "the process answering on {path} is not the agent ({why}): the socket's path was taken over? nothing was sent to it"
    )]
    NotTheAgent { path: String, why: String },
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
        /// The NIC's ifindex as sysfs shows it now: what a rename does not change (cloud-init
        /// 26.x's hook is handed the kernel's first name, `eth0`, of a NIC udev renamed since).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ifindex: Option<u32>,
    },
    /// Ask IMDS again for an attached ENI and bring its configuration in line.
    Refresh { iface: String },
    /// Unload and load a driver (with new parameters), restoring and checking its NICs.
    Reload {
        driver: String,
        #[serde(default)]
        params: Vec<String>,
        #[serde(default)]
        dry_run: bool,
    },
}

/// Reads one request line as the agent does: an empty line asks for the status.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Request::Status);
    }
    serde_json::from_str::<Request>(line).map_err(|e| format!("bad request: {e}"))
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
    /// Where the time went (absent in a state file written before phases were measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<crate::reconfigure::restore::RestorePhases>,
}

/// Where an attach stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachStatus {
    /// IMDS was asked and has not answered yet.
    WaitingForImds,
    /// Configured from IMDS's answer.
    Configured,
    /// IMDS did not answer in time, or the configuration failed (see `errors`).
    Failed,
    /// The NIC left or registered again before IMDS answered.
    Abandoned,
    /// cloud-init's hotplug hook configures it.
    LeftToCloudInit,
    /// IMDS is off (disabled, unusable, or not EC2): nobody configures it.
    ImdsOff,
    /// A status this release does not know (written by a newer one).
    #[serde(other)]
    Unknown,
}

impl AttachStatus {
    /// As `status` shows it, the audit trail and the metrics' label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForImds => "waiting-for-imds",
            Self::Configured => "configured",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
            Self::LeftToCloudInit => "left-to-cloud-init",
            Self::ImdsOff => "imds-off",
            Self::Unknown => "unknown",
        }
    }

    /// Configured (or tried) from IMDS by the agent: what a refresh may bring in line.
    pub const fn from_imds(self) -> bool {
        matches!(self, Self::Configured | Self::Failed)
    }
}

impl std::fmt::Display for AttachStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an attach stands, and what it cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachOutcome {
    pub status: AttachStatus,
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
    /// Its interface name now (while present), else the last one known. (`name` is the
    /// present state's own field.)
    #[serde(default, rename = "interface", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub state: NicState,
    /// The network manager that configures it besides hotplug-agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    pub snapshot: Option<String>,
    pub last_event: Option<String>,
    /// How long ago the last event happened (by the kernel's clock), when the status was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_age_ms: Option<u64>,
    pub last_restore: Option<RestoreOutcome>,
    /// Its part of the last guided reload of its driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<crate::decide::reload::NicReport>,
    #[serde(default)]
    pub attach: Option<AttachOutcome>,
}

/// A short age: `850 ms`, `12 s`, `7 min`, `3 h`, `2 d`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=119_999 => format!("{} s", ms / 1_000),
        120_000..=7_199_999 => format!("{} min", ms / 60_000),
        7_200_000..=172_799_999 => format!("{} h", ms / 3_600_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

/// One row of `status`'s table: NIC, MAC, state, last event, last restore, attach.
pub fn table_row(nic: &NicStatus) -> [String; 6] {
    let state = serde_json::to_value(&nic.state).unwrap_or_default();
    let state_name = state["state"].as_str().unwrap_or("?");
    let state = match state["cause"].as_str() {
        Some(cause) => format!("{state_name} ({cause})"),
        None => state_name.to_owned(),
    };
    let event = nic.last_event.as_deref().map_or_else(
        || "-".to_owned(),
        |e| {
            let words: Vec<&str> = e.split_whitespace().take(2).collect();
            let ago = nic.last_event_age_ms.map(|a| format!(", {} ago", age(a))).unwrap_or_default();
            format!("{}{ago}", words.join(" "))
        },
    );
    let restore = nic.last_restore.as_ref().map_or_else(
        || "-".to_owned(),
        |r| {
            let verdict = if !r.errors.is_empty() {
                format!("{} errors", r.errors.len())
            } else if !r.differences.is_empty() {
                format!("{} differences", r.differences.len())
            } else {
                "ok".to_owned()
            };
            format!("{verdict}, {} ms", r.latency_us / 1_000)
        },
    );
    let attach = nic.attach.as_ref().map_or_else(
        || "-".to_owned(),
        |a| format!("{}{}", a.status, a.table.map(|t| format!(", table {t}")).unwrap_or_default()),
    );
    let name = nic.name.clone().unwrap_or_else(|| "-".to_owned());
    [name, nic.mac.clone(), state, event, restore, attach]
}

/// The rows laid out in columns under a header.
pub fn table(rows: &[[String; 6]]) -> String {
    let header = ["NIC", "MAC", "STATE", "LAST EVENT", "LAST RESTORE", "ATTACH"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> =
            row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One NIC's part of a reload report, in a line.
fn describe_nic_reload(nic: &crate::decide::reload::NicReport) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    format!(
        "down {}, restore {}, read-back {}, gateway: {}",
        ms(nic.down_ms),
        ms(nic.restore_ms),
        nic.read_back,
        if nic.reachability.is_empty() { "-".to_owned() } else { nic.reachability.join(", ") }
    )
}

/// `hotplug-agent reload DRIVER`: asks the running agent to carry out the reload and prints its
/// report (or its plan, or why it refused). True when the reload went as asked.
pub fn print_reload(
    socket: &Path,
    driver: &str,
    params: &[String],
    dry_run: bool,
    json: bool,
) -> Result<bool, ControlError> {
    let request = Request::Reload { driver: driver.to_owned(), params: params.to_vec(), dry_run };
    // Four module commands at most (65 s each), the NICs' return twice (60 s each), and each
    // gateway's probe (15 s for the carrier, three 5 s resolutions): well under 15 minutes.
    let body = ask(socket, &request, Duration::from_secs(900))?;
    if let Ok(serde_json::Value::Object(answer)) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
            eprintln!("hotplug-agent: the agent refused the reload: {error}");
            return Ok(false);
        }
    }
    let report: crate::decide::reload::ReloadReport = serde_json::from_slice(&body)?;
    let mut out = std::io::stdout().lock();
    let ok = report.status == "ok" || report.status == "planned";
    if json {
        let _ = out.write_all(&body);
        let _ = writeln!(out);
        return Ok(ok);
    }
    let params =
        if report.params.is_empty() { String::new() } else { format!(" {}", report.params.join(" ")) };
    let _ = writeln!(out, "reload {}{params}: {}", report.driver, report.status);
    if let Some(plan) = &report.plan {
        for step in &plan.steps {
            let _ = writeln!(out, "  would run: {step}");
        }
        for nic in &plan.nics {
            let gateways: Vec<String> = nic.gateways.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "  NIC {} ({}): restored from its snapshot, then gateway {}",
                nic.name,
                nic.mac,
                if gateways.is_empty() { "-".to_owned() } else { gateways.join(", ") }
            );
        }
    }
    for step in &report.steps {
        let _ = writeln!(out, "  ran: {step}");
    }
    for nic in &report.nics {
        let _ = writeln!(out, "  NIC {} ({}): {}", nic.name, nic.mac, describe_nic_reload(nic));
    }
    for error in &report.errors {
        let _ = writeln!(out, "  error: {error}");
    }
    if !report.dry_run && report.status != "refused" {
        let _ = writeln!(out, "  total {} ms", report.total_ms);
    }
    Ok(ok)
}

/// Sends `request` and returns the agent's answer.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Vec<u8>, ControlError> {
    let path = socket.display().to_string();
    let no_agent = |source| ControlError::NoAgent { path: path.clone(), source };
    let mut stream = UnixStream::connect(socket).map_err(no_agent)?;
    // The agent runs as root with CAP_NET_ADMIN in this user namespace (or, tried out, as this
    // very user): anyone else who holds the path (a uid-0 process without capabilities can take
    // it) gets no request, and its answers are not believed.
    check_server(&stream).map_err(|why| ControlError::NotTheAgent { path: path.clone(), why })?;
    stream.set_read_timeout(Some(timeout)).map_err(no_agent)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_agent)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(no_agent)?;
    let mut body = Vec::new();
    match stream.read_to_end(&mut body) {
        Ok(_) => Ok(body),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(ControlError::Timeout { path: path.clone(), seconds: timeout.as_secs() })
        }
        Err(e) => Err(no_agent(e)),
    }
}

/// Whether the process answering on `stream` may be the agent: this user's own process, or one
/// with `CAP_NET_ADMIN` in this user namespace.
pub fn check_server(stream: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let server = crate::peer::of(stream)?;
    if me != 0 && server.uid == me {
        return Ok(());
    }
    if server.uid != 0 {
        return Err(format!("it runs as uid {}", server.uid));
    }
    crate::peer::allowed(&server, crate::peer::Needs::NetAdmin)
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

/// `hotplug-agent status`: asks the running agent and prints its answer: a table, one block per
/// NIC with everything (`detail`), or the JSON.
pub fn print_status(socket: &Path, json: bool, detail: bool) -> Result<(), ControlError> {
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
    if !detail {
        let rows: Vec<[String; 6]> = status.iter().map(table_row).collect();
        let _ = out.write_all(table(&rows).as_bytes());
        return Ok(());
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
            if let Some(phases) = &restore.phases {
                let _ = writeln!(out, "      phases: {phases}");
            }
        }
        if let Some(reload) = &nic.last_reload {
            let _ = writeln!(out, "    last reload: {}", describe_nic_reload(reload));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Cause;

    fn nic(mac: &str, state: NicState) -> NicStatus {
        NicStatus {
            mac: mac.into(),
            name: None,
            state,
            manager: None,
            snapshot: None,
            last_event: None,
            last_event_age_ms: None,
            last_restore: None,
            attach: None,
            last_reload: None,
        }
    }

    #[test]
    fn a_restore_outcome_keeps_its_phases_and_reads_one_without_them() -> Result<(), serde_json::Error> {
        let phases = crate::reconfigure::restore::RestorePhases {
            to_decision_us: 900,
            link_us: 30_000,
            addresses_us: 400,
            ..Default::default()
        };
        let outcome = RestoreOutcome {
            latency_us: 32_000,
            requests: 3,
            errors: vec![],
            differences: vec![],
            left_to_manager: vec![],
            waited_for_manager_ms: None,
            phases: Some(phases),
        };
        let json = serde_json::to_value(&outcome)?;
        assert_eq!(json["phases"]["link_us"], 30_000);
        assert_eq!(json["phases"]["to_decision_us"], 900);
        let back: RestoreOutcome = serde_json::from_value(json)?;
        assert_eq!(back.phases, Some(phases));
        // A state file from before phases were measured.
        let old: RestoreOutcome =
            serde_json::from_str(r#"{"latency_us":1,"requests":1,"errors":[],"differences":[]}"#)?;
        assert_eq!(old.phases, None);
        assert!(phases
            .to_string()
            .starts_with("to-decision 900 us, waited 0 us, pre-read 0 us, link 30000 us"));
        Ok(())
    }

    #[test]
    fn the_status_table_has_a_row_per_nic_in_aligned_columns() {
        let mut present = nic("52:54:00:12:34:10", NicState::Present { ifindex: 2, name: "eth0".into() });
        present.name = Some("eth0".into());
        present.last_event = Some("registration driver-load (kernel) ifindex 2".into());
        present.last_event_age_ms = Some(12_345);
        present.last_restore = Some(RestoreOutcome {
            latency_us: 71_500,
            requests: 4,
            errors: vec![],
            differences: vec!["route x".into()],
            left_to_manager: vec![],
            waited_for_manager_ms: None,
            phases: None,
        });
        present.attach = Some(AttachOutcome {
            status: AttachStatus::Configured,
            latency_ms: Some(200),
            imds_requests: 11,
            table: Some(10_001),
            errors: vec![],
        });
        let gone = nic(
            "52:54:00:12:34:11",
            NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 },
        );
        let rows = [table_row(&present), table_row(&gone)];
        assert_eq!(
            rows[0],
            [
                "eth0",
                "52:54:00:12:34:10",
                "present",
                "registration driver-load, 12 s ago",
                "1 differences, 71 ms",
                "configured, table 10001"
            ]
            .map(str::to_owned)
        );
        assert_eq!(rows[1][2], "driver-gone (driver-unload)");
        assert_eq!(rows[1][3], "-");
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NIC   MAC"), "{text}");
        // Every column starts at the same offset on every line.
        let column = |line: &str, needle: &str| line.find(needle);
        assert_eq!(column(lines[0], "STATE"), column(lines[1], "present"), "{text}");
        assert_eq!(column(lines[0], "STATE"), column(lines[2], "driver-gone"), "{text}");
        assert_eq!(column(lines[0], "ATTACH"), column(lines[1], "configured"), "{text}");
    }

    #[test]
    fn the_json_has_no_duplicate_keys_and_reads_back() -> Result<(), serde_json::Error> {
        let mut present = nic("52:54:00:12:34:10", NicState::Present { ifindex: 2, name: "eth0".into() });
        present.name = Some("eth0".into());
        let text = serde_json::to_string(&[present])?;
        let back: Vec<NicStatus> = serde_json::from_str(&text)?;
        assert_eq!(back[0].name.as_deref(), Some("eth0"), "{text}");
        Ok(())
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_000), "12 s");
        assert_eq!(age(7 * 60_000), "7 min");
        assert_eq!(age(3 * 3_600_000), "3 h");
        assert_eq!(age(2 * 86_400_000), "2 d");
    }
}
