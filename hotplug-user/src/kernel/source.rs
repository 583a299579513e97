//! The kernel event source: reads the ring buffer as tokio wakes it and hands decoded events to
//! the agent over a channel. Lost records are never silent: the loss is reported as an event and
//! followed by a resynchronisation from an rtnetlink dump.
use hotplug_common::Counter;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{decode, probes::KernelProbes, rtnl, KernelEvent};

/// Forwards every record on the ring buffer to `tx` until `tx` closes. Records that do not decode
/// are logged, never silently dropped.
pub async fn forward(probes: KernelProbes, tx: mpsc::Sender<KernelEvent>) -> std::io::Result<()> {
    let (ring, probes) = probes.split();
    // SAFETY: the RingBuf owns its map's file descriptor, keeps it open until it is dropped, and
    // always returns that same descriptor; the AsyncFd owns the RingBuf, so it drops first.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut lost_seen = 0;
    loop {
        let mut guard = ring.readable_mut().await?;
        while let Some(record) = guard.get_inner_mut().next() {
            match decode::decode(&record) {
                Ok(event) => {
                    if tx.send(event).await.is_err() {
                        return Ok(());
                    }
                }
                Err(error) => tracing::warn!(%error, "undecodable record from the kernel"),
            }
        }
        guard.clear_ready();
        let lost = probes.counter(Counter::RingReserveFailed);
        if lost > lost_seen {
            tracing::warn!(lost = lost - lost_seen, "kernel events lost (ring buffer full): resynchronising");
            let events = lost - lost_seen;
            lost_seen = lost;
            if tx.send(KernelEvent::Lost { events }).await.is_err() {
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
}
