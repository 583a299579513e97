//! The kernel event source: reads the ring buffer as tokio wakes it and hands decoded events to
//! the agent over a channel. Lost records are never silent: after each batch every kernel-side
//! counter is read; a rise of one that means lost or incomplete records is reported as an event
//! and followed by a resynchronisation from an rtnetlink dump. Records the programs filter on
//! purpose (refused unprivileged calls, other namespaces) are counted and summarised now and then.
use std::time::{Duration, Instant};

use hotplug_common::Counter;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{
    decode::{self, CounterRise},
    probes::KernelProbes,
    rtnl, KernelEvent,
};

/// How often the filtered counts are summarised in the log, at most.
const FILTER_SUMMARY: Duration = Duration::from_secs(60);
/// How often the counters are read when no record wakes the reader (a loss that left no record
/// behind still gets its resync).
const COUNTER_POLL: Duration = Duration::from_secs(2);

/// Forwards every record on the ring buffer to `tx` until `tx` closes. Records that do not decode
/// are logged, never silently dropped. `nic_events` false: NIC records are dropped here (degraded
/// mode's classifier reports NIC changes instead, the kernel's causes being incomplete).
pub async fn forward(
    probes: KernelProbes,
    tx: mpsc::Sender<KernelEvent>,
    nic_events: bool,
) -> std::io::Result<()> {
    let (ring, probes) = probes.split();
    // SAFETY: the RingBuf owns its map's file descriptor, keeps it open until it is dropped, and
    // always returns that same descriptor; the AsyncFd owns the RingBuf, so it drops first.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut seen = [0u64; Counter::ALL.len()];
    let mut summarised = Instant::now();
    let mut filtered_since = [0u64; Counter::ALL.len()];
    let mut poll = tokio::time::interval(COUNTER_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                while let Some(record) = guard.get_inner_mut().next() {
                    match decode::decode(&record) {
                        Ok(KernelEvent::Nic(_)) if !nic_events => {}
                        Ok(event) => {
                            if tx.send(event).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(error) => tracing::warn!(%error, "undecodable record from the kernel"),
                    }
                }
                guard.clear_ready();
            }
            _ = poll.tick() => {}
        }
        let mut losses = Vec::new();
        for counter in Counter::ALL {
            let now = probes.counter(counter);
            let slot = counter as usize;
            let rise = now.saturating_sub(seen[slot]);
            seen[slot] = now;
            if rise == 0 {
                continue;
            }
            if counter.is_loss() {
                losses.push((counter, rise));
            } else {
                filtered_since[slot] += rise;
            }
        }
        if summarised.elapsed() >= FILTER_SUMMARY && filtered_since.iter().any(|&n| n > 0) {
            let parts: Vec<String> = Counter::ALL
                .iter()
                .filter(|c| filtered_since[**c as usize] > 0)
                .map(|c| format!("{} {}", filtered_since[*c as usize], c.name()))
                .collect();
            tracing::info!("kernel-side filters dropped, in the last minute or so: {}", parts.join(", "));
            filtered_since = [0; Counter::ALL.len()];
            summarised = Instant::now();
        }
        if losses.is_empty() {
            continue;
        }
        for (counter, rise) in &losses {
            tracing::warn!(
                counter = counter.name(),
                rise,
                "kernel events lost or incomplete: resynchronising"
            );
        }
        let events =
            losses.iter().filter(|(c, _)| *c == Counter::RingReserveFailed).map(|(_, rise)| *rise).sum();
        let counters =
            losses.iter().map(|(c, rise)| CounterRise { counter: c.name(), rise: *rise }).collect();
        if tx.send(KernelEvent::Lost { events, counters }).await.is_err() {
            return Ok(());
        }
        match rtnl::dump_links().await {
            Ok(links) => {
                if tx.send(KernelEvent::Resync { links }).await.is_err() {
                    return Ok(());
                }
            }
            Err(error) => tracing::error!(%error, "cannot resynchronise from rtnetlink"),
        }
    }
}
