//! The control socket, the agent's side (the protocol and its clients: `crate::control`). Bound
//! root-only; every connection is read and answered by a task of its own, so a client that stalls
//! stalls nothing else, while the answer is computed by the agent's loop, which owns the state.
use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    control::{Request, MAX_REQUEST_BYTES},
    peer::Needs,
};

/// What a request needs of its caller beyond reaching the socket: `reload` runs modprobe for it,
/// `refresh` and the cloud-init gate make IMDS requests and spend the gate's credits.
pub fn needs(request: &Request) -> Needs {
    match request {
        Request::Status => Needs::Nothing,
        Request::CloudInitGate { .. } | Request::Refresh { .. } => Needs::NetAdmin,
        Request::Reload { .. } => Needs::SysModule,
    }
}

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to read the answer (one that never reads does not keep a task and
/// a file descriptor for ever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
#[error("control socket {path}: {source}")]
pub struct SocketError {
    path: String,
    source: std::io::Error,
}

/// A request for the agent's loop, and where its answer goes.
pub type Query = (Request, oneshot::Sender<Vec<u8>>);

/// Binds the control socket: its directory mode 0700, the socket 0600, a stale one replaced.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let err = |source| SocketError { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
        // Only the agent's user may put a socket there (or take one away).
        let meta = std::fs::metadata(dir).map_err(err)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let mode = meta.permissions().mode();
        if std::os::unix::fs::MetadataExt::uid(&meta) != me || mode & 0o022 != 0 {
            return Err(err(std::io::Error::other(format!(
                "its directory {} is owned by uid {} with mode {mode:o}: it must be the agent's own and writable by nobody else (the default /run/hotplug is)",
                dir.display(),
                std::os::unix::fs::MetadataExt::uid(&meta)
            ))));
        }
    }
    // Replace a stale socket, but never another kind of file, nor one an agent still answers on.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
                match crate::control::check_server(&stream) {
                    Ok(()) => {
                        return Err(err(std::io::Error::other(
                            "another hotplug-agent answers on it: stop that one first (systemctl stop hotplug-agent), or give this one another socket",
                        )))
                    }
                    // A process without the agent's rights took the path: it is not the agent's.
                    Err(why) => tracing::warn!(path = %path.display(), "a process that is not an agent answered on the control socket ({why}): replacing its socket"),
                }
            }
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

/// Reads one request (a line; nothing at all means `status`), has the loop answer it, writes the
/// answer and closes.
pub async fn serve(stream: UnixStream, queries: mpsc::Sender<Query>) {
    // Who connected, and their rights, read at once (a caller that exits meanwhile lends its pid
    // to nobody: `peer::of`).
    let caller = crate::peer::of(&stream);
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let request = match read {
        Ok(Ok(_)) => crate::control::parse_request(&line),
        // A client that connects and writes nothing (`socat -`) wants the status.
        Err(_) => Ok(Request::Status),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
    };
    // The socket's mode lets only uid 0 connect; what a request needs beyond that is checked on
    // the caller's process (`crate::peer`).
    let request = request.and_then(|request| {
        let needs = needs(&request);
        if needs == Needs::Nothing {
            return Ok(request);
        }
        match caller.as_ref().map_err(Clone::clone).and_then(|c| crate::peer::allowed(c, needs)) {
            Ok(()) => Ok(request),
            Err(why) => {
                tracing::warn!(action = "control", ?needs, "control request refused: {why}");
                Err(format!(
                    "refused: the caller, {why}: run it as root with its capabilities, in the host's namespaces (sudo)"
                ))
            }
        }
    });
    let body = match request {
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            if queries.send((request, tx)).await.is_err() {
                return; // the agent is stopping
            }
            match rx.await {
                Ok(body) => body,
                Err(_) => return,
            }
        }
        Err(message) => serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default(),
    };
    let write = async {
        writer.write_all(&body).await?;
        writer.shutdown().await
    };
    if tokio::time::timeout(WRITE_TIMEOUT, write).await.is_err() {
        tracing::debug!(
            "control socket: a client did not read its answer within {} s",
            WRITE_TIMEOUT.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_needs_its_capability() {
        let reload = Request::Reload { driver: "ena".into(), params: Vec::new(), dry_run: false };
        assert_eq!(needs(&reload), Needs::SysModule);
        assert_eq!(needs(&Request::Refresh { iface: "ens6".into() }), Needs::NetAdmin);
        let gate = Request::CloudInitGate {
            action: crate::decide::gate::UeventAction::Add,
            devpath: "/devices/x/net/eth1".into(),
            mac: None,
            ifindex: None,
        };
        assert_eq!(needs(&gate), Needs::NetAdmin);
        assert_eq!(needs(&Request::Status), Needs::Nothing);
    }
}
