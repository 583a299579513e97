//! Loads the embedded eBPF object, fills in what the programs need from the running kernel
//! (tracepoint field offsets from tracefs, struct member offsets from BTF, attach points from
//! kallsyms), and attaches each program. What cannot attach is reported,
//! not fatal: the agent then runs in degraded mode.
use std::path::Path;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{KProbe, TracePoint},
    Ebpf, EbpfLoader,
};
use hotplug_common::{globals, Counter};
use thiserror::Error;

use super::{
    abi::{AbiError, Convention},
    btf::{Btf, BtfError, Shape},
    features::KernelFeatures,
    kallsyms::Kallsyms,
    tracefs,
};

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
    Map { name: &'static str, source: aya::maps::MapError },
}

/// One program of the object, where it was attached, and whether it runs.
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
    /// What the programs run without on this kernel (each one a reason for degraded mode).
    pub limitations: Vec<String>,
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
        self.counters.get(&(counter as u32), 0).map_or(0, |values| values.iter().sum())
    }
}

/// The programs kernel-side NIC classification needs. A `Pick::All` program counts as attached
/// when it is on every one of its functions this kernel has (a kernel without one variant, e.g.
/// `init_module`, is not asked to have it).
const NIC_CLASSIFICATION: [&str; 15] = [
    "netdev_unregister",
    "netdev_register_enter",
    "netdev_register_exit",
    "delete_module_enter",
    "delete_module_exit",
    "module_init_enter",
    "module_init_exit",
    "unbind_enter",
    "unbind_exit",
    "bind_enter",
    "bind_exit",
    "pci_remove_enter",
    "pci_remove_exit",
    "pci_add_enter",
    "pci_add_exit",
];

/// (program, tracepoint category, tracepoint names) of the tracepoint programs.
const TRACEPOINTS: [(&str, &str, &[&str]); 2] =
    [("module_load", "module", &["module_load"]), ("module_free", "module", &["module_free"])];

/// How a kprobe program picks its kernel functions.
#[derive(Clone, Copy)]
enum Pick {
    /// The first candidate the kernel has (the function's arguments matter).
    First,
    /// Every candidate the kernel has (context markers: nesting is counted).
    All,
}

/// What a kprobe program is placed on.
#[derive(Clone, Copy)]
enum Hook {
    /// Kernel functions by name.
    Functions(&'static [&'static str]),
    /// System calls by name: their wrappers on this architecture (`Convention::syscall_prefix`).
    Syscalls(&'static [&'static str]),
}

/// (program, is kretprobe, hook, pick) of the kprobe programs. See the comments in
/// `hotplug-ebpf/src/context.rs` and `netdev.rs` for the kernel functions.
const KPROBES: [(&str, bool, Hook, Pick); 21] = [
    ("delete_module_enter", false, Hook::Syscalls(&["delete_module"]), Pick::First),
    ("delete_module_exit", true, Hook::Syscalls(&["delete_module"]), Pick::First),
    ("module_init_enter", false, MODULE_INIT, Pick::All),
    ("module_init_exit", true, MODULE_INIT, Pick::All),
    (
        "netdev_unregister",
        false,
        Hook::Functions(&["unregister_netdevice_many_notify", "unregister_netdevice_many"]),
        Pick::First,
    ),
    ("netdev_register_enter", false, Hook::Functions(&["register_netdevice"]), Pick::First),
    ("netdev_register_exit", true, Hook::Functions(&["register_netdevice"]), Pick::First),
    ("netns_move_enter", false, NETNS_MOVE, Pick::First),
    ("netns_move_exit", true, NETNS_MOVE, Pick::First),
    ("unbind_enter", false, Hook::Functions(&["unbind_store"]), Pick::All),
    ("unbind_exit", true, Hook::Functions(&["unbind_store"]), Pick::All),
    ("bind_enter", false, Hook::Functions(&["bind_store"]), Pick::All),
    ("bind_exit", true, Hook::Functions(&["bind_store"]), Pick::All),
    ("pci_remove_enter", false, PCI_REMOVE, Pick::All),
    ("pci_remove_exit", true, PCI_REMOVE, Pick::All),
    ("pci_add_enter", false, PCI_ADD, Pick::All),
    ("pci_add_exit", true, PCI_ADD, Pick::All),
    ("dellink_enter", false, Hook::Functions(&["rtnl_dellink"]), Pick::All),
    ("dellink_exit", true, Hook::Functions(&["rtnl_dellink"]), Pick::All),
    ("newlink_enter", false, Hook::Functions(&["rtnl_newlink"]), Pick::All),
    ("newlink_exit", true, Hook::Functions(&["rtnl_newlink"]), Pick::All),
];

