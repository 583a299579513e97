//! `cargo xtask`: set-up, build, run, test, and the QEMU guest harness.
//!
//! Everything a fresh machine needs is installed from here (`setup`), and every other command runs
//! it first, so the README's two commands (`cargo xtask run`, `cargo xtask test`) are all a user
//! needs.
mod apt;
mod arch;
mod bench;
mod build;
mod cmd;
mod distro;
mod fuzz;
mod initramfs;
mod kernels;
mod package;
mod qmp;
mod run;
mod setup;
mod test;
mod userland;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test hotplug")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: nightly rust-src, bpf-linker, Debian packages, packaging tools,
    /// guest kernels, the distro guest's image.
    Setup(setup::SetupArgs),
    /// Build the agent with its eBPF object (and the guest-side tools).
    Build(build::BuildArgs),
    /// Write the .deb and .rpm (with man pages and completions) under target/package/.
    Package(package::PackageArgs),
    /// Build and start the agent on this host, as root. Ctrl-C stops it.
    Run(run::RunArgs),
    /// Benchmarks that print figures (not part of `test`).
    Bench(bench::BenchArgs),
    /// Everything CI checks: fmt, clippy, unit and host tests, a short fuzzing run, every VM
    /// scenario.
    Test(test::TestArgs),
    /// Run the fuzz targets (cargo-fuzz, nightly) for a while each.
    Fuzz(fuzz::FuzzArgs),
    /// Boot a QEMU guest with a Debian kernel and run a script or scenario in it.
    Vm(vm::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Build(args) => build::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Package(args) => package::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Vm(args) => vm::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
