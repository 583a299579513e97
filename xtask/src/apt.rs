//! apt with a private state (its own lists and cache under the harness's cache directory),
//! reading the host's Debian mirrors and keyring and never changing the host's apt: how the guest
//! kernels and the foreign-architecture guest userland are fetched.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{arch::Arch, cmd};

/// apt with its own lists and cache, reading the host's Debian mirrors and keyring, for one
/// architecture's packages.
pub struct PrivateApt {
    options: Vec<String>,
    arch: Arch,
}

impl PrivateApt {
    /// Lists under `dir` for `archive_suites` (e.g. `trixie`) and, if the host names a security
    /// mirror, `security_suites` (e.g. `trixie-security`).
    pub fn new(dir: &Path, arch: Arch, archive_suites: &[&str], security_suites: &[&str]) -> Result<Self> {
        let mirrors = HostMirrors::read()?;
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let mut sources = String::new();
        for s in archive_suites {
            sources.push_str(&format!("deb [signed-by={}] {} {s} main\n", mirrors.keyring, mirrors.archive));
        }
        if let Some(security) = &mirrors.security {
            for s in security_suites {
                sources.push_str(&format!("deb [signed-by={}] {security} {s} main\n", mirrors.keyring));
            }
        }
        let list = dir.join("sources.list");
        fs::write(&list, sources)?;
        let options = vec![
            format!("Dir::Etc::sourcelist={}", list.display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            // Only this architecture's packages, whatever the host's dpkg knows.
            format!("APT::Architecture={}", arch.name()),
            format!("APT::Architectures={}", arch.name()),
            // The host's dpkg status is not this package set's.
            format!("Dir::State::status={}", dir.join("status").display()),
            "APT::Get::List-Cleanup=0".to_owned(),
            // The cache is root's own directory; apt's _apt sandbox user cannot write there.
            "APT::Sandbox::User=root".to_owned(),
        ];
        if !dir.join("status").exists() {
            fs::write(dir.join("status"), "")?;
        }
        Ok(Self { options, arch })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command
    }

    /// Updates the private lists.
    pub fn update(&self) -> Result<()> {
        cmd::output(self.command("apt-get").args(["update", "-qq"]))
            .context("apt-get update (the harness's private package lists) failed")?;
        Ok(())
    }

    /// Updates the private lists and names the kernel release `linux-image-<arch>` depends on.
    pub fn resolve_release(&self) -> Result<String> {
        self.update()?;
        let meta = format!("linux-image-{}", self.arch.name());
        let deps = self.depends(&meta)?;
        deps.iter()
            .find_map(|dep| {
                dep.strip_prefix("linux-image-").filter(|r| *r != self.arch.name()).map(str::to_owned)
            })
            .with_context(|| format!("{meta} depends on no linux-image-<release> package"))
    }

    pub fn depends(&self, package: &str) -> Result<Vec<String>> {
        let text = cmd::output(self.command("apt-cache").args(["depends", package]))?;
        Ok(text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .map(|dep| dep.trim_matches(|c| c == '<' || c == '>').to_owned())
            .collect())
    }

    /// `packages` and every package they depend on (recursively; no recommends), by name.
    pub fn closure(&self, packages: &[&str]) -> Result<Vec<String>> {
        let text = cmd::output(
            self.command("apt-cache")
                .args(["depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts"])
                .args(["--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends"])
                .args(packages),
        )?;
        let mut names: Vec<String> = text
            .lines()
            .filter(|line| !line.starts_with(' ') && !line.starts_with('<'))
            .map(|line| line.trim().split(':').next().unwrap_or_default().to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub fn download(&self, packages: &[String], into: &Path) -> Result<()> {
        cmd::run(self.command("apt-get").current_dir(into).arg("download").args(packages))
    }
}

/// The Debian archive and security mirrors the host's apt already uses, and their keyring.
pub struct HostMirrors {
    pub archive: String,
    pub security: Option<String>,
    pub keyring: String,
}

impl HostMirrors {
    const DEFAULT_KEYRING: &'static str = "/usr/share/keyrings/debian-archive-keyring.gpg";

    pub fn read() -> Result<Self> {
        let mut entries = Vec::new();
        let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
            files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
        }
        for file in files {
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            match file.extension().and_then(|e| e.to_str()) {
                Some("sources") => entries.extend(parse_deb822(&text)),
                Some("list") | None => entries.extend(parse_one_line(&text)),
                _ => {}
            }
        }
        let is_debian = |e: &&SourceEntry| e.suites.iter().any(|s| is_debian_suite(s));
        let archive = std::env::var("HOTPLUG_DEBIAN_MIRROR").ok().or_else(|| {
            entries
                .iter()
                .filter(is_debian)
                .find(|e| e.suites.iter().any(|s| !s.contains('-')))
                .map(|e| e.uri.clone())
        });
        let security = std::env::var("HOTPLUG_DEBIAN_SECURITY_MIRROR").ok().or_else(|| {
            entries
                .iter()
                .filter(is_debian)
                .find(|e| e.suites.iter().any(|s| s.ends_with("-security")))
                .map(|e| e.uri.clone())
        });
        let keyring = entries
            .iter()
            .filter(is_debian)
            .find_map(|e| e.signed_by.clone())
            .filter(|k| Path::new(k).exists())
            .unwrap_or_else(|| Self::DEFAULT_KEYRING.to_owned());
        let Some(archive) = archive else {
            bail!(
                "no Debian archive in this host's apt sources, so no guest kernel can be fetched: \
                 set HOTPLUG_DEBIAN_MIRROR to a Debian mirror's URL"
            );
        };
        Ok(Self { archive, security, keyring })
    }
}

fn is_debian_suite(suite: &str) -> bool {
    let base = suite.split('-').next().unwrap_or(suite);
    [
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "stable",
        "testing",
        "unstable",
        "oldstable",
    ]
    .contains(&base)
}

struct SourceEntry {
    uri: String,
    suites: Vec<String>,
    signed_by: Option<String>,
}

fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field =
                |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()));
            if field("Types:").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb")) {
                return None;
            }
            if field("Enabled:").is_some_and(|v| v == "no") {
                return None;
            }
            Some(SourceEntry {
                uri: field("URIs:")?.split_whitespace().next()?.to_owned(),
                suites: field("Suites:")?.split_whitespace().map(str::to_owned).collect(),
                signed_by: field("Signed-By:"),
            })
        })
        .collect()
}

fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("deb ")?;
            let (options, rest) = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']')?,
                None => ("", rest),
            };
            let mut words = rest.split_whitespace();
            let signed_by =
                options.split_whitespace().find_map(|o| o.strip_prefix("signed-by=").map(str::to_owned));
            Some(SourceEntry {
                uri: words.next()?.to_owned(),
                suites: vec![words.next()?.to_owned()],
                signed_by,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_apt_source_formats() {
        let deb822 = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let entries = parse_deb822(deb822);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].uri, "http://mirror.invalid/debian");
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(entries[1].suites, ["bookworm-security"]);

        let one_line = "# comment\ndeb [arch=amd64 signed-by=/x.gpg] http://mirror.invalid/debian trixie main\ndeb-src http://mirror.invalid/debian trixie main\n";
        let entries = parse_one_line(one_line);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].suites, ["trixie"]);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/x.gpg"));
        assert!(is_debian_suite("trixie-security"));
        assert!(!is_debian_suite("nodistro"));
    }
}
