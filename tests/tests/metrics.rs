//! The metrics endpoint as a scraper sees it: served on a Unix socket by the agent's own code,
//! scraped over HTTP, and checked by Prometheus's `promtool check metrics` (fetched by
//! `cargo xtask setup` into the cache; `HOTPLUG_PROMTOOL` names it).
use std::{io::Write as _, process::Stdio};

use hotplug::metrics::{global, serve};
use hotplug_tests::host::{is_root, skip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn promtool() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("HOTPLUG_PROMTOOL").map(std::path::PathBuf::from) {
        if path.is_file() {
            return Some(path);
        }
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join("promtool"))
        .find(|p| p.is_file())
}

#[tokio::test]
async fn a_scrape_passes_promtool_check_metrics() -> Result<(), Box<dyn std::error::Error>> {
    let Some(promtool) = promtool() else {
        skip(
            "a_scrape_passes_promtool_check_metrics",
            "no promtool (cargo xtask setup fetches it; or set HOTPLUG_PROMTOOL)",
        );
        return Ok(());
    };
    if !is_root() {
        skip(
            "a_scrape_passes_promtool_check_metrics",
            "needs root: a Unix metrics socket must be in a root-owned directory",
        );
        return Ok(());
    }
    // Every family with a sample, as after a reload, a lost record and an IMDS failure.
    let metrics = global();
    metrics.set_mode(false);
    metrics.set_nics(3, 0, 1);
    metrics.nic_event("removal", "driver-unload", "kernel");
    metrics.nic_event("registration", "driver-load", "kernel");
    metrics.module_event("unload");
    metrics.restore("ok", "driver-reload", 85_000);
    metrics.attach("configured");
    metrics.imds_request("timeout");
    metrics.delivered(40_000);
    metrics.lost_records.inc();
    metrics.resyncs.inc();

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("metrics.sock");
    serve::start(&serve::Listen::Unix(socket.clone()))?;
    let scrape = |accept: &'static str| {
        let socket = socket.clone();
        async move {
            let mut stream = tokio::net::UnixStream::connect(&socket).await?;
            stream
                .write_all(format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n").as_bytes())
                .await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            let (head, body) = reply.split_once("\r\n\r\n").ok_or("no end of headers")?;
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            Ok::<_, Box<dyn std::error::Error>>(body.to_owned())
        }
    };
    // What Prometheus asks for: OpenMetrics, ending with # EOF.
    let openmetrics =
        scrape("Accept: application/openmetrics-text;version=1.0.0;q=0.9,text/plain;q=0.1\r\n").await?;
    assert!(
        openmetrics.contains("hotplug_restores_total{outcome=\"ok\",reason=\"driver-reload\"} 1"),
        "{openmetrics}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    // What curl gets, and promtool checks: the Prometheus text format.
    let body = scrape("").await?;
    assert!(body.contains("# TYPE hotplug_restores_total counter"), "{body}");

    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(body.as_bytes())?;
    let output = child.wait_with_output()?;
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}\n{body}",
        output.status
    );
    Ok(())
}
