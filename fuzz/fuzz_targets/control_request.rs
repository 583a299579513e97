//! The control socket's requests as the agent reads them (any local root process may write one;
//! the peer check comes after the parse), and what a reload or a gate question makes of them.
#![no_main]
use hotplug::{
    control::{parse_request, Request},
    decide::{gate, reload},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads at most 4096 bytes of one line.
    let Ok(line) = std::str::from_utf8(&data[..data.len().min(4096)]) else { return };
    let Ok(request) = parse_request(line) else { return };
    // What parses writes back to the same request.
    let again = serde_json::to_string(&request).ok().and_then(|text| parse_request(&text).ok());
    assert_eq!(again.as_ref(), Some(&request));
    match &request {
        Request::Reload { driver, params, dry_run } => {
            if let Ok(checked) = reload::validate(driver, params, *dry_run) {
                // Nothing modprobe could read as an option or as two arguments.
                for word in std::iter::once(&checked.driver).chain(&checked.params) {
                    assert!(!word.starts_with('-') && !word.is_empty(), "{word:?}");
                    assert!(!word.chars().any(|c| c.is_whitespace() || c.is_control()), "{word:?}");
                }
            }
        }
        Request::CloudInitGate { devpath, .. } => {
            // Matching a removal by DEVPATH never panics, whatever the path.
            let half = gate::RemoveHalf {
                at_ns: 1,
                name: devpath.rsplit('/').next().unwrap_or_default().to_owned(),
                bus: Some("0000:00:05.0".to_owned()),
                cause: hotplug::classify::Cause::DriverUnload,
                skip: true,
            };
            let _ = gate::match_remove(devpath, [("02:00:00:00:00:01", &half)].into_iter());
        }
        Request::Status | Request::Refresh { .. } => {}
    }
});
