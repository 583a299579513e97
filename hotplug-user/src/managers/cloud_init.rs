//! cloud-init's hotplug hook, and the gate in front of it.
//!
//! cloud-init (24.1+ on EC2, or wherever `updates: network: when` holds `hotplug`) installs a
//! udev rule whose `RUN` writes one line per NIC uevent into a FIFO; `cloud-init-hotplugd.socket`
//! then starts `cloud-init-hotplugd.service`, which reads that line from fd 3 and runs
//! `cloud-init devel hotplug-hook` with it. That hook crawls the instance metadata service and
//! waits for it (a driver reload costs 37-99 s and 345-690 requests), then re-applies cloud-init's
//! view of the network.
//!
//! The package replaces the service's `ExecStart` with `hotplug-agent cloud-init-gate` (a
//! drop-in): it reads the same line the same way, asks the agent whether the uevent is half of a
//! driver reload the agent restores (`decide::gate`), and either ends there or runs cloud-init's
//! hook exactly as before. cloud-init keeps real attaches and detaches, and its boot-time
//! configuration is untouched. Whatever goes wrong in the gate, cloud-init runs.
use std::{
    io::Read as _,
    os::{fd::FromRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::Host;
use crate::{
    control::{self, Request},
    decide::gate::{UeventAction, Verdict},
};

/// The rule files cloud-init writes (22.x used 10-, 24.1+ use 90-).
const RULES: [&str; 2] = [
    "/etc/udev/rules.d/90-cloud-init-hook-hotplug.rules",
    "/etc/udev/rules.d/10-cloud-init-hook-hotplug.rules",
];
/// The socket unit that starts cloud-init's hook for each line its udev rule writes.
pub const SOCKET: &str = "cloud-init-hotplugd.socket";
/// The package's drop-in that puts the gate in front of the hook.
pub const GATE_DROP_IN: &str = "/usr/lib/systemd/system/cloud-init-hotplugd.service.d/hotplug-agent.conf";
/// What the gate runs when cloud-init is to handle the uevent.
const HOOK: &str = "/usr/bin/cloud-init";
/// The longest line read from cloud-init's FIFO.
const MAX_LINE: usize = 4096;
/// How long the gate keeps asking while the agent has not seen the kernel event yet, when the
/// device is gone (a removal the agent never knew).
const UNKNOWN_RETRY: Duration = Duration::from_secs(2);
/// ...and when the device is registered: the agent will see its registration (its event loop may
/// be busy restoring a dozen NICs), so the gate waits longer before handing it to cloud-init.
const UNKNOWN_REGISTERED_RETRY: Duration = Duration::from_secs(10);

/// The network device a uevent's DEVPATH names, as sysfs shows it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNow {
    pub name: String,
    pub mac: Option<String>,
    pub ifindex: Option<u32>,
}

/// Finds the device of a uevent's `devpath` (`/devices/.../net/NAME`) under `sys` (`/sys`): the
/// path itself, or, when the NIC was renamed since the uevent (udev renames it after the kernel's
/// `add`; cloud-init 26.x's hook is handed the first name), the one network interface its parent
/// device has now (for an `add` only). `None` when the device is gone, or its parent has several
/// interfaces and none by that name.
pub fn device_now(sys: &Path, devpath: &str, action: UeventAction) -> Option<DeviceNow> {
    let relative = devpath.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|part| part == "..") {
        return None;
    }
    let read = |dir: &Path, name: String| DeviceNow {
        mac: std::fs::read_to_string(dir.join("address")).ok().map(|m| m.trim().to_owned()),
        ifindex: std::fs::read_to_string(dir.join("ifindex")).ok().and_then(|i| i.trim().parse().ok()),
        name,
    };
    let path = sys.join(relative);
    let (parent, name) = relative.rsplit_once('/')?;
    if path.join("ifindex").exists() {
        return Some(read(&path, name.to_owned()));
    }
    // A removed device's name is the one it had: another interface of its parent (a multi-port
    // function's sibling) is not it.
    if !parent.ends_with("/net") || action != UeventAction::Add {
        return None;
    }
    let mut now: Vec<String> = std::fs::read_dir(sys.join(parent))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    match now.len() {
        1 => now.pop().map(|only| read(&sys.join(parent).join(&only), only)),
        _ => None,
    }
}

