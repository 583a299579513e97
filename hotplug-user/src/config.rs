//! The agent's configuration: a TOML file (`--config`), sensible defaults without one. Every error
//! names the bad key and value; a broken file stops the agent before it touches anything.
//!
//! ```toml
//! state_dir = "/var/lib/hotplug"          # snapshots and per-NIC state
//! socket = "/run/hotplug/agent.sock"      # root-only status socket
//! return_timeout_seconds = 60             # how long a NIC whose driver left may take to come back
//! hook_timeout_seconds = 30               # a `command` hook's process group is killed after it
//! manager_wait_seconds = 30               # how long a restore waits for networkd & co. first
//! attach_layout = "amazon-linux"          # amazon-linux | device-number: tables of attached ENIs
//! metrics_listen = "127.0.0.1:9464"       # OpenMetrics: loopback or unix:/run/hotplug/…; off if unset
//!
//! [interfaces.default]
//! policy = "restore"                      # restore | ignore | command
//! manager = "auto"                        # auto | none: wait for networkd & co., or not
//!
//! [interfaces."52:54:00:12:34:11"]        # by permanent MAC, or by interface name
//! policy = "command"
//! command = ["/usr/local/sbin/nic-hook", "--quiet"]   # run with HOTPLUG_* variables, no shell
//!
//! [imds]                                  # asked only when a NIC is really attached
//! enabled = true
//! require_ec2 = true                      # only where the firmware says EC2
//! endpoint = "http://169.254.169.254"     # link-local or loopback unless allow_any_endpoint
//! token_ttl_seconds = 21600
//! request_timeout_ms = 2000
//! requests_per_second = 20
//! attach_deadline_seconds = 120
//! ```
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    decide::attach_plan::Layout,
    imds::{ImdsClient, ImdsConfig},
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}` = {value}: {problem}")]
    Invalid { path: PathBuf, key: String, value: String, problem: String },
}

/// What the agent does with a NIC whose driver left and came back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Put its configuration back (the default).
    #[default]
    Restore,
    /// Leave it alone: another network manager owns it.
    Ignore,
    /// Run `command` with the NIC's facts in `HOTPLUG_*` environment variables.
    Command,
}

/// `[interfaces.X] manager`: whether the agent looks for another manager of the NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManagerMode {
    /// Detect it (networkd's link state, amazon-ec2-net-utils' files, NetworkManager's devices):
    /// a returning NIC is restored once its manager has configured it, its leases left to it.
    #[default]
    Auto,
    /// Behave as if nothing else configured the NIC: restore everything at once.
    None,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub policy: PolicyKind,
    #[serde(default)]
    pub manager: ManagerMode,
    /// Program and arguments, for `policy = "command"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_return_timeout")]
    pub return_timeout_seconds: u64,
    /// How long a `command` policy's hook may run before its process group is killed.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_seconds: u64,
    /// How long a restore waits for the NIC's manager (networkd, amazon-ec2-net-utils, ifupdown) to configure
    /// a returning NIC before it goes ahead; routes and rules that could not go back then are
    /// replayed once the manager is done.
    #[serde(default = "default_manager_wait")]
    pub manager_wait_seconds: u64,
    /// How attached ENIs' tables, rules and metrics are numbered.
    #[serde(default)]
    pub attach_layout: Layout,
    /// Policies by interface name or MAC; `default` applies to the rest.
    #[serde(default)]
    pub interfaces: BTreeMap<String, Policy>,
    /// The instance metadata service, asked only for real attaches.
    #[serde(default)]
    pub imds: ImdsConfig,
    /// Where to serve OpenMetrics (`127.0.0.1:9464`, `unix:/run/hotplug/metrics.sock`); off
    /// without it. Read at start only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hotplug")
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/hotplug/agent.sock")
}

const fn default_return_timeout() -> u64 {
    60
}

const fn default_hook_timeout() -> u64 {
    30
}

const fn default_manager_wait() -> u64 {
    30
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            socket: default_socket(),
            return_timeout_seconds: default_return_timeout(),
            hook_timeout_seconds: default_hook_timeout(),
            manager_wait_seconds: default_manager_wait(),
            attach_layout: Layout::default(),
            interfaces: BTreeMap::new(),
            imds: ImdsConfig::default(),
            metrics_listen: None,
        }
    }
}

