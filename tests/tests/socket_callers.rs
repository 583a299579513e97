//! Who may ask the agent what, on its control socket (agent/peer.rs): root with its capabilities
//! may reload a driver; a uid-0 process stripped of its capabilities (`setpriv`) or root in a user
//! namespace of its own (`unshare -U -r`) may read the status but not reload, refresh or spend the
//! cloud-init gate's credits. The agent's loop is a stand-in that answers every request it gets,
//! so what reaches it is what the socket let through.
use std::{
    io::Write as _,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use hotplug_tests::host::{is_root, skip};

const RELOAD: &str = r#"{"command":"reload","driver":"e1000e","dry_run":true}"#;
const REFRESH: &str = r#"{"command":"refresh","iface":"eth1"}"#;
const GATE: &str = r#"{"command":"cloud-init-gate","action":"add","devpath":"/devices/x/net/eth1"}"#;
const STATUS: &str = r#"{"command":"status"}"#;

/// Sends `request` through socat, run under `wrapper` (a command and its arguments, before
/// socat's), and returns the answer.
fn ask_as(wrapper: &[&str], socket: &Path, request: &str) -> Result<String, String> {
    let mut command = Command::new(wrapper[0]);
    command.args(&wrapper[1..]).args(["socat", "-", &format!("UNIX-CONNECT:{}", socket.display())]);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{wrapper:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(format!("{request}\n").as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{wrapper:?} socat failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The stand-in loop's answer: every request that reaches it is answered so.
const REACHED: &str = r#"{"reached":"the agent's loop"}"#;

fn serve(dir: PathBuf) -> Result<PathBuf, String> {
    let socket = dir.join("agent.sock");
    let ready = std::sync::mpsc::channel();
    let path = socket.clone();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => return ready.0.send(Err(e.to_string())),
        };
        runtime.block_on(async move {
            let listener = match hotplug::agent::control::bind(&path) {
                Ok(listener) => listener,
                Err(e) => return ready.0.send(Err(e.to_string())),
            };
            let (queries, mut loop_rx) = tokio::sync::mpsc::channel::<hotplug::agent::control::Query>(8);
            tokio::spawn(async move {
                while let Some((_, reply)) = loop_rx.recv().await {
                    let _ = reply.send(REACHED.as_bytes().to_vec());
                }
            });
            let _ = ready.0.send(Ok(()));
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hotplug::agent::control::serve(stream, queries.clone()));
            }
            Ok(())
        })
    });
    ready.1.recv_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())??;
    Ok(socket)
}

#[test]
fn only_callers_with_the_rights_may_reload_refresh_or_ask_the_gate() -> Result<(), String> {
    let name = "only_callers_with_the_rights_may_reload_refresh_or_ask_the_gate";
    if !is_root() {
        skip(
            name,
            "needs root: the control socket is root's, and callers are made by dropping root's rights",
        );
        return Ok(());
    }
    if Command::new("socat").arg("-V").output().is_err()
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        skip(name, "needs socat and setpriv (cargo xtask setup installs socat; setpriv is util-linux's)");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("hotplug-socket-callers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| e.to_string())?;
    let socket = serve(dir.clone())?;

    // Root, with its capabilities: everything reaches the agent.
    let root: &[&str] = &["env"];
    for request in [RELOAD, REFRESH, GATE, STATUS] {
        assert_eq!(ask_as(root, &socket, request)?, REACHED, "root: {request}");
    }
    // uid 0 without a capability: the status only.
    let stripped: &[&str] =
        &["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"];
    for (request, capability) in
        [(RELOAD, "CAP_SYS_MODULE"), (REFRESH, "CAP_NET_ADMIN"), (GATE, "CAP_NET_ADMIN")]
    {
        let answer = ask_as(stripped, &socket, request)?;
        assert!(
            answer.contains("refused") && answer.contains(capability),
            "stripped root, {request}: {answer}"
        );
    }
    assert_eq!(ask_as(stripped, &socket, STATUS)?, REACHED, "the status needs no capability");
    // CAP_NET_ADMIN alone: a refresh, not a reload.
    let net_admin: &[&str] = &[
        "setpriv",
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--bounding-set=-all,+net_admin",
        "--",
    ];
    assert_eq!(ask_as(net_admin, &socket, REFRESH)?, REACHED, "CAP_NET_ADMIN may refresh");
    let answer = ask_as(net_admin, &socket, RELOAD)?;
    assert!(answer.contains("CAP_SYS_MODULE"), "CAP_NET_ADMIN may not reload: {answer}");
    // Root in a user namespace of its own: its capabilities are not the host's.
    match ask_as(&["unshare", "--user", "--map-root-user", "--"], &socket, RELOAD) {
        Ok(answer) => {
            assert!(answer.contains("another user namespace"), "root in a user namespace: {answer}")
        }
        Err(error) => {
            skip(&format!("{name} (user namespace part)"), &format!("unshare --user failed here: {error}"))
        }
    }

    // A second agent on the same socket path is refused while this one answers.
    let second = hotplug::agent::control::bind(&socket);
    assert!(
        second.as_ref().is_err_and(|e| e.to_string().contains("another hotplug-agent answers on it")),
        "{:?}",
        second.map(|_| ())
    );
    // A uid-0 process without capabilities that takes a socket path: clients do not talk to it,
    // and a starting agent replaces its socket.
    let squat = dir.join("squat.sock");
    let mut squatter = Command::new("setpriv")
        .args(["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--", "socat"])
        .arg(format!("UNIX-LISTEN:{},fork", squat.display()))
        .arg("SYSTEM:echo '{\"verdict\":\"skip\",\"reason\":\"forged\"}'")
        .spawn()
        .map_err(|e| format!("setpriv socat: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !squat.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let asked = hotplug::control::ask(&squat, &hotplug::control::Request::Status, Duration::from_secs(5));
    // tokio's listener needs a runtime to register with.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let replaced = {
        let _inside = runtime.enter();
        hotplug::agent::control::bind(&squat).map(|_| ())
    };
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        matches!(&asked, Err(hotplug::control::ControlError::NotTheAgent { why, .. }) if why.contains("lacks CAP_NET_ADMIN")),
        "a client talked to a squatter: {asked:?}"
    );
    assert!(replaced.is_ok(), "a starting agent did not replace a squatter's socket: {replaced:?}");
    // A directory others may write to is refused.
    let open = dir.join("open");
    std::fs::DirBuilder::new().mode(0o777).create(&open).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    let refused = hotplug::agent::control::bind(&open.join("agent.sock"));
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("writable by nobody else")),
        "{:?}",
        refused.map(|_| ())
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
