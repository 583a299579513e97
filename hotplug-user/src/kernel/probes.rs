//! Loads the embedded eBPF object, fills in the field offsets the programs need from the running
//! kernel, and attaches each program. What cannot attach is reported, not fatal: the agent then
//! runs in degraded mode.
use std::path::Path;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use hotplug_common::{globals, Counter};
use thiserror::Error;

use super::{features::KernelFeatures, tracefs};

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("this agent was built without its eBPF object (HOTPLUG_SKIP_EBPF): rebuild it with `cargo xtask build`")]
    NoObject,
    #[error("no tracefs: {0}")]
    NoTracefs(String),
    #[error("reading tracepoint layouts: {0}")]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("loading the eBPF object failed: {0}. Loading needs root (CAP_BPF and CAP_PERFMON)")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}: agent and object are out of step")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// One program of the object and whether it runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: String,
    /// `None` when attached; otherwise why not.
    pub error: Option<String>,
}

/// The loaded programs and the maps user space reads.
pub struct KernelProbes {
    events: RingBuf<MapData>,
    handle: ProbeHandle,
    pub attachments: Vec<Attachment>,
}

/// What must stay alive while events flow: the programs (dropping them detaches everything) and
/// the counters.
pub struct ProbeHandle {
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
}

impl ProbeHandle {
    /// A counter summed over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map_or(0, |values| values.iter().sum())
    }
}

/// (program, tracepoint category, tracepoint name) for the module lifecycle programs.
const MODULE_TRACEPOINTS: [(&str, &str, &str); 4] = [
    ("delete_module_enter", "syscalls", "sys_enter_delete_module"),
    ("delete_module_exit", "syscalls", "sys_exit_delete_module"),
    ("module_load", "module", "module_load"),
    ("module_free", "module", "module_free"),
];

impl KernelProbes {
    pub fn load(object: Option<&[u8]>, features: &KernelFeatures) -> Result<Self, ProbeError> {
        let object = object.ok_or(ProbeError::NoObject)?;
        let tracefs = features.tracefs.as_deref().map(Path::new).ok_or_else(|| {
            ProbeError::NoTracefs("tracefs is neither mounted nor mountable".into())
        })?;

        // Offsets of the tracepoint fields the programs read; a tracepoint that does not exist
        // here keeps the compiled-in default and its program will fail to attach below.
        let offset = |system: &str, event: &str, field: &str| match tracefs::field_offset(
            tracefs, system, event, field,
        ) {
            Ok(offset) => Ok(Some(offset)),
            Err(tracefs::TracefsError::NoSuchTracepoint { .. }) => Ok(None),
            Err(error) => Err(error),
        };
        let layout = [
            (
                globals::DELETE_MODULE_ENTER_NAME,
                offset("syscalls", "sys_enter_delete_module", "name_user")?,
            ),
            (
                globals::DELETE_MODULE_EXIT_RET,
                offset("syscalls", "sys_exit_delete_module", "ret")?,
            ),
            (
                globals::MODULE_LOAD_NAME,
                offset("module", "module_load", "name")?,
            ),
            (
                globals::MODULE_FREE_NAME,
                offset("module", "module_free", "name")?,
            ),
        ];
        let mut loader = EbpfLoader::new();
        for (name, value) in &layout {
            if let Some(value) = value {
                loader.override_global(name, value, true);
            }
        }
        let mut ebpf = loader.load(object)?;
        if let Err(error) = aya_log::EbpfLogger::init(&mut ebpf) {
            tracing::debug!(%error, "no eBPF log channel");
        }

        let mut attachments = Vec::new();
        for (program, category, name) in MODULE_TRACEPOINTS {
            let error = if tracefs::has_tracepoint(tracefs, category, name) {
                attach_tracepoint(&mut ebpf, program, category, name).err()
            } else {
                Some("this kernel has no such tracepoint".to_owned())
            };
            attachments.push(Attachment {
                program,
                hook: format!("tracepoint {category}:{name}"),
                error,
            });
        }

        let events = ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::Missing("EVENTS map"))?;
        let events = RingBuf::try_from(events).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })?;
        let counters = ebpf
            .take_map("COUNTERS")
            .ok_or(ProbeError::Missing("COUNTERS map"))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;
        Ok(Self {
            events,
            handle: ProbeHandle {
                _ebpf: ebpf,
                counters,
            },
            attachments,
        })
    }

    /// Whether every module lifecycle program is attached.
    pub fn module_lifecycle_attached(&self) -> bool {
        self.attachments.iter().all(|a| a.error.is_none())
    }

    /// The ring buffer to read, and what keeps the programs attached.
    pub fn split(self) -> (RingBuf<MapData>, ProbeHandle) {
        (self.events, self.handle)
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load()
        .map_err(|e| format!("load: {}", error_chain(&e)))?;
    prog.attach(category, name)
        .map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

/// An error and its sources, joined (aya's errors keep the OS error in the source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
