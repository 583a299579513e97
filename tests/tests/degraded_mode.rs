//! Degraded mode on the host: the heuristic classifier watches rtnetlink and uevents in a private
//! network namespace while real veth and bridge links come and go.
use std::{process::Command, time::Duration};

use hotplug_tests::host::{ip, is_root, skip};

use hotplug::kernel::KernelEvent;
use hotplug::{
    classify::{Action, Cause, NicEvent, Source},
    kernel::heuristic,
};
use tokio::sync::mpsc;

/// Runs `scenario` on a thread of its own inside a new network namespace and returns the NIC
/// events the heuristic classifier reported.
fn in_private_netns(expected: usize, scenario: fn() -> Result<(), String>) -> Result<Vec<NicEvent>, String> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces; nothing else runs on it.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let (tx, mut rx) = mpsc::channel(64);
            let watcher = tokio::spawn(heuristic::run(tx));
            tokio::time::sleep(Duration::from_millis(200)).await;
            scenario()?;
            let mut events = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while events.len() < expected {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(KernelEvent::Nic(event))) => events.push(event),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            watcher.abort();
            Ok(events)
        })
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_owned())?
}

fn find<'a>(events: &'a [NicEvent], action: Action, name: &str) -> Option<&'a NicEvent> {
    events.iter().find(|e| e.action == action && e.name == name)
}

#[test]
fn veth_and_bridge_changes_are_classified_by_the_heuristics() -> Result<(), String> {
    if !is_root() {
        skip(
            "veth_and_bridge_changes_are_classified_by_the_heuristics",
            "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create links in a private network namespace",
        );
        return Ok(());
    }
    let events = in_private_netns(6, || {
        ip("link add hpt0 type veth peer name hpt1")?;
        ip("link add hptbr type bridge")?;
        std::thread::sleep(Duration::from_millis(100));
        ip("link del hpt0")?;
        ip("link del hptbr")
    })?;
    for e in &events {
        assert_eq!(e.source, Source::Heuristic, "{e:?}");
    }
    let cause = |action, name| find(&events, action, name).map(|e| e.cause);
    assert_eq!(cause(Action::Registration, "hpt0"), Some(Cause::LinkCreated), "{events:#?}");
    assert_eq!(cause(Action::Registration, "hpt1"), Some(Cause::LinkCreated), "{events:#?}");
    assert_eq!(cause(Action::Registration, "hptbr"), Some(Cause::LinkCreated), "{events:#?}");
    assert_eq!(cause(Action::Removal, "hpt0"), Some(Cause::LinkDeleted), "{events:#?}");
    assert_eq!(cause(Action::Removal, "hpt1"), Some(Cause::LinkDeleted), "{events:#?}");
    assert_eq!(cause(Action::Removal, "hptbr"), Some(Cause::LinkDeleted), "{events:#?}");
    let bridge = find(&events, Action::Registration, "hptbr").and_then(|e| e.driver.clone());
    assert_eq!(bridge.as_deref(), Some("bridge"));
    Ok(())
}

#[test]
fn a_move_to_another_namespace_is_a_netns_move() -> Result<(), String> {
    if !is_root() {
        skip("a_move_to_another_namespace_is_a_netns_move", "needs root to create namespaces and links");
        return Ok(());
    }
    let events = in_private_netns(3, || {
        // A process in yet another namespace to move the link to, by pid.
        let mut other = Command::new("unshare")
            .args(["--net", "sleep", "10"])
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        std::thread::sleep(Duration::from_millis(200));
        let moved = ip("link add hpm0 type veth peer name hpm1")
            .and_then(|()| ip(&format!("link set hpm1 netns {}", other.id())));
        let _ = other.kill();
        let _ = other.wait();
        moved
    })?;
    let removal = find(&events, Action::Removal, "hpm1").map(|e| e.cause);
    assert_eq!(removal, Some(Cause::NetnsMove), "{events:#?}");
    Ok(())
}

#[test]
fn a_degraded_start_gives_each_cause_once() -> Result<(), String> {
    let name = "a_degraded_start_gives_each_cause_once";
    if hotplug::kernel::embedded_object().is_none() {
        skip(name, "this build embeds no eBPF object (HOTPLUG_SKIP_EBPF): nothing to attach");
        return Ok(());
    }
    if !is_root() {
        skip(name, "needs root to load and attach the eBPF programs");
        return Ok(());
    }
    let options = hotplug::kernel::probes::LoadOptions {
        ring_bytes: 1 << 16,
        disabled: Vec::new(),
        netns: None,
        drop_registrations: 0,
    };
    let startup = hotplug::agent::Startup::probe(&options);
    let hotplug::agent::Mode::Degraded(reasons) = &startup.mode else {
        skip(name, "this kernel runs the agent in full mode: no degraded start to look at");
        return Ok(());
    };
    // Each cause is one reason (one WARN line at start), whatever the number of probes it keeps out.
    let mut distinct = reasons.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), reasons.len(), "a reason given twice: {reasons:#?}");
    if !startup.features.kprobes {
        let kprobes: Vec<&String> = reasons.iter().filter(|r| r.contains("CONFIG_KPROBES")).collect();
        assert_eq!(kprobes.len(), 1, "{reasons:#?}");
        assert!(kprobes[0].contains(" probes not attached: "), "counts the probes: {}", kprobes[0]);
    }
    Ok(())
}
