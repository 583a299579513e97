//! Unloading and loading a kernel module for a guided reload: `modprobe`, run directly (never
//! through a shell, never found through PATH), with a deadline.
use std::{path::Path, process::Stdio, time::Duration};

/// Where distributions put modprobe (kmod's, or busybox's).
const MODPROBE: [&str; 4] = ["/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe", "/bin/modprobe"];
/// A modprobe that has not finished by then is killed (a driver's remove or probe can hang).
pub const MODPROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The first modprobe that exists.
fn modprobe() -> Result<&'static str, String> {
    MODPROBE
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| format!("no modprobe in {}: install kmod", MODPROBE.join(", ")))
}

/// Whether this process may load and unload modules: `CAP_SYS_MODULE` (bit 16) in its effective
/// set. The packaged service has it in neither its bounding set nor its sandbox
/// (`ProtectKernelModules=yes`).
pub fn may_manage_modules() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 16) != 0)
}

/// Runs `modprobe ARGS`; `Ok` with what it printed, `Err` with its exit status and message.
pub async fn run(args: &[String]) -> Result<String, String> {
    let program = modprobe()?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .kill_on_drop(true);
    let child = command.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    let line = format!("{program} {}", args.join(" "));
    match tokio::time::timeout(MODPROBE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!("{line}: killed after {} s", MODPROBE_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(format!("{line}: {e}")),
        Ok(Ok(output)) => {
            let said = crate::classify::sanitize(
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )
                .trim(),
            );
            if output.status.success() {
                Ok(said)
            } else {
                Err(format!(
                    "{line}: {}{}",
                    output.status,
                    if said.is_empty() { String::new() } else { format!(": {said}") }
                ))
            }
        }
    }
}
