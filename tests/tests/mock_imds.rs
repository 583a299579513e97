//! Host test of the `mock-imds` binary: started on 127.0.0.1 port 0 and spoken to with
//! hand-written HTTP/1.1 over `TcpStream`: tokens, metadata keys, attach lag, every fault, and
//! stats and log that match what the test did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

const MAC: &str = "52:54:00:12:34:11";
const MAC2: &str = "52:54:00:12:34:22";
const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "X-aws-ec2-metadata-token";
const MACS: &str = "/latest/meta-data/network/interfaces/macs/";
const TOKEN_PATH: &str = "/latest/api/token";

fn nic1() -> Value {
    json!({
        "mac": MAC, "device_number": 1, "local_ipv4s": ["10.0.1.5", "10.0.1.6"],
        "subnet_ipv4_cidr_block": "10.0.1.0/24", "ipv6s": ["fd00:1::5"],
        "subnet_ipv6_cidr_blocks": ["fd00:1::/64"]
    })
}

fn nic2() -> Value {
    json!({
        "mac": MAC2.to_uppercase(), "device_number": 2, "local_ipv4s": ["10.0.2.7"],
        "subnet_ipv4_cidr_block": "10.0.2.0/24"
    })
}

/// The running mock, killed when dropped.
struct Mock {
    child: Child,
    addr: SocketAddr,
    /// Every IMDS (non-control) request sent: method, path, status (0: dropped).
    sent: Vec<(String, String, u16)>,
    /// TCP connections opened, control ones included.
    connections: u64,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn start(args: &[&str]) -> Mock {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-imds"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mock-imds");
    let stdout = child.stdout.take().expect("stdout");
    let mut mock =
        Mock { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), sent: Vec::new(), connections: 0 };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
    let addr =
        line.trim_end().strip_prefix("mock-imds listening on ").unwrap_or_else(|| panic!("got {line:?}"));
    mock.addr = addr.parse().expect("an address");
    mock
}

impl Mock {
    /// Sends one request on a new connection and returns all the bytes that came back.
    fn raw(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
        self.connections += 1;
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "PUT" || method == "POST" {
            request
                .push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).expect("send");
        let mut reply = Vec::new();
        match stream.read_to_end(&mut reply) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{method} {path}: {e}"),
        }
        reply
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let raw = self.raw(method, path, headers, body);
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{method} {path}: {raw:?}"));
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| l.split_once(": ").unwrap())
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
            .collect();
        let body = raw[split + 4..].to_vec();
        let reply = Reply { status, headers, body };
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str()),
            "{method} {path}"
        );
        reply
    }

    /// An IMDS request, remembered for the stats and log checks.
    fn imds(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let reply = self.request(method, path, headers, "");
        self.sent.push((method.into(), path.into(), reply.status));
        reply
    }

    fn token(&mut self, ttl: &str) -> String {
        let reply = self.imds("PUT", TOKEN_PATH, &[(TTL, ttl)]);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header(TTL), Some(ttl));
        let token = reply.text();
        assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_alphanumeric()), "{token:?}");
        token
    }

    fn get(&mut self, path: &str, token: &str) -> Reply {
        self.imds("GET", path, &[(TOKEN, token)])
    }

    fn key(&mut self, mac: &str, key: &str, token: &str) -> (u16, String) {
        let reply = self.get(&format!("{MACS}{mac}/{key}"), token);
        (reply.status, String::from_utf8_lossy(&reply.body).into_owned())
    }

    fn control(&mut self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let reply = self.request(method, path, &[], &body);
        (reply.status, serde_json::from_slice(&reply.body).unwrap_or(Value::Null))
    }

    fn control_ok(&mut self, method: &str, path: &str, body: Value) -> Value {
        let (status, value) = self.control(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {value}");
        value
    }
}

