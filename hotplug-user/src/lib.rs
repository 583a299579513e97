//! hotplug's agent library.
//!
//! Layout follows the flow: `kernel` (events in: eBPF programs, their loader, decoding) →
//! `agent` (the loop that moves events to decisions). Later stages — classification, per-NIC
//! decisions, netlink reconfiguration and IMDS — get modules of their own beside these.
pub mod agent;
pub mod classify;
pub mod cli;
pub mod config;
pub mod decide;
pub mod imds;
pub mod kernel;
pub mod reconfigure;
pub mod snapshot;