/// Whether `cloud-init-hotplugd.socket` is listening (`systemctl is-active`; no systemctl, or no
/// answer within 5 s, reads as not listening: the agent then configures attaches itself).
pub async fn socket_listening() -> bool {
    let Some(systemctl) =
        ["/usr/bin/systemctl", "/bin/systemctl"].into_iter().find(|p| Path::new(p).exists())
    else {
        return false;
    };
    let status = tokio::process::Command::new(systemctl)
        .args(["is-active", "--quiet", SOCKET])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env_clear()
        .kill_on_drop(true)
        .status();
    matches!(tokio::time::timeout(Duration::from_secs(5), status).await, Ok(Ok(s)) if s.success())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hotplug {
    /// The udev rule that feeds cloud-init's hook.
    pub rule: String,
    /// Whether the gate stands in front of it.
    pub gated: bool,
}

impl Hotplug {
    pub fn detect(host: &Host) -> Option<Self> {
        let rule = RULES.iter().find(|r| host.exists(r))?;
        Some(Self { rule: (*rule).to_owned(), gated: gated(host) })
    }
}

/// Whether the package's drop-in is in force: present, and not overridden by a drop-in of the
/// same name in /etc or /run (the documented way to undo it: an empty file, or a link to
/// /dev/null) that does not itself run the gate.
fn gated(host: &Host) -> bool {
    let name = GATE_DROP_IN.rsplit_once("/system/").map_or(GATE_DROP_IN, |(_, tail)| tail);
    let over = ["/etc/systemd/system/", "/run/systemd/system/"]
        .iter()
        .map(|dir| host.path(&format!("{dir}{name}")))
        .find(|path| path.symlink_metadata().is_ok());
    match over {
        Some(path) => std::fs::read_to_string(path).is_ok_and(|text| text.contains("cloud-init-gate")),
        None => host.exists(GATE_DROP_IN),
    }
}

/// cloud-init's request: ` --subsystem=net handle --devpath=/devices/... --udevaction=add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookArgs {
    pub words: Vec<String>,
    pub subsystem: Option<String>,
    pub devpath: Option<String>,
    pub action: Option<UeventAction>,
}

impl HookArgs {
    pub fn parse(line: &str) -> Self {
        // Split as bash splits `$args` in cloud-init's own ExecStart.
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let value = |key: &str| words.iter().find_map(|w| w.strip_prefix(key)).map(str::to_owned);
        let action = match value("--udevaction=").as_deref() {
            Some("add") => Some(UeventAction::Add),
            Some("remove") => Some(UeventAction::Remove),
            _ => None,
        };
        let handle = words.iter().any(|w| w == "handle");
        Self {
            subsystem: value("--subsystem="),
            devpath: value("--devpath="),
            action: action.filter(|_| handle),
            words,
        }
    }
}

/// Reads one line from fd 3 a byte at a time, as bash's `read` does: the FIFO may already hold
/// the next uevent's line, which belongs to the next run of the service. A read error ends the
/// line where it came (bash's `read` keeps what it read too); the error is returned beside it.
fn read_fifo_line() -> (String, Option<std::io::Error>) {
    // SAFETY: fd 3 is the FIFO systemd passes to cloud-init-hotplugd.service (its socket unit's
    // ListenFIFO=); this process owns it and nothing else in it uses fd 3.
    let mut fifo = unsafe { std::fs::File::from_raw_fd(3) };
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut error = None;
    while line.len() < MAX_LINE {
        match fifo.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    (String::from_utf8_lossy(&line).into_owned(), error)
}

/// A line for the service's journal. Never fails: stdout closed or broken (`println!` would
/// panic on EPIPE) must not keep cloud-init's hook from running.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// cloud-init's request, for the panic hook: whatever goes wrong in the gate after the line was
/// read, cloud-init's hook still runs with it.
static REQUEST: std::sync::OnceLock<HookArgs> = std::sync::OnceLock::new();

/// `hotplug-agent cloud-init-gate`, run by cloud-init-hotplugd.service in place of cloud-init's
/// hook. Returns only when cloud-init is not to run (or cannot be started).
pub fn gate(socket: &Path) -> ExitCode {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if let Some(args) = REQUEST.get() {
            // Replaces this process: nothing of the gate's state is used after a panic.
            run_hook(args, "the gate failed (a panic)");
        }
    }));
    let (line, error) = read_fifo_line();
    if let Some(error) = error {
        // What cloud-init's own `read args <&3` would have left: the line as far as it came.
        say(&format!(
            "hotplug-agent: reading cloud-init's request from fd 3 failed ({error}) after {:?}",
            line
        ));
        return run_hook(&HookArgs::parse(&line), "the gate could not read the whole request");
    }
    let args = HookArgs::parse(&line);
    let _ = REQUEST.set(args.clone());
    say(&format!("args={line}"));
    let (Some(action), Some("net"), Some(devpath)) =
        (args.action, args.subsystem.as_deref(), args.devpath.as_deref())
    else {
        return run_hook(&args, "not a NIC add or remove");
    };
    // An added device is still there to read (perhaps renamed since); a removed one is not.
    let device = device_now(Path::new("/sys"), devpath, action);
    let unknown_retry = if device.is_some() { UNKNOWN_REGISTERED_RETRY } else { UNKNOWN_RETRY };
    let request = Request::CloudInitGate {
        action,
        devpath: devpath.to_owned(),
        mac: device.as_ref().and_then(|d| d.mac.clone()),
        ifindex: device.as_ref().and_then(|d| d.ifindex),
    };
    if let Some(device) = device.as_ref().filter(|d| !devpath.ends_with(&format!("/{}", d.name))) {
        say(&format!("hotplug-agent: {devpath} is {} now", device.name));
    }
    let started = Instant::now();
    loop {
        match control::ask_gate(socket, &request, Duration::from_secs(3)) {
            Ok(answer) if answer.verdict == Verdict::Skip => {
                say(&format!("hotplug-agent: cloud-init not run for {devpath}: {}", answer.reason));
                return ExitCode::SUCCESS;
            }
            Ok(answer) if answer.verdict == Verdict::Unknown && started.elapsed() < unknown_retry => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(answer) => return run_hook(&args, &answer.reason),
            Err(error) => return run_hook(&args, &format!("hotplug-agent did not answer: {error}")),
        }
    }
}

