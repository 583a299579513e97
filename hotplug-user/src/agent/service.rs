//! The service manager's side of the agent: systemd's notify protocol. `READY=1` once the kernel
//! side is attached (or degraded mode announced) and every NIC has a snapshot, `STATUS=` naming the
//! mode, `RELOADING=1` around a configuration reload, `STOPPING=1`, and `WATCHDOG=1` sent from the
//! agent's event loop itself, so that a loop that stops turning is restarted.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.
use std::time::Duration;

use sd_notify::NotifyState;

pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment. (Children
    /// never inherit them: hooks run with a cleared environment, and the unit's
    /// `NotifyAccess=main` ignores any other process anyway.)
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Self { enabled, watchdog: sd_notify::watchdog_enabled() }
    }

    /// How often to ping: half the watchdog timeout, as systemd recommends.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2).filter(|p| !p.is_zero())
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(states) {
            tracing::warn!(%error, "cannot notify the service manager");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Announces a configuration reload (`MONOTONIC_USEC` is what `Type=notify-reload` wants).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}
