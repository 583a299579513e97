//! Puts a NIC's tuning back (`snapshot::tuning`): the link attributes over rtnetlink, one request
//! each and only those that differ from what the link has (a refused one names itself and stops
//! nothing else), and its sysctls and queue settings through their files (every one kept: a NIC
//! just registered has its defaults). What the NIC has that the snapshot does not name (a
//! manager's doing meanwhile) is left alone.
//!
//! Order (the restore's): link attributes with the link's other changes, while it is down; then
//! sysctls and queues, before addresses and before the link goes up (`disable_ipv6`,
//! `accept_ra` and `addr_gen_mode` act when the link comes up and addresses arrive).
use std::fs;

use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

use crate::snapshot::tuning::{self, LinkTuning, Root, Setting, Tuning};

/// One link attribute to set: what it is (for errors and the report) and its request.
pub struct LinkChange {
    pub what: String,
    pub message: LinkMessage,
}

fn change(ifindex: u32, what: String, attribute: LinkAttribute) -> LinkChange {
    let mut message = LinkMessage::default();
    message.header.index = ifindex;
    message.attributes.push(attribute);
    LinkChange { what, message }
}

/// The MAC `aa:bb:…` as bytes, if it is one.
fn mac_bytes(text: &str) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> = text.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect();
    bytes.filter(|b| !b.is_empty() && b.len() <= 32)
}

/// The requests that make `have`'s attributes `want`'s, on `ifindex` (`master_index`: the ifindex
/// of the master `want` names, looked up by the caller; `Err` for what cannot be asked at all).
pub fn link_changes(
    ifindex: u32,
    want: &LinkTuning,
    have: &LinkTuning,
    master_index: Option<u32>,
) -> (Vec<LinkChange>, Vec<String>) {
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    if let Some(address) = want.address.as_ref().filter(|a| have.address.as_ref() != Some(*a)) {
        match mac_bytes(address) {
            Some(bytes) => changes.push(change(
                ifindex,
                format!("link address {address}"),
                LinkAttribute::Address(bytes),
            )),
            None => errors.push(format!("link address {address}: not a MAC address")),
        }
    }
    let numbers = [
        (
            "txqueuelen",
            want.txqueuelen,
            have.txqueuelen,
            LinkAttribute::TxQueueLen as fn(u32) -> LinkAttribute,
        ),
        ("gso_max_size", want.gso_max_size, have.gso_max_size, LinkAttribute::GsoMaxSize),
        ("gso_max_segs", want.gso_max_segs, have.gso_max_segs, LinkAttribute::GsoMaxSegs),
        ("gro_max_size", want.gro_max_size, have.gro_max_size, LinkAttribute::GroMaxSize),
    ];
    for (what, want, have, attribute) in numbers {
        if let Some(value) = want.filter(|v| Some(*v) != have) {
            changes.push(change(ifindex, format!("link {what} {value}"), attribute(value)));
        }
    }
    if let Some(group) = want.group.filter(|g| have.group != Some(*g)) {
        changes.push(change(ifindex, format!("link group {group}"), LinkAttribute::Group(group)));
    }
    if let Some(alias) = want.alias.as_ref().filter(|a| have.alias.as_ref() != Some(*a)) {
        changes.push(change(ifindex, format!("link alias {alias}"), LinkAttribute::IfAlias(alias.clone())));
    }
    if let Some(master) = want.master.as_ref().filter(|m| have.master.as_ref() != Some(*m)) {
        match master_index {
            Some(index) => changes.push(change(
                ifindex,
                format!("link master {master}"),
                LinkAttribute::Controller(index),
            )),
            None => errors.push(format!("link master {master}: no such link now (it went with the NIC?)")),
        }
    }
    (changes, errors)
}

/// One sysctl or queue setting written, or why not.
pub type Written = (String, Result<(), String>);

/// Writes `want`'s sysctls and queue settings on `interface` where `have` (what the NIC has now,
/// as far as the caller read it) differs. What `have` has that `want` has not is left alone: a
/// manager may have set it since.
pub fn write_settings(root: &Root, interface: &str, want: &Tuning, have: &Tuning) -> Vec<Written> {
    let mut written = Vec::new();
    if !tuning::safe_name(interface) {
        written.push((format!("settings of {interface:?}"), Err("not an interface name".to_owned())));
        return written;
    }
    for setting in want.sysctls.iter().filter(|s| !have.sysctls.contains(s)) {
        let what = format!("sysctl {}", setting.key);
        let result = match tuning::sysctl_parts(&setting.key) {
            Some((tree, name)) => write(&root.sysctl(tree, interface, name), setting),
            None => Err("not a per-interface sysctl this agent keeps".to_owned()),
        };
        written.push((what, result));
    }
    for setting in want.queues.iter().filter(|s| !have.queues.contains(s)) {
        let what = format!("queue {}", setting.key);
        let result = match tuning::queue_parts(&setting.key) {
            Some((queue, file)) => write(&root.queue(interface, queue, file), setting),
            None => Err("not a queue setting this agent keeps".to_owned()),
        };
        written.push((what, result));
    }
    written
}

