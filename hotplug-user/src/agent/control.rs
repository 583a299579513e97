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

use crate::control::{Request, MAX_REQUEST_BYTES};

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

/// Reads one request (a line; nothing at all means `status`), has the loop answer it, writes the
/// answer and closes.
pub async fn serve(stream: UnixStream, queries: mpsc::Sender<Query>) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let request = match read {
        Ok(Ok(_)) if line.trim().is_empty() => Ok(Request::Status),
        Ok(Ok(_)) => serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}")),
        // A client that connects and writes nothing (`socat -`) wants the status.
        Err(_) => Ok(Request::Status),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
    };
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
