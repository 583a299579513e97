//! BTF blobs (the kernel's type information, read from /sys/kernel/btf/vmlinux) and the member
//! look-ups the loader does in them: any blob is parsed or refused, never a panic or a hang.
#![no_main]
use hotplug::kernel::{abi, btf::Btf};
use hotplug_common::globals;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else { return };
    let lookups = globals::STRUCT_OFFSETS
        .iter()
        .chain(&globals::NETNS_OFFSETS)
        .chain(&globals::PRIV_OFFSETS)
        .map(|(_, strukt, path)| (*strukt, *path))
        .chain([("module", "name"), ("a", "b.c.d"), ("", "")]);
    for (strukt, path) in lookups {
        let _ = btf.member(strukt, path);
    }
    // The register offsets of every architecture: `pt_regs` members through anonymous unions,
    // array elements.
    for convention in abi::CONVENTIONS {
        let _ = convention.offsets(&btf);
    }
});
