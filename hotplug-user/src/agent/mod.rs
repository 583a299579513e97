//! The running agent: probes the kernel, attaches what it can, says which mode it runs in, and
//! moves kernel events to their consumers until it is told to stop.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

pub mod control;
pub mod nics;
pub mod service;

use futures::StreamExt as _;

use crate::{
    clock::{monotonic_ns, sleep_until},
    config::{Config, ConfigError},
    kernel::{
        self,
        probes::{KernelProbes, LoadOptions},
        KernelEvent, KernelFeatures,
    },
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Nics(#[from] nics::ManagerError),
    #[error(transparent)]
    Control(#[from] control::SocketError),
    #[error(transparent)]
    Client(#[from] crate::control::ControlError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("writing events: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Usage(String),
    #[error("reload of {0} did not go as asked (the report above says what happened)")]
    ReloadFailed(String),
    #[error("serializing an event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("refresh of {0} failed (the lines above say why, and what was changed, if anything)")]
    RefreshFailed(String),
    #[error("the {} stopped ({}): stopping so that the service manager restarts the agent", .0.source, .0.why)]
    SourceEnded(SourceEnded),
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
    pub fn probe(options: &LoadOptions) -> Self {
        let mark = crate::clock::monotonic_ns();
        let features = KernelFeatures::probe();
        tracing::debug!("kernel features read in {} us", (crate::clock::monotonic_ns() - mark) / 1000);
        let mut reasons = Vec::new();
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            reasons.push("not running as root: eBPF programs and netlink changes need root".to_owned());
        }
        let probes = match KernelProbes::load(kernel::embedded_object(), &features, options) {
            Ok(probes) => {
                reasons.extend(probes.limitations.iter().cloned());
                // One reason per distinct cause, naming the probes it kept out (`features` lists
                // every hook).
                reasons.extend(kernel::probes::unattached_reasons(&probes.attachments));
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
        // Parsing the kernel's BTF (several MiB on recent kernels) leaves freed heap behind; hand it
        // back to the system rather than carry it for the agent's lifetime.
        // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
        unsafe { libc::malloc_trim(0) };
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

    /// Starts the kernel event sources. When the NIC hooks or the context probes that explain
    /// them are not all attached, degraded mode's heuristic classifier reports NIC changes
    /// instead (module events still come from whatever programs did attach). The second receiver says when one of them ended (and
    /// why): the agent would be blind to part of what it exists to see, so it stops and lets its
    /// service manager restart it, rather than go on half-deaf.
    fn events(&mut self) -> (mpsc::Receiver<KernelEvent>, mpsc::Receiver<SourceEnded>) {
        let (tx, rx) = mpsc::channel(4096);
        let (ended_tx, ended) = mpsc::channel(2);
        let nic_hooks = self.probes.as_ref().is_some_and(KernelProbes::nic_hooks_attached);
        if !nic_hooks {
            tracing::warn!("NIC hooks not attached: NIC causes come from rtnetlink, uevents and sysfs (source: heuristic)");
            let (tx, ended_tx) = (tx.clone(), ended_tx.clone());
            tokio::spawn(async move {
                let why = match kernel::heuristic::run(tx).await {
                    Ok(()) => "its sockets closed".to_owned(),
                    Err(error) => error.to_string(),
                };
                let _ = ended_tx.send(SourceEnded { source: "degraded NIC classification", why }).await;
            });
        }
        if let Some(probes) = self.probes.take() {
            tokio::spawn(async move {
                let why = match kernel::source::forward(probes, tx, nic_hooks).await {
                    Ok(()) => "its ring buffer closed".to_owned(),
                    Err(error) => error.to_string(),
                };
                let _ = ended_tx.send(SourceEnded { source: "kernel event reader", why }).await;
            });
        }
        (rx, ended)
    }
}

/// A kernel event source stopped.
#[derive(Debug)]
pub struct SourceEnded {
    source: &'static str,
    why: String,
}

impl Startup {
    /// The first line of `events --json` and the body of `features --json`.
    fn header(&self) -> StreamHeader<'_> {
        StreamHeader {
            kind: "agent",
            features: &self.features,
            mode: &self.mode,
            managers: crate::managers::Host::default().detect(),
            hooks: None,
        }
    }

    /// Every hook, attached or why not.
    fn hooks(&self) -> &[kernel::probes::Attachment] {
        self.probes.as_ref().map_or(&[], |p| p.attachments.as_slice())
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

/// Milliseconds since `since_ns` (CLOCK_MONOTONIC), with a tenth.
fn since_ms(since_ns: u64) -> f64 {
    let us = crate::clock::monotonic_ns().saturating_sub(since_ns) / 1000;
    (us / 100) as f64 / 10.0
}

/// Ticks every `period`, or never (a `select!` arm for the watchdog).
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{decode::Task, ModuleEventKind, ModuleLifecycle};

    #[test]
    fn json_lines_keep_field_order_and_carry_the_receive_time() -> Result<(), serde_json::Error> {
        let event = KernelEvent::Module(ModuleLifecycle {
            kind: ModuleEventKind::Load,
            module: "e1000".into(),
            task: Task { pid: 1, tid: 1, comm: "modprobe".into(), uid: None, ppid: None },
            ret: None,
            timestamp_ns: 5,
        });
        let line = json_line(&event, 9)?;
        assert!(line.starts_with(r#"{"type":"module","kind":"load","module":"e1000""#), "{line}");
        assert!(line.ends_with(r#""timestamp_ns":5,"received_ns":9}"#), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(value["received_ns"], 9);
        Ok(())
    }
}

/// `hotplug-agent run`: the agent proper. Kernel events go through the NIC manager, which holds
/// a NIC's snapshot when its driver leaves and restores it when the driver registers it again.
/// SIGHUP re-reads `config_path`; a file that does not validate is refused and the running
/// configuration kept.
pub async fn run(
    config_path: Option<PathBuf>,
    config: Config,
    options: LoadOptions,
    notifier: service::Notifier,
) -> Result<(), AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let started_ns = crate::clock::monotonic_ns();
    let mut hangup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let mut startup = Startup::probe(&options);
    let probes_ms = since_ms(started_ns);
    startup.announce();
    // Watch configuration changes before reading the NICs, so that no change falls between.
    let changes = nics::config_changes()?;
    tokio::pin!(changes);
    let nics_start_ns = crate::clock::monotonic_ns();
    let (mut manager, mut background) = nics::NicManager::start(config.clone()).await?;
    let nics_ms = since_ms(nics_start_ns);
    let listener = control::bind(&config.socket)?;
    let (queries_tx, mut queries) = mpsc::channel::<control::Query>(16);
    let (mut events, mut ended) = startup.events();
    let metrics = crate::metrics::global();
    metrics.set_mode(startup.mode == Mode::Full);
    manager.set_full_mode(startup.mode == Mode::Full);
    manager.recover_interrupted_reload();
    manager.count_states();
    if let Some(listen) = &config.metrics_listen {
        // Checked when the file was read; a port taken or a path refused costs the metrics only.
        match crate::metrics::serve::Listen::parse(listen) {
            Ok(listen) => {
                if let Err(error) = crate::metrics::serve::start(&listen) {
                    tracing::error!("{error}: the agent runs without metrics");
                }
            }
            Err(problem) => tracing::error!("metrics_listen {listen:?}: {problem}"),
        }
    }
    let status = service_status(&startup.mode, manager.nic_count());
    // Start to ready: kernel features, BTF and probes attached (`probes_ms`), every NIC read and
    // reconciled with the state on disk (`nics_ms`).
    tracing::info!(
        socket = %config.socket.display(),
        state = %config.state_dir.display(),
        probes_ms,
        nics_ms,
        ready_ms = since_ms(started_ns),
        "agent ready: {status}"
    );
    notifier.ready(&status);
    // The watchdog is fed from this loop: if the loop stops turning, systemd restarts the agent.
    let mut watchdog = notifier.watchdog_period().map(|period| {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut accept_after: Option<tokio::time::Instant> = None;
    let mut drop_registrations = options.drop_registrations;
    loop {
        let wakeup = manager.next_wakeup();
        tokio::select! {
            signal = &mut shutdown => {
                tracing::info!("{}: stopping", signal?);
                notifier.stopping();
                let _ = std::fs::remove_file(&config.socket);
                manager.flush_audit().await;
                return Ok(());
            }
            () = tick(watchdog.as_mut()) => notifier.watchdog(),
            Some(source) = ended.recv() => {
                notifier.stopping();
                let _ = std::fs::remove_file(&config.socket);
                manager.flush_audit().await;
                return Err(AgentError::SourceEnded(source));
            }
            Some(()) = hangup.recv() => {
                notifier.reloading();
                reload(config_path.as_deref(), &mut manager);
                notifier.ready(&service_status(&startup.mode, manager.nic_count()));
            }
            Some(event) = events.recv() => match event {
                // Its audit entry (cause, task, the agent's decision) is its log line.
                KernelEvent::Nic(nic) if drop_registrations > 0
                    && nic.source == crate::classify::Source::Kernel
                    && nic.action == crate::classify::Action::Registration =>
                {
                    drop_registrations -= 1;
                    tracing::warn!(mac = %nic.mac, ifindex = nic.ifindex, "fault injection (--drop-registrations): registration record dropped");
                }
                KernelEvent::Nic(nic) => {
                    if nic.source == crate::classify::Source::Kernel {
                        metrics.delivered(monotonic_ns().saturating_sub(nic.timestamp_ns));
                    }
                    tracing::debug!("{}", describe(&KernelEvent::Nic(nic.clone())));
                    manager.on_event(&nic).await;
                }
                KernelEvent::Resync { links } => {
                    metrics.resyncs.inc();
                    manager.resync(&links).await;
                }
                KernelEvent::Module(module) => {
                    metrics.delivered(monotonic_ns().saturating_sub(module.timestamp_ns));
                    match crate::audit::module_entry(&module) {
                        Some(entry) => {
                            metrics.module_event(&entry.action);
                            manager.audit_by(entry, Some(&module.task), module.timestamp_ns);
                        }
                        None => tracing::info!("{}", describe(&KernelEvent::Module(module))),
                    }
                }
                KernelEvent::Lost { events: lost, counters } => {
                    metrics.lost_records.inc_by(lost);
                    tracing::info!("{}", describe(&KernelEvent::Lost { events: lost, counters }));
                }
            },
            change = changes.next() => match change {
                Some(change) => manager.note_change(change),
                None => {
                    notifier.stopping();
                    let _ = std::fs::remove_file(&config.socket);
                    manager.flush_audit().await;
                    let why = "its socket closed".to_owned();
                    return Err(AgentError::SourceEnded(SourceEnded { source: "rtnetlink notification reader", why }));
                }
            },
            Some(message) = background.recv() => manager.on_background(message).await,
            Some((request, reply)) = queries.recv() => {
                manager.query(request, reply).await;
            }
            () = sleep_until(wakeup) => manager.wake().await,
            accepted = listener.accept(), if accept_after.is_none() => {
                match accepted {
                    // Read and written by a task of its own: a stalled client cannot stall the agent.
                    Ok((stream, _)) => {
                        accept_after = None;
                        tokio::spawn(control::serve(stream, queries_tx.clone()));
                    }
                    // Out of file descriptors, say: the error repeats at once, so wait a little
                    // rather than spin (the loop goes on serving the kernel).
                    Err(error) => {
                        tracing::warn!(%error, "control socket: cannot accept a connection; retrying in 1 s");
                        accept_after = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
                    }
                }
            }
            () = sleep_until(accept_after), if accept_after.is_some() => accept_after = None,
        }
    }
}

/// `STATUS=` for the service manager: the mode, and how many NICs are managed.
fn service_status(mode: &Mode, nics: usize) -> String {
    match mode {
        Mode::Full => format!("full mode (kernel hooks attached), {nics} NICs"),
        Mode::Degraded(reasons) => format!(
            "DEGRADED mode ({} reasons, first: {}), {nics} NICs",
            reasons.len(),
            reasons.first().map_or("", String::as_str)
        ),
    }
}

/// SIGHUP: re-reads the configuration file. Nothing changes unless the whole file validates.
fn reload(path: Option<&Path>, manager: &mut nics::NicManager) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: the agent was started without --config; nothing to re-read");
        return;
    };
    match Config::load(Some(path)) {
        Ok(config) => {
            for kept in manager.reconfigure(config) {
                tracing::warn!("configuration reloaded, but {kept}");
            }
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Err(error) => {
            tracing::error!(config = %path.display(), "configuration reload refused, the running configuration stays: {error}");
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
    /// The host's other network managers.
    managers: crate::managers::HostManagers,
    /// Every hook, attached or why not (`features` only: the start-up log groups them by cause).
    #[serde(skip_serializing_if = "Option::is_none")]
    hooks: Option<&'a [kernel::probes::Attachment]>,
}

/// `hotplug-agent events`: prints every kernel event as it happens until SIGINT/SIGTERM.
pub async fn stream_events(json: bool, options: LoadOptions) -> Result<(), AgentError> {
    let mut startup = Startup::probe(&options);
    startup.announce();
    let mut out = std::io::stdout().lock();
    if json {
        let header = startup.header();
        writeln!(out, "{}", serde_json::to_string(&header)?).map_err(AgentError::Output)?;
    }
    out.flush().map_err(AgentError::Output)?;
    drop(out);
    let (mut events, mut ended) = startup.events();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            signal = &mut shutdown => {
                tracing::info!("{}: stopping", signal?);
                return Ok(());
            }
            Some(source) = ended.recv() => return Err(AgentError::SourceEnded(source)),
            Some(event) = events.recv() => event,
        };
        let line = if json { json_line(&event, monotonic_ns())? } else { describe(&event) };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(AgentError::Output)?;
    }
}

/// The JSON line for an event, with `received_ns`: when user space had it (same clock as the
/// kernel's `timestamp_ns`, so the difference is the delivery latency).
pub fn json_line(event: &KernelEvent, received_ns: u64) -> Result<String, serde_json::Error> {
    // Appended to the serialized object rather than through a `Value`, which would sort the keys.
    let mut line = serde_json::to_string(event)?;
    if line.ends_with('}') {
        line.pop();
        line.push_str(&format!(",\"received_ns\":{received_ns}}}"));
    }
    Ok(line)
}

/// `hotplug-agent history`: the audit trail, oldest first.
pub fn print_history(state_dir: &Path, since: Option<&str>, json: bool) -> Result<(), AgentError> {
    let since_ms = since
        .map(|text| crate::audit::parse_since(text, std::time::SystemTime::now()))
        .transpose()
        .map_err(AgentError::Usage)?;
    let history = crate::audit::read(state_dir, since_ms)?;
    let mut out = std::io::stdout().lock();
    for entry in &history.entries {
        let line =
            if json { serde_json::to_string(entry)? } else { format!("{}  {}", entry.time, entry.summary()) };
        writeln!(out, "{line}").map_err(AgentError::Output)?;
    }
    if history.entries.is_empty() && !json {
        let path = state_dir.join(crate::audit::FILE_NAME);
        writeln!(
            out,
            "no entries{} in {}",
            since.map(|s| format!(" since {s}")).unwrap_or_default(),
            path.display()
        )
        .map_err(AgentError::Output)?;
    }
    if history.unreadable_lines > 0 {
        eprintln!(
            "hotplug-agent: {} lines of the trail were not entries (a line torn by a crash?)",
            history.unreadable_lines
        );
    }
    Ok(())
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
        KernelEvent::Lost { events, counters } => {
            let counters: Vec<String> =
                counters.iter().map(|c| format!("{} +{}", c.counter, c.rise)).collect();
            format!("LOST {events} kernel events ({}); resynchronising", counters.join(", "))
        }
        KernelEvent::Resync { links } => {
            let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
            format!("resync: links now {}", names.join(" "))
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
pub fn print_features(json: bool, options: &LoadOptions) -> Result<(), AgentError> {
    let mut startup = Startup::probe(options);
    startup.features.probe_fentry();
    let mut out = std::io::stdout().lock();
    if json {
        let header = StreamHeader { hooks: Some(startup.hooks()), ..startup.header() };
        writeln!(out, "{}", serde_json::to_string_pretty(&header)?).map_err(AgentError::Output)?;
    } else {
        writeln!(out, "{}", startup.features).map_err(AgentError::Output)?;
        writeln!(out, "{}", describe_managers(&crate::managers::Host::default().detect()))
            .map_err(AgentError::Output)?;
        match &startup.mode {
            Mode::Full => writeln!(out, "mode: full"),
            Mode::Degraded(reasons) => writeln!(out, "mode: degraded")
                .and_then(|()| reasons.iter().try_for_each(|r| writeln!(out, "  - {r}"))),
        }
        .map_err(AgentError::Output)?;
        // Every hook on its own line (the mode's reasons group them by cause).
        writeln!(out, "hooks:").map_err(AgentError::Output)?;
        for hook in startup.hooks() {
            let state =
                hook.error.as_deref().map_or_else(|| "attached".to_owned(), |e| format!("not attached: {e}"));
            writeln!(out, "  {:<22} {:<46} {state}", hook.program, hook.hook).map_err(AgentError::Output)?;
        }
    }
    Ok(())
}

/// One line on the host's other network managers, for people.
pub fn describe_managers(managers: &crate::managers::HostManagers) -> String {
    if !managers.any() && managers.cloud_init_hotplug.is_none() {
        return "other network managers: none".to_owned();
    }
    let mut parts: Vec<String> = managers.names().into_iter().map(str::to_owned).collect();
    if managers.networkd {
        let foreign = if managers.networkd_keeps_foreign { "keeps" } else { "DELETES" };
        parts.push(format!("networkd {foreign} routes and rules it did not make"));
    }
    if let Some(hook) = &managers.cloud_init_hotplug {
        let gated =
            if hook.gated { "gated by hotplug-agent" } else { "NOT gated: driver reloads also run it" };
        parts.push(format!("cloud-init's hotplug hook {gated}"));
    }
    format!("other network managers: {}", parts.join("; "))
}

/// Run statistics of one of hotplug's programs.
#[derive(Debug, Serialize)]
pub struct ProgramStats {
    pub id: u32,
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// `hotplug-agent bpf-stats`: the run counts and times the kernel keeps for hotplug's programs
/// (loaded by a running agent). Program names are truncated to 15 bytes by the kernel.
pub fn print_bpf_stats(json: bool) -> Result<(), AgentError> {
    let ours = kernel::probes::program_names();
    let mut stats = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else { continue };
        if !ours.iter().any(|p| p.starts_with(name) && !name.is_empty()) {
            continue;
        }
        stats.push(ProgramStats {
            id: info.id(),
            name: name.to_owned(),
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        });
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&stats)?).map_err(AgentError::Output)?;
    } else {
        for s in &stats {
            let avg = s.run_time_ns.checked_div(s.run_count).unwrap_or(0);
            writeln!(
                out,
                "{:>6} {:<16} runs {:>8} total {:>10} ns avg {:>6} ns",
                s.id, s.name, s.run_count, s.run_time_ns, avg
            )
            .map_err(AgentError::Output)?;
        }
    }
    Ok(())
}
