//! Ring-buffer records as the kernel side writes them (any bytes: a record of the wrong size,
//! kind or content must be an error, never a panic), and what reaches a log line from them.
#![no_main]
use hotplug::kernel::{decode, KernelEvent};
use libfuzzer_sys::fuzz_target;

fn printable(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

fuzz_target!(|data: &[u8]| {
    match decode::decode(data) {
        Ok(KernelEvent::Nic(nic)) => {
            assert!(printable(&nic.name), "{:?}", nic.name);
            assert!(nic.task.iter().all(|t| printable(&t.comm)));
            assert!(nic.module.iter().chain(&nic.context_module).chain(&nic.driver).all(|m| printable(m)));
        }
        Ok(KernelEvent::Module(module)) => {
            assert!(printable(&module.module) && printable(&module.task.comm));
        }
        Ok(_) | Err(_) => {}
    }
});
