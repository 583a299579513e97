//! Kernel events in: the eBPF programs' loader, the running kernel's features, tracepoint and
//! struct layouts, the decoding of ring buffer records into typed events, and the rtnetlink and
//! uevent sources degraded mode uses instead.
pub mod abi;
pub mod btf;
pub mod decode;
pub mod features;
pub mod heuristic;
pub mod kallsyms;
pub mod probes;
pub mod rtnl;
pub mod source;
pub mod tracefs;
pub mod uevent;

pub use decode::{KernelEvent, ModuleEventKind, ModuleLifecycle};
pub use features::KernelFeatures;

/// The eBPF object built by `build.rs`, or `None` when it was skipped (`HOTPLUG_SKIP_EBPF=1`).
pub fn embedded_object() -> Option<&'static [u8]> {
    #[cfg(hotplug_ebpf_object)]
    {
        static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hotplug.bpf.o"));
        Some(OBJECT)
    }
    #[cfg(not(hotplug_ebpf_object))]
    {
        None
    }
}
