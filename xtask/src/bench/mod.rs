//! `cargo xtask bench`: benchmarks that print figures. They are not part of `cargo xtask test`
//! (they take minutes and assert nothing); their last results are in the README.
//!
//! Without a subcommand every benchmark runs (micro-benchmarks, the benchmark scenarios, the large
//! routing table when root) and `target/bench/results.json`, `restore.svg` and `summary.md` are
//! written; `--publish` also puts the picture and the table into `docs/bench/` and README.md.
mod report;

use std::{fs, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::arch::Arch;
use crate::{build, cmd, distro, kernels, package, setup, vm};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// One benchmark; without one, every benchmark.
    #[command(subcommand)]
    pub which: Option<Bench>,
    /// With every benchmark: also copy the picture to docs/bench/restore.svg and the table into
    /// README.md (between its `bench:begin` and `bench:end` markers).
    #[arg(long)]
    pub publish: bool,
}

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// The user-space micro-benchmarks (criterion: record decoding and classification, the
    /// decision, snapshot comparisons, and the whole path's records per second). Writes
    /// target/bench/micro.json.
    Micro,
    /// The benchmark scenarios (`# bench: yes` in tests/scenarios: restore latency against the
    /// netlink floor, each driver's reload against `ip -batch`, event delivery, storms, idle
    /// cost), each on its kernels. Writes target/bench/scenarios.json and prints the figures.
    Scenarios {
        /// Only scenarios whose name contains this.
        #[arg(long)]
        scenario: Option<String>,
        /// Only this guest architecture (default: both; arm64 runs the benchmarks marked
        /// `# arches: ... arm64`, on the same kernels).
        #[arg(long, value_enum)]
        arch: Option<Arch>,
    },
    /// The large routing table case, natively on this machine (root): the agent (degraded mode
    /// here) in a private network namespace with one managed veth; 200,000 blackhole routes added
    /// to `main` (none on the NIC), then ten address changes on the NIC. Prints the agent's CPU
    /// time and RSS at each step and writes target/bench/large-table.json.
    LargeTable {
        /// Routes to add.
        #[arg(long, default_value_t = 200_000)]
        routes: u32,
    },
    /// cloud-init's hotplug hook against hotplug-agent, side by side: the distro guest with
    /// cloud-init (Ec2 datasource, hotplug hook as Debian ships it) booted twice, without then with
    /// the package; the same virtio_net reloads and a real attach in each. Writes
    /// target/bench/cloud-init.json and prints a table.
    CloudInit {
        /// Driver reloads in each run.
        #[arg(long, default_value_t = 3)]
        reloads: u32,
        /// Guest kernel.
        #[arg(long, value_enum, default_value = "trixie")]
        kernel: kernels::Suite,
        /// The distro guest: trixie (cloud-init 25.1) or sid (the newest cloud-init).
        #[arg(long, value_enum, default_value = "trixie")]
        distro: distro::Distro,
        /// Take the cloud-init-alone half from its last run
        /// (target/vm-results/bench-cloud-init-alone-KERNEL.json, same kernel and reload count)
        /// instead of running it again: it does not depend on hotplug's code and takes about 45
        /// minutes. Its date is printed with the table.
        #[arg(long)]
        reuse_alone: bool,
    },
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match &args.which {
        None => all(args.publish),
        Some(_) if args.publish => bail!("--publish goes with every benchmark (no subcommand)"),
        Some(Bench::Micro) => {
            let micro = micro()?;
            write_results("micro.json", &json!({ "command": "cargo xtask bench micro", "figures": micro }))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Bench::CloudInit { reloads, kernel, distro, reuse_alone }) => {
            cloud_init(*reloads, *kernel, *distro, *reuse_alone)
        }
        Some(Bench::Scenarios { scenario, arch }) => {
            let (runs, failed) = scenarios(scenario.as_deref(), *arch)?;
            print_runs(&runs);
            write_results(
                "scenarios.json",
                &json!({ "command": "cargo xtask bench scenarios", "runs": runs }),
            )?;
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Some(Bench::LargeTable { routes }) => {
            let figures = large_table(*routes)?;
            write_results(
                "large-table.json",
                &json!({
                    "command": format!("cargo xtask bench large-table --routes {routes}"),
                    "routes": routes,
                    "figures": figures,
                }),
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every benchmark but the cloud-init one (an hour, and about cloud-init more than hotplug).
fn all(publish: bool) -> Result<ExitCode> {
    eprintln!("bench: micro-benchmarks");
    let micro = micro()?;
    eprintln!("bench: benchmark scenarios");
    let (runs, failed) = scenarios(None, None)?;
    let large_table = if cmd::is_root() {
        eprintln!("bench: the large routing table");
        large_table(200_000)?
    } else {
        eprintln!("bench: SKIPPED the large routing table: it needs root (a network namespace and routes)");
        json!({ "skipped": "not root" })
    };
    let results = json!({
        "command": "cargo xtask bench",
        "micro": micro,
        "runs": runs,
        "large_table": large_table.clone(),
    });
    let results = write_results("results.json", &results)?;
    let dir = cmd::target_dir().join("bench");
    let svg = report::svg(&results);
    let summary = report::markdown(&results);
    fs::write(dir.join("restore.svg"), &svg)?;
    fs::write(dir.join("summary.md"), &summary)?;
    println!("{summary}");
    eprintln!("bench: picture in {}", dir.join("restore.svg").display());
    if publish {
        if failed || large_table.get("skipped").is_some() {
            bail!(
                "not publishing: {}; the results are in {}",
                if failed {
                    "a benchmark scenario failed"
                } else {
                    "the large routing table was skipped (not root)"
                },
                dir.display()
            );
        }
        report::publish(&svg, &summary)?;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Writes `results` with the date and this machine to target/bench/NAME; returns what it wrote.
fn write_results(name: &str, results: &Value) -> Result<Value> {
    let mut results = results.clone();
    if let Some(object) = results.as_object_mut() {
        object.insert("date".into(), json!(cmd::utc_now()));
        object.insert("machine".into(), json!(cmd::machine_summary()));
    }
    let dir = cmd::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    eprintln!("bench: written to {}", path.display());
    Ok(results)
}

/// Runs the criterion benchmarks and reads their estimates: each one's mean in ns, and for a
/// benchmark with a throughput, its elements per second.
fn micro() -> Result<Value> {
    setup::ensure_toolchain()?;
    let started = std::time::SystemTime::now();
    cmd::run(cmd::cargo().args(["bench", "-p", "hotplug-user", "--bench", "pipeline"]))?;
    let mut figures = serde_json::Map::new();
    let mut found = Vec::new();
    collect_estimates(&cmd::target_dir().join("criterion"), started, &mut found)?;
    found.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, mean_ns, elements) in found {
        println!("  {id:<60} {mean_ns:>12.1} ns");
        figures.insert(format!("{id} mean_ns"), json!((mean_ns * 10.0).round() / 10.0));
        if let Some(elements) = elements {
            let per_second = (elements as f64 * 1e9 / mean_ns).round();
            println!("  {id:<60} {per_second:>12.0} per second");
            figures.insert(format!("{id} per_second"), json!(per_second));
        }
    }
    if figures.is_empty() {
        bail!("criterion left no estimates under {}", cmd::target_dir().join("criterion").display());
    }
    Ok(Value::Object(figures))
}

/// (id, mean ns, elements per iteration) of each `new/` result under `dir` written since `since`
/// (criterion keeps the results of benchmarks renamed or removed since).
fn collect_estimates(
    dir: &std::path::Path,
    since: std::time::SystemTime,
    found: &mut Vec<(String, f64, Option<u64>)>,
) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let written = fs::metadata(path.join("estimates.json")).and_then(|m| m.modified());
            if !written.is_ok_and(|w| w >= since) {
                continue;
            }
            let read = |name: &str| -> Result<Value> {
                let file = path.join(name);
                let text =
                    fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
            };
            let (benchmark, estimates) = (read("benchmark.json")?, read("estimates.json")?);
            let id = benchmark["full_id"].as_str().unwrap_or("?").to_owned();
            let Some(mean) = estimates["mean"]["point_estimate"].as_f64() else { continue };
            found.push((id, mean, benchmark["throughput"]["Elements"].as_u64()));
        } else if path.file_name().is_some_and(|n| n != "base" && n != "report") {
            collect_estimates(&path, since, found)?;
        }
    }
    Ok(())
}

fn print_runs(runs: &[Value]) {
    for run in runs {
        println!("{} on {} ({}):", run["scenario"], run["kernel"], run["arch"]);
        if let Some(figures) = run["figures"].as_object() {
            for (key, value) in figures {
                println!("  {key:<40} {value}");
            }
        }
    }
}

/// The large routing table case natively (see `Bench::LargeTable`): its figures.
fn large_table(routes: u32) -> Result<Value> {
    if !cmd::is_root() {
        bail!("the large-table benchmark makes a network namespace and routes: run it as root");
    }
    setup::ensure_toolchain()?;
    let binaries = build::guest_binaries(Arch::Amd64)?;
    let agent = binaries.first().context("no agent binary")?;
    let script = cmd::workspace_root().join("tests/bench/large-table.sh");
    let output = cmd::output(
        std::process::Command::new("unshare")
            .arg("--net")
            .arg("sh")
            .arg(&script)
            .arg(agent)
            .arg(routes.to_string()),
    )
    .context("the large-table script failed")?;
    let mut figures = serde_json::Map::new();
    for line in output.lines() {
        if let Some((name, value)) = line.strip_prefix("FIGURE ").and_then(|l| l.split_once(' ')) {
            let value: Value = match (value.parse::<u64>(), value.parse::<f64>()) {
                (Ok(v), _) => json!(v),
                (_, Ok(v)) => json!(v),
                _ => json!(value),
            };
            println!("  {name:<40} {value}");
            figures.insert(name.to_owned(), value);
        }
    }
    // A restore with and without 200,000 routes elsewhere in `main` (hotplug-bench makes its own
    // network namespace and fills it).
    let bench = binaries.get(1).context("no hotplug-bench binary")?;
    for (label, table_routes) in [("idle_table", 0), ("large_table", routes)] {
        let output = cmd::output(
            std::process::Command::new(bench).args(["restore", "10"]).arg(table_routes.to_string()),
        )
        .context("hotplug-bench restore failed")?;
        for line in output.lines().filter_map(|l| l.strip_prefix("BENCH restore ")) {
            let mut words = line.split_whitespace();
            let Some(n) = words.next().and_then(|w| w.strip_prefix("n=")) else { continue };
            for (key, value) in words.filter_map(|w| w.split_once('=')) {
                if key == "p50_us" || key == "floor_p50_us" {
                    let name = format!("restore_n{n}_{key}_{label}");
                    let value: Value = value.parse::<u64>().map_or_else(|_| json!(value), |v| json!(v));
                    println!("  {name:<40} {value}");
                    figures.insert(name, value);
                }
            }
        }
    }
    Ok(Value::Object(figures))
}

/// Runs the benchmark scenarios; their runs, and whether one failed.
fn scenarios(only: Option<&str>, arch: Option<Arch>) -> Result<(Vec<Value>, bool)> {
    let benches: Vec<vm::Scenario> = vm::scenarios()?
        .into_iter()
        .filter(|s| s.bench && only.is_none_or(|name| s.name.contains(name)))
        .collect();
    if benches.is_empty() {
        bail!("no benchmark scenario (`# bench: yes`) matches {only:?}");
    }
    let wants = |a: Arch| arch.is_none_or(|chosen| chosen == a);
    let suites_of = |a: Arch| -> Vec<kernels::Suite> {
        let mut suites: Vec<kernels::Suite> = Vec::new();
        let on = benches.iter().filter(|s| wants(a) && s.arches.contains(&a));
        for suite in on.flat_map(|s| s.kernels.iter().copied()) {
            if !suites.contains(&suite) {
                suites.push(suite);
            }
        }
        suites
    };
    let (amd64_suites, arm64_suites) = (suites_of(Arch::Amd64), suites_of(Arch::Arm64));
    if amd64_suites.is_empty() && arm64_suites.is_empty() {
        bail!("no benchmark scenario matches {only:?} on {}", arch.map_or("any architecture", Arch::name));
    }
    let prepared = setup::run(&setup::SetupArgs {
        // An empty list would mean every kernel.
        kernels: if amd64_suites.is_empty() { vec![kernels::Suite::Bookworm] } else { amd64_suites },
        arm64_kernels: arm64_suites,
        toolchain_only: false,
        refresh_kernels: false,
        rebuild_distro: false,
    })?;
    let amd64_binaries = build::guest_binaries(Arch::Amd64)?;
    let arm64_binaries = if wants(Arch::Arm64) && benches.iter().any(|s| s.arches.contains(&Arch::Arm64)) {
        build::guest_binaries(Arch::Arm64)?
    } else {
        Vec::new()
    };
    let mut runs = Vec::new();
    let mut failed = false;
    for scenario in &benches {
        if scenario.distro.is_some() {
            bail!("{}: a benchmark runs in the busybox guest", scenario.name);
        }
        let runs_on = |k: &&kernels::GuestKernel| {
            scenario.kernels.contains(&k.suite) && scenario.arches.contains(&k.arch) && wants(k.arch)
        };
        for kernel in prepared.kernels.iter().filter(runs_on) {
            eprintln!("bench: {} on {} ({})", scenario.name, kernel.release, kernel.arch.name());
            let guest = vm::Guest {
                kernel: kernel.clone(),
                nics: scenario.nics.clone(),
                memory_mib: 1024,
                binaries: match kernel.arch {
                    Arch::Amd64 => amd64_binaries.clone(),
                    Arch::Arm64 => arm64_binaries.clone(),
                },
                distro: None,
            };
            let outcome = guest.run(&scenario.path, Duration::from_secs(900), vm::Console::Stream)?;
            vm::write_result(&scenario.name, &guest, &outcome)?;
            failed |= !outcome.passed();
            runs.push(json!({
                "scenario": scenario.name,
                "arch": kernel.arch.name(),
                "kernel": kernel.release,
                "passed": outcome.passed(),
                "figures": outcome.figures,
            }));
        }
    }
    Ok((runs, failed))
}

fn cloud_init(
    reloads: u32,
    suite: kernels::Suite,
    guest: distro::Distro,
    reuse_alone: bool,
) -> Result<ExitCode> {
    let prepared = setup::run(&setup::SetupArgs {
        kernels: vec![suite],
        arm64_kernels: Vec::new(),
        toolchain_only: false,
        refresh_kernels: false,
        rebuild_distro: false,
    })?;
    let kernel = prepared.kernels.first().context("no guest kernel prepared")?.clone();
    let image = match prepared.distros.iter().find(|d| d.distro == guest) {
        Some(image) => image.clone(),
        None => distro::ensure(guest, false)?,
    };
    let binaries = build::guest_binaries(Arch::Amd64)?;
    let packages = package::build_packages(Arch::Amd64)?;
    let root = cmd::workspace_root();
    let body = fs::read_to_string(root.join("tests/bench/cloud-init.sh"))?;
    let dir = cmd::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let script = dir.join("cloud-init-guest.sh");
    fs::write(&script, format!("BENCH_RELOADS={reloads}\n{body}"))?;
    let mut runs = Vec::new();
    let mut halves = vec![("cloud-init alone", false), ("cloud-init + hotplug-agent", true)];
    if reuse_alone {
        let (label, figures) = last_alone_run(&kernel.release, guest, reloads)?;
        eprintln!("bench: cloud-init alone: reusing {label}");
        runs.push(("cloud-init alone", figures));
        halves.remove(0);
    }
    for (label, preinstall) in halves {
        eprintln!(
            "bench: {label}: {reloads} reloads and an attach (this takes minutes without hotplug-agent)"
        );
        let guest = vm::Guest {
            kernel: kernel.clone(),
            nics: vm::DEFAULT_NICS.to_vec(),
            memory_mib: 1024,
            binaries: binaries.clone(),
            distro: Some(vm::DistroBoot {
                image: image.clone(),
                managers: vec![vm::Manager::CloudInit],
                packages: packages.clone(),
                preinstall,
                imds_nics: true,
            }),
        };
        let outcome = guest.run(&script, Duration::from_secs(3600), vm::Console::Capture)?;
        let name = if preinstall { "bench-cloud-init-with-hotplug" } else { "bench-cloud-init-alone" };
        vm::write_result(name, &guest, &outcome)?;
        if !outcome.passed() {
            bail!(
                "{label}: the guest failed ({}); its console is in target/vm-results/{name}*.log",
                outcome.summary()
            );
        }
        runs.push((label, outcome.figures));
    }
    let result = json!({
        "benchmark": "cloud-init",
        "kernel": kernel.release,
        "distro": guest.name(),
        "reloads": reloads,
        "alone_half_reused": reuse_alone,
        "runs": runs.iter().map(|(label, figures)| json!({ "label": label, "figures": figures })).collect::<Vec<_>>(),
    });
    write_results("cloud-init.json", &result)?;
    print_table(reloads, &runs);
    Ok(ExitCode::SUCCESS)
}

/// The figures of the last cloud-init-alone run on this kernel and distro guest, with a label saying which run.
fn last_alone_run(
    release: &str,
    guest: distro::Distro,
    reloads: u32,
) -> Result<(String, std::collections::BTreeMap<String, Value>)> {
    let dir = cmd::target_dir().join("vm-results");
    let candidates = fs::read_dir(&dir)
        .with_context(|| format!("--reuse-alone: no results in {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bench-cloud-init-alone") && n.ends_with(".json"))
        });
    for path in candidates {
        let text = fs::read_to_string(&path)?;
        let run: Value =
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        let figures: std::collections::BTreeMap<String, Value> =
            serde_json::from_value(run["figures"].clone()).unwrap_or_default();
        let complete = (1..=reloads).all(|k| figures.contains_key(&format!("reload_{k}_imds_requests")))
            && !figures.contains_key(&format!("reload_{}_imds_requests", reloads + 1));
        if run["kernel_release"] == release
            && run["guest"] == guest.name()
            && run["passed"] == true
            && complete
        {
            let modified = fs::metadata(&path)?.modified()?;
            let age = modified.elapsed().unwrap_or_default().as_secs() / 3600;
            return Ok((format!("{} (written {age} h ago)", path.display()), figures));
        }
    }
    bail!(
        "--reuse-alone: no passed cloud-init-alone run with {reloads} reloads on {release} in {}; \
         run the bench without --reuse-alone once",
        dir.display()
    )
}

