//! hotplug's scenarios and host integration tests.
//!
//! - `scenarios/*.sh`: guest scenarios, run in QEMU by `cargo xtask vm --scenario NAME` and by
//!   `cargo xtask test` on every kernel their `# kernels:` line names.
//! - `guest/vmctl`: the guest side of the harness's control channel.
//! - `tests/*.rs`: host integration tests (`cargo test`), some needing root, which they check for
//!   and report loudly when skipped.

/// Helpers for host tests that need root.
pub mod host {
    use std::process::Command;

    pub fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// Says loudly that `test` did not run and why: on stderr (past the test harness's capture),
    /// and, under `cargo xtask test`, in the file `HOTPLUG_SKIP_LOG` names, so that the tally
    /// counts it as skipped rather than passed. The caller returns right after.
    pub fn skip(test: &str, why: &str) {
        use std::io::Write as _;
        let line = format!("SKIPPED {test}: {why}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(path) = std::env::var_os("HOTPLUG_SKIP_LOG") {
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = file.write_all(line.as_bytes());
            }
        }
    }

    /// Runs iproute2's `ip` with whitespace-separated `args` (in the calling thread's namespace).
    pub fn ip(args: &str) -> Result<(), String> {
        let status = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .map_err(|e| format!("ip {args}: {e}"))?;
        status.success().then_some(()).ok_or_else(|| format!("ip {args} failed: {status}"))
    }
}
