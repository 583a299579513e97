//! `cargo xtask test`: set-up, formatting, lints, unit and host tests, and every VM scenario on
//! every guest kernel it names. Ends with one line `N passed, N failed, N skipped`: a host test
//! that could not run here (no root) records itself in `HOTPLUG_SKIP_LOG` and counts as skipped.
use std::{
    io::{BufRead as _, BufReader},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{arch::Arch, build, cmd, distro::Distro, fuzz, kernels, package, setup, vm};

/// How long each fuzz target runs in `cargo xtask test` (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS: u64 = 6;

/// The arm64 guest kernels run by default (`--kernels` names others, `all` every one).
const ARM64_DEFAULT_KERNELS: [kernels::Suite; 1] = [kernels::Suite::Trixie];

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Only these guest kernels, or `all` (default: every kernel a scenario names on amd64, and
    /// trixie on arm64).
    #[arg(long, value_delimiter = ',', value_parser = parse_kernels)]
    pub kernels: Vec<Vec<kernels::Suite>>,
    /// Also these distro guests, for the scenarios that list them (`# guests-extra: sid`), or
    /// `all`. Each is built first if missing (sid: a few minutes).
    #[arg(long, value_delimiter = ',', value_parser = parse_distros)]
    pub distros: Vec<Vec<Distro>>,
    /// Only this guest architecture's scenarios (default: both; arm64 runs the scenarios marked
    /// `# arches: ... arm64`).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Skip the VM scenarios (fmt, clippy, unit and host tests only).
    #[arg(long)]
    pub no_vm: bool,
    /// Only scenarios whose name contains this.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Skip the short fuzzing run.
    #[arg(long)]
    pub no_fuzz: bool,
}

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
    skipped: Vec<String>,
    failures: Vec<String>,
    /// Scenarios run twice because QEMU died under the first run.
    retried: Vec<String>,
}

impl Tally {
    fn skip(&mut self, line: &str) {
        self.skipped.push(line.to_owned());
    }

    fn record(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(name.to_owned());
        }
    }
}

/// A `--distros` word: a distro, or `all`.
fn parse_distros(word: &str) -> Result<Vec<Distro>, String> {
    if word.eq_ignore_ascii_case("all") {
        return Ok(<Distro as clap::ValueEnum>::value_variants().to_vec());
    }
    <Distro as clap::ValueEnum>::from_str(word, true).map(|distro| vec![distro])
}

/// A `--kernels` word: a suite (or its kernel version), or `all`.
fn parse_kernels(word: &str) -> Result<Vec<kernels::Suite>, String> {
    if word.eq_ignore_ascii_case("all") {
        return Ok(kernels::Suite::ALL.to_vec());
    }
    <kernels::Suite as clap::ValueEnum>::from_str(word, true).map(|suite| vec![suite])
}

