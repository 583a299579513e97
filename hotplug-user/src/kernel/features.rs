//! What the running kernel offers hotplug's programs, probed once at start-up.
use std::{fmt, path::Path};

use aya::programs::ProgramType;

use super::tracefs;

/// The kernel facilities the agent's programs can use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// `uname -m`: the architecture (`x86_64`, `aarch64`), whose calling convention the probes
    /// read arguments by (`abi`).
    pub arch: String,
    /// `/sys/kernel/btf/vmlinux` exists (types for offsets and BTF-typed programs).
    pub btf: bool,
    /// kprobes can be created (the `kprobe` perf PMU exists; `CONFIG_KPROBES`).
    pub kprobes: bool,
    /// fentry/fexit programs load (BPF trampolines); `None` if not probed (the agent's programs
    /// use none, and the probe parses the kernel's BTF once more: only `features` asks) or if
    /// the probe itself failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fentry: Option<bool>,
    /// `module:module_load` and `module:module_free` exist (`CONFIG_MODULES`).
    pub module_tracepoints: bool,
    /// Where tracefs is mounted, if it could be found or mounted.
    pub tracefs: Option<String>,
    /// Why there is none: not mounted, and mounting it failed (a sandbox without mount(2)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracefs_problem: Option<String>,
}

impl KernelFeatures {
    /// Whether fentry programs load here (for `features`: the agent uses none).
    pub fn probe_fentry(&mut self) {
        self.fentry = aya::sys::is_program_supported(ProgramType::Tracing).ok();
    }

    pub fn probe() -> Self {
        let (tracefs, tracefs_problem) = match tracefs::find_or_mount() {
            Ok(path) => (Some(path), None),
            Err(error) => {
                tracing::warn!(%error, "no tracefs: tracepoints cannot be attached");
                (None, Some(error.to_string()))
            }
        };
        let has = |system: &str, events: &[&str]| {
            tracefs.as_deref().is_some_and(|t| events.iter().all(|e| tracefs::has_tracepoint(t, system, e)))
        };
        Self {
            release: kernel_release(),
            arch: super::abi::machine(),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            kprobes: Path::new("/sys/bus/event_source/devices/kprobe").exists(),
            fentry: None,
            module_tracepoints: has("module", &["module_load", "module_free"]),
            tracefs: tracefs.map(|p| p.display().to_string()),
            tracefs_problem,
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned())
}

impl fmt::Display for KernelFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "kernel {} ({}): BTF {}, kprobes {}",
            self.release,
            self.arch,
            yes(self.btf),
            yes(self.kprobes)
        )?;
        if let Some(fentry) = self.fentry {
            write!(f, ", fentry {}", yes(fentry))?;
        }
        write!(f, ", module tracepoints {}", yes(self.module_tracepoints))
    }
}