fn print_table(reloads: u32, runs: &[(&str, std::collections::BTreeMap<String, Value>)]) {
    let (Some((_, alone)), Some((_, with))) = (runs.first(), runs.get(1)) else { return };
    let seconds = |v: Option<&Value>| match v.and_then(Value::as_f64) {
        Some(ms) => format!("{:.2} s", ms / 1000.0),
        None => "never (120 s)".to_owned(),
    };
    let count =
        |v: Option<&Value>| v.and_then(Value::as_u64).map_or_else(|| "-".to_owned(), |n| n.to_string());
    let ratio =
        |a: Option<&Value>, b: Option<&Value>| match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.0}x", a / b),
            (None, Some(_)) => "never vs done".to_owned(),
            _ => "-".to_owned(),
        };
    println!("| | cloud-init alone | cloud-init + hotplug-agent | ratio |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for k in 1..=reloads {
        rows.push((format!("reload {k}: configuration back"), format!("reload_{k}_ms"), true));
        rows.push((format!("reload {k}: IMDS requests"), format!("reload_{k}_imds_requests"), false));
    }
    rows.push(("attach: configured".to_owned(), "attach_ms".to_owned(), true));
    rows.push(("attach: IMDS requests".to_owned(), "attach_imds_requests".to_owned(), false));
    for (label, key, is_time) in rows {
        let (a, b) = (alone.get(&key), with.get(&key));
        if is_time {
            println!("| {label} | {} | {} | {} |", seconds(a), seconds(b), ratio(a, b));
        } else {
            println!("| {label} | {} | {} | |", count(a), count(b));
        }
    }
}
