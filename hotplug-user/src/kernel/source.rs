//! The kernel event source: reads the ring buffer as tokio wakes it and hands decoded events to
//! the agent over a channel.
use hotplug_common::Counter;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{decode, probes::KernelProbes, KernelEvent};

/// Forwards every record on the ring buffer to `tx` until `tx` closes. Records that do not decode
/// are logged and counted, never silently dropped.
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
            tracing::warn!(lost = lost - lost_seen, "kernel events lost: the ring buffer was full");
            lost_seen = lost;
        }
    }
}
