//! The state format against files written by release 0.1.0 (tests/fixtures/state-0.1.0, written by
//! that release's own code), format 1's fixture (tests/fixtures/state-1, still read as it is) and
//! the current format's own (tests/fixtures/state-2).
use super::*;
use crate::{
    classify::Cause,
    control::AttachStatus,
    snapshot::{address_message, route_message, rule_message},
};

const GONE_0_1_0: &str = include_str!("../../../tests/fixtures/state-0.1.0/driver-gone.json");
const PRESENT_0_1_0: &str = include_str!("../../../tests/fixtures/state-0.1.0/present-restored.json");
const GONE_1: &str = include_str!("../../../tests/fixtures/state-1/driver-gone.json");
const GONE_2: &str = include_str!("../../../tests/fixtures/state-2/driver-gone.json");
/// Format 2 as written before the gate's credits became queued halves (bare times).
const GONE_2_BARE_CREDITS: &str =
    include_str!("../../../tests/fixtures/state-2/driver-gone-credits-before-halves.json");

type Error = Box<dyn std::error::Error>;

fn load(text: &str) -> Result<Decoded<Nic>, Error> {
    let mut decoded: Decoded<Nic> = decode(text.as_bytes())?;
    let unreadable = decoded.nic.refresh_summaries();
    assert!(unreadable.is_empty(), "{unreadable:?}");
    Ok(decoded)
}

/// Every object's netlink message, as the restore sends them.
fn messages(snapshot: &NicSnapshot) -> Result<Vec<String>, Error> {
    let mut all = Vec::new();
    for entry in &snapshot.addresses {
        all.push(format!("{:?}", address_message(entry)?));
    }
    for entry in &snapshot.routes {
        all.push(format!("{:?}", route_message(entry)?));
    }
    for entry in &snapshot.rules {
        all.push(format!("{:?}", rule_message(entry)?));
    }
    Ok(all)
}

#[test]
fn a_held_nic_from_release_0_1_0_loads_with_everything_it_had() -> Result<(), Error> {
    let Decoded { nic, format } = load(GONE_0_1_0)?;
    assert_eq!(format, FORMAT_0_1_0);
    assert_eq!(nic.mac, "02:00:00:00:aa:01@hr0");
    assert!(
        matches!(nic.record.state, NicState::DriverGone { cause: Cause::DriverUnload, .. }),
        "{:?}",
        nic.record.state
    );
    assert_eq!(nic.record.last_removal, Some((Cause::DriverUnload, "hr0".to_owned())));
    assert!(!nic.record.returned_from_driver_gone);
    let Some(held) = &nic.snapshot else { return Err("no snapshot held".into()) };
    assert_eq!((held.name.as_str(), held.mtu, held.up), ("hr0", Some(1400), true));
    assert_eq!(held.altnames, vec!["hotplug-test-alt".to_owned()]);
    assert_eq!((held.addresses.len(), held.routes.len(), held.rules.len()), (4, 5, 2));
    let Some(restore) = &nic.last_restore else { return Err("no restore recorded".into()) };
    assert!(restore.errors.is_empty() && restore.differences.is_empty() && restore.requests > 0);
    assert!(restore.phases.is_some());
    // Restore equal: the messages a restore sends are the ones 0.1.0 held, byte for byte.
    let raw: serde_json::Value = serde_json::from_str(GONE_0_1_0)?;
    let held_then: Vec<&str> = ["addresses", "routes", "rules"]
        .iter()
        .flat_map(|kind| raw["snapshot"][kind].as_array().into_iter().flatten())
        .filter_map(|entry| entry["message"].as_str())
        .collect();
    let held_now: Vec<&str> =
        held.addresses.iter().chain(&held.routes).chain(&held.rules).map(|e| e.message.as_str()).collect();
    assert_eq!(held_now, held_then);
    Ok(())
}

#[test]
fn a_present_nic_from_release_0_1_0_keeps_what_the_gate_reads_but_its_credits() -> Result<(), Error> {
    let Decoded { nic, format } = load(PRESENT_0_1_0)?;
    assert_eq!(format, FORMAT_0_1_0);
    assert!(matches!(nic.record.state, NicState::Present { ref name, .. } if name == "hr0"));
    assert!(nic.record.returned_from_driver_gone);
    // Its credits (bare times) are not read: those halves go to cloud-init.
    let raw: serde_json::Value = serde_json::from_str(PRESENT_0_1_0)?;
    assert!(raw["gate_credits"]["remove"][0].as_u64().is_some(), "{raw}");
    assert!(nic.record.gate_credits.removes().is_empty() && !nic.record.gate_credits.has_adds());
    assert!(nic.history.is_empty() && nic.pending_restore.is_none() && nic.attach.is_none());
    Ok(())
}

