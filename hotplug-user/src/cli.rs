//! Command-line interface of `hotplug-agent`.
//!
//! Self-contained (clap and `hotplug-common` only): `cargo xtask package` includes this file to
//! generate the man page and shell completions from the same definitions.
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "hotplug-agent",
    version,
    about = "Keeps NIC configuration right across driver reloads and real attach/detach"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `hotplug=trace`. RUST_LOG, when set, wins.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// How logs are written: `journald` (native journal entries with structured fields, e.g.
    /// `HOTPLUG_MAC`), `json` (one object per line on stderr, for log shippers), `text` (stderr),
    /// or `auto`: journald when stderr is connected to the journal (a systemd service), else text.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Configuration file (TOML); without one, defaults apply. `run` re-reads it on SIGHUP.
    #[arg(long, global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least one page.
    #[arg(long, global = true, default_value_t = hotplug_common::EVENT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,
    /// Do not attach this eBPF program (repeatable, or comma-separated; `features` lists the
    /// names). For a probe that misbehaves on one kernel: what it explains is then classified
    /// by degraded mode's heuristics, and the agent says so.
    #[arg(long, global = true, value_name = "PROGRAM", value_delimiter = ',')]
    pub disable_probe: Vec<String>,
    /// Fault injection for tests: the first N NIC registration records from the kernel probes
    /// are dropped, as if a probe run had been missed (kretprobe slots exhausted, BPF
    /// recursion); the agent must find those registrations by itself.
    #[arg(long, global = true, hide = true, default_value_t = 0)]
    pub drop_registrations: u32,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

fn parse_ring_bytes(value: &str) -> Result<u32, String> {
    let bytes: u32 = value.parse().map_err(|e| format!("{value:?} is not a byte count: {e}"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} is not a power of two of at least 4096 (the kernel requires it)"));
    }
    Ok(bytes)
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the agent (the default). SIGHUP re-reads the configuration; SIGTERM stops it.
    Run,
    /// Stream kernel events as they happen, one per line.
    Events {
        /// JSON lines; the first line describes the agent's mode and the kernel's features.
        #[arg(long)]
        json: bool,
    },
    /// Print what the running kernel offers and which mode the agent would run in.
    Features {
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent for each NIC's state, last event, last restore and attach: a table
    /// (`--detail`: one block per NIC with its configuration and every error; `--json`: all of
    /// it for scripts).
    Status {
        #[arg(long)]
        json: bool,
        /// One block per NIC: its configuration, last event and restore in full, errors.
        #[arg(long, conflicts_with = "json")]
        detail: bool,
    },
    /// Ask IMDS again for an attached ENI (a secondary address, IPv6 address or delegated prefix
    /// assigned or unassigned since) and bring the NIC in line: what IMDS lists now is added,
    /// what the agent had added and IMDS no longer lists is removed. One IMDS look-up; an IMDS
    /// error or a doubtful answer changes nothing. Exit status 1 when it failed.
    Refresh {
        /// The NIC's name, e.g. `ens6`.
        iface: String,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail, oldest first: every module unload and load, every NIC removal and
    /// registration with its cause and the task behind it (pid, uid, parent, command line while
    /// it could still be read), the agent's decision and how its restore, attach or detach
    /// ended. Read from the state directory (`audit.jsonl` and its rotated files): works with the
    /// agent stopped.
    History {
        /// Only entries since then: a duration back from now (`10m`, `2h`, `1day`) or a time
        /// (`2026-11-29T22:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// One JSON object per line, as stored.
        #[arg(long)]
        json: bool,
    },
    /// Reload a NIC driver through the running agent, so that it does not ride on this session:
    /// it lists the NICs bound to DRIVER, refuses if it could not restore one (degraded mode, a
    /// snapshot not current, a policy other than restore), runs `modprobe -r DRIVER` and
    /// `modprobe DRIVER KEY=VALUE…`, waits for every NIC to register and be restored, reads each
    /// back and asks the kernel to resolve each default gateway (ARP / neighbour solicitation,
    /// nothing beyond the link). If the load fails or a NIC does not return, it loads the module
    /// again without the new parameters. The report is printed and kept in `status --detail`;
    /// killing this client does not stop the reload. Exit status 1 unless it went as asked.
    Reload {
        /// The module, e.g. `ena` or `e1000e`.
        driver: String,
        /// A load-time parameter (repeatable), e.g. `--param rx_queue_size=2048`.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Show the plan (NICs, commands, gateways) and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run counts and run time of hotplug's loaded eBPF programs (needs
    /// `sysctl kernel.bpf_stats_enabled=1` for run time).
    BpfStats {
        #[arg(long)]
        json: bool,
    },
    /// Stand in front of cloud-init's hotplug hook (what cloud-init-hotplugd.service runs, by the
    /// package's drop-in): read cloud-init's request from fd 3, and run
    /// `cloud-init devel hotplug-hook` with it unless the running agent restores that NIC after
    /// a driver reload. Real attaches and detaches, and anything the agent cannot tell, go to
    /// cloud-init.
    CloudInitGate,
}
