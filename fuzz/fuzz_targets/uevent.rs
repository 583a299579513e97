//! Kernel uevent datagrams (`NETLINK_KOBJECT_UEVENT`) as degraded mode reads them.
#![no_main]
use hotplug::kernel::uevent::Uevent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(event) = Uevent::parse(data) {
        let _ = (event.name(), event.subsystem(), event.var("ACTION"));
        assert!(!event.action.contains('@'));
    }
});