fn write(path: &std::path::Path, setting: &Setting) -> Result<(), String> {
    // What the NIC has already (a value its driver sets itself, XPS say) is not written again.
    if fs::read_to_string(path).is_ok_and(|now| now.trim() == setting.value) {
        return Ok(());
    }
    // No create: a setting this kernel or device does not have is an error, not a new file.
    let file = fs::OpenOptions::new().write(true).truncate(true).open(path);
    let result = file.and_then(|mut f| std::io::Write::write_all(&mut f, setting.value.as_bytes()));
    result.map_err(|error| match error.raw_os_error() {
        Some(libc::ENOENT) => "this kernel or device has no such setting now".to_owned(),
        _ => format!("writing {}: {error}", setting.value),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn setting(key: &str, value: &str) -> Setting {
        Setting { key: key.into(), value: value.into() }
    }

    #[test]
    fn only_what_differs_is_asked_for() {
        let want = LinkTuning {
            txqueuelen: Some(5000),
            alias: Some("uplink".into()),
            group: Some(7),
            gso_max_size: Some(65536),
            address: Some("02:00:00:00:00:09".into()),
            master: Some("br0".into()),
            ..LinkTuning::default()
        };
        let have = LinkTuning {
            txqueuelen: Some(1000),
            gso_max_size: Some(65536),
            group: Some(3),
            ..LinkTuning::default()
        };
        let (changes, errors) = link_changes(9, &want, &have, Some(4));
        let whats: Vec<&str> = changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "link address 02:00:00:00:00:09",
                "link txqueuelen 5000",
                "link group 7",
                "link alias uplink",
                "link master br0"
            ]
        );
        assert!(errors.is_empty());
        assert!(changes.iter().all(|c| c.message.header.index == 9));
        assert_eq!(changes[0].message.attributes, vec![LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9])]);
        assert_eq!(changes[4].message.attributes, vec![LinkAttribute::Controller(4)]);
        let (none, _) = link_changes(9, &want, &want, Some(4));
        assert!(none.is_empty(), "nothing to do on a NIC that has it all");
        let grouped = LinkTuning { group: Some(3), ..LinkTuning::default() };
        assert!(
            link_changes(9, &LinkTuning::default(), &grouped, None).0.is_empty(),
            "a group set since is left alone"
        );
        let (_, errors) = link_changes(9, &want, &have, None);
        assert_eq!(errors, vec!["link master br0: no such link now (it went with the NIC?)"]);
        let bad = LinkTuning { address: Some("zz".into()), ..LinkTuning::default() };
        assert_eq!(
            link_changes(9, &bad, &LinkTuning::default(), None).1,
            vec!["link address zz: not a MAC address"]
        );
    }

    #[test]
    fn settings_are_written_where_they_differ_and_refused_elsewhere() -> Result<(), std::io::Error> {
        let dir = std::env::temp_dir().join(format!("hotplug-write-tuning-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = Root(dir.clone());
        let rp_filter = root.sysctl("ipv4/conf", "eth1", "rp_filter");
        let rps = root.queue("eth1", "rx-0", "rps_cpus");
        for path in [&rp_filter, &rps] {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, "0\n")?;
        }
        let want = Tuning {
            sysctls: vec![setting("ipv4/conf/rp_filter", "2"), setting("ipv6/conf/accept_ra", "0")],
            queues: vec![setting("rx-0/rps_cpus", "3"), setting("rx-0/../../../x", "1")],
            ..Tuning::default()
        };
        let written = write_settings(&root, "eth1", &want, &Tuning::default());
        let outcome: Vec<(&str, bool)> = written.iter().map(|(w, r)| (w.as_str(), r.is_ok())).collect();
        assert_eq!(
            outcome,
            [
                ("sysctl ipv4/conf/rp_filter", true),
                ("sysctl ipv6/conf/accept_ra", false),
                ("queue rx-0/rps_cpus", true),
                ("queue rx-0/../../../x", false),
            ]
        );
        assert_eq!(written[1].1, Err("this kernel or device has no such setting now".to_owned()));
        assert_eq!(fs::read_to_string(&rp_filter)?, "2");
        assert_eq!(fs::read_to_string(&rps)?, "3");
        assert!(!PathBuf::from(&dir).join("x").exists() && !dir.join("sys/x").exists());
        // What the NIC has already is not written again.
        let again = write_settings(&root, "eth1", &want, &want);
        assert!(again.is_empty(), "{again:?}");
        assert!(write_settings(&root, "../eth1", &want, &Tuning::default())[0].1.is_err());
        fs::remove_dir_all(&dir)
    }
}
