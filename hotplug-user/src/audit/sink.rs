//! The audit trail's writer, a task of its own: the agent's loop hands it entries and goes on.
//! Completing an entry's task from `/proc` (`Actor::read_soon`) can take up to its limit, and a
//! `/proc` read can hang for good (argv memory paged from a FUSE file that never answers): that
//! waits here, never on a kernel event's path. Entries are written in the order given; when
//! more than [`BACKLOG`] wait, the next ones keep the kernel's part of their task only, so that
//! the trail catches up.
use std::path::Path;

use tokio::{sync::mpsc, task::JoinHandle};

use super::{Actor, Entry, Trail};
use crate::classify::Task;

/// Entries waiting beyond which no more `/proc` reads are waited for.
const BACKLOG: usize = 64;

struct Pending {
    entry: Entry,
    /// The task to complete from `/proc`, and the kernel's timestamp of what it did.
    task: Option<(Task, u64)>,
}

/// Hands entries to the writer task.
pub struct Sink {
    tx: Option<mpsc::UnboundedSender<Pending>>,
    writer: Option<JoinHandle<()>>,
}

impl Sink {
    /// Starts the writer of the trail in `dir` (the state directory). Needs a tokio runtime.
    pub fn start(dir: &Path) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(Trail::new(dir), rx));
        Self { tx: Some(tx), writer: Some(writer) }
    }

    /// An entry as it is.
    pub fn record(&self, entry: Entry) {
        self.send(Pending { entry, task: None });
    }

    /// An entry whose task (the kernel's record of it) is completed from `/proc` first.
    pub fn record_by(&self, entry: Entry, task: Option<&Task>, event_ns: u64) {
        self.send(Pending { entry, task: task.map(|t| (t.clone(), event_ns)) });
    }

    fn send(&self, pending: Pending) {
        if let Some(tx) = &self.tx {
            // Fails only once the writer ended (the agent is stopping).
            let _ = tx.send(pending);
        }
    }

    /// Writes what is still waiting and ends the writer (at stop).
    pub async fn flush(&mut self) {
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        }
    }
}

async fn write(mut trail: Trail, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(Pending { mut entry, task }) = rx.recv().await {
        if let Some((task, event_ns)) = task {
            // Past the backlog, or stopping (what waits is written, without more /proc reads).
            entry.task = Some(if rx.len() > BACKLOG || rx.is_closed() {
                Actor::from_kernel(&task)
            } else {
                Actor::read_soon(&task, event_ns).await
            });
        }
        trail.record(&entry);
    }
}