impl Config {
    /// Loads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_owned(),
            value,
            problem: problem.to_owned(),
        };
        for (key, dir) in [("state_dir", &self.state_dir), ("socket", &self.socket)] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{:?}", dir.display().to_string()),
                    "must be an absolute path",
                ));
            }
        }
        if self.return_timeout_seconds == 0 || self.return_timeout_seconds > 86_400 {
            return Err(invalid(
                "return_timeout_seconds",
                self.return_timeout_seconds.to_string(),
                "must be between 1 and 86400",
            ));
        }
        if self.hook_timeout_seconds == 0 || self.hook_timeout_seconds > 3600 {
            return Err(invalid(
                "hook_timeout_seconds",
                self.hook_timeout_seconds.to_string(),
                "must be between 1 and 3600",
            ));
        }
        if self.manager_wait_seconds == 0 || self.manager_wait_seconds > 600 {
            return Err(invalid(
                "manager_wait_seconds",
                self.manager_wait_seconds.to_string(),
                "must be between 1 and 600",
            ));
        }
        if self.imds.enabled {
            if let Err(error) = ImdsClient::new(&self.imds) {
                return Err(invalid(
                    "imds.endpoint",
                    format!("{:?}", self.imds.endpoint),
                    &error.to_string(),
                ));
            }
        }
        if !(1..=21_600).contains(&self.imds.token_ttl_seconds) {
            return Err(invalid(
                "imds.token_ttl_seconds",
                self.imds.token_ttl_seconds.to_string(),
                "must be between 1 and 21600",
            ));
        }
        if !(1..=500).contains(&self.imds.requests_per_second) {
            return Err(invalid(
                "imds.requests_per_second",
                self.imds.requests_per_second.to_string(),
                "must be between 1 and 500 (IMDS drops traffic above ~1024 packets/s per ENI)",
            ));
        }
        if let Some(listen) = &self.metrics_listen {
            match crate::metrics::serve::Listen::parse(listen) {
                Err(problem) => return Err(invalid("metrics_listen", format!("{listen:?}"), &problem)),
                Ok(crate::metrics::serve::Listen::Unix(path)) if path == self.socket => {
                    return Err(invalid(
                        "metrics_listen",
                        format!("{listen:?}"),
                        "is the control socket's path",
                    ));
                }
                Ok(_) => {}
            }
        }
        for (name, policy) in &self.interfaces {
            let key = format!("interfaces.\"{name}\"");
            let looks_like_mac = name.contains(':');
            if looks_like_mac && crate::imds::parse::mac("", name).is_err() {
                return Err(invalid(
                    &key,
                    format!("{name:?}"),
                    "is neither an interface name nor a MAC like 52:54:00:12:34:56",
                ));
            }
            if !looks_like_mac
                && (name.is_empty()
                    || name.len() > 15
                    || name.contains('/')
                    || name.contains(char::is_whitespace))
            {
                return Err(invalid(
                    &key,
                    format!("{name:?}"),
                    "is not a valid interface name (1-15 bytes, no '/' or spaces)",
                ));
            }
            match (policy.policy, policy.command.is_empty()) {
                (PolicyKind::Command, true) => {
                    return Err(invalid(
                        &format!("{key}.command"),
                        "[]".into(),
                        "policy \"command\" needs a program to run",
                    ));
                }
                (PolicyKind::Command, false) if !Path::new(&policy.command[0]).is_absolute() => {
                    return Err(invalid(
                        &format!("{key}.command"),
                        format!("{:?}", policy.command[0]),
                        "the program must be an absolute path (no PATH lookup for a root agent)",
                    ));
                }
                (PolicyKind::Restore | PolicyKind::Ignore, false) => {
                    return Err(invalid(
                        &format!("{key}.command"),
                        format!("{:?}", policy.command),
                        "only policy \"command\" runs a command",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn return_timeout(&self) -> Duration {
        Duration::from_secs(self.return_timeout_seconds)
    }

    pub fn hook_timeout(&self) -> Duration {
        Duration::from_secs(self.hook_timeout_seconds)
    }

    pub fn manager_wait(&self) -> Duration {
        Duration::from_secs(self.manager_wait_seconds)
    }

    /// The policy for a NIC: by MAC, then by name, then `default`, then restore.
    pub fn policy_for(&self, mac: &str, name: &str) -> Policy {
        // A virtual link's key is `mac@name`: match its MAC part.
        let mac = mac.split('@').next().unwrap_or(mac).to_ascii_lowercase();
        self.interfaces
            .iter()
            .find(|(k, _)| k.to_ascii_lowercase() == mac)
            .or_else(|| self.interfaces.iter().find(|(k, _)| k.as_str() == name))
            .or_else(|| self.interfaces.iter().find(|(k, _)| k.as_str() == "default"))
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/hotplug.toml"))
    }

    #[test]
    fn defaults_without_a_file_and_policies_by_mac_then_name() -> Result<(), ConfigError> {
        assert_eq!(Config::load(None)?, Config::default());
        let config = parse(
            r#"
            return_timeout_seconds = 30
            [interfaces.default]
            policy = "ignore"
            [interfaces."52:54:00:12:34:11"]
            policy = "restore"
            [interfaces.eth2]
            policy = "command"
            command = ["/usr/local/sbin/hook", "--quiet"]
            "#,
        )?;
        assert_eq!(config.return_timeout(), Duration::from_secs(30));
        assert_eq!(config.policy_for("52:54:00:12:34:11", "eth1").policy, PolicyKind::Restore);
        assert_eq!(config.policy_for("52:54:00:12:34:12", "eth2").policy, PolicyKind::Command);
        assert_eq!(config.policy_for("52:54:00:12:34:13", "eth3").policy, PolicyKind::Ignore);
        Ok(())
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases = [
            ("stat_dir = \"/x\"", "stat_dir"),
            ("return_timeout_seconds = 0", "return_timeout_seconds` = 0"),
            ("return_timeout_seconds = \"soon\"", "return_timeout_seconds"),
            ("hook_timeout_seconds = 0", "hook_timeout_seconds` = 0"),
            ("manager_wait_seconds = 601", "manager_wait_seconds` = 601"),
            ("state_dir = \"relative\"", "`state_dir` = \"relative\""),
            ("[interfaces.\"52:54:zz:12:34:11\"]\npolicy = \"ignore\"", "52:54:zz:12:34:11"),
            ("[interfaces.eth1]\npolicy = \"command\"", "interfaces.\"eth1\".command"),
            ("[interfaces.eth1]\npolicy = \"command\"\ncommand = [\"hook\"]", "absolute path"),
            ("[interfaces.eth1]\npolicy = \"reboot\"", "reboot"),
            ("[interfaces.eth1]\npolicy = \"ignore\"\ncommand = [\"/bin/true\"]", "only policy"),
            ("state_dir = ", "/etc/hotplug.toml"),
            ("[imds]\nendpoint = \"http://10.0.0.1\"", "imds.endpoint"),
            ("[imds]\nrequests_per_second = 2000", "imds.requests_per_second"),
            ("[imds]\nendpont = \"x\"", "endpont"),
        ];
        for (text, expected) in cases {
            match parse(text) {
                Ok(config) => panic!("{text:?} was accepted: {config:?}"),
                Err(error) => assert!(error.to_string().contains(expected), "{text:?}: {error}"),
            }
        }
    }

    /// The file the packages install and the hotplug.toml(5) page describe the configuration the
    /// code reads: the file (all commented out) gives the defaults, and both name every key.
    #[test]
    fn the_packaged_file_and_the_man_page_name_every_key() -> Result<(), Box<dyn std::error::Error>> {
        let packaged = include_str!("../packaging/hotplug.toml");
        let man = include_str!("../../docs/hotplug.toml.5");
        assert_eq!(parse(packaged)?, Config::default());
        let defaults: toml::Table = toml::from_str(&toml::to_string(&Config::default())?)?;
        let mut keys: Vec<String> = Vec::new();
        for (key, value) in &defaults {
            match value.as_table() {
                Some(table) => keys.extend(table.keys().cloned()),
                None => keys.push(key.clone()),
            }
        }
        keys.extend(["policy".to_owned(), "manager".to_owned(), "command".to_owned()]);
        for key in keys {
            assert!(packaged.contains(&format!("#{key} = ")), "{key} is not in packaging/hotplug.toml");
            assert!(man.contains(&format!(".BR {key} ")), "{key} is not in docs/hotplug.toml.5");
        }
        Ok(())
    }
}
