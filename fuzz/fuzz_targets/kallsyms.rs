//! /proc/kallsyms as the loader reads it to place its kprobes.
#![no_main]
use hotplug::kernel::kallsyms::Kallsyms;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let symbols = Kallsyms::parse(&text);
    let _ = symbols.has_function("register_netdevice");
    if let Some(found) = symbols.first_function(&["__x64_sys_delete_module", "__arm64_sys_delete_module"]) {
        assert!(symbols.has_function(found));
    }
});
