//! The `command` policy: run a site's own program with the NIC's facts in environment variables.
//! Never through a shell, and never with kernel data in the command line.
use std::process::Stdio;

use crate::classify::NicEvent;

/// Runs `argv` with `HOTPLUG_*` variables describing `event`; returns its exit status text.
pub async fn run(argv: &[String], event: &NicEvent, phase: &str) -> Result<String, std::io::Error> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut command = tokio::process::Command::new(program);
    // Nothing of the agent's environment (systemd's notify socket, credentials) reaches the hook.
    command
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .args(args)
        .env("HOTPLUG_PHASE", phase)
        .env("HOTPLUG_ACTION", format!("{:?}", event.action).to_lowercase())
        .env("HOTPLUG_CAUSE", event.cause.as_str())
        .env("HOTPLUG_IFNAME", &event.name)
        .env("HOTPLUG_IFINDEX", event.ifindex.to_string())
        .env("HOTPLUG_MAC", &event.mac)
        .env("HOTPLUG_BUS", event.bus.as_deref().unwrap_or(""))
        .env("HOTPLUG_DRIVER", event.driver.as_deref().unwrap_or(""))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let status = command.status().await?;
    Ok(status.to_string())
}
