//! The status socket: a root-only Unix socket on which the agent answers one JSON document per
//! connection, and the `hotplug-agent status` client.
use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
};

use thiserror::Error;
use tokio::{io::AsyncWriteExt as _, net::UnixListener};

use super::nics::NicStatus;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("status socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
    #[error(
        "no agent answers on {path} ({source}): is `hotplug-agent run` running, with the same --config?"
    )]
    NoAgent { path: String, source: std::io::Error },
    #[error("the agent's answer is not valid JSON: {0}")]
    Answer(#[from] serde_json::Error),
}

/// Binds the status socket: its directory mode 0700, the socket 0600, a stale one replaced.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Socket { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    // Replace a stale socket, but never another kind of file.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::other("exists and is not a socket; refusing to replace it")));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Answers one client with the status document.
pub async fn respond(mut stream: tokio::net::UnixStream, status: Vec<NicStatus>) {
    let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

/// `hotplug-agent status`: asks the running agent and prints its answer.
pub fn print_status(socket: &Path, json: bool) -> Result<(), ControlError> {
    let path = socket.display().to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|source| ControlError::NoAgent { path: path.clone(), source })?;
    let mut body = String::new();
    stream.read_to_string(&mut body).map_err(|source| ControlError::NoAgent { path, source })?;
    let status: Vec<NicStatus> = serde_json::from_str(&body)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{body}");
        return Ok(());
    }
    for nic in status {
        let state = serde_json::to_value(&nic.state).ok();
        let state_name = state.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("?").to_owned();
        let _ = writeln!(out, "{}  {}", nic.mac, state_name);
        if let Some(snapshot) = &nic.snapshot {
            let _ = writeln!(out, "    config: {snapshot}");
        }
        if let Some(event) = &nic.last_event {
            let _ = writeln!(out, "    last event: {event}");
        }
        if let Some(attach) = &nic.attach {
            let _ = writeln!(
                out,
                "    attach: {}, {} IMDS requests{}{}",
                attach.status,
                attach.imds_requests,
                attach.latency_ms.map(|l| format!(", {l} ms")).unwrap_or_default(),
                attach.table.map(|t| format!(", table {t}")).unwrap_or_default()
            );
        }
        if let Some(restore) = &nic.last_restore {
            let _ = writeln!(
                out,
                "    last restore: {} us, {} requests, {} errors, {} differences",
                restore.latency_us,
                restore.requests,
                restore.errors.len(),
                restore.differences.len()
            );
        }
    }
    Ok(())
}
