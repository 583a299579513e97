//! Persistence of per-NIC state in the state directory: one JSON file per NIC, written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a restarted agent — even one killed
//! with SIGKILL while a driver was unloaded — still knows what to restore.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not valid JSON ({source}); it was left in place and ignored")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

pub struct Store {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

impl Store {
    /// Opens the state directory, creating it with mode 0700 if missing. An existing directory's
    /// mode is left as it is (it may be shared), but one that others may write to is refused.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let mode = fs::metadata(dir).map_err(io(dir))?.permissions().mode();
        if mode & 0o022 != 0 {
            let source = std::io::Error::other(format!(
                "mode {mode:o} lets other users write there; choose a root-only state_dir (e.g. /var/lib/hotplug)"
            ));
            return Err(StoreError::Io { path: dir.to_path_buf(), source });
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self, key: &str) -> PathBuf {
        let file: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        self.dir.join(format!("nic-{file}.json"))
    }

    pub fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?
        };
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Every stored value; unreadable files are reported and skipped, never deleted.
    pub fn load_all<T: DeserializeOwned>(&self) -> Result<(Vec<T>, Vec<StoreError>), StoreError> {
        let mut values = Vec::new();
        let mut problems = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let is_state = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nic-") && n.ends_with(".json"));
            if !is_state {
                continue;
            }
            match fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(value) => values.push(value),
                    Err(source) => problems.push(StoreError::Corrupt { path, source }),
                },
                Err(source) => problems.push(StoreError::Io { path, source }),
            }
        }
        Ok((values, problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_loads_and_reports_corrupt_files() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("hotplug-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir)?;
        store.save("52:54:00:12:34:11", &vec![1, 2, 3])?;
        store.save("52:54:00:12:34:12", &vec![4])?;
        fs::write(dir.join("nic-broken.json"), b"{not json")?;
        let (mut values, problems): (Vec<Vec<i32>>, _) = store.load_all()?;
        values.sort();
        assert_eq!(values, vec![vec![1, 2, 3], vec![4]]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("nic-broken.json"));
        assert!(dir.join("nic-broken.json").exists(), "a corrupt file is kept for the operator");
        store.remove("52:54:00:12:34:12")?;
        store.remove("52:54:00:12:34:12")?;
        let (values, _): (Vec<Vec<i32>>, _) = store.load_all()?;
        assert_eq!(values.len(), 1);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