pub fn run(args: &TestArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut chosen: Vec<kernels::Suite> = Vec::new();
    for suite in args.kernels.iter().flatten() {
        if !chosen.contains(suite) {
            chosen.push(*suite);
        }
    }
    let amd64 = args.arch.is_none_or(|a| a == Arch::Amd64);
    // arm64: the cross-build and its packages always, its guests unless --no-vm.
    let arm64_build = args.arch.is_none_or(|a| a == Arch::Arm64);
    let arm64_vm = arm64_build && !args.no_vm;
    // Set-up prepares amd64 kernels; an empty list means all of them, so --arch arm64 asks for
    // just one.
    let amd64_kernels = if amd64 { chosen.clone() } else { vec![kernels::Suite::Trixie] };
    let arm64_kernels: Vec<kernels::Suite> = match (arm64_vm, chosen.is_empty()) {
        (false, _) => Vec::new(),
        (true, true) => ARM64_DEFAULT_KERNELS.to_vec(),
        (true, false) => chosen.clone(),
    };
    step("set-up (toolchains, guest kernels, distro image)");
    let mut prepared = setup::run(&setup::SetupArgs {
        kernels: amd64_kernels,
        arm64_kernels: Vec::new(),
        toolchain_only: false,
        refresh_kernels: false,
        rebuild_distro: false,
    })?;
    let mut tally = Tally::default();
    let extra_distros: Vec<Distro> = args.distros.iter().flatten().copied().collect();
    if !args.no_vm {
        let missing: Vec<Distro> = extra_distros
            .iter()
            .filter(|d| !prepared.distros.iter().any(|i| i.distro == **d))
            .copied()
            .collect();
        for distro in &missing {
            step(&format!("set-up: the {} distro guest's image", distro.name()));
            match crate::distro::ensure(*distro, false) {
                Ok(image) => prepared.distros.push(image),
                Err(error) => {
                    println!("{} distro image: {error:#}", distro.name());
                    tally.record(&format!("set-up: the {} distro guest's image", distro.name()), false);
                }
            }
        }
    }
    // arm64's own set-up (cross toolchain, emulator, userland, kernels) fails as one check, not
    // the whole run: everything else is still tested.
    if !arm64_kernels.is_empty() {
        step("set-up for arm64 guests (emulator, firmware, cross toolchain, userland, kernels)");
        match setup::arm64_guests(&arm64_kernels, false) {
            Ok(kernels) => prepared.kernels.extend(kernels),
            Err(error) => {
                println!("arm64 set-up failed: {error:#}");
                tally.record("set-up for arm64 guests", false);
            }
        }
    }
    let root = cmd::workspace_root();

    step("cargo fmt --check");
    let fmt = cmd::cargo().current_dir(&root).args(["fmt", "--all", "--check"]).status()?;
    tally.record("cargo fmt --check", fmt.success());

    step("cargo clippy (warnings are errors)");
    let clippy = cmd::cargo()
        .current_dir(&root)
        .env_remove("HOTPLUG_SKIP_EBPF")
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .status()?;
    tally.record("cargo clippy", clippy.success());

    step("cargo clippy for the eBPF programs (nightly, bpfel-unknown-none)");
    let clippy_ebpf = build::ebpf_cargo("clippy").args(["--", "-D", "warnings"]).status()?;
    tally.record("cargo clippy (eBPF)", clippy_ebpf.success());

    step("unit and host tests (cargo test)");
    cargo_test(&mut tally)?;

    if !args.no_fuzz {
        step(&format!(
            "fuzz targets, unoptimized, {FUZZ_SECONDS} s each (cargo xtask fuzz builds them optimized and runs them longer)"
        ));
        let fuzzed = setup::ensure_cargo_fuzz()
            .and_then(|()| fuzz::fuzz(&fuzz::FuzzArgs { seconds: FUZZ_SECONDS, target: None, dev: true }));
        match fuzzed {
            Ok(outcomes) => {
                for outcome in outcomes {
                    tally.record(&format!("fuzz {}", outcome.target), outcome.passed);
                }
            }
            Err(error) => {
                println!("fuzz: {error:#}");
                tally.record("fuzz targets (did not build or run)", false);
            }
        }
    }

    step("packages (.deb, .rpm) and their checks");
    let packages = package::build_packages(Arch::Amd64)?;
    let problems = package::check(&packages, Arch::Amd64)?;
    for problem in &problems {
        println!("package: {problem}");
    }
    tally.record("packages: lintian, file lists, linked libraries", problems.is_empty());

    let arm64_binaries = if arm64_build {
        step("arm64: cross-build (--target aarch64-unknown-linux-gnu), packages and their checks");
        match arm64_packages() {
            Ok((binaries, problems)) => {
                for problem in &problems {
                    println!("package (arm64): {problem}");
                }
                tally.record(
                    "arm64 packages: lintian, file lists, architecture, linked libraries",
                    problems.is_empty(),
                );
                Some(binaries)
            }
            Err(error) => {
                println!("arm64 cross-build failed: {error:#}");
                tally.record("arm64 cross-build and packages", false);
                None
            }
        }
    } else {
        None
    };

    if !args.no_vm {
        step("VM scenarios");
        let amd64_binaries = build::guest_binaries(Arch::Amd64)?;
        let (benches, scenarios): (Vec<vm::Scenario>, Vec<vm::Scenario>) = vm::scenarios()?
            .into_iter()
            .filter(|s| args.scenario.as_deref().is_none_or(|name| s.name.contains(name)))
            .partition(|s| s.bench);
        if !benches.is_empty() {
            let names: Vec<&str> = benches.iter().map(|s| s.name.as_str()).collect();
            println!(
                "benchmarks not run here (figures only): {}; `cargo xtask bench scenarios` runs them",
                names.join(", ")
            );
        }
        for scenario in &scenarios {
            let runs_on = |k: &&kernels::GuestKernel| {
                (scenario.kernels.contains(&k.suite)
                    || (scenario.extra_kernels.contains(&k.suite) && chosen.contains(&k.suite)))
                    && scenario.arches.contains(&k.arch)
                    && (k.arch == Arch::Arm64 || amd64)
            };
            // The scenario's own distro guest, and the extra ones asked for (a busybox
            // scenario: None, once).
            let distros: Vec<Option<Distro>> = std::iter::once(scenario.distro)
                .chain(scenario.extra_distros.iter().filter(|d| extra_distros.contains(d)).map(|d| Some(*d)))
                .collect();
            for (distro, kernel) in
                distros.iter().flat_map(|d| prepared.kernels.iter().filter(runs_on).map(move |k| (*d, k)))
            {
                let binaries = match (kernel.arch, &arm64_binaries) {
                    (Arch::Amd64, _) => amd64_binaries.clone(),
                    (Arch::Arm64, Some(binaries)) => binaries.clone(),
                    // Its failure is already counted.
                    (Arch::Arm64, None) => continue,
                };
                let label = format!(
                    "vm {} on {}{} ({}){}",
                    scenario.name,
                    kernel.suite.name(),
                    if kernel.arch == Arch::Amd64 {
                        String::new()
                    } else {
                        format!(" {}", kernel.arch.name())
                    },
                    kernel.release,
                    distro.map(|d| format!(", {} guest", d.name())).unwrap_or_default()
                );
                let image = distro.and_then(|d| prepared.distros.iter().find(|i| i.distro == d));
                if distro.is_some() && image.is_none() {
                    continue; // its image failed to build: counted already
                }
                let distro = image.map(|image| vm::DistroBoot {
                    image: image.clone(),
                    managers: scenario.managers.clone(),
                    packages: packages.clone(),
                    preinstall: scenario.preinstall,
                    imds_nics: !scenario.imds_no_nics,
                });
                let guest = vm::Guest {
                    kernel: kernel.clone(),
                    nics: scenario.nics.clone(),
                    memory_mib: 1024,
                    binaries,
                    distro,
                };
                let mut outcome =
                    guest.run(&scenario.path, Duration::from_secs(600), vm::Console::Capture)?;
                if outcome.emulator_died() {
                    // QEMU exited under the guest, no check failed: said loudly, run once more,
                    // and the second run counts.
                    println!("{label}: RETRY, QEMU died under the guest: {}", outcome.summary());
                    println!("----- guest console ({label}, first run) -----\n{}-----", outcome.console);
                    tally.retried.push(label.clone());
                    outcome = guest.run(&scenario.path, Duration::from_secs(600), vm::Console::Capture)?;
                }
                vm::write_result(&scenario.name, &guest, &outcome)?;
                println!("{label}: {} {}", if outcome.passed() { "PASS" } else { "FAIL" }, outcome.summary());
                if !outcome.passed() {
                    println!("----- guest console ({label}) -----\n{}-----", outcome.console);
                }
                tally.record(&label, outcome.passed());
            }
        }
    }

    step_done();
    println!();
    for skipped in &tally.skipped {
        println!("skipped: {skipped}");
    }
    for failure in &tally.failures {
        println!("failed: {failure}");
    }
    for retried in &tally.retried {
        println!("retried (QEMU died under the first run): {retried}");
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    println!(
        "{} passed, {} failed, {} skipped, {} retried",
        tally.passed,
        tally.failed,
        tally.skipped.len(),
        tally.retried.len()
    );
    Ok(if tally.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The arm64 binaries, and the problems of the arm64 packages built from them.
fn arm64_packages() -> Result<(Vec<std::path::PathBuf>, Vec<String>)> {
    setup::ensure_cross(Arch::Arm64)?;
    let packages = package::build_packages(Arch::Arm64)?;
    let problems = package::check(&packages, Arch::Arm64)?;
    Ok((build::guest_binaries(Arch::Arm64)?, problems))
}

/// Prints a step's title, and how long the step before it took (the last one's time is printed
/// by [`step_done`]), so a slow run shows where its minutes went.
fn step(name: &str) {
    step_done();
    println!("\n=== {name} ===");
    if let Ok(mut current) = CURRENT_STEP.lock() {
        *current = Some((name.to_owned(), Instant::now()));
    }
}

fn step_done() {
    if let Some((name, started)) = CURRENT_STEP.lock().ok().and_then(|mut c| c.take()) {
        println!("--- {name}: {:.0} s", started.elapsed().as_secs_f64());
    }
}

static CURRENT_STEP: std::sync::Mutex<Option<(String, Instant)>> = std::sync::Mutex::new(None);

/// Runs `cargo test`, streaming its output, and adds every test it ran to the tally.
fn cargo_test(tally: &mut Tally) -> Result<()> {
    let skip_log = std::env::temp_dir().join(format!("hotplug-skips-{}", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut child = cmd::cargo()
        .current_dir(cmd::workspace_root())
        .env_remove("HOTPLUG_SKIP_EBPF")
        .env("HOTPLUG_SKIP_LOG", &skip_log)
        .env("HOTPLUG_PROMTOOL", setup::promtool())
        .args(["test", "--no-fail-fast"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let failed_before = tally.failed;
    let mut saw_results = false;
    let mut passed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        // "test foo::bar ... ok" / "... FAILED"
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.rsplit_once(" ... ") {
                match result {
                    "ok" => passed.push(name.to_owned()),
                    "FAILED" => tally.record(name, false),
                    _ => {}
                }
            }
        }
        saw_results |= line.starts_with("test result:");
    }
    let status = child.wait()?;
    // A test that returned early because it could not run here passed nothing: it is skipped.
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let _ = std::fs::remove_file(&skip_log);
    for name in passed {
        let short = name.rsplit("::").next().unwrap_or(&name).to_owned();
        match skips
            .lines()
            .find(|l| l.strip_prefix("SKIPPED ").is_some_and(|r| r.starts_with(&format!("{short}:"))))
        {
            Some(line) => tally.skip(line.trim_start_matches("SKIPPED ")),
            None => tally.record(&name, true),
        }
    }
    // A test binary that crashed (abort, signal) prints no FAILED line for the test it was in.
    if !status.success() && tally.failed == failed_before {
        let what =
            if saw_results { "cargo test (a test binary crashed)" } else { "cargo test (did not build)" };
        tally.record(what, false);
    }
    Ok(())
}