#[test]
fn mock_imds_speaks_imdsv2_with_lag_faults_and_stats() {
    let nic = nic1().to_string();
    let mut mock = start(&["--nic", &nic]);

    // Tokens: a TTL between 1 and 21600 seconds, else 400.
    let token = mock.token("60");
    for headers in [&[][..], &[(TTL, "0")][..], &[(TTL, "21601")][..], &[(TTL, "soon")][..]] {
        assert_eq!(mock.imds("PUT", TOKEN_PATH, headers).status, 400, "{headers:?}");
    }
    assert_eq!(mock.imds("GET", TOKEN_PATH, &[]).status, 405);

    // Every GET needs a valid token.
    assert_eq!(mock.imds("GET", MACS, &[]).status, 401);
    assert_eq!(mock.get(MACS, "not-a-token").status, 401);

    // The keys of the published NIC.
    let macs = mock.get(MACS, &token);
    assert_eq!((macs.status, macs.text()), (200, format!("{MAC}/")));
    assert!(macs.header(TTL).is_some());
    let keys = "device-number\nipv6s\nlocal-ipv4s\nmac\nnetwork-card\nsubnet-ipv4-cidr-block\nsubnet-ipv6-cidr-blocks";
    assert_eq!(mock.key(MAC, "", &token), (200, keys.into()));
    let expected = [
        ("device-number", "1"),
        ("network-card", "0"),
        ("mac", MAC),
        ("local-ipv4s", "10.0.1.5\n10.0.1.6"),
        ("subnet-ipv4-cidr-block", "10.0.1.0/24"),
        ("ipv6s", "fd00:1::5"),
        ("subnet-ipv6-cidr-blocks", "fd00:1::/64"),
    ];
    for (key, value) in expected {
        assert_eq!(mock.key(MAC, key, &token), (200, value.into()), "{key}");
    }
    assert_eq!(mock.key(MAC, "vpc-id", &token).0, 404);
    assert_eq!(mock.key(MAC2, "mac", &token).0, 404);

    // Attach with a propagation lag of 300 ms: 404 before, 200 after. (The "before" answers
    // only prove something if they came back within 300 ms of asking for the attach.)
    let asked = Instant::now();
    let attached = mock.control_ok("POST", "/_mock/attach", json!({ "nic": nic2(), "lag_ms": 300 }));
    assert_eq!(attached["mac"], MAC2);
    let before = mock.key(MAC2, "mac", &token).0;
    let listed = mock.get(MACS, &token).text();
    if asked.elapsed() < Duration::from_millis(300) {
        assert_eq!(before, 404);
        assert_eq!(listed, format!("{MAC}/"));
    } else {
        eprintln!("too slow to see the attach lag ({:?}); not checked", asked.elapsed());
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(mock.key(MAC2, "mac", &token), (200, MAC2.into()));
    assert_eq!(mock.get(MACS, &token).text(), format!("{MAC}/\n{MAC2}/"));
    assert_eq!(mock.key(MAC2, "local-ipv4s", &token), (200, "10.0.2.7".into()));
    assert_eq!(mock.key(MAC2, "ipv6s", &token).0, 404);
    assert_eq!(mock.key(MAC2, "subnet-ipv6-cidr-blocks", &token).0, 404);
    assert_eq!(
        mock.key(MAC2, "", &token),
        (200, "device-number\nlocal-ipv4s\nmac\nnetwork-card\nsubnet-ipv4-cidr-block".into())
    );

    // Detach: gone after its lag (0 here); an unknown MAC is refused.
    mock.control_ok("POST", "/_mock/detach", json!({ "mac": MAC2 }));
    assert_eq!(mock.key(MAC2, "mac", &token).0, 404);
    assert_eq!(mock.control("POST", "/_mock/detach", json!({ "mac": "02:00:00:00:00:99" })).0, 404);
    assert_eq!(mock.control("POST", "/_mock/attach", json!({ "nic": { "mac": "nope" } })).0, 400);

    // 503 once, then normal again.
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "503", "count": 1 }));
    assert_eq!(mock.key(MAC, "mac", &token).0, 503);
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);

    // 500 twice.
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "500", "count": 2 }));
    assert_eq!(mock.key(MAC, "mac", &token).0, 500);
    assert_eq!(mock.imds("PUT", TOKEN_PATH, &[(TTL, "60")]).status, 500);
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);

    // expire-tokens: every token issued so far is refused; a new one works.
    let expired = mock.control_ok("POST", "/_mock/fault", json!({ "kind": "expire-tokens" }));
    assert_eq!(expired["expired_tokens"], 1);
    assert_eq!(mock.key(MAC, "mac", &token).0, 401);
    let token = mock.token("60");
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);
    // A token that lives one second; checked at the end.
    let short = mock.token("1");
    let short_issued = Instant::now();
    assert_eq!(mock.key(MAC, "mac", &short).0, 200);

    // 403 until cleared: token PUTs too.
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "403", "count": 0 }));
    assert_eq!(mock.imds("PUT", TOKEN_PATH, &[(TTL, "60")]).status, 403);
    assert_eq!(mock.key(MAC, "mac", &token).0, 403);
    assert_eq!(mock.key(MAC, "mac", &token).0, 403);
    assert_eq!(mock.control_ok("GET", "/_mock/fault", Value::Null)["kind"], "403");
    mock.control_ok("DELETE", "/_mock/fault", Value::Null);
    assert_eq!(mock.control_ok("GET", "/_mock/fault", Value::Null), Value::Null);
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);

    // drop: the connection closes without a byte of response.
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "drop", "count": 1 }));
    let path = format!("{MACS}{MAC}/mac");
    let reply = mock.raw("GET", &path, &[(TOKEN, &token)], "");
    assert!(reply.is_empty(), "dropped, yet got {:?}", String::from_utf8_lossy(&reply));
    mock.sent.push(("GET".into(), path, 0));
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);

    // malformed: 200 with garbage.
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "malformed", "count": 1 }));
    let reply = mock.get(&format!("{MACS}{MAC}/local-ipv4s"), &token);
    assert_eq!(reply.status, 200);
    assert!(std::str::from_utf8(&reply.body).is_err());
    assert!(reply.body.ends_with(b"not-an-ip"), "{:?}", reply.body);

    // delay: answered normally, late.
    assert_eq!(mock.control("POST", "/_mock/fault", json!({ "kind": "delay", "count": 1 })).0, 400);
    mock.control_ok("POST", "/_mock/fault", json!({ "kind": "delay", "count": 1, "delay_ms": 200 }));
    let asked = Instant::now();
    assert_eq!(mock.key(MAC, "mac", &token), (200, MAC.into()));
    assert!(asked.elapsed() >= Duration::from_millis(200));
    assert_eq!(mock.control("POST", "/_mock/fault", json!({ "kind": "teapot", "count": 1 })).0, 400);
    assert_eq!(mock.control("GET", "/_mock/nothing", Value::Null).0, 404);

    // A token past its TTL is refused; the long one still works.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(short_issued.elapsed()));
    assert_eq!(mock.key(MAC, "mac", &short).0, 401);
    assert_eq!(mock.key(MAC, "mac", &token).0, 200);

    // Stats and log match what was sent.
    let stats = mock.control_ok("GET", "/_mock/stats", Value::Null);
    let mut by_status = BTreeMap::<String, u64>::new();
    for (_, _, status) in &mock.sent {
        *by_status.entry(status.to_string()).or_default() += 1;
    }
    let count = |f: &dyn Fn(&str) -> bool| mock.sent.iter().filter(|(_, p, _)| f(p)).count();
    let expected = json!({
        "requests": mock.sent.len(),
        "token_requests": count(&|p| p == TOKEN_PATH),
        "metadata_requests": count(&|p| p.starts_with("/latest/meta-data/")),
        "by_status": by_status,
        // This test's client sends no User-Agent.
        "by_client": { "(none)": mock.sent.len() },
        "connections": mock.connections,
        // Nothing here answered with a redirect.
        "followed_redirects": 0,
        "followed_with_token": 0,
    });
    assert_eq!(stats, expected);
    let log = mock.control_ok("GET", "/_mock/log", Value::Null);
    let log: Vec<(String, String, u16)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["at_ms"].as_u64().is_some());
            (
                e["method"].as_str().unwrap().into(),
                e["path"].as_str().unwrap().into(),
                e["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(log, mock.sent);

    // Reset zeroes them (the stats request's own connection is the one counted).
    mock.control_ok("POST", "/_mock/reset", Value::Null);
    let stats = mock.control_ok("GET", "/_mock/stats", Value::Null);
    assert_eq!(
        stats,
        json!({
            "requests": 0, "token_requests": 0, "metadata_requests": 0, "by_status": {}, "by_client": {},
            "connections": 1, "followed_redirects": 0, "followed_with_token": 0,
        })
    );
    assert_eq!(mock.control_ok("GET", "/_mock/log", Value::Null), json!([]));
}

#[test]
fn mock_imds_reads_a_nics_file_and_refuses_foreign_addresses() {
    let file = std::env::temp_dir().join(format!("mock-imds-test-{}.json", std::process::id()));
    let mut nic2 = nic2();
    nic2["device_number"] = json!(0);
    std::fs::write(&file, json!([nic1(), nic2]).to_string()).unwrap();
    let mut mock = start(&["--nics-file", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    let token = mock.token("21600");
    // Listed by device number.
    assert_eq!(mock.get(MACS, &token).text(), format!("{MAC2}/\n{MAC}/"));
    assert_eq!(mock.key(MAC2, "device-number", &token), (200, "0".into()));
    drop(mock);

    let bin = env!("CARGO_BIN_EXE_mock-imds");
    for addr in ["0.0.0.0:0", "10.1.2.3:0", "[::]:0", "[fd00:ec2::253]:0"] {
        let out = Command::new(bin).args(["--listen", addr]).output().unwrap();
        assert!(!out.status.success(), "{addr}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refusing to listen on"), "{addr}: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = Command::new(bin).args(["--nic", r#"{"mac":"52:54:00:12:34:11"}"#]).output().unwrap();
    assert!(!out.status.success());
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in
        ["--listen", "--nic", "--nics-file", "/_mock/attach", "/_mock/fault", "expire-tokens", "/_mock/stats"]
    {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
