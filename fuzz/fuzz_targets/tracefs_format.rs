//! tracefs `format` files, from which tracepoint field offsets are read.
#![no_main]
use hotplug::kernel::tracefs::parse_format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for field in parse_format(&text) {
        let _ = field;
    }
});
