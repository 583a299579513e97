//! `hotplug-agent`: a thin entry point; everything lives in the `hotplug` library.
use std::process::ExitCode;

use clap::Parser as _;
use hotplug::{
    agent,
    cli::{Cli, Command, LogFormat},
    config::Config,
};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CloudInitGate) = cli.command {
        // First, before anything that can fail: cloud-init runs whatever goes wrong here. The
        // gate writes plain lines to stdout (the unit's journal) and sets up no logging; a
        // broken configuration only costs the socket path, which then is the default one.
        let socket = Config::load(cli.config.as_deref()).unwrap_or_default().socket;
        return hotplug::managers::cloud_init::gate(&socket);
    }
    if let Err(message) = init_logging(&cli) {
        eprintln!("hotplug-agent: {message}");
        return ExitCode::from(2);
    }
    // Before the runtime: the notify protocol's environment is read while no other thread exists.
    let notifier = agent::service::Notifier::from_env();
    // The audit trail reads /proc on a blocking thread (a process stuck in the kernel must not
    // stall the loop): one, kept for the agent's life rather than made anew for each burst, and
    // sharing glibc's one arena, so that reads leave no lasting memory behind (a read stuck on
    // it makes the next ones time out: the kernel's part of the task is then what is recorded).
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .thread_keep_alive(std::time::Duration::from_secs(365 * 24 * 3600))
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hotplug-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    for program in &cli.disable_probe {
        if !hotplug::kernel::probes::program_names().contains(&program.as_str()) {
            eprintln!(
                "hotplug-agent: --disable-probe {program}: no such program; the programs are: {}",
                hotplug::kernel::probes::program_names().join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let options = hotplug::kernel::probes::LoadOptions {
        ring_bytes: cli.ring_bytes,
        disabled: cli.disable_probe.clone(),
        netns: hotplug::kernel::probes::own_netns(),
        drop_registrations: cli.drop_registrations,
    };
    // Only the commands that use the configuration read it: a broken file must not stop
    // `events` or `features`, which an operator may need to diagnose the host.
    let config = || Config::load(cli.config.as_deref());
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => agent::run(cli.config.clone(), config()?, options, notifier).await,
            Command::Status { json, detail } => {
                Ok(hotplug::control::print_status(&config()?.socket, json, detail)?)
            }
            Command::Refresh { iface, json } => {
                if hotplug::control::print_refresh(&config()?.socket, &iface, json)? {
                    Ok(())
                } else {
                    Err(agent::AgentError::RefreshFailed(iface))
                }
            }
            Command::Reload { driver, params, dry_run, json } => {
                if hotplug::control::print_reload(&config()?.socket, &driver, &params, dry_run, json)? {
                    Ok(())
                } else {
                    Err(agent::AgentError::ReloadFailed(driver))
                }
            }
            Command::History { since, json } => {
                // A broken file must not hide the history: its state directory is then the
                // default one, and the line says so.
                let state_dir = match Config::load(cli.config.as_deref()) {
                    Ok(config) => config.state_dir,
                    Err(error) => {
                        let fallback = Config::default().state_dir;
                        eprintln!("hotplug-agent: {error}; reading the trail in {}", fallback.display());
                        fallback
                    }
                };
                Ok(agent::print_history(&state_dir, since.as_deref(), json)?)
            }
            Command::Events { json } => agent::stream_events(json, options).await,
            Command::Features { json } => agent::print_features(json, &options),
            Command::BpfStats { json } => agent::print_bpf_stats(json),
            Command::CloudInitGate => Ok(()), // handled above, without a runtime
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // As a plain line for people at a terminal; as a log entry where logs are structured.
            match effective_format(cli.log_format) {
                LogFormat::Text | LogFormat::Auto => eprintln!("hotplug-agent: {error}"),
                LogFormat::Json | LogFormat::Journald => tracing::error!("{error}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// `auto` means journald when stderr is the journal (systemd sets `JOURNAL_STREAM` to the
/// device and inode of the stream it connected), else text.
fn effective_format(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    }
}

fn stderr_is_journal() -> bool {
    use std::os::{fd::AsFd as _, unix::fs::MetadataExt as _};
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    let Ok(meta) = std::fs::File::from(fd).metadata() else { return false };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

fn init_logging(cli: &Cli) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log))
        .map_err(|error| format!("bad --log filter {:?}: {error}", cli.log))?;
    // Logs go to stderr so that `events` output on stdout stays machine-readable. aya and aya-log
    // log through the `log` crate; `init` bridges it (feature `tracing-log`).
    let registry = tracing_subscriber::registry().with(filter);
    match effective_format(cli.log_format) {
        LogFormat::Journald => {
            let layer = tracing_journald::layer()
                .map_err(|error| format!("--log-format journald: cannot reach journald ({error})"))?
                .with_field_prefix(Some("HOTPLUG".into()))
                .with_syslog_identifier("hotplug-agent".into())
                .with_priority_mappings(priorities());
            registry.with(layer).try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text | LogFormat::Auto => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
                .try_init()
        }
    }
    .map_err(|error| format!("cannot set up logging: {error}"))
}

/// syslog priorities: errors 3, warnings 4, the agent's normal account of events 6 (info), debug
/// and trace 7 (tracing-journald's default would put every info line at notice).
fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    let mut mappings = tracing_journald::PriorityMappings::new();
    mappings.info = Priority::Informational;
    mappings.debug = Priority::Debug;
    mappings.trace = Priority::Debug;
    mappings
}
