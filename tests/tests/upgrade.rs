//! An upgrade while a driver is away: release 0.1.0's agent held a NIC (its state file, written by
//! that release's own code, is tests/fixtures/state-0.1.0/driver-gone.json) and stopped; this
//! release's agent starts on that state directory, and the NIC registers again. It must be
//! restored equal to what 0.1.0 held, and the state file written again in the current format.
use std::{os::unix::fs::DirBuilderExt as _, time::Duration};

use hotplug_tests::host::{ifindex, in_private_netns, ip, is_root, skip, veth_event};

use hotplug::{
    agent::nics::NicManager,
    classify::{Action, Cause},
    config::Config,
    snapshot,
    state::{self, store::file_name},
};

const FIXTURE: &str = include_str!("../fixtures/state-0.1.0/driver-gone.json");
/// The veth the fixture was written for (no permanent MAC: keyed by MAC and name).
const MAC: &str = "02:00:00:00:aa:01";
const KEY: &str = "02:00:00:00:aa:01@hr0";

fn this_boot() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .map_err(|e| e.to_string())
}

async fn scenario(state_dir: std::path::PathBuf) -> Result<(), String> {
    // The 0.1.0 file, as that agent left it in this boot (state from another boot is forgotten).
    let mut old: serde_json::Value = serde_json::from_str(FIXTURE).map_err(|e| e.to_string())?;
    old["boot_id"] = serde_json::Value::from(this_boot()?);
    std::fs::DirBuilder::new().mode(0o700).create(&state_dir).map_err(|e| e.to_string())?;
    let path = state_dir.join(file_name(KEY));
    std::fs::write(&path, old.to_string()).map_err(|e| e.to_string())?;
    let held: state::Decoded<state::Nic> = state::decode(FIXTURE.as_bytes()).map_err(|e| e.to_string())?;
    let Some(mut want) = held.nic.snapshot else { return Err("the fixture holds no snapshot".into()) };
    want.refresh_summaries();

    let imds = hotplug::imds::ImdsConfig { enabled: false, ..Default::default() };
    let config = Config { state_dir, socket: "/nonexistent/hotplug.sock".into(), imds, ..Config::default() };
    let (mut manager, _background) = NicManager::start(config).await.map_err(|e| e.to_string())?;
    let status = manager.status();
    let nic = status
        .iter()
        .find(|n| n.mac == KEY)
        .ok_or_else(|| format!("the held NIC was not loaded: {status:#?}"))?;
    let state = serde_json::to_value(&nic.state).map_err(|e| e.to_string())?;
    assert_eq!(state["state"], "driver-gone", "{status:#?}");
    let rewritten: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    assert_eq!(rewritten["format"], state::FORMAT, "not written again in the current format: {rewritten}");

    // The driver is back: the same MAC registers under a new ifindex (its peer up, for carrier).
    ip(&format!("link add hr0 address {MAC} type veth peer name hr1"))?;
    ip("link set hr1 up")?;
    let back = veth_event(Action::Registration, Cause::DriverLoad, "hr0", MAC).await?;
    manager.on_event(&back).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let netlink = snapshot::Netlink::connect().map_err(|e| e.to_string())?;
    let after = snapshot::capture(&netlink, ifindex("hr0").await?).await.map_err(|e| e.to_string())?;
    assert_eq!(want.differences(&after), Vec::<String>::new(), "held by 0.1.0: {want:#?}\nnow: {after:#?}");
    let status = manager.status();
    let restored = status.iter().find(|n| n.mac == KEY).and_then(|n| n.last_restore.clone());
    let Some(restored) = restored else { return Err(format!("no restore recorded: {status:#?}")) };
    assert!(restored.errors.is_empty() && restored.differences.is_empty(), "{restored:#?}");
    Ok(())
}

#[test]
fn a_nic_held_by_release_0_1_0_is_restored_equal_after_an_upgrade() -> Result<(), String> {
    let name = "a_nic_held_by_release_0_1_0_is_restored_equal_after_an_upgrade";
    if !is_root() {
        skip(name, "needs root to create a network namespace and links");
        return Ok(());
    }
    let state_dir = std::env::temp_dir().join(format!("hotplug-upgrade-test-{}", std::process::id()));
    let dir = state_dir.clone();
    let result = in_private_netns(move || scenario(dir));
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}
