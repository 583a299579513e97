//! The configuration file: any text is a configuration or an error naming the problem.
#![no_main]
use std::path::Path;

use hotplug::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, Path::new("/etc/hotplug/hotplug.toml")) {
        Ok(config) => {
            let _ = config.policy_for("52:54:00:12:34:11", "eth1");
            assert!(config.return_timeout().as_secs() >= 1);
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