/// Runs cloud-init's hook as cloud-init's own unit would (`exec cloud-init devel hotplug-hook $args`).
fn run_hook(args: &HookArgs, why: &str) -> ExitCode {
    say(&format!("hotplug-agent: passing to cloud-init ({why})"));
    let error = Command::new(HOOK).args(["devel", "hotplug-hook"]).args(&args.words).exec();
    say(&format!("hotplug-agent: cannot run {HOOK}: {error}"));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uevent_under_the_kernels_first_name_finds_the_renamed_nic() -> std::io::Result<()> {
        let sys = std::env::temp_dir().join(format!("hotplug-sys-{}", std::process::id()));
        let net = sys.join("devices/pci0000:00/0000:00:03.0/virtio0/net");
        let nic = net.join("enp1s0");
        std::fs::create_dir_all(&nic)?;
        std::fs::write(nic.join("address"), "52:54:00:12:34:10\n")?;
        std::fs::write(nic.join("ifindex"), "7\n")?;
        let found = device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0", UeventAction::Add);
        let want = DeviceNow {
            name: "enp1s0".to_owned(),
            mac: Some("52:54:00:12:34:10".to_owned()),
            ifindex: Some(7),
        };
        assert_eq!(found.as_ref(), Some(&want), "renamed since the uevent");
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0", UeventAction::Remove),
            None,
            "a removal names the device it had: a sibling is not it"
        );
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/enp1s0", UeventAction::Add),
            Some(want)
        );
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/../net/eth0", UeventAction::Add),
            None
        );
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:04.0/virtio1/net/eth1", UeventAction::Add),
            None,
            "gone"
        );
        // Two interfaces on one device, none by the uevent's name: no guess.
        let other = net.join("enp1s0d1");
        std::fs::create_dir_all(&other)?;
        std::fs::write(other.join("ifindex"), "8\n")?;
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0", UeventAction::Add),
            None
        );
        assert_eq!(
            device_now(&sys, "/devices/pci0000:00/0000:00:03.0/virtio0/net/enp1s0d1", UeventAction::Add)
                .and_then(|d| d.ifindex),
            Some(8)
        );
        std::fs::remove_dir_all(&sys)
    }

    #[test]
    fn an_override_in_etc_ungates_the_hook() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("hotplug-gate-{}", std::process::id()));
        let host = Host::at(&dir);
        let file = |path: &str, text: &str| -> std::io::Result<()> {
            let path = dir.join(path.trim_start_matches('/'));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, text)
        };
        file(RULES[0], "")?;
        assert_eq!(Hotplug::detect(&host).map(|h| h.gated), Some(false), "no drop-in");
        file(GATE_DROP_IN, "[Service]\nExecStart=\nExecStart=/usr/sbin/hotplug-agent cloud-init-gate\n")?;
        assert_eq!(Hotplug::detect(&host).map(|h| h.gated), Some(true));
        let over = "/etc/systemd/system/cloud-init-hotplugd.service.d/hotplug-agent.conf";
        file(over, "")?;
        assert_eq!(Hotplug::detect(&host).map(|h| h.gated), Some(false), "emptied in /etc");
        std::fs::remove_file(dir.join(over.trim_start_matches('/')))?;
        std::os::unix::fs::symlink("/dev/null", dir.join(over.trim_start_matches('/')))?;
        assert_eq!(Hotplug::detect(&host).map(|h| h.gated), Some(false), "masked in /etc");
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn parses_the_hooks_line_of_every_version() {
        // 25.1+ writes a leading space; 22.4 does not.
        for line in [
            " --subsystem=net handle --devpath=/devices/pci0000:00/0000:00:06.0/net/ens6 --udevaction=add",
            "--subsystem=net handle --devpath=/devices/pci0000:00/0000:00:06.0/net/ens6 --udevaction=add",
        ] {
            let args = HookArgs::parse(line);
            assert_eq!(args.subsystem.as_deref(), Some("net"));
            assert_eq!(args.devpath.as_deref(), Some("/devices/pci0000:00/0000:00:06.0/net/ens6"));
            assert_eq!(args.action, Some(UeventAction::Add));
            assert_eq!(args.words.len(), 4, "passed on word for word");
        }
        let remove =
            HookArgs::parse(" --subsystem=net handle --devpath=/devices/x/net/ens6 --udevaction=remove");
        assert_eq!(remove.action, Some(UeventAction::Remove));
        let other = HookArgs::parse("--subsystem=net query");
        assert_eq!(other.action, None, "not a handle request: passed to cloud-init untouched");
        let change = HookArgs::parse("--subsystem=net handle --devpath=/d --udevaction=change");
        assert_eq!(change.action, None);
    }
}
