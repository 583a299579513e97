//! OpenMetrics: what the agent saw and did, as counters, gauges and histograms
//! (prometheus-client), served on a loopback address or a Unix socket when the configuration
//! names one (`metrics_listen`; off by default).
//!
//! The metrics are process-wide ([`global`]): any layer counts into them (the IMDS client its
//! requests, the agent's loop the kernel's events) without them being threaded through every
//! call. Nothing reads them back to decide anything.
use std::sync::LazyLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

mod peers;
pub mod serve;

/// `hotplug_nic_events_total{action,cause,source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NicEventLabels {
    pub action: String,
    pub cause: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoreLabels {
    pub outcome: String,
    /// `driver-reload` (the NIC came back), `manager-cycle` (networkd dropped routes and rules
    /// it does not own, which went back once it was done).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub nic_events: Family<NicEventLabels, Counter>,
    pub module_events: Family<ActionLabels, Counter>,
    pub restores: Family<RestoreLabels, Counter>,
    pub attaches: Family<OutcomeLabels, Counter>,
    pub imds_requests: Family<OutcomeLabels, Counter>,
    pub lost_records: Counter,
    pub resyncs: Counter,
    pub ignored_uevents: Family<ReasonLabels, Counter>,
    pub missed_registrations: Counter,
    pub nics: Family<StateLabels, Gauge>,
    pub mode: Family<ModeLabels, Gauge>,
    pub restore_latency: Histogram,
    pub delivery_latency: Histogram,
}

/// Restore latency buckets, seconds: 1 ms to about 16 s.
fn restore_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

/// Event delivery buckets, seconds: 10 µs to about 1.3 s.
fn delivery_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 18)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hotplug");
        let nic_events = Family::<NicEventLabels, Counter>::default();
        registry.register(
            "nic_events",
            "NIC removals and registrations, by cause and by source (kernel or heuristic)",
            nic_events.clone(),
        );
        let module_events = Family::<ActionLabels, Counter>::default();
        registry.register(
            "module_events",
            "Module unloads and loads seen in the kernel",
            module_events.clone(),
        );
        let restores = Family::<RestoreLabels, Counter>::default();
        registry.register(
            "restores",
            "Restores of a NIC's configuration, by outcome and reason",
            restores.clone(),
        );
        let attaches = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "attaches",
            "NICs configured from IMDS after an attach, by outcome",
            attaches.clone(),
        );
        let imds_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "imds_requests",
            "Requests to the instance metadata service, by outcome",
            imds_requests.clone(),
        );
        let lost_records = Counter::default();
        registry.register(
            "lost_records",
            "Kernel records lost before the agent read them",
            lost_records.clone(),
        );
        let resyncs = Counter::default();
        registry.register("resyncs", "Full re-reads of the host's NICs after a loss", resyncs.clone());
        let ignored_uevents = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ignored_uevents",
            "Datagrams on the uevent socket not taken as uevents, by reason (not-from-kernel: a process sent it)",
            ignored_uevents.clone(),
        );
        let missed_registrations = Counter::default();
        registry.register(
            "missed_registrations",
            "NIC registrations the kernel probes did not report, found from rtnetlink and replayed",
            missed_registrations.clone(),
        );
        let nics = Family::<StateLabels, Gauge>::default();
        registry.register("nics", "NICs the agent manages, by state", nics.clone());
        let mode = Family::<ModeLabels, Gauge>::default();
        registry.register("mode", "1 for the mode the agent runs in (full or degraded)", mode.clone());
        let restore_latency = Histogram::new(restore_buckets());
        registry.register_with_unit(
            "restore_latency",
            "From the NIC's registration in the kernel to the restore's last netlink acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            restore_latency.clone(),
        );
        let delivery_latency = Histogram::new(delivery_buckets());
        registry.register_with_unit(
            "event_delivery_latency",
            "From a kernel hook firing to the agent reading its record",
            prometheus_client::registry::Unit::Seconds,
            delivery_latency.clone(),
        );
        Self {
            registry,
            nic_events,
            module_events,
            restores,
            attaches,
            imds_requests,
            lost_records,
            resyncs,
            ignored_uevents,
            missed_registrations,
            nics,
            mode,
            restore_latency,
            delivery_latency,
        }
    }

    /// The OpenMetrics text exposition of every metric (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// The exposition in the format the scraper asked for: OpenMetrics when its `Accept` names
    /// it (Prometheus does), else the Prometheus text format 0.0.4 (curl, older tools,
    /// `promtool check metrics`).
    pub fn encode_for(&self, openmetrics: bool) -> String {
        let text = self.encode();
        if openmetrics {
            text
        } else {
            to_prometheus_text(&text)
        }
    }

    pub fn nic_event(&self, action: &str, cause: &str, source: &str) {
        let labels =
            NicEventLabels { action: action.to_owned(), cause: cause.to_owned(), source: source.to_owned() };
        self.nic_events.get_or_create(&labels).inc();
    }

    pub fn module_event(&self, action: &str) {
        self.module_events.get_or_create(&ActionLabels { action: action.to_owned() }).inc();
    }

    /// A restore ended; only a driver reload's has a latency from the kernel's registration.
    pub fn restore(&self, outcome: &str, reason: &str, latency_us: u64) {
        let labels = RestoreLabels { outcome: outcome.to_owned(), reason: reason.to_owned() };
        self.restores.get_or_create(&labels).inc();
        if reason == "driver-reload" {
            // Microseconds to seconds; precision well below a bucket's width.
            #[allow(clippy::cast_precision_loss)]
            self.restore_latency.observe(latency_us as f64 / 1e6);
        }
    }

    pub fn attach(&self, outcome: &str) {
        self.attaches.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    /// One IMDS request: `ok`, `not-found`, `http-4xx`, `http-5xx`, `http-other`, `timeout`,
    /// `error` (no answer: connection refused, reset, unreachable).
    pub fn imds_request(&self, outcome: &str) {
        self.imds_requests.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    pub fn missed_registration(&self) {
        self.missed_registrations.inc();
    }

    pub fn ignored_uevent(&self, reason: &str) {
        self.ignored_uevents.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    pub fn delivered(&self, latency_ns: u64) {
        #[allow(clippy::cast_precision_loss)]
        self.delivery_latency.observe(latency_ns as f64 / 1e9);
    }

    /// The NICs by state, all three states always present (a missing series reads as a gap).
    pub fn set_nics(&self, present: usize, driver_gone: usize, removed: usize) {
        for (state, count) in [("present", present), ("driver-gone", driver_gone), ("removed", removed)] {
            self.nics
                .get_or_create(&StateLabels { state: state.to_owned() })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    pub fn set_mode(&self, full: bool) {
        for (mode, on) in [("full", full), ("degraded", !full)] {
            self.mode.get_or_create(&ModeLabels { mode: mode.to_owned() }).set(i64::from(on));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family `x` is named by its
/// samples' name `x_total` in `# HELP` and `# TYPE`, and `# UNIT` and `# EOF` (unknown there) go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The agent's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

#[cfg(test)]
mod tests;