const NETNS_MOVE: Hook = Hook::Functions(&[
    "__dev_change_net_namespace",
    "netif_change_net_namespace",
    "dev_change_net_namespace",
]);
const MODULE_INIT: Hook = Hook::Syscalls(&["init_module", "finit_module"]);
const PCI_REMOVE: Hook =
    Hook::Functions(&["pci_stop_and_remove_bus_device", "pci_stop_and_remove_bus_device_locked"]);
const PCI_ADD: Hook = Hook::Functions(&["pci_bus_add_devices", "pci_bus_add_device"]);

impl Hook {
    /// The names this kernel would have: syscalls as this architecture's wrappers; none when the
    /// architecture is unknown (its bare `sys_<name>` takes its arguments in registers, not the
    /// `struct pt_regs *` the programs read).
    fn candidates(self, convention: Option<&Convention>) -> Vec<String> {
        match (self, convention) {
            (Self::Functions(names), _) => names.iter().map(|n| (*n).to_owned()).collect(),
            (Self::Syscalls(names), Some(c)) => {
                names.iter().map(|n| format!("{}{n}", c.syscall_prefix)).collect()
            }
            (Self::Syscalls(_), None) => Vec::new(),
        }
    }
}

/// Struct member offsets for the NIC programs, from BTF.
struct StructLayout {
    offsets: Vec<(&'static str, u32)>,
    dev_addr_is_pointer: u32,
}

/// The offsets of an optional group, if this kernel's BTF has every one of them.
fn optional_layout(btf: &Btf, group: &[(&'static str, &str, &str)]) -> Option<Vec<(&'static str, u32)>> {
    group
        .iter()
        .map(|(global, strukt, path)| btf.member(strukt, path).ok().map(|m| (*global, m.offset)))
        .collect()
}

impl LoadOptions {
    /// The default ring, nothing disabled, this process's namespace.
    pub fn with_defaults() -> Self {
        Self {
            ring_bytes: hotplug_common::EVENT_RING_BYTES,
            disabled: Vec::new(),
            netns: own_netns(),
            drop_registrations: 0,
        }
    }
}

/// The inode of this process's network namespace.
pub fn own_netns() -> Option<u32> {
    let meta = std::fs::metadata("/proc/self/ns/net").ok()?;
    u32::try_from(std::os::unix::fs::MetadataExt::ino(&meta)).ok()
}

/// What the loader is asked for besides the kernel's own facts.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Size of the ring buffer, bytes.
    pub ring_bytes: u32,
    /// Programs not to attach (`--disable-probe`): an operator's way around a probe that
    /// misbehaves on one kernel, and the tests' way to make attaching fail.
    pub disabled: Vec<String>,
    /// Inode of the agent's network namespace (NIC events of others are dropped in the kernel).
    pub netns: Option<u32>,
    /// Fault injection for tests (`--drop-registrations`): this many NIC registration records
    /// are dropped as they arrive, as if the probe had missed them.
    pub drop_registrations: u32,
}

/// Why the struct layout the kprobes need could not be had.
#[derive(Clone, Debug, Error)]
pub enum LayoutError {
    #[error("no struct layout from BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("{0}")]
    Abi(#[from] AbiError),
}

fn struct_layout(btf: &Btf, convention: Result<Convention, AbiError>) -> Result<StructLayout, LayoutError> {
    let registers = convention?.offsets(btf)?;
    let mut offsets = vec![
        (globals::REGS_ARG0, registers.arg0),
        (globals::REGS_RET, registers.ret),
        (globals::SYSCALL_ARG0, registers.syscall_arg0),
    ];
    let mut dev_addr_is_pointer = 1;
    for (global, strukt, path) in globals::STRUCT_OFFSETS {
        let member = btf.member(strukt, path)?;
        if global == "NETDEV_DEV_ADDR" {
            dev_addr_is_pointer = u32::from(member.shape == Shape::Pointer);
        }
        offsets.push((global, member.offset));
    }
    offsets.push((globals::MODULE_STRUCT_NAME, btf.member("module", "name")?.offset));
    Ok(StructLayout { offsets, dev_addr_is_pointer })
}

impl KernelProbes {
    pub fn load(
        object: Option<&[u8]>,
        features: &KernelFeatures,
        options: &LoadOptions,
    ) -> Result<Self, ProbeError> {
        let object = object.ok_or(ProbeError::NoObject)?;
        let tracefs = features.tracefs.as_deref().map(Path::new).ok_or_else(|| {
            ProbeError::NoTracefs(
                features.tracefs_problem.clone().unwrap_or_else(|| "tracefs is not mounted".into()),
            )
        })?;

        // Offsets of the tracepoint fields the programs read; a tracepoint that does not exist
        // here keeps the compiled-in default and its program is not attached below.
        let offset = |system: &str, event: &str, field: &str| match tracefs::field_offset(
            tracefs, system, event, field,
        ) {
            Ok(offset) => Ok(Some(offset)),
            Err(tracefs::TracefsError::NoSuchTracepoint { .. }) => Ok(None),
            Err(error) => Err(error),
        };
        let tracepoint_layout = [
            (globals::MODULE_LOAD_NAME, offset("module", "module_load", "name")?),
            (globals::MODULE_FREE_NAME, offset("module", "module_free", "name")?),
        ];
        let mark = crate::clock::monotonic_ns();
        let btf = Btf::vmlinux();
        tracing::debug!("kernel BTF read in {} us", (crate::clock::monotonic_ns() - mark) / 1000);
        let convention = Convention::of(&features.arch);
        let struct_layout = btf
            .as_ref()
            .map_err(|e| LayoutError::from(e.clone()))
            .and_then(|btf| struct_layout(btf, convention.clone()));
        let netns_layout = btf.as_ref().ok().and_then(|b| optional_layout(b, &globals::NETNS_OFFSETS));
        let priv_layout = btf.as_ref().ok().and_then(|b| optional_layout(b, &globals::PRIV_OFFSETS));
        let parent_layout = btf.as_ref().ok().and_then(|b| optional_layout(b, &globals::PARENT_OFFSETS));
        drop(btf);
        let mut limitations = Vec::new();
        if netns_layout.is_none() {
            limitations.push("no namespace offsets in BTF: NIC events carry no namespace, other namespaces' NICs cannot be told apart".to_owned());
        }
        if priv_layout.is_none() {
            limitations.push("no credential offsets in BTF: refused delete_module calls of unprivileged users reach the ring buffer".to_owned());
        }
        // Which attach points exist: only the candidates are looked for, and only where a kprobe
        // can be placed at all (the file is long, and costs the kernel tens of ms to write).
        let mark = crate::clock::monotonic_ns();
        let wanted: Vec<String> =
            KPROBES.iter().flat_map(|(_, _, hook, _)| hook.candidates(convention.as_ref().ok())).collect();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let kallsyms = if features.kprobes {
            Kallsyms::read(&wanted).unwrap_or_else(|error| {
                limitations.push(format!("cannot read /proc/kallsyms ({error}): no kprobe can be placed"));
                Kallsyms::default()
            })
        } else {
            Kallsyms::default()
        };
        tracing::debug!("kallsyms read in {} us", (crate::clock::monotonic_ns() - mark) / 1000);

        let mark = crate::clock::monotonic_ns();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("EVENTS", options.ring_bytes);
        for (name, value) in &tracepoint_layout {
            if let Some(value) = value {
                loader.override_global(name, value, true);
            }
        }
        if let Ok(layout) = &struct_layout {
            for (name, value) in &layout.offsets {
                loader.override_global(name, value, true);
            }
            loader.override_global(globals::NETDEV_DEV_ADDR_IS_POINTER, &layout.dev_addr_is_pointer, true);
        }
        let netns_known = u32::from(netns_layout.is_some());
        for (name, value) in netns_layout.iter().flatten() {
            loader.override_global(name, value, true);
        }
        loader.override_global(globals::NETNS_KNOWN, &netns_known, true);
        let agent_netns = options.netns.filter(|_| netns_known == 1).unwrap_or(0);
        loader.override_global(globals::AGENT_NETNS, &agent_netns, true);
        let priv_known = u32::from(priv_layout.is_some());
        for (name, value) in priv_layout.iter().flatten() {
            loader.override_global(name, value, true);
        }
        loader.override_global(globals::PRIV_KNOWN, &priv_known, true);
        let parent_known = u32::from(parent_layout.is_some());
        for (name, value) in parent_layout.iter().flatten() {
            loader.override_global(name, value, true);
        }
        loader.override_global(globals::PARENT_KNOWN, &parent_known, true);
        let mut ebpf = loader.load(object)?;
        tracing::debug!("eBPF object loaded in {} us", (crate::clock::monotonic_ns() - mark) / 1000);
        if let Err(error) = aya_log::EbpfLogger::init(&mut ebpf) {
            tracing::debug!(%error, "no eBPF log channel");
        }

        let mut attachments = Vec::new();
        let disabled = |program: &str| options.disabled.iter().any(|d| d == program);
        for (program, category, names) in TRACEPOINTS {
            for name in names {
                let error = if disabled(program) {
                    Some("disabled (--disable-probe)".to_owned())
                } else if tracefs::has_tracepoint(tracefs, category, name) {
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
        }
        let convention = convention.ok();
        for (program, is_return, hook, pick) in KPROBES {
            let kind = if is_return { "kretprobe" } else { "kprobe" };
            let candidates = hook.candidates(convention.as_ref());
            let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
            if let Err(error) = &struct_layout {
                attachments.push(Attachment {
                    program,
                    hook: format!("{kind} {}", candidates.join("|")),
                    error: Some(format!("not attached: {error}")),
                });
                continue;
            }
            if disabled(program) {
                attachments.push(Attachment {
                    program,
                    hook: format!("{kind} {}", candidates.join("|")),
                    error: Some("disabled (--disable-probe)".to_owned()),
                });
                continue;
            }
            let functions: Vec<&str> = match pick {
                Pick::First => kallsyms.first_function(&candidates).into_iter().collect(),
                Pick::All => candidates.iter().copied().filter(|c| kallsyms.has_function(c)).collect(),
            };
            if !features.kprobes {
                attachments.push(Attachment {
                    program,
                    hook: format!("{kind} {}", candidates.join("|")),
                    error: Some("this kernel has no kprobes (CONFIG_KPROBES off)".to_owned()),
                });
                continue;
            }
            if functions.is_empty() {
                attachments.push(Attachment {
                    program,
                    hook: format!("{kind} {}", candidates.join("|")),
                    error: Some("this kernel has none of these functions".to_owned()),
                });
            }
            for function in functions {
                let error = attach_kprobe(&mut ebpf, program, function).err();
                attachments.push(Attachment { program, hook: format!("{kind} {function}"), error });
            }
        }

        let events = ebpf.take_map("EVENTS").ok_or(ProbeError::Missing("EVENTS map"))?;
        let events =
            RingBuf::try_from(events).map_err(|source| ProbeError::Map { name: "EVENTS", source })?;
        let counters = ebpf.take_map("COUNTERS").ok_or(ProbeError::Missing("COUNTERS map"))?;
        let counters =
            PerCpuArray::try_from(counters).map_err(|source| ProbeError::Map { name: "COUNTERS", source })?;
        Ok(Self { events, handle: ProbeHandle { _ebpf: ebpf, counters }, attachments, limitations })
    }

    /// Whether the kernel's NIC events can be trusted for their causes: the NIC unregister and
    /// register hooks run, and so do the context probes that explain them (module unload and
    /// load, bind and unbind, PCI removal and addition). With the NIC hooks but not every context
    /// probe, every cause would read `unknown`: degraded mode's classifier reports NIC changes
    /// instead.
    pub fn nic_hooks_attached(&self) -> bool {
        NIC_CLASSIFICATION.iter().all(|program| {
            let mine: Vec<_> = self.attachments.iter().filter(|a| a.program == *program).collect();
            !mine.is_empty() && mine.iter().all(|a| a.error.is_none())
        })
    }

    /// The ring buffer to read, and what keeps the programs attached.
    pub fn split(self) -> (RingBuf<MapData>, ProbeHandle) {
        (self.events, self.handle)
    }
}

/// The reasons for degraded mode that unattached hooks give, one per distinct cause: a cause
/// that kept one hook out names it (`netdev_register (kprobe register_netdevice) not attached:
/// …`), one that kept several out counts them and names their programs once each (`22 probes not
/// attached: this kernel has no kprobes (CONFIG_KPROBES off): delete_module_enter, …`), in the
/// order the causes were first met. `features` keeps the list per hook.
pub fn unattached_reasons(attachments: &[Attachment]) -> Vec<String> {
    let mut causes: Vec<(&str, Vec<&Attachment>)> = Vec::new();
    for attachment in attachments {
        let Some(error) = attachment.error.as_deref() else { continue };
        match causes.iter_mut().find(|(cause, _)| *cause == error) {
            Some((_, hooks)) => hooks.push(attachment),
            None => causes.push((error, vec![attachment])),
        }
    }
    causes
        .into_iter()
        .map(|(cause, hooks)| match hooks.as_slice() {
            [one] => format!("{} ({}) not attached: {cause}", one.program, one.hook),
            many => {
                let mut programs: Vec<&str> = Vec::new();
                for hook in many {
                    if !programs.contains(&hook.program) {
                        programs.push(hook.program);
                    }
                }
                format!("{} probes not attached: {cause}: {}", many.len(), programs.join(", "))
            }
        })
        .collect()
}

/// The names of every program in the object.
pub fn program_names() -> Vec<&'static str> {
    TRACEPOINTS.iter().map(|t| t.0).chain(KPROBES.iter().map(|k| k.0)).collect()
}

fn attach_tracepoint(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| format!("load: {}", error_chain(&e)))?;
    }
    prog.attach(category, name).map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), String> {
    let prog: &mut KProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| format!("load: {}", error_chain(&e)))?;
    }
    prog.attach(function, 0).map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

/// An error and its sources, joined (aya's errors keep the OS error in the source). A verifier
/// log can run to thousands of lines: only its first and last lines are kept (the full log is
/// logged at debug level).
fn error_chain(error: &dyn std::error::Error) -> String {
    let text = crate::error_chain(error);
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 12 {
        return text;
    }
    tracing::debug!("full error: {text}");
    let head = lines[..2].join(" / ");
    let tail = lines[lines.len() - 4..].join(" / ");
    format!("{head} / [{} verifier lines omitted] / {tail}", lines.len() - 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reason_per_cause_naming_its_probes() {
        let hook = |program: &'static str, hook: &str, error: Option<&str>| Attachment {
            program,
            hook: hook.to_owned(),
            error: error.map(str::to_owned),
        };
        let no_kprobes = "this kernel has no kprobes (CONFIG_KPROBES off)";
        let attachments = [
            hook("module_load", "tracepoint module:module_load", None),
            hook("netdev_register", "kprobe register_netdevice", Some(no_kprobes)),
            hook("pci_remove", "kprobe pci_stop_and_remove_bus_device", Some(no_kprobes)),
            hook("pci_remove", "kprobe pci_stop_and_remove_bus_device_locked", Some(no_kprobes)),
            hook("module_free", "tracepoint module:module_free", Some("this kernel has no such tracepoint")),
        ];
        assert_eq!(
            unattached_reasons(&attachments),
            [
                format!("3 probes not attached: {no_kprobes}: netdev_register, pci_remove"),
                "module_free (tracepoint module:module_free) not attached: this kernel has no such tracepoint"
                    .to_owned(),
            ]
        );
        assert!(unattached_reasons(&attachments[..1]).is_empty());
    }

    #[test]
    fn syscalls_are_hooked_on_the_architectures_wrappers_and_on_nothing_elsewhere() -> Result<(), AbiError> {
        let arm = Convention::of("aarch64")?;
        assert_eq!(
            MODULE_INIT.candidates(Some(&arm)),
            ["__arm64_sys_init_module", "__arm64_sys_finit_module"]
        );
        let x86 = Convention::of("x86_64")?;
        assert_eq!(Hook::Syscalls(&["delete_module"]).candidates(Some(&x86)), ["__x64_sys_delete_module"]);
        assert!(MODULE_INIT.candidates(None).is_empty(), "an unknown architecture's sys_* take no pt_regs");
        assert_eq!(PCI_ADD.candidates(None), ["pci_bus_add_devices", "pci_bus_add_device"]);
        Ok(())
    }
}
