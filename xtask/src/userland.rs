//! The busybox guest's userland: busybox, iproute2's `ip`, and the shared libraries they and the
//! project's binaries load. For amd64 they are this machine's own files (`ldd` names the
//! libraries); for arm64 they come from Debian trixie's arm64 packages, fetched with a private apt
//! and unpacked into the cache (nothing is installed here), and the libraries are found by
//! following each ELF file's `DT_NEEDED` entries (`readelf`, which reads any architecture).
//!
//! Cache layout for a foreign architecture, under `cmd::cache_dir()/userland/<arch>/`:
//! `apt/` (private lists), `root/` (the unpacked packages), `.ready` (the package list).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{apt::PrivateApt, arch::Arch, cmd};

/// What the foreign userland is made of (and their dependencies).
const PACKAGES: &[&str] = &["busybox-static", "iproute2", "libc6", "libgcc-s1"];

/// Where a foreign-architecture glibc keeps its libraries, relative to a root; the guest gets
/// them under `/lib/<multiarch>/` and the loader where `PT_INTERP` names it, where glibc's own
/// search looks.
fn library_dirs(arch: Arch) -> [String; 4] {
    let triple = arch.multiarch();
    [format!("usr/lib/{triple}"), format!("lib/{triple}"), "usr/lib".to_owned(), "lib".to_owned()]
}

pub enum Userland {
    /// This machine's own files.
    Host,
    /// Unpacked packages of another architecture.
    Foreign { root: PathBuf, arch: Arch },
}

pub fn ensure(arch: Arch) -> Result<Userland> {
    if arch == Arch::Amd64 {
        return Ok(Userland::Host);
    }
    let dir = cmd::cache_dir().join("userland").join(arch.name());
    let root = dir.join("root");
    let ready = dir.join(".ready");
    let wanted = PACKAGES.join(" ");
    if fs::read_to_string(&ready).is_ok_and(|r| r.trim() == wanted) && root.is_dir() {
        return Ok(Userland::Foreign { root, arch });
    }
    let apt = PrivateApt::new(&dir.join("apt"), arch, &["trixie"], &["trixie-security"])?;
    apt.update()?;
    let closure = apt.closure(PACKAGES)?;
    eprintln!(
        "setup: fetching the {} guest userland from Debian trixie ({} packages: {}; unpacked into {}, nothing installed)",
        arch.name(),
        closure.len(),
        PACKAGES.join(", "),
        root.display()
    );
    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    let debs = work.join("debs");
    let unpacked = work.join("root");
    fs::create_dir_all(&debs)?;
    fs::create_dir_all(&unpacked)?;
    apt.download(&closure, &debs)?;
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let _ = fs::remove_dir_all(&root);
    fs::rename(&unpacked, &root)?;
    fs::remove_dir_all(&work)?;
    fs::write(&ready, wanted)?;
    Ok(Userland::Foreign { root, arch })
}

impl Userland {
    /// The static busybox.
    pub fn busybox(&self) -> Result<PathBuf> {
        match self {
            Self::Host => cmd::which("busybox")
                .context("busybox is missing (cargo xtask setup installs busybox-static)"),
            Self::Foreign { root, .. } => find_in(root, &["usr/bin/busybox", "bin/busybox"]),
        }
    }

    /// iproute2's `ip`.
    pub fn ip(&self) -> Result<PathBuf> {
        match self {
            Self::Host => {
                cmd::which("ip").context("iproute2's ip is missing (cargo xtask setup installs iproute2)")
            }
            Self::Foreign { root, .. } => find_in(root, &["usr/bin/ip", "bin/ip", "usr/sbin/ip", "sbin/ip"]),
        }
    }

    /// The shared libraries `binary` loads, as (path in the guest, file here).
    pub fn libraries(&self, binary: &Path) -> Result<Vec<(String, PathBuf)>> {
        match self {
            Self::Host => host_libraries(binary),
            Self::Foreign { root, arch } => foreign_libraries(root, *arch, binary),
        }
    }
}

fn find_in(root: &Path, candidates: &[&str]) -> Result<PathBuf> {
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.exists())
        .with_context(|| format!("none of {candidates:?} in {}", root.display()))
}

/// What `ldd` names, at the same paths.
fn host_libraries(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let ldd = Command::new("ldd").arg(binary).output()?;
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|w| w.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            libraries.push((lib.to_owned(), PathBuf::from(lib)));
        }
    }
    Ok(libraries)
}

/// `binary`'s program interpreter and its `DT_NEEDED` libraries, transitively, from `root`.
fn foreign_libraries(root: &Path, arch: Arch, binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    let (interpreter, mut queue) = elf_needs(binary)?;
    if let Some(interpreter) = interpreter {
        let name = interpreter.rsplit('/').next().unwrap_or(&interpreter).to_owned();
        let file = find_library(root, arch, &name)?;
        found.push((interpreter, file));
    }
    let mut seen = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let file = find_library(root, arch, &name)?;
        queue.extend(elf_needs(&file)?.1);
        found.push((format!("/lib/{}/{name}", arch.multiarch()), file));
    }
    Ok(found)
}

fn find_library(root: &Path, arch: Arch, name: &str) -> Result<PathBuf> {
    library_dirs(arch)
        .iter()
        .map(|dir| root.join(dir).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("no {name} in the guest userland under {}", root.display()))
}

/// An ELF file's program interpreter (`PT_INTERP`) and `DT_NEEDED` names, from `readelf`.
fn elf_needs(file: &Path) -> Result<(Option<String>, Vec<String>)> {
    let out =
        cmd::output(Command::new("readelf").args(["--program-headers", "--dynamic", "--wide"]).arg(file))
            .with_context(|| format!("readelf cannot read {}", file.display()))?;
    Ok(parse_readelf(&out))
}

fn parse_readelf(text: &str) -> (Option<String>, Vec<String>) {
    let interpreter = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("[Requesting program interpreter: ")
            .map(|rest| rest.trim_end_matches(']').to_owned())
    });
    let needed = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.rsplit_once('[').map(|(_, rest)| rest.trim_end_matches(']').to_owned()))
        .collect();
    (interpreter, needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_interpreter_and_needed_libraries() {
        let text = "  INTERP         0x000238 0x0000000000000238\n      [Requesting program interpreter: /lib/ld-linux-aarch64.so.1]\n\
                    Dynamic section at offset 0x1 contains 30 entries:\n\
                    \x20 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]\n\
                    \x20 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n\
                    \x20 0x000000000000000e (SONAME)             Library soname: [libfoo.so.1]\n";
        let (interpreter, needed) = parse_readelf(text);
        assert_eq!(interpreter.as_deref(), Some("/lib/ld-linux-aarch64.so.1"));
        assert_eq!(needed, ["libgcc_s.so.1", "libc.so.6"]);
        assert_eq!(parse_readelf("static binary\n"), (None, vec![]));
    }
}
