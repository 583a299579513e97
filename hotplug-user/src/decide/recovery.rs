//! An agent that starts and finds a guided reload's marker: what to do about the module an
//! earlier agent was unloading or loading when it stopped. Pure: the agent reads the facts (the
//! boot id, `/sys/module/NAME/initstate`, whether the module command it named still runs, which
//! NICs are back) and carries the answer out (`agent/nics/reload.rs`).
//!
//! The marker says which driver, in which boot, which NICs the reload expects back, and which
//! module command was running (its transient unit, or its pid and start time). The order of the
//! checks is the point: a `modprobe -r` an earlier agent started may still be running (a driver's
//! remove can take seconds, and neither a transient unit nor an orphaned child dies with the
//! agent), and while it runs the module reads `live` (the unload has not begun) or `going`;
//! deciding on that reading would leave the module unloaded for good once the command ends.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a module command (or a module `coming`/`going`) is waited for: longer than the
/// agent's own deadline for one (`reconfigure::module::MODPROBE_TIMEOUT`, 60 s).
pub const COMMAND_WAIT: Duration = Duration::from_secs(75);
/// How long the reload's NICs are waited for once the module is loaded again.
pub const RETURN_WAIT: Duration = Duration::from_secs(60);

/// The module command an agent was running when it last wrote the marker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCommand {
    /// `modprobe -r DRIVER` or `modprobe DRIVER ...`.
    pub command: String,
    /// The transient unit it runs in (the packaged service's way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Its pid and start time (clock ticks since boot, /proc/PID/stat's 22nd field), when the
    /// agent ran it as its child: a pid alone could have been reused since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

/// The reload marker (`STATE_DIR/reload-in-progress`), JSON. Release 0.1's marker was the
/// driver's name alone: it still reads, with nothing else known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub driver: String,
    /// `/proc/sys/kernel/random/boot_id` when it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The MACs of the NICs the reload takes down and expects back.
    #[serde(default)]
    pub nics: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<RunningCommand>,
}

impl Marker {
    /// Reads a marker's text: JSON, or a bare module name (release 0.1). The driver's name is
    /// checked as a request's would be.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let marker = if text.starts_with('{') {
            serde_json::from_str::<Self>(text).map_err(|e| format!("not a reload marker: {e}"))?
        } else {
            Self { driver: text.to_owned(), ..Self::default() }
        };
        super::reload::validate(&marker.driver, &[], false)?;
        Ok(marker)
    }
}

/// The module as `/sys/module/NAME` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    Live,
    Coming,
    Going,
    /// No `/sys/module/NAME`.
    Unloaded,
    /// `/sys/module/NAME` without `initstate`.
    Builtin,
}

impl ModuleState {
    /// From `initstate`'s text (`None`: no such file), and whether `/sys/module/NAME` exists.
    pub fn read(dir_exists: bool, initstate: Option<&str>) -> Self {
        match (dir_exists, initstate.map(str::trim)) {
            (false, _) => Self::Unloaded,
            (true, None) => Self::Builtin,
            (true, Some("coming")) => Self::Coming,
            (true, Some("going")) => Self::Going,
            (true, Some(_)) => Self::Live,
        }
    }
}

/// What the agent sees now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub boot_id: Option<String>,
    pub module: ModuleState,
    /// The command the marker names is still running (its unit active, its pid that process).
    pub command_running: bool,
    /// This agent already ran `modprobe -b DRIVER` for it.
    pub loaded_once: bool,
    /// The marker's NICs that are registered now.
    pub nics_back: usize,
    /// Since this agent started looking.
    pub waited: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: the marker goes (why, for the log).
    Forget(String),
    /// Look again shortly.
    Wait(String),
    /// `modprobe -b DRIVER`: the module as the host configures it (its blacklist honoured).
    Load,
    /// Done: the module is loaded and its NICs are back (or the wait for them ended); the marker
    /// goes.
    Done(String),
    /// Cannot finish by itself: the operator must (the marker stays for the next agent).
    GiveUp(String),
}

