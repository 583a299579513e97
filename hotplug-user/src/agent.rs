//! The running agent: probes the kernel, attaches what it can, says which mode it runs in, and
//! moves kernel events to their consumers until it is told to stop.
use std::io::Write as _;

use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::kernel::{self, probes::KernelProbes, KernelEvent, KernelFeatures};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("writing events: {0}")]
    Output(std::io::Error),
    #[error("serializing an event: {0}")]
    Json(#[from] serde_json::Error),
}

/// How much of the kernel side is working.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", content = "reasons", rename_all = "kebab-case")]
pub enum Mode {
    /// Every hook attached: removals are classified from kernel context.
    Full,
    /// Some or all hooks are missing; the reasons say which and why.
    Degraded(Vec<String>),
}

/// The result of start-up: what the kernel offers, the mode, and the attached programs.
pub struct Startup {
    pub features: KernelFeatures,
    pub mode: Mode,
    probes: Option<KernelProbes>,
}

impl Startup {
    /// Probes the kernel and attaches the eBPF programs. Never fails: whatever cannot be attached
    /// becomes a reason for degraded mode.
    pub fn probe() -> Self {
        let features = KernelFeatures::probe();
        let mut reasons = Vec::new();
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            reasons.push("not running as root: eBPF programs and netlink changes need root".to_owned());
        }
        let probes = match KernelProbes::load(kernel::embedded_object(), &features) {
            Ok(probes) => {
                for attachment in &probes.attachments {
                    if let Some(error) = &attachment.error {
                        reasons.push(format!(
                            "{} ({}) not attached: {error}",
                            attachment.program, attachment.hook
                        ));
                    }
                }
                Some(probes)
            }
            Err(error) => {
                reasons.push(error.to_string());
                None
            }
        };
        if !features.module_tracepoints {
            reasons.push(
                "this kernel has no module tracepoints (CONFIG_MODULES off?): driver unloads cannot be seen"
                    .to_owned(),
            );
        }
        reasons.dedup();
        let mode = if reasons.is_empty() { Mode::Full } else { Mode::Degraded(reasons) };
        Self { features, mode, probes }
    }

    /// Logs the kernel's features and the mode, loudly when degraded.
    pub fn announce(&self) {
        tracing::info!("{}", self.features);
        match &self.mode {
            Mode::Full => tracing::info!("mode: full (kernel hooks attached)"),
            Mode::Degraded(reasons) => {
                tracing::warn!(
                    "mode: DEGRADED: driver reloads cannot be told from device removals by kernel context"
                );
                for reason in reasons {
                    tracing::warn!("degraded because: {reason}");
                }
            }
        }
    }

    /// Starts forwarding kernel events; the receiver yields them until the probes are dropped.
    fn events(&mut self) -> mpsc::Receiver<KernelEvent> {
        let (tx, rx) = mpsc::channel(4096);
        if let Some(probes) = self.probes.take() {
            tokio::spawn(async move {
                if let Err(error) = kernel::source::forward(probes, tx).await {
                    tracing::error!(%error, "reading kernel events failed");
                }
            });
        }
        rx
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() -> Result<&'static str, AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// `hotplug-agent run`: the agent proper.
pub async fn run() -> Result<(), AgentError> {
    let mut startup = Startup::probe();
    startup.announce();
    let mut events = startup.events();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            signal = &mut shutdown => {
                tracing::info!("{}: stopping", signal?);
                return Ok(());
            }
            Some(event) = events.recv() => tracing::info!(?event, "kernel event"),
        }
    }
}

/// The first line of `hotplug-agent events --json`: what the stream that follows can contain.
#[derive(Serialize)]
struct StreamHeader<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    features: &'a KernelFeatures,
    #[serde(flatten)]
    mode: &'a Mode,
}

/// `hotplug-agent events`: prints every kernel event as it happens until SIGINT/SIGTERM.
pub async fn stream_events(json: bool) -> Result<(), AgentError> {
    let mut startup = Startup::probe();
    startup.announce();
    let mut out = std::io::stdout().lock();
    if json {
        let header = StreamHeader { kind: "agent", features: &startup.features, mode: &startup.mode };
        writeln!(out, "{}", serde_json::to_string(&header)?).map_err(AgentError::Output)?;
    }
    out.flush().map_err(AgentError::Output)?;
    drop(out);
    let mut events = startup.events();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            signal = &mut shutdown => {
                tracing::info!("{}: stopping", signal?);
                return Ok(());
            }
            Some(event) = events.recv() => event,
        };
        let line = if json { serde_json::to_string(&event)? } else { describe(&event) };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(AgentError::Output)?;
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// The JSON line for an event, with `received_ns`: when user space had it (same clock as the
/// kernel's `timestamp_ns`, so the difference is the delivery latency).
pub fn json_line(event: &KernelEvent, received_ns: u64) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(event)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("received_ns".to_owned(), received_ns.into());
    }
    serde_json::to_string(&value)
}

/// One human-readable line for an event.
pub fn describe(event: &KernelEvent) -> String {
    match event {
        KernelEvent::Module(m) => {
            let ret = m.ret.map(|r| format!(" ret={r}")).unwrap_or_default();
            format!(
                "{:>16} module {:<20} {:?} by {}[{}]{ret}",
                m.timestamp_ns, m.module, m.kind, m.task.comm, m.task.pid
            )
        }
        KernelEvent::Nic(n) => {
            let task = n.task.as_ref().map(|t| format!(" by {}[{}]", t.comm, t.pid)).unwrap_or_default();
            format!(
                "{:>16} {:<12} {:<8} ifindex {:<3} {} {} bus {} driver {} cause {} ({:?}){task}",
                n.timestamp_ns,
                format!("{:?}", n.action).to_lowercase(),
                n.name,
                n.ifindex,
                n.mac,
                n.permanent_mac.as_deref().map_or("", |_| "(permanent)"),
                n.bus.as_deref().unwrap_or("-"),
                n.driver.as_deref().unwrap_or("-"),
                n.cause.as_str(),
                n.source,
            )
        }
    }
}

/// `hotplug-agent features`: the probe result and the mode, then exit.
pub fn print_features(json: bool) -> Result<(), AgentError> {
    let startup = Startup::probe();
    let mut out = std::io::stdout().lock();
    if json {
        let header = StreamHeader { kind: "agent", features: &startup.features, mode: &startup.mode };
        writeln!(out, "{}", serde_json::to_string_pretty(&header)?).map_err(AgentError::Output)?;
    } else {
        writeln!(out, "{}", startup.features).map_err(AgentError::Output)?;
        match &startup.mode {
            Mode::Full => writeln!(out, "mode: full"),
            Mode::Degraded(reasons) => writeln!(out, "mode: degraded")
                .and_then(|()| reasons.iter().try_for_each(|r| writeln!(out, "  - {r}"))),
        }
        .map_err(AgentError::Output)?;
    }
    Ok(())
}
