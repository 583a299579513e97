//! `cargo xtask fuzz`: builds the fuzz targets under `fuzz/` with cargo-fuzz (nightly, libFuzzer,
//! AddressSanitizer) and runs each for a while from its committed seeds. New inputs go to
//! `target/fuzz/corpus/TARGET/` (the committed corpus is only read), crashes to
//! `target/fuzz/artifacts/TARGET/`. Prints one line per target: executions, corpus, coverage.
use std::{
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{cmd, setup};

#[derive(Args, Debug, Clone)]
pub struct FuzzArgs {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (default: every one `cargo fuzz list` names).
    #[arg(long)]
    pub target: Option<String>,
    /// Build without optimizations (debug assertions on): about half the cold build time, fewer
    /// executions a second. `cargo xtask test`'s short run builds so.
    #[arg(long)]
    pub dev: bool,
}

/// How one target's run went.
pub struct Outcome {
    pub target: String,
    pub passed: bool,
}

pub fn run(args: &FuzzArgs) -> Result<ExitCode> {
    setup::ensure_toolchain()?;
    setup::ensure_cargo_fuzz()?;
    let outcomes = fuzz(args)?;
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn cargo_fuzz(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(cmd::workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        // The agent's build script would build the eBPF object; the fuzzers do not need it.
        .env("HOTPLUG_SKIP_EBPF", "1")
        .arg("+nightly")
        .arg("fuzz")
        .args(args);
    command
}

/// Builds every target, then runs each (or the one asked for) for `args.seconds`.
pub fn fuzz(args: &FuzzArgs) -> Result<Vec<Outcome>> {
    let target_dir = cmd::target_dir();
    let target_dir_arg = target_dir.to_string_lossy().into_owned();
    let profile: &[&str] = if args.dev { &["--dev"] } else { &["-O", "--debug-assertions"] };
    let started = Instant::now();
    cmd::run(cargo_fuzz(&["build"]).args(profile).args(["--target-dir", &target_dir_arg]))
        .context("building the fuzz targets (cargo +nightly fuzz build)")?;
    eprintln!("fuzz: targets built in {:.0} s", started.elapsed().as_secs_f64());
    let listed = cmd::output(&mut cargo_fuzz(&["list"]))?;
    let targets: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .filter(|t| args.target.as_deref().is_none_or(|only| only == *t))
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        anyhow::bail!("no fuzz target named {:?} (cargo fuzz list: {})", args.target, listed.trim());
    }
    let root = cmd::workspace_root();
    let mut outcomes = Vec::new();
    for target in targets {
        let seeds = root.join("fuzz/corpus").join(&target);
        let corpus = target_dir.join("fuzz/corpus").join(&target);
        let artifacts = target_dir.join("fuzz/artifacts").join(&target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let output = cargo_fuzz(&["run"])
            .args(profile)
            .args(["--target-dir", &target_dir_arg, &target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map_or_else(|| "?".to_owned(), |v| v.trim().to_owned())
        };
        let coverage = log
            .lines()
            .rev()
            .find_map(|l| l.split_whitespace().skip_while(|w| *w != "cov:").nth(1))
            .unwrap_or("?")
            .to_owned();
        let corpus_files = std::fs::read_dir(&corpus).map(Iterator::count).unwrap_or(0);
        let passed = output.status.success();
        let line = format!(
            "fuzz {target}: {} in {} s, {} executions, coverage {coverage}, corpus {corpus_files} new inputs{}",
            if passed { "no crash" } else { "CRASH" },
            args.seconds,
            stat("number_of_executed_units"),
            if passed { String::new() } else { format!(", artifacts in {}", artifacts.display()) },
        );
        println!("{line}");
        if !passed {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                println!("  {l}");
            }
        }
        outcomes.push(Outcome { target, passed });
    }
    Ok(outcomes)
}
