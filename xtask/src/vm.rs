//! The QEMU guest harness: boots a Debian kernel with a busybox initramfs holding the NIC modules
//! and the project's binaries, runs one script as root in it, streams the console, and serves the
//! guest's requests for PCI hot-unplug / hot-plug over a second serial port.
//!
//! Two kinds of guest: the busybox one runs the script from the initramfs (no init system); the
//! distro one (`--distro trixie`) mounts a Debian root file system (`distro.rs`, `snapshot=on`),
//! hands over to systemd, and runs the script once `multi-user.target` is reached, with the
//! project's packages in `/opt/hotplug/pkg/` to install as an operator would, an EC2-like SMBIOS
//! identity, and the guest's journal saved beside the result.
//!
//! Sockets: QEMU connects out to two Unix sockets the harness listens on first (so nothing the
//! guest says is lost): the control channel (guest `/dev/ttyS1` on amd64, `/dev/hvc0` on arm64;
//! the `vmctl` protocol) and QMP.
//!
//! Guests of both architectures: amd64 under `qemu-system-x86_64` (q35), arm64 under
//! `qemu-system-aarch64` (`virt`, UEFI, see `arch::Arch::qemu_machine`), with the same NICs on
//! PCIe root ports, the same initramfs layout and `vmctl`; an arm64 guest gets arm64 binaries
//! (cross-built) and an arm64 userland (`userland.rs`).
//! Every guest NIC is `-netdev user,restrict=on`: no guest traffic leaves the machine.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::arch::Arch;
use crate::{
    build, cmd,
    distro::{self, Distro, DistroImage},
    initramfs::Initramfs,
    kernels, package,
    qmp::Qmp,
    setup, userland,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NicModel {
    /// virtio-net-pci (driver virtio_net)
    Virtio,
    /// Intel 82574L (driver e1000e)
    E1000e,
    /// Intel 82540EM (driver e1000)
    E1000,
}

impl NicModel {
    const fn qemu_device(self) -> &'static str {
        match self {
            Self::Virtio => "virtio-net-pci",
            Self::E1000e => "e1000e",
            Self::E1000 => "e1000",
        }
    }
}

pub const DEFAULT_NICS: [NicModel; 3] = [NicModel::Virtio, NicModel::E1000e, NicModel::E1000];

/// systemd-networkd and its helpers on at boot (as the image's packages had them).
const NETWORKD_ON: &str = "w=/newroot/etc/systemd/system; u=/usr/lib/systemd/system
ln -sf $u/systemd-networkd.service $w/multi-user.target.wants/systemd-networkd.service
ln -sf $u/systemd-networkd.socket $w/sockets.target.wants/systemd-networkd.socket
ln -sf $u/systemd-networkd-wait-online.service $w/network-online.target.wants/systemd-networkd-wait-online.service
ln -sf $u/systemd-network-generator.service $w/sysinit.target.wants/systemd-network-generator.service";

/// A network manager the distro guest turns on at boot (all are installed, all off by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Manager {
    /// cloud-init with its Ec2 datasource (and its hotplug hook, as Debian ships it).
    CloudInit,
    /// systemd-networkd (and its wait-online and network-generator units).
    Networkd,
    /// amazon-ec2-net-utils' udev rule (`policy-routes@IFACE`, with networkd).
    Ec2NetUtils,
}

impl Manager {
    /// Shell commands for the distro guest's /init, run against the new root at `/newroot`
    /// before systemd starts: undo what the image's customization did for this manager.
    fn enable(self) -> Vec<&'static str> {
        match self {
            Self::CloudInit => vec!["rm -f /newroot/etc/cloud/cloud-init.disabled"],
            Self::Networkd => vec![NETWORKD_ON],
            // It runs on networkd, and matches EC2's NIC drivers only (its udev rule, its
            // 80-ec2.network): the harness's virtio_net, e1000e and e1000 are added to both.
            Self::Ec2NetUtils => vec![
                NETWORKD_ON,
                "rm -f /newroot/etc/udev/rules.d/99-vpc-policy-routes.rules
sed 's/vif|ena|ixgbevf/vif|ena|ixgbevf|virtio_net|e1000e|e1000/' /newroot/usr/lib/udev/rules.d/99-vpc-policy-routes.rules >/newroot/etc/udev/rules.d/99-vpc-policy-routes.rules
sed -i 's/^Driver=.*/& virtio_net e1000e e1000/' /newroot/usr/lib/systemd/network/80-ec2.network",
            ],
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::CloudInit => "cloud-init",
            Self::Networkd => "networkd",
            Self::Ec2NetUtils => "ec2-net-utils",
        }
    }
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Guest kernel: bullseye (5.10), bookworm (6.1), trixie (6.12) or sid (7.2).
    #[arg(long, value_enum, default_value = "bookworm")]
    pub kernel: kernels::Suite,
    /// Guest architecture: amd64, or arm64 (Debian's arm64 kernel under qemu-system-aarch64,
    /// with cross-built binaries; busybox guests only).
    #[arg(long, value_enum, default_value_t)]
    pub arch: Arch,
    /// NIC models, in order (they become eth0, eth1, ...).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["virtio", "e1000e", "e1000"])]
    pub nics: Vec<NicModel>,
    /// Run this shell script as root in the guest.
    #[arg(long, conflicts_with_all = ["scenario", "list"])]
    pub script: Option<PathBuf>,
    /// Run a scenario from tests/scenarios and write target/vm-results/NAME.json.
    #[arg(long, conflicts_with = "list")]
    pub scenario: Option<String>,
    /// List the scenarios.
    #[arg(long)]
    pub list: bool,
    /// Stop the guest after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Boot this Debian root file system with systemd instead of the busybox initramfs (a
    /// scenario's `# guest:` line sets it too). The project's packages are in /opt/hotplug/pkg/.
    #[arg(long, value_enum)]
    pub distro: Option<Distro>,
    /// Network managers the distro guest turns on at boot (a scenario's `# managers:` line sets
    /// them too).
    #[arg(long, value_enum, value_delimiter = ',', requires = "distro")]
    pub managers: Vec<Manager>,
    /// Install the project's .deb into the distro guest before it boots, as in an image built with
    /// it: the service starts with the system (a scenario's `# preinstall: hotplug-agent` too).
    #[arg(long, requires = "distro")]
    pub preinstall: bool,
    /// The distro guest's mock IMDS publishes no NIC at boot (`# imds: no-nics`): nothing for the
    /// agent's start-up pass to configure.
    #[arg(long, requires = "distro")]
    pub imds_no_nics: bool,
}

