//! hotplug's scenarios and host integration tests.
//!
//! - `scenarios/*.sh`: guest scenarios, run in QEMU by `cargo xtask vm --scenario NAME` and by
//!   `cargo xtask test` on every kernel their `# kernels:` line names.
//! - `guest/vmctl`: the guest side of the harness's control channel.
//! - `tests/*.rs`: host integration tests (`cargo test`), some needing root, which they check for
//!   and report loudly when skipped.
