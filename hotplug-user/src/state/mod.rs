//! What the agent keeps about each NIC across restarts and upgrades, and the format it is kept in.
//!
//! One file per NIC (`store`), a JSON document with the format's version:
//!
//! ```json
//! { "format": 1, "written_by": "hotplug-agent 0.1.0", "nic": { "mac": "...", "state": {...}, ... } }
//! ```
//!
//! A file without `format` was written by release 0.1.0 (the NIC's fields at the top level); it is
//! read as format 0 and written again in the current format. A file of a newer format than this
//! agent reads (written by a newer agent, then downgraded) is moved aside, never overwritten.
//!
//! Every address, route and rule is kept as the kernel's netlink message. Its one-line summary is
//! a cache: on load it is made again from the message's parsed fields by this agent
//! ([`Nic::refresh_summaries`]), so a release that words summaries differently compares a snapshot
//! held across an upgrade with what it reads from the kernel without false differences.
pub mod store;

use std::{collections::VecDeque, net::IpAddr};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use crate::{
    classify::NicEvent,
    control::{AttachOutcome, RestoreOutcome},
    decide::{coexist::RestorePlan, reload::NicReport, NicRecord, NicState},
    snapshot::{self, NicSnapshot},
};

/// The format this agent writes (and the newest it reads). 2: a snapshot's manager may be
/// `ifupdown`, a pending restore's reason `restored` (format 1 is read as it is).
pub const FORMAT: u64 = 2;
/// Release 0.1.0's files, which carry no `format`.
pub const FORMAT_0_1_0: u64 = 0;

#[derive(Debug, Error)]
pub enum FormatError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a JSON {0}, not an object")]
    NotAnObject(&'static str),
    #[error("format {found} is newer than this agent reads ({FORMAT}): written by a newer hotplug-agent")]
    Newer { found: u64 },
    #[error("`format` is {0}, not a whole number")]
    BadVersion(serde_json::Value),
}

/// One NIC as the agent manages and persists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Nic {
    pub mac: String,
    /// What decisions read and change (`decide::step`).
    #[serde(flatten)]
    pub record: NicRecord,
    /// The boot this state was written in (state from another boot is never restored).
    #[serde(default)]
    pub boot_id: String,
    /// While present: the latest snapshot; after the driver left: the one to restore.
    pub snapshot: Option<NicSnapshot>,
    pub last_event: Option<NicEvent>,
    pub last_restore: Option<RestoreOutcome>,
    #[serde(default)]
    pub attach: Option<AttachOutcome>,
    /// Rules the agent added on attach (the detach path removes exactly these).
    #[serde(default)]
    pub configured_rules: Vec<snapshot::Entry>,
    /// Addresses the agent configured from IMDS (a refresh removes one IMDS no longer lists).
    #[serde(default)]
    pub configured_addresses: Vec<(IpAddr, u8)>,
    /// The snapshot a restore waits to replay (while the NIC's manager configures it first).
    #[serde(default)]
    pub pending_restore: Option<Pending>,
    /// Its part of the last guided reload of its driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<NicReport>,
    /// The latest snapshots read while it is present (memory only).
    #[serde(skip)]
    pub history: VecDeque<NicSnapshot>,
    /// Shortly after a driver reload's restore: what was restored (memory only; see
    /// `decide::coexist::teardown_after_restore`).
    #[serde(skip)]
    pub settling: Option<Settling>,
}

/// A NIC just restored after its driver came back.
#[derive(Clone, Debug)]
pub struct Settling {
    /// CLOCK_MONOTONIC ns until which a loss is taken for a peer's teardown.
    pub until_ns: u64,
    /// When the NIC registered again (a manager's work since then is what is waited for).
    pub registered_ns: u64,
    pub restored: NicSnapshot,
}

impl Nic {
    pub fn new(mac: &str, state: NicState) -> Self {
        Self {
            mac: mac.to_owned(),
            record: NicRecord::new(state),
            boot_id: String::new(),
            snapshot: None,
            last_event: None,
            last_restore: None,
            attach: None,
            configured_rules: Vec::new(),
            configured_addresses: Vec::new(),
            pending_restore: None,
            last_reload: None,
            history: VecDeque::new(),
            settling: None,
        }
    }

    /// Makes every kept object's summary again from its netlink message (see the module's
    /// comment). Returns the objects whose message does not parse: they keep the summary read,
    /// and a restore reports each as an error.
    pub fn refresh_summaries(&mut self) -> Vec<String> {
        let mut unreadable = Vec::new();
        if let Some(snapshot) = &mut self.snapshot {
            unreadable.extend(snapshot.refresh_summaries());
        }
        if let Some(pending) = &mut self.pending_restore {
            unreadable.extend(pending.snapshot.refresh_summaries());
        }
        for rule in &mut self.configured_rules {
            if let Err(error) = rule.refresh_rule_summary() {
                unreadable.push(format!("rule {}: {error}", rule.summary));
            }
        }
        unreadable
    }
}

/// A snapshot waiting to be replayed, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    pub snapshot: NicSnapshot,
    pub reason: PendingReason,
    /// How it is replayed (a restarted agent replays it the same way).
    #[serde(default = "legacy_plan")]
    pub plan: RestorePlan,
}

/// The plan of a pending restore written before plans were recorded.
fn legacy_plan() -> RestorePlan {
    RestorePlan {
        wait_for_udev: true,
        wait_for_manager: true,
        leave_dynamic: true,
        routes_and_rules_only: false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingReason {
    /// The NIC came back after a driver reload.
    Reload,
    /// networkd reconfigured the link and dropped routes and rules it does not own.
    ManagerCycle,
    /// A driver reload's restore is being finished: what it could not put back ahead of a late
    /// manager, or what a peer tore down right after it. The snapshot is the whole restored one:
    /// it stays the NIC's (reads meanwhile are not adopted; a driver leaving again holds it).
    Restored,
}

/// The document written for a NIC.
#[derive(Serialize)]
struct Document<'a, T> {
    format: u64,
    written_by: &'static str,
    nic: &'a T,
}

/// The bytes of a NIC's state file, in the current format.
pub fn encode<T: Serialize>(nic: &T) -> serde_json::Result<Vec<u8>> {
    let written_by = concat!("hotplug-agent ", env!("CARGO_PKG_VERSION"));
    serde_json::to_vec_pretty(&Document { format: FORMAT, written_by, nic })
}

/// A NIC's state read from its file, and the format it was in.
#[derive(Debug)]
pub struct Decoded<T> {
    pub nic: T,
    pub format: u64,
}

/// Reads a state file of any format this agent knows.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Decoded<T>, FormatError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(FormatError::NotAnObject(json_kind(&value)));
    };
    let Some(version) = object.remove("format") else {
        // Release 0.1.0: the NIC's own fields, no envelope.
        let nic = serde_json::from_value(serde_json::Value::Object(object))?;
        return Ok(Decoded { nic, format: FORMAT_0_1_0 });
    };
    let format = version.as_u64().ok_or(FormatError::BadVersion(version))?;
    if format > FORMAT {
        return Err(FormatError::Newer { found: format });
    }
    // Formats 1 and 2 share the envelope (2 only adds enum values).
    let nic =
        object.remove("nic").ok_or_else(|| FormatError::Json(serde::de::Error::missing_field("nic")))?;
    Ok(Decoded { nic: serde_json::from_value(nic)?, format })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests;