/// The next step of a recovery.
pub fn next(marker: &Marker, facts: &Facts) -> Recovery {
    let driver = &marker.driver;
    if let (Some(then), Some(now)) = (&marker.boot_id, &facts.boot_id) {
        if then != now {
            return Recovery::Forget(format!(
                "the marker is from an earlier boot: {driver} is as this boot left it"
            ));
        }
    }
    let busy = match (facts.command_running, facts.module) {
        (true, _) => Some(format!(
            "the earlier agent's `{}` still runs",
            marker.running.as_ref().map_or("modprobe", |r| r.command.as_str())
        )),
        (false, ModuleState::Going) => Some(format!("{driver} is still being unloaded")),
        (false, ModuleState::Coming) => Some(format!("{driver} is still being loaded")),
        _ => None,
    };
    if let Some(why) = busy {
        return if facts.waited > COMMAND_WAIT {
            Recovery::GiveUp(format!("{why} after {} s", facts.waited.as_secs()))
        } else {
            Recovery::Wait(why)
        };
    }
    // Only once nothing runs: `/sys/module/NAME` without `initstate` is also what a module being
    // loaded or unloaded shows for a moment (the agent reads it twice before it says built-in).
    if facts.module == ModuleState::Builtin {
        return Recovery::Forget(format!("{driver} is built into this kernel"));
    }
    match facts.module {
        ModuleState::Unloaded if facts.loaded_once => Recovery::GiveUp(format!(
            "`modprobe -b {driver}` left it unloaded (blacklisted, or its install command failed): load it by hand"
        )),
        ModuleState::Unloaded => Recovery::Load,
        _ if facts.nics_back >= marker.nics.len() => {
            Recovery::Done(format!("{driver} is loaded and its NICs are back"))
        }
        _ if facts.waited > RETURN_WAIT + if facts.loaded_once { COMMAND_WAIT } else { Duration::ZERO } => {
            Recovery::Done(format!(
                "{driver} is loaded; {} of its {} NICs came back",
                facts.nics_back,
                marker.nics.len()
            ))
        }
        _ => Recovery::Wait(format!("{driver} is loaded: waiting for its NICs")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> Marker {
        Marker {
            driver: "e1000e".to_owned(),
            boot_id: Some("b1".to_owned()),
            nics: vec!["52:54:00:12:34:11".to_owned()],
            running: Some(RunningCommand {
                command: "modprobe -r e1000e".to_owned(),
                unit: Some("hotplug-modprobe-e1000e.service".to_owned()),
                ..RunningCommand::default()
            }),
        }
    }

    fn facts(module: ModuleState) -> Facts {
        Facts {
            boot_id: Some("b1".to_owned()),
            module,
            command_running: false,
            loaded_once: false,
            nics_back: 0,
            waited: Duration::ZERO,
        }
    }

    #[test]
    fn a_running_unload_is_waited_for_even_while_the_module_reads_live() {
        // The bug this replaces: `live` during a slow `modprobe -r` read as "loaded, nothing to
        // do", the marker went, the unload finished, and nothing loaded the module again.
        let f = Facts { command_running: true, ..facts(ModuleState::Live) };
        assert!(matches!(next(&marker(), &f), Recovery::Wait(why) if why.contains("modprobe -r e1000e")));
        let f = facts(ModuleState::Going);
        assert!(matches!(next(&marker(), &f), Recovery::Wait(why) if why.contains("being unloaded")));
        // Then the command ended with the module gone: load it.
        assert_eq!(next(&marker(), &facts(ModuleState::Unloaded)), Recovery::Load);
    }

    #[test]
    fn a_command_that_never_ends_is_given_up_on_with_the_marker_kept() {
        let f = Facts { waited: COMMAND_WAIT + Duration::from_secs(1), ..facts(ModuleState::Going) };
        assert!(matches!(next(&marker(), &f), Recovery::GiveUp(why) if why.contains("still being unloaded")));
    }

    #[test]
    fn the_marker_stays_until_the_nics_are_back() {
        let f = Facts { loaded_once: true, ..facts(ModuleState::Live) };
        assert!(matches!(next(&marker(), &f), Recovery::Wait(_)));
        let f = Facts { nics_back: 1, ..f };
        assert!(matches!(next(&marker(), &f), Recovery::Done(_)));
        // A NIC that never returns does not keep the marker forever.
        let f = Facts { nics_back: 0, waited: RETURN_WAIT + COMMAND_WAIT + Duration::from_secs(1), ..f };
        assert!(matches!(next(&marker(), &f), Recovery::Done(why) if why.contains("0 of its 1")));
    }

    #[test]
    fn a_marker_from_an_earlier_boot_or_a_builtin_driver_is_forgotten() {
        let f = Facts { boot_id: Some("b2".to_owned()), ..facts(ModuleState::Unloaded) };
        assert!(matches!(next(&marker(), &f), Recovery::Forget(why) if why.contains("earlier boot")));
        assert!(matches!(next(&marker(), &facts(ModuleState::Builtin)), Recovery::Forget(_)));
    }

    #[test]
    fn a_module_read_as_builtin_mid_command_is_waited_for() {
        let f = Facts { command_running: true, ..facts(ModuleState::Builtin) };
        assert!(matches!(next(&marker(), &f), Recovery::Wait(_)));
    }

    #[test]
    fn a_blacklisted_module_is_not_loaded_twice() {
        let f = Facts { loaded_once: true, ..facts(ModuleState::Unloaded) };
        assert!(matches!(next(&marker(), &f), Recovery::GiveUp(why) if why.contains("modprobe -b e1000e")));
    }

    #[test]
    fn markers_of_both_formats_read_and_bad_ones_do_not() {
        let old = Marker::parse("e1000e\n");
        assert_eq!(old, Ok(Marker { driver: "e1000e".to_owned(), ..Marker::default() }));
        // Nothing known of an old marker's boot: it is taken as this one's.
        let Ok(old) = old else { return };
        assert_eq!(next(&old, &facts(ModuleState::Unloaded)), Recovery::Load);
        let json = serde_json::to_string(&marker()).unwrap_or_default();
        assert_eq!(Marker::parse(&json), Ok(marker()));
        assert!(Marker::parse("-r ena").is_err());
        assert!(Marker::parse(r#"{"driver":"../x"}"#).is_err());
        assert!(Marker::parse("{").is_err());
    }

    #[test]
    fn module_states_read_from_sysfs() {
        assert_eq!(ModuleState::read(false, None), ModuleState::Unloaded);
        assert_eq!(ModuleState::read(true, None), ModuleState::Builtin);
        assert_eq!(ModuleState::read(true, Some("going\n")), ModuleState::Going);
        assert_eq!(ModuleState::read(true, Some("coming\n")), ModuleState::Coming);
        assert_eq!(ModuleState::read(true, Some("live\n")), ModuleState::Live);
    }
}
