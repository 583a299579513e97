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

    /// Runs `scenario` on a thread of its own, moved into a new network namespace, on a tokio
    /// runtime of that thread alone (the namespace is the thread's: nothing else may run there).
    pub fn in_private_netns<F, Fut>(scenario: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(scenario())
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
    }

    /// The ifindex of `name` in this thread's namespace.
    pub async fn ifindex(name: &str) -> Result<u32, String> {
        let links = hotplug::kernel::rtnl::dump_links().await.map_err(|e| e.to_string())?;
        links.iter().find(|l| l.name == name).map(|l| l.ifindex).ok_or_else(|| format!("no link {name}"))
    }

    /// A kernel NIC event of the veth `name` with MAC `mac` (a virtual link: keyed by MAC and
    /// name), standing in for the kernel's.
    pub async fn veth_event(
        action: hotplug::classify::Action,
        cause: hotplug::classify::Cause,
        name: &str,
        mac: &str,
    ) -> Result<hotplug::classify::NicEvent, String> {
        Ok(hotplug::classify::NicEvent {
            action,
            cause,
            source: hotplug::classify::Source::Kernel,
            ifindex: i32::try_from(ifindex(name).await?).map_err(|e| e.to_string())?,
            name: name.into(),
            mac: mac.into(),
            permanent_mac: None,
            bus: None,
            driver: Some("veth".into()),
            module: None,
            context_module: None,
            task: None,
            timestamp_ns: hotplug::clock::monotonic_ns(),
            netns: None,
        })
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
