//! hotplug's agent library.
//!
//! Layout follows the flow: `kernel` (events in: the eBPF programs' loader, decoding, rtnetlink
//! and uevents) → `classify` (why a NIC came or went) → `decide` (per-NIC state machine) →
//! `reconfigure` (netlink restore, attach, detach) with `snapshot` (a NIC's configuration) and
//! `imds` (the metadata service); `managers` knows the host's other network managers, `control`
//! is the control socket's protocol; `state` what is kept about each NIC on disk, in a versioned
//! format; `agent` runs the loop, `config` reads the TOML file.
pub mod agent;
pub mod audit;
pub mod classify;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod decide;
pub mod identity;
pub mod imds;
pub mod kernel;
pub mod managers;
pub mod metrics;
pub mod peer;
pub mod platform;
pub mod reconfigure;
pub mod snapshot;
pub mod state;

/// An error and all its sources, joined with ": " (many library errors keep the cause, such as
/// the OS error, only in their source).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
