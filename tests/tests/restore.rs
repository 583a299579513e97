//! Restore on the host: a veth in a private network namespace is configured, "unloaded" (deleted)
//! and "loaded" again (re-created with the same MAC), with synthetic cause events standing in for
//! the kernel's; the NIC manager must put its configuration back, idempotently.
use std::time::Duration;

use hotplug_tests::host::{ifindex, in_private_netns, ip, is_root, skip, veth_event};

use hotplug::{
    agent::nics::NicManager,
    classify::{Action, Cause},
    config::Config,
    reconfigure::restore,
    snapshot,
};

const MAC: &str = "02:00:00:00:aa:01";
/// A veth has no permanent MAC and is virtual: the agent keys it by MAC and name.
const KEY: &str = "02:00:00:00:aa:01@hr0";

async fn event(action: Action, cause: Cause, name: &str) -> Result<hotplug::classify::NicEvent, String> {
    veth_event(action, cause, name, MAC).await
}

fn create_veth() -> Result<(), String> {
    ip(&format!("link add hr0 address {MAC} type veth peer name hr1"))?;
    ip("link set hr1 up")
}

fn configure() -> Result<(), String> {
    for args in [
        "link set hr0 mtu 1400 up",
        "addr add 10.9.0.5/24 dev hr0",
        "addr add 10.9.0.6/24 dev hr0",
        "-6 addr add fd09::5/64 dev hr0 nodad",
        "route add 192.168.90.0/24 via 10.9.0.254 dev hr0",
        "route add default via 10.9.0.1 dev hr0 table 10009",
        // A gateway reachable only through a route of the snapshot: the two are restored in one
        // pipelined phase, in order.
        "route add 10.50.0.1 dev hr0",
        "route add 10.60.0.0/16 via 10.50.0.1 dev hr0",
        "rule add from 10.9.0.5 lookup 10009 pref 10009",
        "link property add dev hr0 altname hotplug-test-alt",
        "link set hr0 txqueuelen 5000 alias hotplug-uplink group 7",
    ] {
        ip(args)?;
    }
    // Sysctls off their default (/proc/sys/net is this thread's namespace's).
    for (path, value) in [
        ("ipv4/conf/hr0/rp_filter", "2"),
        ("ipv4/conf/hr0/arp_ignore", "1"),
        ("ipv6/conf/hr0/hop_limit", "33"),
    ] {
        std::fs::write(format!("/proc/sys/net/{path}"), value).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

async fn scenario(state_dir: std::path::PathBuf) -> Result<(), String> {
    create_veth()?;
    configure()?;
    let imds = hotplug::imds::ImdsConfig { enabled: false, ..Default::default() };
    let config = Config { state_dir, socket: "/nonexistent/hotplug.sock".into(), imds, ..Config::default() };
    let (mut manager, _attach_results) = NicManager::start(config).await.map_err(|e| e.to_string())?;
    let netlink = snapshot::Netlink::connect().map_err(|e| e.to_string())?;
    let before = snapshot::capture(&netlink, ifindex("hr0").await?).await.map_err(|e| e.to_string())?;
    // The kernel's filtered route dump gives what reading every route and keeping the NIC's does.
    let unfiltered = snapshot::Netlink::unfiltered(netlink.handle.clone());
    let all = snapshot::capture(&unfiltered, ifindex("hr0").await?).await.map_err(|e| e.to_string())?;
    let summaries =
        |s: &snapshot::NicSnapshot| s.routes.iter().map(|r| r.summary.clone()).collect::<Vec<_>>();
    assert_eq!(summaries(&before), summaries(&all), "filtered and unfiltered route reads differ");
    // A filtered read for a device that is not there is an error, not "no routes".
    let gone = netlink.routes_through(rtnetlink::packet_route::AddressFamily::Inet, 999_999).await;
    assert!(
        matches!(gone, Err(snapshot::SnapshotError::NoSuchLink(999_999))),
        "a vanished NIC read as {gone:?}"
    );
    assert_eq!(before.addresses.len(), 4, "two IPv4, one IPv6, the link-local: {before:#?}");
    assert_eq!(before.routes.len(), 4, "{before:#?}");
    assert_eq!(before.rules.len(), 1, "{before:#?}");
    let tuned: Vec<(&str, &str)> =
        before.tuning.sysctls.iter().map(|s| (s.key.as_str(), s.value.as_str())).collect();
    assert_eq!(
        tuned,
        [("ipv4/conf/arp_ignore", "1"), ("ipv4/conf/rp_filter", "2"), ("ipv6/conf/hop_limit", "33")],
        "the sysctls off their default, and nothing else: {before:#?}"
    );
    let link = &before.tuning.link;
    assert_eq!(
        (link.txqueuelen, link.alias.as_deref(), link.group),
        (Some(5000), Some("hotplug-uplink"), Some(7))
    );

    // The driver "leaves": the removal event comes first (as from the kernel), then the link goes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    manager.on_event(&event(Action::Removal, Cause::DriverUnload, "hr0").await?).await;
    ip("link del hr0")?;
    let gone = manager.status();
    assert!(gone
        .iter()
        .any(|n| n.mac == KEY && serde_json::to_string(&n.state).is_ok_and(|s| s.contains("driver-gone"))));

    // ... and comes back with the same MAC and a new ifindex.
    create_veth()?;
    let back = event(Action::Registration, Cause::DriverLoad, "hr0").await?;
    assert_ne!(u32::try_from(back.ifindex).ok(), Some(before.ifindex));
    manager.on_event(&back).await;
    let after = snapshot::capture(&netlink, ifindex("hr0").await?).await.map_err(|e| e.to_string())?;
    assert_eq!(before.differences(&after), Vec::<String>::new());
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/hr0/rp_filter").map_err(|e| e.to_string())?.trim(),
        "2"
    );
    let status = manager.status();
    let restored = status.iter().find(|n| n.mac == KEY).and_then(|n| n.last_restore.clone());
    let Some(restored) = restored else { return Err(format!("no restore recorded: {status:#?}")) };
    assert!(restored.errors.is_empty() && restored.differences.is_empty(), "{restored:#?}");

    // Idempotent: again changes nothing and fails nothing; what the snapshot does not name stays.
    ip("addr add 10.9.0.99/24 dev hr0")?;
    let report =
        restore::restore(&netlink, &before, ifindex("hr0").await?, restore::RestoreOptions::default()).await;
    assert!(report.errors.is_empty(), "{report:#?}");
    assert_eq!(report.differences, vec!["address extra: 10.9.0.99/24 flags Secondary label hr0".to_owned()]);

    // A route whose place another NIC took is reported, not taken over; the others are fine.
    ip("addr add 10.8.0.1/24 dev hr1")?;
    ip("route del 192.168.90.0/24 dev hr0")?;
    ip("route add 192.168.90.0/24 via 10.8.0.254 dev hr1")?;
    let report =
        restore::restore(&netlink, &before, ifindex("hr0").await?, restore::RestoreOptions::default()).await;
    assert_eq!(report.errors.len(), 1, "{report:#?}");
    assert!(
        report.errors[0].contains("192.168.90.0/24 via 10.9.0.254")
            && report.errors[0].contains("another route has its place")
            && report.errors[0].contains("via 10.8.0.254"),
        "{report:#?}"
    );
    Ok(())
}

#[test]
fn a_reloaded_nic_gets_its_configuration_back() -> Result<(), String> {
    if !is_root() {
        skip(
            "a_reloaded_nic_gets_its_configuration_back",
            "needs root to create a network namespace and links",
        );
        return Ok(());
    }
    let state_dir = std::env::temp_dir().join(format!("hotplug-restore-test-{}", std::process::id()));
    let dir = state_dir.clone();
    let result = in_private_netns(move || scenario(dir));
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}
