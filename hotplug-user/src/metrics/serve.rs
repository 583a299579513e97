//! The scrape endpoint: `GET /metrics` over HTTP/1.x on a loopback address or a Unix socket.
//! Hand-written because it is the whole of what is needed (one GET, one answer, close). It runs
//! on a thread of its own (its own runtime): a local user's connections never take time from the
//! agent's event loop, nor the event loop from a scrape. Each connection is served by a task of
//! its own, with a deadline and a bounded request; at most 16 at once, and at most 4 of one local
//! user (`peers`), so that idle connections cannot starve the scraper.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};

/// The most request bytes read before the request line and headers must have ended.
const MAX_REQUEST: usize = 8192;
/// A scraper that has not sent its request by then is dropped.
const READ_DEADLINE: Duration = Duration::from_secs(1);
/// Nor one that has not read the whole answer by then.
const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("metrics_listen {0}: cannot listen: {1}")]
    Bind(String, std::io::Error),
}

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A loopback address and port, e.g. `127.0.0.1:9464`.
    Tcp(SocketAddr),
    /// `unix:/run/hotplug/metrics.sock` (under the service's sandbox only `/run/hotplug` is
    /// writable).
    Unix(PathBuf),
}

impl Listen {
    /// `127.0.0.1:9464`, `[::1]:9464` or `unix:/absolute/path`. Any other address is refused:
    /// the metrics tell which NICs come and go and why, and the agent is not a web server for
    /// the network; put a proxy in front if they must leave the host.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err("a Unix socket path must be absolute (unix:/run/hotplug/metrics.sock)".to_owned());
            }
            return Ok(Self::Unix(path));
        }
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| "is neither ADDRESS:PORT (127.0.0.1:9464, [::1]:9464) nor unix:/PATH".to_owned())?;
        if !addr.ip().is_loopback() {
            return Err("only a loopback address (127.0.0.0/8, ::1) or a Unix socket: the metrics are not for the network".to_owned());
        }
        if addr.port() == 0 {
            return Err("needs a port".to_owned());
        }
        Ok(Self::Tcp(addr))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Binds `listen` and serves scrapes of [`super::global`] until the process ends.
pub fn start(listen: &Listen) -> Result<(), ServeError> {
    let bind_error = |e| ServeError::Bind(listen.to_string(), e);
    let bound = match listen {
        Listen::Tcp(addr) => {
            let std_listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
            std_listener.set_nonblocking(true).map_err(bind_error)?;
            Unbound::Tcp(std_listener)
        }
        Listen::Unix(path) => {
            safe_directory(path).map_err(bind_error)?;
            remove_stale_socket(path).map_err(bind_error)?;
            // Its mode comes from the umask (root's alone under the service's UMask=0077); who
            // else may scrape is the directory's and the socket's owner's business.
            let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_error)?;
            std_listener.set_nonblocking(true).map_err(bind_error)?;
            Unbound::Unix(std_listener)
        }
    };
    let listen_text = listen.to_string();
    std::thread::Builder::new()
        .name("hotplug-metrics".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match runtime {
                Ok(runtime) => runtime.block_on(async move {
                    match bound.into_tokio() {
                        Ok(bound) => bound.serve(Arc::new(Semaphore::new(MAX_CONNECTIONS))).await,
                        Err(error) => tracing::error!(%error, listen = listen_text, "metrics: cannot serve"),
                    }
                }),
                Err(error) => tracing::error!(%error, "metrics: no runtime for the endpoint's thread"),
            }
        })
        .map_err(bind_error)?;
    tracing::info!(listen = %listen, "metrics: serving GET /metrics (OpenMetrics)");
    Ok(())
}

/// The endpoint's socket, bound in the caller's thread (errors are the caller's).
enum Unbound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Unbound {
    /// Registered with the endpoint thread's runtime.
    fn into_tokio(self) -> std::io::Result<Bound> {
        Ok(match self {
            Self::Tcp(listener) => Bound::Tcp(TcpListener::from_std(listener)?),
            Self::Unix(listener) => Bound::Unix(UnixListener::from_std(listener)?),
        })
    }
}

/// The endpoint's listening socket.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Bound {
    /// Accepts connections for ever, each served by a task of its own.
    async fn serve(self, slots: Arc<Semaphore>) {
        let peers = super::peers::Peers::default();
        loop {
            let accepted = match &self {
                Self::Tcp(listener) => listener.accept().await.map(|(stream, peer)| {
                    let ours = stream.local_addr().ok();
                    let uid = ours.and_then(|ours| super::peers::tcp_peer_uid(peer, ours));
                    spawn_one(stream, &slots, &peers, uid);
                }),
                Self::Unix(listener) => listener.accept().await.map(|(stream, _)| {
                    let uid = stream.peer_cred().ok().map(|cred| cred.uid());
                    spawn_one(stream, &slots, &peers, uid);
                }),
            };
            if let Err(error) = accepted {
                pause_after(&error).await;
            }
        }
    }
}

/// The socket's directory must be root's and writable by nobody else: otherwise another user
/// could put a file of theirs where the agent removes and binds.
fn safe_directory(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the path has no directory"))?;
    let meta = std::fs::metadata(dir)?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} must be root's and writable by no one else", dir.display()),
        ));
    }
    Ok(())
}

/// A socket left by an agent that died is removed; anything else at the path is not ours.
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket: not removing it",
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Out of descriptors, say: the error repeats at once, so wait a little rather than spin.
async fn pause_after(error: &std::io::Error) {
    tracing::warn!(%error, "metrics: cannot accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn spawn_one<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slots: &Arc<Semaphore>,
    peers: &super::peers::Peers,
    uid: Option<u32>,
) {
    // Over either limit: the connection is closed at once rather than queued in the agent.
    let Some(held) = peers.take(uid.unwrap_or(super::peers::UNKNOWN)) else { return };
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else { return };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DEADLINE, answer(stream, |om| super::global().encode_for(om))).await;
        drop((permit, held));
    });
}

/// Reads one request head and writes the answer: the exposition for `GET /metrics` (or `/`),
/// OpenMetrics when the request's `Accept` names it (`body(true)`), else the Prometheus text
/// format (`body(false)`); 404 for another path, 405 for another method, 400 for anything
/// unreadable.
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    body: impl FnOnce(bool) -> String,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n") {
            if request.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    match tokio::time::timeout(READ_DEADLINE, read_head).await {
        Err(_) => return Ok(()), // a client that says nothing is dropped
        Ok(Err(error)) => return Err(error),
        Ok(Ok(false)) => {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
        }
        Ok(Ok(true)) => {}
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics" | "/") => {
            let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
            let openmetrics =
                head.lines().any(|l| l.starts_with("accept:") && l.contains("application/openmetrics-text"));
            let text = body(openmetrics);
            let kind = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            respond(&mut stream, "200 OK", kind, &text).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "GET /metrics\n").await,
        ("", _) => respond(&mut stream, "400 Bad Request", "text/plain", "").await,
        _ => {
            respond(&mut stream, "405 Method Not Allowed\r\nAllow: GET", "text/plain", "GET /metrics\n").await
        }
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