pub fn run(args: &VmArgs) -> Result<ExitCode> {
    if args.list {
        for scenario in scenarios()? {
            println!("{:<24} {}", scenario.name, scenario.summary);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (script, scenario) = match (&args.script, &args.scenario) {
        (Some(path), None) => (path.clone(), None),
        (None, Some(name)) => {
            let found = find_scenario(name)?;
            (found.path.clone(), Some(found))
        }
        _ => bail!("say what to run: --script FILE, --scenario NAME (see --list)"),
    };
    let distro = args.distro.or(scenario.as_ref().and_then(|s| s.distro));
    let mut managers = args.managers.clone();
    if managers.is_empty() {
        managers = scenario.as_ref().map(|s| s.managers.clone()).unwrap_or_default();
    }
    if distro.is_some() && args.arch != Arch::Amd64 {
        bail!("the distro guest is amd64 only: run it without --arch, or pick a busybox scenario");
    }
    setup::ensure_toolchain()?;
    setup::ensure_debian_packages(setup::DEBIAN_PACKAGES)?;
    setup::ensure_debian_packages(args.arch.guest_packages())?;
    setup::ensure_cross(args.arch)?;
    if let Some(s) = scenario.as_ref().filter(|s| !s.arches.contains(&args.arch)) {
        eprintln!("vm: {} is not marked for {} (`# arches:`); running it anyway", s.name, args.arch.name());
    }
    let kernel = kernels::ensure(args.kernel, args.arch, false)?;
    let binaries = build::guest_binaries(args.arch)?;
    let distro = match distro {
        Some(distro) => {
            setup::ensure_debian_packages(setup::DISTRO_PACKAGES)?;
            setup::ensure_packaging_tools()?;
            let packages = package::build_packages(Arch::Amd64)?;
            let preinstall = args.preinstall || scenario.as_ref().is_some_and(|s| s.preinstall);
            let imds_nics = !(args.imds_no_nics || scenario.as_ref().is_some_and(|s| s.imds_no_nics));
            Some(DistroBoot {
                image: distro::ensure(distro, false)?,
                managers,
                packages,
                preinstall,
                imds_nics,
            })
        }
        None => None,
    };
    // A scenario that says which NICs it needs gets them; otherwise --nics.
    let nics = scenario
        .as_ref()
        .filter(|s| s.nics != DEFAULT_NICS)
        .map_or_else(|| args.nics.clone(), |s| s.nics.clone());
    let guest = Guest { kernel, nics, memory_mib: args.memory, binaries, distro };
    let outcome = guest.run(&script, Duration::from_secs(args.timeout), Console::Stream)?;
    if let Some(scenario) = scenario {
        let path = write_result(&scenario.name, &guest, &outcome)?;
        eprintln!("vm: result written to {}", path.display());
    }
    eprintln!("vm: {}", outcome.summary());
    Ok(match outcome.exit_status {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code.clamp(1, 255)).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// A scenario file in `tests/scenarios/`: its name and the first comment line.
pub struct Scenario {
    pub name: String,
    pub summary: String,
    pub path: PathBuf,
    /// Kernels it runs on (`# kernels:` header line), all by default.
    pub kernels: Vec<kernels::Suite>,
    /// Kernels it runs on only when `cargo xtask test --kernels` names them (`# kernels-extra:`):
    /// a heavier matrix kept out of the default run.
    pub extra_kernels: Vec<kernels::Suite>,
    /// The distro guest it needs (`# guest: trixie`), or the busybox guest.
    pub distro: Option<Distro>,
    /// Other distro guests it runs in when `cargo xtask test --distros` names them
    /// (`# guests-extra: sid`).
    pub extra_distros: Vec<Distro>,
    /// Network managers the distro guest turns on (`# managers: networkd cloud-init`).
    pub managers: Vec<Manager>,
    /// The package is installed before the guest boots (`# preinstall: hotplug-agent`).
    pub preinstall: bool,
    /// The mock IMDS publishes no NIC at boot (`# imds: no-nics`).
    pub imds_no_nics: bool,
    /// The guest's NICs (`# nics: virtio virtio e1000e ...`, at most [`MAX_NICS`]), else
    /// [`DEFAULT_NICS`].
    pub nics: Vec<NicModel>,
    /// A benchmark (`# bench: yes`): figures only, run by `cargo xtask bench scenarios`, not by
    /// `cargo xtask test`.
    pub bench: bool,
    /// Guest architectures it runs on (`# arches: amd64 arm64`), amd64 by default.
    pub arches: Vec<Arch>,
}

/// The most NICs a guest gets (each on a PCIe root port of its own, plus the spare slot).
pub const MAX_NICS: usize = 16;

pub fn scenarios() -> Result<Vec<Scenario>> {
    let dir = cmd::workspace_root().join("tests/scenarios");
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sh")) else {
            continue;
        };
        if name.starts_with('_') {
            continue; // shared helpers, not a scenario
        }
        let text = fs::read_to_string(&path)?;
        let comments: Vec<&str> =
            text.lines().skip(1).map_while(|l| l.strip_prefix('#')).map(str::trim).collect();
        let summary = comments.first().copied().unwrap_or_default().to_owned();
        let header = |key: &str| comments.iter().find_map(|l| l.strip_prefix(key)).map(str::trim);
        let words = |key: &str| header(key).map(|list| list.split_whitespace().collect::<Vec<_>>());
        // A header's words as values of `T` (`None`: no such header).
        fn values<T: ValueEnum>(words: Option<Vec<&str>>, path: &Path, key: &str) -> Result<Option<Vec<T>>> {
            words
                .map(|list| {
                    list.into_iter().map(|w| T::from_str(w, true).map_err(anyhow::Error::msg)).collect()
                })
                .transpose()
                .with_context(|| format!("{}: `# {key}`", path.display()))
        }
        let kernels =
            values(words("kernels:"), &path, "kernels:")?.unwrap_or_else(|| kernels::Suite::ALL.to_vec());
        let distro = header("guest:")
            .filter(|g| *g != "busybox")
            .map(|g| Distro::from_str(g, true).map_err(anyhow::Error::msg))
            .transpose()
            .with_context(|| format!("{}: `# guest:`", path.display()))?;
        let managers = words("managers:")
            .unwrap_or_default()
            .into_iter()
            .map(|m| Manager::from_str(m, true).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("{}: `# managers:`", path.display()))?;
        let preinstall = match header("preinstall:") {
            None => false,
            Some("hotplug-agent") => true,
            Some(other) => bail!("{}: `# preinstall: {other}`: only hotplug-agent can be", path.display()),
        };
        let imds_no_nics = match header("imds:") {
            None => false,
            Some("no-nics") => true,
            Some(other) => bail!("{}: `# imds: {other}`: only no-nics is known", path.display()),
        };
        let extra_kernels = values(words("kernels-extra:"), &path, "kernels-extra:")?.unwrap_or_default();
        let extra_distros: Vec<Distro> =
            values(words("guests-extra:"), &path, "guests-extra:")?.unwrap_or_default();
        if !extra_distros.is_empty() && distro.is_none() {
            bail!("{}: `# guests-extra:` needs a `# guest:` line", path.display());
        }
        let arches = values(words("arches:"), &path, "arches:")?.unwrap_or_else(|| vec![Arch::Amd64]);
        if distro.is_some() && arches != [Arch::Amd64] {
            bail!("{}: a distro guest scenario runs on amd64 only", path.display());
        }
        let bench = match header("bench:") {
            None | Some("no") => false,
            Some("yes") => true,
            Some(other) => bail!("{}: `# bench: {other}`: yes or no", path.display()),
        };
        let nics = values(words("nics:"), &path, "nics:")?.unwrap_or_else(|| DEFAULT_NICS.to_vec());
        if nics.is_empty() || nics.len() > MAX_NICS {
            bail!("{}: `# nics:` lists {} NICs (1 to {MAX_NICS})", path.display(), nics.len());
        }
        found.push(Scenario {
            nics,
            name: name.to_owned(),
            summary,
            path,
            kernels,
            extra_kernels,
            distro,
            extra_distros,
            managers,
            preinstall,
            imds_no_nics,
            bench,
            arches,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

fn find_scenario(name: &str) -> Result<Scenario> {
    scenarios()?
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no scenario {name:?} in tests/scenarios (see `cargo xtask vm --list`)"))
}

pub enum Console {
    /// Copy the guest console to our stdout as it comes.
    Stream,
    /// Only keep it in the outcome (tests print it on failure).
    Capture,
}

pub struct Guest {
    pub kernel: kernels::GuestKernel,
    pub nics: Vec<NicModel>,
    pub memory_mib: u32,
    pub binaries: Vec<PathBuf>,
    /// Boot a distro root file system with systemd (else the busybox initramfs runs the script).
    pub distro: Option<DistroBoot>,
}

/// What a distro guest boots with.
pub struct DistroBoot {
    pub image: DistroImage,
    pub managers: Vec<Manager>,
    /// The project's packages, in /opt/hotplug/pkg/ of the guest.
    pub packages: package::Packages,
    /// Install the .deb before systemd starts (the service then starts at boot).
    pub preinstall: bool,
    /// The mock IMDS publishes the guest's NICs at boot (else none).
    pub imds_nics: bool,
}

pub struct Outcome {
    /// The script's exit status; `None` if the guest died or timed out before it finished.
    pub exit_status: Option<i32>,
    pub failure: Option<String>,
    /// From QEMU's start to the guest's `hello` (init ready to run the script).
    pub boot: Option<Duration>,
    pub duration: Duration,
    pub figures: BTreeMap<String, Value>,
    pub console: String,
    /// Files the guest sent with `vmctl put NAME FILE` (the distro guest's journal among them).
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What `serve` says when the guest's control channel reaches its end: QEMU exited (or the guest
/// closed its serial port) with no exit status reported.
const CHANNEL_CLOSED: &str = "the guest's control channel closed";

impl Outcome {
    pub fn passed(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// The guest vanished before its script reported anything: QEMU exited under it, with no
    /// check failed (an emulator failure, worth one more try).
    pub fn emulator_died(&self) -> bool {
        self.exit_status.is_none() && self.failure.as_deref().is_some_and(|f| f.contains(CHANNEL_CLOSED))
    }

    pub fn summary(&self) -> String {
        let boot = self.boot.map_or_else(|| "-".to_owned(), |b| format!("{:.2} s", b.as_secs_f64()));
        match (self.exit_status, &self.failure) {
            (Some(code), _) => {
                format!("script exited {code} (boot {boot}, total {:.1} s)", self.duration.as_secs_f64())
            }
            (None, Some(why)) => format!("guest failed: {why}"),
            (None, None) => "guest ended without an exit status".to_owned(),
        }
    }
}

/// Per-run scratch directory with short paths (Unix socket paths are limited to 108 bytes).
fn scratch_dir() -> Result<PathBuf> {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hotplug-vm-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A NIC as QEMU knows it.
struct Nic {
    model: NicModel,
    id: String,
    netdev: String,
    bus: String,
    mac: String,
    present: bool,
    /// The guest's name for it when it was last unplugged (what `vmctl plug NAME` refers to).
    guest_name: Option<String>,
}

impl Guest {
    pub fn run(&self, script: &Path, timeout: Duration, console: Console) -> Result<Outcome> {
        let dir = scratch_dir()?;
        let result = self.run_in(&dir, script, timeout, console);
        let _ = fs::remove_dir_all(&dir);
        result
    }

    fn nics(&self) -> Vec<Nic> {
        self.nics
            .iter()
            .enumerate()
            .map(|(i, &model)| Nic {
                model,
                id: format!("nic{i}"),
                netdev: format!("net{i}"),
                bus: format!("rp{i}"),
                mac: format!("52:54:00:12:34:{:02x}", 0x10 + i),
                present: true,
                guest_name: None,
            })
            .collect()
    }

    fn run_in(&self, dir: &Path, script: &Path, timeout: Duration, console: Console) -> Result<Outcome> {
        let image = self.initramfs(script)?;
        let initrd = dir.join("initramfs.cpio");
        fs::write(&initrd, image)?;
        let ctl_path = dir.join("ctl.sock");
        let qmp_path = dir.join("qmp.sock");
        let ctl_listener = UnixListener::bind(&ctl_path)?;
        let qmp_listener = UnixListener::bind(&qmp_path)?;
        let mut nics = self.nics();

        let arch = self.kernel.arch;
        let mut qemu = Command::new(arch.qemu());
        qemu.args(arch.qemu_machine())
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel.image)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &self.command_line()])
            .args(["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"])
            .arg("-chardev")
            .arg(format!("socket,id=ctl,path={}", ctl_path.display()))
            .args(arch.control_channel())
            .arg("-chardev")
            .arg(format!("socket,id=qmp,path={}", qmp_path.display()))
            .args(["-mon", "chardev=qmp,mode=control"]);
        for (i, nic) in nics.iter().enumerate() {
            qemu.args([
                "-device",
                &format!("pcie-root-port,id={},bus=pcie.0,chassis={},slot={}", nic.bus, i + 1, i + 1),
                "-netdev",
                // Its own subnet per NIC, as EC2 gives each ENI: DHCP hands out 10.0.N.5, the
                // router is 10.0.N.1 (the addresses the mock IMDS publishes).
                &format!(
                    "user,id={},restrict=on,net=10.0.{i}.0/24,host=10.0.{i}.1,dhcpstart=10.0.{i}.5",
                    nic.netdev
                ),
                "-device",
                &format!(
                    "{},id={},netdev={},bus={},mac={}",
                    nic.model.qemu_device(),
                    nic.id,
                    nic.netdev,
                    nic.bus,
                    nic.mac
                ),
            ]);
        }
        // An empty hot-pluggable slot with its own network (10.0.N.0/24, N the number of NICs),
        // where `vmctl attach` plugs a NIC the guest never had.
        let spare = nics.len();
        qemu.args([
            "-device",
            &format!("pcie-root-port,id={SPARE_BUS},bus=pcie.0,chassis={},slot={}", spare + 1, spare + 1),
            "-netdev",
            &format!("user,id={SPARE_NETDEV},restrict=on,net=10.0.{spare}.0/24,host=10.0.{spare}.1,dhcpstart=10.0.{spare}.5"),
        ]);
        // Every guest is an EC2 instance as far as its firmware goes: what cloud-init's ds-identify
        // and the agent (`hotplug::platform`) read to tell EC2 (SMBIOS type 1).
        qemu.args([
            "-smbios",
            &format!("type=1,manufacturer={EC2_VENDOR},product=m5.large,serial={EC2_UUID},uuid={EC2_UUID}"),
        ]);
        if let Some(distro) = &self.distro {
            qemu.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio,snapshot=on", distro.image.image.display()));
        }
        qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = qemu
            .spawn()
            .with_context(|| format!("cannot start {} (cargo xtask setup installs it)", arch.qemu()))?;
        let console_log = Arc::new(std::sync::Mutex::new(String::new()));
        let console_thread =
            spawn_console(&mut child, matches!(console, Console::Stream), Arc::clone(&console_log))?;

        let mut outcome = Outcome {
            exit_status: None,
            failure: None,
            boot: None,
            duration: Duration::ZERO,
            figures: BTreeMap::new(),
            console: String::new(),
            files: BTreeMap::new(),
        };
        let served = accept(&ctl_listener, &mut child, started)
            .and_then(|ctl| Ok((ctl, accept(&qmp_listener, &mut child, started)?)))
            .and_then(|(ctl, qmp)| {
                let mut qmp = Qmp::new(qmp)?;
                serve(ctl, &mut qmp, &mut nics, &mut outcome, started, timeout)
            });
        if let Err(error) = served {
            outcome.failure = Some(format!("{error:#}"));
        }
        // The guest powers off after the script; give it a moment, then stop it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let status = child.wait()?;
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let _ = console_thread.join();
        outcome.duration = started.elapsed();
        outcome.console = console_log.lock().map(|c| c.clone()).unwrap_or_default();
        if outcome.exit_status.is_none() && outcome.failure.is_none() {
            outcome.failure =
                Some(format!("QEMU exited ({status}) before the script finished: {}", stderr.trim()));
        } else if let Some(failure) = outcome.failure.as_mut().filter(|f| f.contains(CHANNEL_CLOSED)) {
            // Say what became of QEMU: the channel closes when it exits.
            failure.push_str(&format!("; QEMU exited ({status}): {}", stderr.trim()));
        }
        Ok(outcome)
    }

    /// What the distro guest's mock IMDS publishes at boot: each NIC with device number N (its
    /// position), address 10.0.N.5 in 10.0.N.0/24 (what its user-mode network's DHCP gives).
    fn imds_nics(&self) -> String {
        let nics: Vec<Value> = self
            .nics()
            .iter()
            .enumerate()
            .map(|(i, nic)| {
                json!({
                    "mac": nic.mac,
                    "device_number": i,
                    "local_ipv4s": [format!("10.0.{i}.5")],
                    "subnet_ipv4_cidr_block": format!("10.0.{i}.0/24"),
                })
            })
            .collect();
        Value::Array(nics).to_string()
    }

    fn command_line(&self) -> String {
        let mut line =
            format!("console={} panic=-1 quiet loglevel=4 rdinit=/init", self.kernel.arch.console());
        if self.distro.is_some() {
            line.push_str(" systemd.unit=hotplug-harness.target systemd.show_status=false");
        }
        line
    }

    fn initramfs(&self, script: &Path) -> Result<Vec<u8>> {
        let mut image = Initramfs::new();
        for dir in [
            "dev", "proc", "sys", "tmp", "run", "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root",
            "var/run",
        ] {
            image.dir(dir);
        }
        image.char_device("/dev/console", 5, 1);
        image.char_device("/dev/null", 1, 3);
        let arch = self.kernel.arch;
        let userland = userland::ensure(arch)?;
        add_binary(&mut image, &userland, "/bin/busybox", &userland.busybox()?)?;
        image.symlink("/bin/sh", "busybox");
        for binary in &self.binaries {
            let name = binary.file_name().and_then(|n| n.to_str()).context("binary without a name")?;
            // A distro guest gets the agent from its package, as an operator would.
            if self.distro.is_some() && name == "hotplug-agent" {
                continue;
            }
            crate::arch::check_binary(binary, arch)?;
            add_binary(&mut image, &userland, &format!("/opt/hotplug/bin/{name}"), binary)?;
        }
        let root = cmd::workspace_root();
        image.copy("/opt/hotplug/bin/vmctl", &root.join("tests/guest/vmctl"))?;
        image.copy_tree("/opt/hotplug/scenarios", &root.join("tests/scenarios"))?;
        // The real-instance checks, which source the scenarios' helpers from ../scenarios.
        image.copy_tree("/opt/hotplug/ec2", &root.join("tests/ec2"))?;
        image.copy("/opt/hotplug/script", script)?;
        image.copy_tree("/lib/modules", &self.kernel.module_root.join("lib/modules"))?;
        match &self.distro {
            None => {
                // iproute2's ip: scenarios inspect addresses, routes and rules in detail.
                add_binary(&mut image, &userland, "/opt/hotplug/bin/ip", &userland.ip()?)?;
                image.file("/opt/hotplug/profile", 0o644, b"ip() { /opt/hotplug/bin/ip \"$@\"; }\n");
                image.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
                image.file("/etc/group", 0o644, b"root:x:0:\n");
                let modules = kernels::guest_modules(arch).join(" ");
                image.file("/init", 0o755, guest_init(&modules, arch.control_device()).as_bytes());
            }
            Some(distro) => {
                image.copy_tree("/opt/hotplug/guest", &root.join("tests/guest/distro"))?;
                for (dir, package) in
                    [("pkg", &distro.packages.deb), ("pkg/upgrade", &distro.packages.deb_upgrade)]
                {
                    let name =
                        package.file_name().and_then(|n| n.to_str()).context("package without a name")?;
                    image.copy(&format!("/opt/hotplug/{dir}/{name}"), package)?;
                }
                let nics = if distro.imds_nics { self.imds_nics() } else { "[]".to_owned() };
                image.file("/opt/hotplug/guest/nics.json", 0o644, nics.as_bytes());
                let managers: Vec<&str> = distro.managers.iter().flat_map(|m| m.enable()).collect();
                image.file("/init", 0o755, distro_init(&managers.join("\n"), distro.preinstall).as_bytes());
            }
        }
        Ok(image.finish())
    }
}

/// SMBIOS identity of every guest: what EC2's Nitro instances show (cloud-init's ds-identify
/// reads the vendor and a UUID starting with "ec2").
const EC2_VENDOR: &str = "Amazon EC2";
const EC2_UUID: &str = "ec2f1a2b-3c4d-5e6f-7a8b-9c0d1e2f3a4b";

/// The distro guest's /init: mounts the root file system, gives it this kernel's modules and the
/// harness's files, turns on the network managers asked for, and hands over to systemd.
fn distro_init(managers: &str, preinstall: bool) -> String {
    let modules = kernels::DISTRO_MODULES.join(" ");
    // dpkg in a chroot without systemd running: the package is enabled, not started (its
    // maintainer scripts start it only where /run/systemd/system exists).
    let preinstall = if preinstall {
        // Full paths: busybox's chroot would run its own applets (a `dpkg` of its own) for bare names.
        "mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount --bind /dev /newroot/dev
for deb in /newroot/opt/hotplug/pkg/hotplug-agent_*.deb; do
	chroot /newroot /usr/bin/dpkg -i \"${deb#/newroot}\" >/newroot/root/preinstall.log 2>&1 ||
		{ cat /newroot/root/preinstall.log; echo \"init: preinstalling $deb failed\"; }
done
umount /newroot/dev /newroot/sys /newroot/proc"
    } else {
        ""
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_pci {modules}; do modprobe "$m" || echo "init: modprobe $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
	echo "init: cannot mount the root file system /dev/vda"
	poweroff -f
fi
release=$(uname -r)
mkdir -p /newroot/usr/lib/modules
rm -rf "/newroot/usr/lib/modules/$release"
cp -a "/lib/modules/$release" /newroot/usr/lib/modules/
cp -a /opt/hotplug /newroot/opt/
units=/newroot/etc/systemd/system
cp /opt/hotplug/guest/hotplug-harness.service /opt/hotplug/guest/hotplug-harness.target /opt/hotplug/guest/hotplug-mock-imds.service $units/
mkdir -p $units/sysinit.target.wants
ln -sf /etc/systemd/system/hotplug-mock-imds.service $units/sysinit.target.wants/hotplug-mock-imds.service
{managers}
{preinstall}
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#
    )
}

/// The guest's /init: mounts, loads the NIC drivers, runs the script, reports its exit status on
/// the control channel and powers off.
fn guest_init(modules: &str, control: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/opt/hotplug/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root VMCTL_DEVICE={control}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname hotplug-guest
ip link set lo up
for m in {modules}; do modprobe "$m" || echo "init: modprobe $m failed"; done
# The control channel: a virtio console (arm64's hvc0) appears once the host has announced its
# port, a moment after the module loaded (6.1 builds virtio_console as a module). A holder keeps
# it open for the guest's life: it forgets its line settings when its last user closes it, and
# an echo would garble the protocol. Wait for the device node itself: opening a path that does
# not exist yet for writing creates a plain file there, which devtmpfs then cannot replace (an
# arm64 guest lost its control channel so).
i=0
until [ -c {control} ] && (exec 3<>{control}) 2>/dev/null; do
	i=$((i + 1))
	[ $i -ge 100 ] && {{ echo "init: no control channel {control} after 10 s: powering off"; poweroff -f; }}
	sleep 0.1
done
sleep 2147483647 <>{control} >/dev/null 2>&1 &
holder=$!
# The holder opens the device in the background: set the line only once it holds it.
i=0
while [ "$(readlink /proc/$holder/fd/0 2>/dev/null)" != "{control}" ] && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
stty -F {control} raw -echo
vmctl hello "$(uname -r)"
echo "=== hotplug guest $(uname -r): running the script ==="
cd /root
# busybox sh prefers its own applets to PATH; the profile points `ip` at iproute2.
sh -c '. /opt/hotplug/profile; . /opt/hotplug/script'
rc=$?
echo "=== script exited $rc ==="
vmctl exit "$rc"
sync
poweroff -f
"#
    )
}

/// Adds a binary and the shared libraries it loads (from the guest's userland).
fn add_binary(image: &mut Initramfs, userland: &userland::Userland, path: &str, file: &Path) -> Result<()> {
    image.copy(path, file)?;
    for (guest_path, library) in userland.libraries(file)? {
        image.copy(&guest_path, &library)?;
    }
    Ok(())
}

fn spawn_console(
    child: &mut Child,
    stream: bool,
    log: Arc<std::sync::Mutex<String>>,
) -> Result<thread::JoinHandle<()>> {
    let stdout = child.stdout.take().context("QEMU has no stdout")?;
    Ok(thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).replace('\r', "");
            if stream {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            if let Ok(mut log) = log.lock() {
                log.push_str(&text);
            }
            line.clear();
        }
    }))
}

/// Waits for QEMU to connect to `listener`, failing early if QEMU exits.
fn accept(listener: &UnixListener, child: &mut Child, started: Instant) -> Result<UnixStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = child.try_wait()? {
            bail!("QEMU exited ({status}) before connecting its sockets");
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("QEMU did not connect its sockets within 30 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Serves the guest's `vmctl` requests until the script reports its exit status.
fn serve(
    ctl: UnixStream,
    qmp: &mut Qmp,
    nics: &mut Vec<Nic>,
    outcome: &mut Outcome,
    started: Instant,
    timeout: Duration,
) -> Result<()> {
    ctl.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut writer = ctl.try_clone()?;
    let mut reader = BufReader::new(ctl);
    let mut line = String::new();
    // `vmctl put NAME`: the base64 lines that follow, until a line ".".
    let mut receiving: Option<(String, String)> = None;
    loop {
        if started.elapsed() > timeout {
            bail!("the guest did not finish within {} s", timeout.as_secs());
        }
        match reader.read_line(&mut line) {
            Ok(0) => bail!("{CHANNEL_CLOSED}"),
            Ok(_) if line.ends_with('\n') => {}
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue
            }
            Err(e) => return Err(e.into()),
        }
        let request = line.trim().to_owned();
        line.clear();
        if let Some((name, mut data)) = receiving.take() {
            if request != "." {
                data.push_str(&request);
                receiving = Some((name, data));
                continue;
            }
            let reply = match decode_put(&data) {
                Ok(bytes) => {
                    outcome.files.insert(name, bytes);
                    "ok".to_owned()
                }
                Err(e) => format!("error {e:#}"),
            };
            writer.write_all(format!("{reply}\n").as_bytes())?;
            continue;
        }
        let mut words = request.split_whitespace();
        let reply = match (words.next(), words.next(), words.next(), words.next()) {
            (Some("hello"), _, _, _) => {
                outcome.boot = Some(started.elapsed());
                "ok".to_owned()
            }
            (Some("put"), Some(name), None, None) => {
                receiving = Some((name.to_owned(), String::new()));
                continue;
            }
            (Some("exit"), Some(code), None, None) => {
                outcome.exit_status = Some(code.parse().context("bad exit status from the guest")?);
                return Ok(());
            }
            (Some("report"), Some(key), Some(_), _) => {
                let raw = request.splitn(3, ' ').nth(2).unwrap_or_default().trim();
                let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
                outcome.figures.insert(key.to_owned(), value);
                "ok".to_owned()
            }
            (Some("unplug"), Some(name), Some(mac), None) => match unplug(qmp, nics, name, mac) {
                Ok(took) => format!("ok {}", took.as_millis()),
                Err(e) => format!("error {e:#}"),
            },
            (Some("attach"), Some(model), Some(mac), None) => match attach(qmp, nics, model, mac) {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("error {e:#}"),
            },
            (Some("carrier"), Some(mac), Some(state @ ("on" | "off")), None) => {
                match carrier(qmp, nics, mac, state == "on") {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("error {e:#}"),
                }
            }
            (Some("plug"), Some(name), new_mac, None) => match plug(qmp, nics, name, new_mac) {
                Ok(mac) => format!("ok {mac}"),
                Err(e) => format!("error {e:#}"),
            },
            _ => format!("error unknown request {request:?}"),
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
}

/// A `vmctl put` body: base64 of gzip.
fn decode_put(data: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let compressed = base64::engine::general_purpose::STANDARD.decode(data).context("bad base64")?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice()).read_to_end(&mut bytes).context("bad gzip")?;
    Ok(bytes)
}

/// The spare slot's root port and network.
const SPARE_BUS: &str = "rpspare";
const SPARE_NETDEV: &str = "netspare";

/// Plugs a NIC of `model` with `mac` into the spare slot (once).
fn attach(qmp: &mut Qmp, nics: &mut Vec<Nic>, model: &str, mac: &str) -> Result<()> {
    let model = NicModel::from_str(model, true).map_err(anyhow::Error::msg)?;
    if nics.iter().any(|n| n.bus == SPARE_BUS) {
        bail!("the spare slot is taken already");
    }
    qmp.execute(
        "device_add",
        json!({ "driver": model.qemu_device(), "id": "nicspare", "netdev": SPARE_NETDEV, "bus": SPARE_BUS, "mac": mac }),
    )?;
    nics.push(Nic {
        model,
        id: "nicspare".into(),
        netdev: SPARE_NETDEV.into(),
        bus: SPARE_BUS.into(),
        mac: mac.to_owned(),
        present: true,
        guest_name: None,
    });
    Ok(())
}

/// Takes the carrier of the NIC with `mac` away or gives it back (QMP `set_link`: the guest sees
/// its link go down, as when a cable is pulled).
fn carrier(qmp: &mut Qmp, nics: &[Nic], mac: &str, up: bool) -> Result<()> {
    let nic = nics
        .iter()
        .find(|n| n.present && n.mac.eq_ignore_ascii_case(mac))
        .with_context(|| format!("no plugged NIC has MAC {mac}"))?;
    qmp.execute("set_link", json!({ "name": nic.id, "up": up }))?;
    Ok(())
}

fn unplug(qmp: &mut Qmp, nics: &mut [Nic], name: &str, mac: &str) -> Result<Duration> {
    let nic = nics
        .iter_mut()
        .find(|n| n.present && n.mac.eq_ignore_ascii_case(mac))
        .with_context(|| format!("no plugged NIC has MAC {mac}"))?;
    let took = qmp.device_del(&nic.id, Duration::from_secs(30))?;
    nic.present = false;
    nic.guest_name = Some(name.to_owned());
    Ok(took)
}

fn plug(qmp: &mut Qmp, nics: &mut [Nic], name: &str, new_mac: Option<&str>) -> Result<String> {
    let nic = nics
        .iter_mut()
        .find(|n| !n.present && n.guest_name.as_deref() == Some(name))
        .with_context(|| format!("no NIC named {name} was unplugged"))?;
    if let Some(mac) = new_mac {
        nic.mac = mac.to_owned();
    }
    qmp.execute(
        "device_add",
        json!({
            "driver": nic.model.qemu_device(),
            "id": nic.id,
            "netdev": nic.netdev,
            "bus": nic.bus,
            "mac": nic.mac,
        }),
    )?;
    nic.present = true;
    Ok(nic.mac.clone())
}

/// Writes `target/vm-results/NAME.json` (or `NAME-SUITE.json` for non-default kernels), the
/// console beside it (`.log`), and each file the guest sent (`.journal` for the guest's journal).
pub fn write_result(name: &str, guest: &Guest, outcome: &Outcome) -> Result<PathBuf> {
    let dir = cmd::target_dir().join("vm-results");
    fs::create_dir_all(&dir)?;
    let mut file = name.to_owned();
    if guest.kernel.suite != kernels::Suite::Bookworm {
        file = format!("{file}-{}", guest.kernel.suite.name());
    }
    if guest.kernel.arch != Arch::Amd64 {
        file = format!("{file}-{}", guest.kernel.arch.name());
    }
    if let Some(distro) = guest.distro.as_ref().map(|d| d.image.distro).filter(|d| *d != Distro::Trixie) {
        file = format!("{file}-{}-guest", distro.name());
    }
    let file = format!("{file}.json");
    let result = json!({
        "scenario": name,
        "arch": guest.kernel.arch.name(),
        "kernel": guest.kernel.suite.name(),
        "kernel_release": guest.kernel.release,
        "guest": guest.distro.as_ref().map_or("busybox", |d| d.image.distro.name()),
        "managers": guest.distro.as_ref().map(|d| d.managers.iter().map(|m| m.name()).collect::<Vec<_>>()),
        "preinstalled": guest.distro.as_ref().map(|d| d.preinstall),
        "nics": guest.nics.iter().map(|n| n.qemu_device()).collect::<Vec<_>>(),
        "passed": outcome.passed(),
        "exit_status": outcome.exit_status,
        "failure": outcome.failure,
        "boot_seconds": outcome.boot.map(|b| b.as_secs_f64()),
        "duration_seconds": outcome.duration.as_secs_f64(),
        "figures": outcome.figures,
        "files": outcome.files.keys().collect::<Vec<_>>(),
    });
    let path = dir.join(file);
    fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
    fs::write(path.with_extension("log"), &outcome.console)?;
    for (file, bytes) in &outcome.files {
        fs::write(path.with_extension(file), bytes)?;
    }
    Ok(path)
}
