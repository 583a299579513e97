//! An attach's routing on the host (a veth in a private network namespace stands in for the ENI,
//! another for the primary): the ENI's addresses carry no prefix route in `main`, so an IMDS
//! answer whose subnet overlaps the primary's (here a narrower block inside it) draws none of the
//! host's other traffic onto the new NIC; the subnet is on-link in the ENI's table only, and
//! main's default route behind the primary's is on-link.
use std::{net::IpAddr, process::Command};

use hotplug::{
    decide::attach_plan::{AttachPlan, PolicyRouting},
    reconfigure::attach,
    snapshot,
};
use hotplug_tests::host::{ifindex, in_private_netns, ip, is_root, skip};

/// `ip ARGS` and what it printed.
fn ip_out(args: &str) -> Result<String, String> {
    let output =
        Command::new("ip").args(args.split_whitespace()).output().map_err(|e| format!("ip {args}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ip {args} failed: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn scenario() -> Result<(), String> {
    for args in [
        "link set lo up",
        "link add pr0 type veth peer name pr1",
        "link set pr0 up",
        "link set pr1 up",
        "addr add 10.20.0.5/24 dev pr0",
        "route add default via 10.20.0.1 dev pr0 metric 512",
        "link add en0 type veth peer name en1",
        "link set en1 up",
    ] {
        ip(args)?;
    }
    let address: IpAddr = "10.20.0.70".parse().map_err(|e| format!("{e}"))?;
    let block: IpAddr = "10.20.0.0".parse().map_err(|e| format!("{e}"))?;
    let plan = AttachPlan {
        addresses: vec![(address, 25)],
        altnames: Vec::new(),
        policy: Some(PolicyRouting {
            table: 10001,
            metric: Some(513),
            gateway: "10.20.0.1".parse().map_err(|e| format!("{e}"))?,
            subnets: vec![(block, 25)],
            ipv6_default: false,
            main_default: true,
            sources: vec![(address, 32)],
        }),
    };
    let netlink = snapshot::Netlink::connect().map_err(|e| e.to_string())?;
    let report = attach::configure(&netlink.handle, ifindex("en0").await?, &plan).await;
    assert!(report.errors.is_empty(), "{report:#?}");

    let main = ip_out("-4 route show table main")?;
    assert!(!main.contains("10.20.0.0/25"), "no prefix route in main:\n{main}");
    let neighbour = ip_out("-4 route get 10.20.0.9")?;
    assert!(neighbour.contains("dev pr0"), "the primary's subnet stays the primary's:\n{neighbour}");
    let table = ip_out("-4 route show table 10001")?;
    assert!(
        table.contains("10.20.0.0/25 dev en0") && table.contains("default via 10.20.0.1 dev en0"),
        "{table}"
    );
    let default =
        main.lines().find(|l| l.starts_with("default") && l.contains("dev en0")).unwrap_or_default();
    assert!(
        default.contains("metric 513") && default.contains("onlink"),
        "main's default behind the primary's:\n{main}"
    );
    let from_eni = ip_out("-4 route get 8.8.8.8 from 10.20.0.70").map_err(|e| {
        format!(
            "{e}\nrules:\n{}\naddresses:\n{}",
            ip_out("rule").unwrap_or_default(),
            ip_out("addr show en0").unwrap_or_default()
        )
    })?;
    assert!(from_eni.contains("dev en0"), "traffic from the ENI's address by its table:\n{from_eni}");
    Ok(())
}

#[test]
fn an_attach_puts_its_subnet_in_its_table_only() -> Result<(), String> {
    if !is_root() {
        skip(
            "an_attach_puts_its_subnet_in_its_table_only",
            "needs root to create a network namespace and links",
        );
        return Ok(());
    }
    in_private_netns(scenario)
}
