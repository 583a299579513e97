//! `cargo xtask bench`: benchmarks that print figures. They are not part of `cargo xtask test`
//! (they take minutes and assert nothing); their last results are in the README.
use std::{fs, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::{build, cmd, distro, kernels, package, setup, vm};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Subcommand, Debug)]
pub enum Bench {
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
    },
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match &args.which {
        Bench::CloudInit { reloads, kernel } => cloud_init(*reloads, *kernel),
    }
}

fn cloud_init(reloads: u32, suite: kernels::Suite) -> Result<ExitCode> {
    let prepared = setup::run(&setup::SetupArgs {
        kernels: vec![suite],
        toolchain_only: false,
        refresh_kernels: false,
        rebuild_distro: false,
    })?;
    let kernel = prepared.kernels.first().context("no guest kernel prepared")?.clone();
    let image =
        prepared.distros.iter().find(|d| d.distro == distro::Distro::Trixie).context("no distro image")?;
    let binaries = build::guest_binaries()?;
    let packages = package::build_packages()?;
    let root = cmd::workspace_root();
    let body = fs::read_to_string(root.join("tests/bench/cloud-init.sh"))?;
    let dir = cmd::target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let script = dir.join("cloud-init-guest.sh");
    fs::write(&script, format!("BENCH_RELOADS={reloads}\n{body}"))?;
    let mut runs = Vec::new();
    for (label, preinstall) in [("cloud-init alone", false), ("cloud-init + hotplug-agent", true)] {
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
        "reloads": reloads,
        "runs": runs.iter().map(|(label, figures)| json!({ "label": label, "figures": figures })).collect::<Vec<_>>(),
    });
    let path: PathBuf = dir.join("cloud-init.json");
    fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
    print_table(reloads, &runs);
    eprintln!("bench: written to {}", path.display());
    Ok(ExitCode::SUCCESS)
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
