//! The agent's IMDS client against the mock IMDS, one injected fault at a time: what it retries,
//! what stops it, and how many requests each costs.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use hotplug::imds::{ImdsClient, ImdsConfig, ImdsError};

const MAC: &str = "52:54:00:12:34:11";

struct Mock {
    child: Child,
    addr: String,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mock() -> Result<Mock, String> {
    let nic = format!(
        r#"{{"mac":"{MAC}","device_number":1,"local_ipv4s":["10.0.1.5","10.0.1.6"],"subnet_ipv4_cidr_block":"10.0.1.0/24","ipv6s":["fd00:1::5"],"subnet_ipv6_cidr_blocks":["fd00:1::/64"]}}"#
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-imds"))
        .args(["--listen", "127.0.0.1:0", "--nic", &nic])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mock-imds: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("mock-imds listening on ")
        .ok_or(format!("unexpected: {line:?}"))?
        .to_owned();
    Ok(Mock { child, addr })
}

impl Mock {
    /// A control request (`POST /_mock/...` with a JSON body); returns the response body.
    fn control(&self, method: &str, path: &str, body: &str) -> Result<String, String> {
        let mut stream = TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
        Ok(response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
    }

    /// Injects a fault; a `delay` outlasts the client's 500 ms request timeout.
    fn fault(&self, kind: &str, count: u32) -> Result<(), String> {
        let delay = if kind == "delay" { r#","delay_ms":1500"# } else { "" };
        self.control("POST", "/_mock/fault", &format!(r#"{{"kind":"{kind}","count":{count}{delay}}}"#))
            .map(|_| ())
    }

    fn client(&self) -> Result<ImdsClient, String> {
        let config = ImdsConfig {
            endpoint: format!("http://{}", self.addr),
            // The mock listens on an unprivileged loopback port, which the client refuses unless told.
            allow_any_endpoint: true,
            request_timeout_ms: 500,
            requests_per_second: 200,
            ..ImdsConfig::default()
        };
        ImdsClient::new(&config).map_err(|e| e.to_string())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

#[test]
fn reads_the_nic_and_recovers_from_transient_faults() -> Result<(), String> {
    let mock = start_mock()?;
    let rt = runtime()?;
    let client = mock.client()?;
    let nic = rt.block_on(client.nic(MAC)).map_err(|e| e.to_string())?.ok_or("NIC not listed")?;
    assert_eq!(nic.device_number, 1);
    assert_eq!(nic.local_ipv4s.len(), 2);
    assert_eq!(nic.subnet_ipv4.gateway().to_string(), "10.0.1.1");
    assert_eq!(nic.ipv6s.len(), 1);
    assert_eq!(nic.network_card, 0);
    let first = client.requests();
    assert_eq!(
        first, 11,
        "1 token + 9 keys (device-number, local-ipv4s, subnet-ipv4-cidr-block, network-card, ipv6s, interface-id, \
         ipv4-prefix, ipv6-prefix, subnet-ipv6-cidr-blocks) + the primary MAC: only this MAC's network keys are read"
    );
    rt.block_on(client.nic(MAC)).map_err(|e| e.to_string())?.ok_or("NIC not listed")?;
    let clean = client.requests() - first;
    // The token is remembered; this mock instance has no primary ENI (meta-data/mac is a 404),
    // so the MAC is asked again (a primary MAC, once read, is remembered).
    assert_eq!(clean, 10, "9 keys + meta-data/mac");

    // Each transient fault: retried within the deadline, then the NIC is read.
    // (fault, count, the status the mock logs for it: 0 = dropped, 401 = expired token)
    for (kind, count, logged) in [
        ("500", 2, "500"),
        ("503", 3, "503"),
        ("drop", 1, "0"),
        ("delay", 1, "200"),
        ("expire-tokens", 1, "401"),
    ] {
        mock.control("POST", "/_mock/reset", "{}")?;
        mock.fault(kind, count)?;
        let before = client.requests();
        let nic = rt.block_on(client.nic_until_published(MAC, Duration::from_secs(20), |_| Ok(())));
        assert!(nic.is_ok(), "{kind}: {nic:?}");
        let spent = client.requests() - before;
        eprintln!("fault {kind} x{count}: {spent} requests");
        let stats: serde_json::Value =
            serde_json::from_str(&mock.control("GET", "/_mock/stats", "")?).map_err(|e| e.to_string())?;
        let hits = stats["by_status"][logged].as_u64().unwrap_or(0);
        assert!(hits >= u64::from(count.min(1)), "{kind}: the mock logged no {logged}: {stats}");
        assert!(spent >= clean, "{kind}: {spent} requests, fewer than a clean read");
    }

    // A MAC IMDS does not list yet: retried until the deadline, bounded.
    let before = client.requests();
    let missing =
        rt.block_on(client.nic_until_published("02:00:00:00:00:99", Duration::from_secs(2), |_| Ok(())));
    assert!(matches!(missing, Err(ImdsError::Deadline { .. })), "{missing:?}");
    let spent = client.requests() - before;
    assert!((1..=20).contains(&spent), "{spent} requests in 2 s");
    Ok(())
}

#[test]
fn malformed_values_and_a_disabled_imds_stop_at_once() -> Result<(), String> {
    let mock = start_mock()?;
    let rt = runtime()?;
    let client = mock.client()?;
    // A garbage token answer (the first request of a fresh client), then a garbage value.
    mock.fault("malformed", 1)?;
    let malformed = rt.block_on(client.nic_until_published(MAC, Duration::from_secs(20), |_| Ok(())));
    assert!(
        matches!(&malformed, Err(ImdsError::Malformed(m)) if m.key == "/latest/api/token"),
        "{malformed:?}"
    );
    rt.block_on(client.nic(MAC)).map_err(|e| e.to_string())?;
    mock.fault("malformed", 1)?;
    let malformed = rt.block_on(client.nic_until_published(MAC, Duration::from_secs(20), |_| Ok(())));
    assert!(
        matches!(&malformed, Err(ImdsError::Malformed(m)) if m.key.ends_with("/device-number")),
        "{malformed:?}"
    );

    mock.fault("403", 0)?;
    let before = client.requests();
    let disabled = rt.block_on(client.nic_until_published(MAC, Duration::from_secs(20), |_| Ok(())));
    assert!(matches!(disabled, Err(ImdsError::Disabled)), "{disabled:?}");
    assert!(client.requests() - before <= 2, "a 403 is not retried");
    assert!(ImdsError::Disabled.to_string().contains("disabled"));
    Ok(())
}
