//! A minimal `newc` cpio writer, enough for a guest initramfs: directories, regular files,
//! symlinks and device nodes, all owned by root.
use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{Context as _, Result};

#[derive(Default)]
pub struct Initramfs {
    data: Vec<u8>,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Initramfs {
    pub fn new() -> Self {
        Self { next_inode: 1, ..Self::default() }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        let name = name.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(body.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// Adds `path` and every missing parent directory.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, S_IFDIR | 0o755, (0, 0), &[]);
            }
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | mode, (0, 0), body);
    }

    /// Copies a host file (following symlinks) to `path` in the image, keeping its permissions.
    pub fn copy(&mut self, path: &str, host: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let body = fs::read(host).with_context(|| format!("cannot read {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(path, mode, &body);
        Ok(())
    }

    /// Copies a host directory tree below `path` in the image.
    pub fn copy_tree(&mut self, path: &str, host: &Path) -> Result<()> {
        self.dir(path);
        let mut entries: Vec<_> = fs::read_dir(host)
            .with_context(|| format!("cannot list {}", host.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let name = format!("{}/{}", path.trim_end_matches('/'), entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                self.copy_tree(&name, &entry.path())?;
            } else {
                self.copy(&name, &entry.path())?;
            }
        }
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while !self.data.len().is_multiple_of(512) {
            self.data.push(0);
        }
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_and_parents() {
        let mut image = Initramfs::new();
        image.file("/a/b/c.txt", 0o644, b"hello");
        image.symlink("/bin/sh", "busybox");
        let data = image.finish();
        assert_eq!(&data[..6], b"070701");
        assert_eq!(data.len() % 512, 0);
        let text = String::from_utf8_lossy(&data);
        // parents come before children, the trailer last
        let a = text.find("a\0").unwrap_or(usize::MAX);
        let ab = text.find("a/b\0").unwrap_or(usize::MAX);
        let file = text.find("a/b/c.txt\0").unwrap_or(usize::MAX);
        let trailer = text.find("TRAILER!!!").unwrap_or(usize::MAX);
        assert!(a < ab && ab < file && file < trailer, "{a} {ab} {file} {trailer}");
        assert!(text.contains("hello"));
        // the file's size field (7th field, after the magic) says 5 bytes
        let header = &text[file - 110..file];
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "00000005");
    }
}
