//! The `command` policy: run a site's own program with the NIC's facts in environment variables.
//! Never through a shell, never with kernel data in the command line, with an environment of
//! `PATH` and `HOTPLUG_*` only, in a process group of its own that is killed, whole, when the hook
//! outlives its timeout or the agent stops. The agent never waits for a hook in its loop.
use std::{process::Stdio, time::Duration};

use tokio::io::AsyncReadExt as _;

use crate::classify::NicEvent;

/// What a hook may print that is kept for the log (per stream).
const OUTPUT_KEPT: u64 = 4096;
/// The `PATH` a hook gets.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a hook ended.
#[derive(Debug)]
pub struct HookOutcome {
    /// `exit status: 0`, `killed after 30 s`, or why it could not start.
    pub status: String,
    pub succeeded: bool,
    /// The first [`OUTPUT_KEPT`] bytes of its standard output and error.
    pub stdout: String,
    pub stderr: String,
}

/// Kills a hook's process group when dropped: on its timeout, and when the agent stops (the
/// runtime drops the task that runs the hook).
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: kill(2) on a process group this task created (the hook leads it, pgid =
            // its pid, which stays reserved until the hook is reaped after this).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// The hook's environment: `PATH`, and the NIC's facts.
pub fn environment(event: &NicEvent, phase: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PATH", HOOK_PATH.to_owned()),
        ("HOTPLUG_PHASE", phase.to_owned()),
        ("HOTPLUG_ACTION", event.action.as_str().to_owned()),
        ("HOTPLUG_CAUSE", event.cause.as_str().to_owned()),
        ("HOTPLUG_IFNAME", event.name.clone()),
        ("HOTPLUG_IFINDEX", event.ifindex.to_string()),
        ("HOTPLUG_MAC", event.mac.clone()),
        ("HOTPLUG_BUS", event.bus.clone().unwrap_or_default()),
        ("HOTPLUG_DRIVER", event.driver.clone().unwrap_or_default()),
    ]
}

/// Runs `argv` for `event` and waits at most `timeout` for it (and what it started).
pub async fn run(argv: &[String], event: &NicEvent, phase: &str, timeout: Duration) -> HookOutcome {
    let failed = |status: String| HookOutcome {
        status,
        succeeded: false,
        stdout: String::new(),
        stderr: String::new(),
    };
    let Some((program, args)) = argv.split_first() else {
        return failed("empty command".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(environment(event, phase))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return failed(format!("cannot start {program}: {error}")),
    };
    let group = Group(child.id().and_then(|pid| i32::try_from(pid).ok()));
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read = |stream: Option<tokio::process::ChildStdout>| async move {
        let mut text = Vec::new();
        if let Some(stream) = stream {
            let _ = stream.take(OUTPUT_KEPT).read_to_end(&mut text).await;
        }
        String::from_utf8_lossy(&text).into_owned()
    };
    let read_err = |stream: Option<tokio::process::ChildStderr>| async move {
        let mut text = Vec::new();
        if let Some(stream) = stream {
            let _ = stream.take(OUTPUT_KEPT).read_to_end(&mut text).await;
        }
        String::from_utf8_lossy(&text).into_owned()
    };
    let waited = tokio::time::timeout(timeout, async {
        let (out, err, status) = tokio::join!(read(stdout.take()), read_err(stderr.take()), child.wait());
        (out, err, status)
    })
    .await;
    match waited {
        Ok((stdout, stderr, Ok(status))) => {
            // The hook is done; what it left running in its group goes with it.
            drop(group);
            HookOutcome { status: status.to_string(), succeeded: status.success(), stdout, stderr }
        }
        Ok((stdout, stderr, Err(error))) => {
            HookOutcome { status: format!("cannot wait for it: {error}"), succeeded: false, stdout, stderr }
        }
        Err(_) => {
            drop(group);
            let _ = child.wait().await;
            failed(format!(
                "killed after {} s (hook_timeout_seconds), with its process group",
                timeout.as_secs()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Action, Cause, Source};

    fn event() -> NicEvent {
        NicEvent {
            action: Action::Registration,
            cause: Cause::DriverLoad,
            source: Source::Kernel,
            ifindex: 7,
            name: "eth1".into(),
            mac: "52:54:00:12:34:11".into(),
            permanent_mac: None,
            bus: Some("0000:02:00.0".into()),
            driver: Some("e1000e".into()),
            module: None,
            context_module: None,
            task: None,
            timestamp_ns: 1,
            netns: None,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn a_hook_sees_only_path_and_its_facts() {
        std::env::set_var("HOTPLUG_TEST_SECRET", "leaked");
        let outcome = run(&sh("env | sort"), &event(), "returned", Duration::from_secs(10)).await;
        assert!(outcome.succeeded, "{outcome:?}");
        assert!(outcome.stdout.contains("HOTPLUG_MAC=52:54:00:12:34:11\n"), "{}", outcome.stdout);
        assert!(outcome.stdout.contains("HOTPLUG_PHASE=returned\n"));
        assert!(!outcome.stdout.contains("leaked"), "the agent's environment does not reach it");
        let names: Vec<&str> =
            outcome.stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k).collect();
        assert!(
            names.iter().all(|n| n.starts_with("HOTPLUG_") || ["PATH", "PWD", "SHLVL", "_"].contains(n)),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_with_what_it_started() {
        let marker = std::env::temp_dir().join(format!("hotplug-hook-{}", std::process::id()));
        let script = format!("(sleep 2; touch {}) & sleep 600", marker.display());
        let started = std::time::Instant::now();
        let outcome = run(&sh(&script), &event(), "returned", Duration::from_millis(300)).await;
        assert!(!outcome.succeeded);
        assert!(outcome.status.contains("killed after"), "{}", outcome.status);
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        std::thread::sleep(Duration::from_secs(3));
        assert!(!marker.exists(), "its background child was killed with the group");
    }

    #[tokio::test]
    async fn output_and_failure_are_reported() {
        let outcome =
            run(&sh("echo out; echo err >&2; exit 3"), &event(), "returned", Duration::from_secs(10)).await;
        assert!(!outcome.succeeded);
        assert_eq!((outcome.stdout.as_str(), outcome.stderr.as_str()), ("out\n", "err\n"));
        assert!(outcome.status.contains('3'), "{}", outcome.status);
        let missing =
            run(&["/nonexistent/hook".to_owned()], &event(), "returned", Duration::from_secs(1)).await;
        assert!(missing.status.contains("cannot start"), "{}", missing.status);
    }
}
