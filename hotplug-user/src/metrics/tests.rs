use super::{serve::Listen, *};

#[test]
fn counters_and_histograms_show_in_the_exposition() {
    let metrics = Metrics::new();
    metrics.set_mode(true);
    metrics.set_nics(2, 1, 0);
    metrics.nic_event("removal", "driver-unload", "kernel");
    metrics.nic_event("removal", "driver-unload", "kernel");
    metrics.module_event("unload");
    metrics.restore("ok", "driver-reload", 42_000);
    metrics.restore("ok", "manager-cycle", 1);
    metrics.imds_request("http-5xx");
    metrics.delivered(150_000);
    metrics.lost_records.inc_by(3);
    let text = metrics.encode();
    for line in [
        "hotplug_nic_events_total{action=\"removal\",cause=\"driver-unload\",source=\"kernel\"} 2",
        "hotplug_module_events_total{action=\"unload\"} 1",
        "hotplug_restores_total{outcome=\"ok\",reason=\"driver-reload\"} 1",
        "hotplug_restores_total{outcome=\"ok\",reason=\"manager-cycle\"} 1",
        "hotplug_imds_requests_total{outcome=\"http-5xx\"} 1",
        "hotplug_lost_records_total 3",
        "hotplug_resyncs_total 0",
        "hotplug_nics{state=\"driver-gone\"} 1",
        "hotplug_mode{mode=\"full\"} 1",
        "hotplug_mode{mode=\"degraded\"} 0",
        "hotplug_restore_latency_seconds_count 1",
        "hotplug_restore_latency_seconds_bucket{le=\"0.064\"} 1",
        "hotplug_restore_latency_seconds_bucket{le=\"0.032\"} 0",
        "hotplug_event_delivery_latency_seconds_count 1",
        "# EOF",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
}

#[test]
fn only_loopback_or_a_unix_socket_is_accepted() {
    assert_eq!(Listen::parse("127.0.0.1:9464"), Ok(Listen::Tcp(([127, 0, 0, 1], 9464).into())));
    assert!(matches!(Listen::parse("[::1]:9464"), Ok(Listen::Tcp(_))));
    assert_eq!(
        Listen::parse("unix:/run/hotplug/metrics.sock"),
        Ok(Listen::Unix("/run/hotplug/metrics.sock".into()))
    );
    for bad in [
        "0.0.0.0:9464",
        "10.0.0.5:9464",
        "[::]:9464",
        "unix:metrics.sock",
        "localhost:9464",
        "127.0.0.1:0",
        "",
    ] {
        assert!(Listen::parse(bad).is_err(), "{bad} accepted");
    }
}

async fn ask(request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let served =
        tokio::spawn(serve::answer(server, |om| if om { "body 1\n# EOF\n" } else { "body 1\n" }.to_owned()));
    client.write_all(request).await?;
    let mut reply = String::new();
    client.read_to_string(&mut reply).await?;
    served.await.map_err(std::io::Error::other)??;
    Ok(reply)
}

#[tokio::test]
async fn the_endpoint_answers_get_metrics_and_nothing_else() -> std::io::Result<()> {
    let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n").await?;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("Content-Type: application/openmetrics-text; version=1.0.0"), "{ok}");
    assert!(ok.contains("Content-Length: 13\r\n") && ok.ends_with("\r\n\r\nbody 1\n# EOF\n"), "{ok}");
    let plain = ask(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    assert!(
        plain.contains("Content-Type: text/plain; version=0.0.4") && plain.ends_with("\r\n\r\nbody 1\n"),
        "{plain}"
    );
    assert!(ask(b"GET /other HTTP/1.1\r\n\r\n").await?.starts_with("HTTP/1.1 404"));
    assert!(ask(b"POST /metrics HTTP/1.1\r\n\r\n").await?.starts_with("HTTP/1.1 405"));
    assert!(ask(b"\r\n\r\n").await?.starts_with("HTTP/1.1 400"));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10_000));
    assert!(ask(&huge).await?.starts_with("HTTP/1.1 431"));
    Ok(())
}

#[test]
fn the_prometheus_text_names_counters_by_their_samples() {
    let om = "# HELP x Things.\n# TYPE x counter\nx_total 1\n# HELP h Lat.\n# TYPE h_seconds histogram\n# UNIT h_seconds seconds\nh_seconds_count 0\n# EOF\n";
    assert_eq!(
        to_prometheus_text(om),
        "# HELP x_total Things.\n# TYPE x_total counter\nx_total 1\n# HELP h Lat.\n# TYPE h_seconds histogram\nh_seconds_count 0\n"
    );
}
