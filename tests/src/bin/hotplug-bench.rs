//! `hotplug-bench restore`: restore latency for a NIC with 1, 10 and 100 addresses and routes,
//! beside the floor — the same netlink requests sent back to back by a minimal loop. Runs in a
//! private network namespace (needs root); prints figures, asserts nothing about speed.
//!
//! `hotplug-bench restore ROUNDS TABLE_ROUTES` first adds that many blackhole routes to `main`
//! (none through the NIC): a restore's cost should not depend on the rest of the host.
use std::{net::Ipv4Addr, process::Command};

use anyhow::{bail, Context as _, Result};
use hotplug::{clock::monotonic_ns, reconfigure::restore, snapshot};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

const MAC: &str = "02:00:00:00:bb:01";

fn ip(args: &str) -> Result<()> {
    let status =
        Command::new("ip").args(args.split_whitespace()).status().with_context(|| format!("ip {args}"))?;
    if !status.success() {
        bail!("ip {args} failed: {status}");
    }
    Ok(())
}

async fn ifindex(name: &str) -> Result<u32> {
    let links = hotplug::kernel::rtnl::dump_links().await?;
    links.iter().find(|l| l.name == name).map(|l| l.ifindex).context("no such link")
}

async fn fresh_link() -> Result<u32> {
    if ifindex("hb0").await.is_ok() {
        ip("link del hb0")?;
    }
    ip(&format!("link add hb0 address {MAC} type veth peer name hb1"))?;
    ip("link set hb1 up")?;
    ifindex("hb0").await
}

fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, u8::try_from(i / 250).unwrap_or(0), u8::try_from(i % 250 + 1).unwrap_or(1))
}

fn network(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, u8::try_from(i).unwrap_or(0), 0)
}

/// The configuration under test, with `ip` (not timed).
async fn configure(n: usize) -> Result<u32> {
    let index = fresh_link().await?;
    ip("link set hb0 up")?;
    for i in 0..n {
        ip(&format!("addr add {}/16 dev hb0", address(i)))?;
        ip(&format!("route add {}/24 via 10.20.255.254 dev hb0", network(i)))?;
    }
    Ok(index)
}

/// The floor: the same requests, back to back, no reading before or after.
async fn floor(handle: &Handle, n: usize, index: u32) -> Result<u64> {
    let start = monotonic_ns();
    for i in 0..n {
        handle.address().add(index, address(i).into(), 16).execute().await?;
    }
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    for i in 0..n {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network(i), 24)
            .gateway(Ipv4Addr::new(10, 20, 255, 254))
            .output_interface(index)
            .build();
        handle.route().add(route).execute().await?;
    }
    Ok(monotonic_ns() - start)
}

/// `count` blackhole /32 routes in `main`, through no NIC, with one `ip -batch`.
fn fill_main(count: u32) -> Result<()> {
    use std::io::Write as _;
    let batch = tempfile::NamedTempFile::new().context("a file for the route batch")?;
    let mut file = std::io::BufWriter::new(batch.as_file());
    for i in 0..count {
        writeln!(file, "route add blackhole 10.{}.{}.{}/32", 100 + i / 65536, (i / 256) % 256, i % 256)?;
    }
    file.flush()?;
    drop(file);
    let status = Command::new("ip").arg("-batch").arg(batch.path()).status().context("ip -batch")?;
    if !status.success() {
        bail!("adding {count} routes failed: {status}");
    }
    println!("main holds {count} more blackhole routes");
    Ok(())
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted.get((sorted.len() * p).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0)
}

async fn bench(rounds: usize) -> Result<()> {
    let netlink = snapshot::Netlink::connect()?;
    let handle = netlink.handle.clone();
    println!(
        "{:>5} {:>7} {:>12} {:>12} {:>12} {:>12}",
        "n", "rounds", "restore p50", "restore p99", "floor p50", "floor p99"
    );
    for n in [1usize, 10, 100] {
        let rounds = if n == 100 { rounds.div_ceil(2) } else { rounds };
        let mut restores = Vec::new();
        let mut floors = Vec::new();
        let mut phases: Vec<[u64; 5]> = Vec::new();
        for _ in 0..rounds {
            let index = configure(n).await?;
            let want = snapshot::capture(&netlink, index).await?;
            let index = fresh_link().await?;
            let start = monotonic_ns();
            let report = restore::restore(&netlink, &want, index, restore::RestoreOptions::default()).await;
            if !report.errors.is_empty() || !report.differences.is_empty() {
                bail!("restore of {n} was incomplete: {report:?}");
            }
            restores.push(report.last_ack_ns - start);
            let p = report.phases;
            phases.push([p.pre_read_us, p.link_us, p.addresses_us, p.routes_us, p.rules_us]);
            let index = fresh_link().await?;
            floors.push(floor(&handle, n, index).await?);
        }
        restores.sort_unstable();
        floors.sort_unstable();
        let us = |ns: u64| format!("{:.0} us", ns as f64 / 1000.0);
        println!(
            "{n:>5} {rounds:>7} {:>12} {:>12} {:>12} {:>12}",
            us(percentile(&restores, 50)),
            us(percentile(&restores, 99)),
            us(percentile(&floors, 50)),
            us(percentile(&floors, 99))
        );
        let phase_p50 = |i: usize| {
            let mut values: Vec<u64> = phases.iter().map(|p| p[i]).collect();
            values.sort_unstable();
            percentile(&values, 50)
        };
        println!(
            "      phases p50: pre-read {} us, link {} us, addresses {} us, routes {} us, rules {} us",
            phase_p50(0),
            phase_p50(1),
            phase_p50(2),
            phase_p50(3),
            phase_p50(4)
        );
        println!(
            "BENCH restore n={n} p50_us={} p99_us={} floor_p50_us={} floor_p99_us={}",
            percentile(&restores, 50) / 1000,
            percentile(&restores, 99) / 1000,
            percentile(&floors, 50) / 1000,
            percentile(&floors, 99) / 1000
        );
    }
    ip("link del hb0")?;
    Ok(())
}

/// `hotplug-bench time COMMAND [ARGS...]`: runs the command and prints how long it took in
/// microseconds (CLOCK_MONOTONIC; the guests' shell has no sub-millisecond clock).
fn time(mut args: impl Iterator<Item = String>) -> Result<()> {
    let program = args.next().context("usage: hotplug-bench time COMMAND [ARGS...]")?;
    let start = monotonic_ns();
    let status = Command::new(&program).args(args).status().with_context(|| format!("running {program}"))?;
    let elapsed_us = (monotonic_ns() - start) / 1000;
    if !status.success() {
        bail!("{program} failed ({status}) after {elapsed_us} us");
    }
    println!("{elapsed_us}");
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("restore") => {}
        Some("time") => return time(args),
        _ => bail!(
            "usage: hotplug-bench restore [ROUNDS [TABLE_ROUTES]]   (as root; runs in a private network namespace)\n       hotplug-bench time COMMAND [ARGS...]"
        ),
    }
    let rounds: usize =
        args.next().map(|r| r.parse()).transpose().context("ROUNDS must be a number")?.unwrap_or(20);
    let table_routes: u32 =
        args.next().map(|r| r.parse()).transpose().context("TABLE_ROUTES must be a number")?.unwrap_or(0);
    // SAFETY: called before any other thread exists; only this process's namespace changes.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET) failed ({}): run as root", std::io::Error::last_os_error());
    }
    ip("link set lo up")?;
    if table_routes > 0 {
        fill_main(table_routes)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(bench(rounds))
}