#[test]
fn summaries_are_this_releases_whatever_the_file_says() -> Result<(), Error> {
    // A file whose summaries another release worded differently: compared by its messages'
    // parsed fields, it is the same configuration.
    let mut raw: serde_json::Value = serde_json::from_str(GONE_0_1_0)?;
    for kind in ["addresses", "routes", "rules"] {
        for entry in raw["snapshot"][kind].as_array_mut().into_iter().flatten() {
            entry["summary"] = serde_json::Value::from("worded by another release");
        }
    }
    let reworded = load(&serde_json::to_string(&raw)?)?;
    let original = load(GONE_0_1_0)?;
    let (Some(want), Some(have)) = (&original.nic.snapshot, &reworded.nic.snapshot) else {
        return Err("no snapshot".into());
    };
    assert_eq!(want.differences(have), Vec::<String>::new());
    assert!(have.routes.iter().all(|r| r.summary.starts_with("inet")), "{:?}", have.routes);
    assert_eq!(messages(want)?, messages(have)?);
    // A message that does not parse keeps its summary and is named.
    let mut broken = original.nic.clone();
    if let Some(snapshot) = &mut broken.snapshot {
        snapshot.routes[0].message = "zz".into();
    }
    let unreadable = broken.refresh_summaries();
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert!(unreadable[0].starts_with("route inet table 10009 default via 10.9.0.1"), "{unreadable:?}");
    Ok(())
}

#[test]
fn the_current_format_round_trips_and_is_pinned() -> Result<(), Error> {
    // What the agent writes for the 0.1.0 file (after its start-up migration) is the current
    // format's fixture, field for field (only `written_by` follows the version).
    let migrated = load(GONE_0_1_0)?.nic;
    let bytes = encode(&migrated)?;
    if std::env::var_os("HOTPLUG_BLESS_STATE_FORMAT").is_some() {
        // Writes the pinned fixture anew: only with FORMAT raised, and the old format still read.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/state-2/driver-gone.json");
        std::fs::write(path, &bytes)?;
    }
    let written: serde_json::Value = serde_json::from_slice(&bytes)?;
    let mut pinned: serde_json::Value = serde_json::from_str(GONE_2)?;
    assert_eq!(written["written_by"], concat!("hotplug-agent ", env!("CARGO_PKG_VERSION")));
    pinned["written_by"] = written["written_by"].clone();
    assert_eq!(
        written, pinned,
        "the state format changed: a field added with a default is read by format 2 as it is (write the \
         fixture again: HOTPLUG_BLESS_STATE_FORMAT=1 cargo test -p hotplug-user state::); anything else \
         raises FORMAT, and the old format is still read"
    );
    let again = load(GONE_2)?;
    assert_eq!(again.format, FORMAT);
    assert_eq!(serde_json::to_value(&again.nic)?, serde_json::to_value(&migrated)?);
    // Format 1 (the same envelope, fewer enum values) is read as it is.
    let one = load(GONE_1)?;
    assert_eq!(one.format, 1);
    assert_eq!(serde_json::to_value(&one.nic)?, serde_json::to_value(&migrated)?);
    Ok(())
}

#[test]
fn files_that_cannot_be_read_say_why() {
    assert!(matches!(decode::<Nic>(b"[1, 2]"), Err(FormatError::NotAnObject("array"))));
    assert!(matches!(decode::<Nic>(br#"{"format": 7, "nic": {}}"#), Err(FormatError::Newer { found: 7 })));
    assert!(matches!(decode::<Nic>(br#"{"format": "one"}"#), Err(FormatError::BadVersion(_))));
    let missing = decode::<Nic>(br#"{"format": 1}"#).map(|_| ()).map_err(|e| e.to_string());
    assert!(missing.as_ref().is_err_and(|e| e.contains("nic")), "{missing:?}");
    assert!(matches!(decode::<Nic>(b"{not json"), Err(FormatError::Json(_))));
}

#[test]
fn attach_statuses_read_as_0_1_0_wrote_them() -> Result<(), Error> {
    for (text, status) in [
        ("waiting-for-imds", AttachStatus::WaitingForImds),
        ("configured", AttachStatus::Configured),
        ("failed", AttachStatus::Failed),
        ("abandoned", AttachStatus::Abandoned),
        ("left-to-cloud-init", AttachStatus::LeftToCloudInit),
        ("imds-off", AttachStatus::ImdsOff),
    ] {
        let read: AttachStatus = serde_json::from_value(serde_json::Value::from(text))?;
        assert_eq!(read, status);
        assert_eq!(status.as_str(), text);
        assert_eq!(serde_json::to_value(status)?, serde_json::Value::from(text));
    }
    Ok(())
}

#[test]
fn format_2_with_bare_time_credits_still_loads() -> Result<(), Error> {
    let raw: serde_json::Value = serde_json::from_str(GONE_2_BARE_CREDITS)?;
    assert!(raw["nic"]["gate_credits"]["remove"][0].as_u64().is_some(), "{raw}");
    let Decoded { nic, format } = load(GONE_2_BARE_CREDITS)?;
    assert_eq!(format, 2);
    assert!(matches!(nic.record.state, NicState::DriverGone { .. }));
    // The bare times are not read: those halves go to cloud-init.
    assert!(nic.record.gate_credits.removes().is_empty() && !nic.record.gate_credits.has_adds());
    assert!(nic.snapshot.is_some());
    Ok(())
}
