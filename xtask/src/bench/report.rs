//! What `cargo xtask bench` shows people: a picture of restore latency against its floor (per
//! object count and per driver, each architecture and kernel run), and a Markdown table of every
//! headline figure, both made from `results.json` alone.
use std::fmt::Write as _;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::cmd;

/// One bar pair: hotplug-agent against the floor, in microseconds.
struct Case {
    label: String,
    agent_us: f64,
    floor_us: f64,
    floor: &'static str,
}

/// The cases `results.json` holds: `restore-bench`'s object counts and `reload-bench`'s drivers.
fn cases(results: &Value) -> Vec<Case> {
    let mut cases = Vec::new();
    for run in results["runs"].as_array().into_iter().flatten() {
        let figures = &run["figures"];
        let number = |key: &str| figures[key].as_f64();
        let on = format!("{} {}", run["arch"].as_str().unwrap_or("?"), short_kernel(&run["kernel"]));
        match run["scenario"].as_str() {
            Some("restore-bench") => {
                for n in [1, 10, 100] {
                    let (agent, floor) = (
                        number(&format!("restore_n{n}_p50_us")),
                        number(&format!("restore_n{n}_floor_p50_us")),
                    );
                    if let (Some(agent_us), Some(floor_us)) = (agent, floor) {
                        let label =
                            format!("restore, {n} address+route{} ({on})", if n == 1 { "" } else { "s" });
                        cases.push(Case { label, agent_us, floor_us, floor: "same requests, back to back" });
                    }
                }
            }
            Some("reload-bench") => {
                for driver in ["virtio_net", "e1000", "e1000e"] {
                    let agent = number(&format!("reload_{driver}_latency_p50_us"));
                    let floor = number(&format!("reload_{driver}_floor_p50_us"));
                    if let (Some(agent_us), Some(floor_us)) = (agent, floor) {
                        let label = format!("{driver} reload ({on})");
                        cases.push(Case { label, agent_us, floor_us, floor: "ip -batch after the reload" });
                    }
                }
            }
            _ => {}
        }
    }
    cases
}

/// `6.1.0-57-amd64` -> `6.1`.
fn short_kernel(release: &Value) -> String {
    let release = release.as_str().unwrap_or("?");
    release.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn ms(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal bars, hotplug-agent above its floor, each pair scaled to its larger bar; the ratio
/// on the right, against the goal of 1.5x.
pub fn svg(results: &Value) -> String {
    const ROW: usize = 46;
    const TOP: usize = 74;
    const LABEL_W: f64 = 290.0;
    const BAR_W: f64 = 330.0;
    let cases = cases(results);
    let height = TOP + ROW * cases.len().max(1) + 52;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="780" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r##"<rect width="780" height="{height}" fill="#ffffff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">Restore latency (p50) against its floor</text>"#
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="38" fill="#555555">{} · {} · cargo xtask bench</text>"##,
        escape(results["date"].as_str().unwrap_or("?")),
        escape(results["machine"].as_str().unwrap_or("?"))
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="54" fill="#555555">QEMU guests under TCG: compare each ratio, not the times; green within the 1.5x goal</text>"##
    );
    if cases.is_empty() {
        let _ =
            writeln!(out, r#"<text x="10" y="{}">no restore-bench or reload-bench results</text>"#, TOP + 20);
    }
    for (i, case) in cases.iter().enumerate() {
        let y = TOP + ROW * i;
        let scale = BAR_W / case.agent_us.max(case.floor_us).max(1.0);
        let ratio = case.agent_us / case.floor_us.max(1.0);
        let colour = if ratio <= 1.5 { "#1a7f37" } else { "#cf222e" };
        let _ = writeln!(out, r#"<text x="10" y="{}">{}</text>"#, y + 19, escape(&case.label));
        for (row, (us, fill, what)) in
            [(case.agent_us, "#2f6fdf", "hotplug-agent"), (case.floor_us, "#9aa4b1", case.floor)]
                .iter()
                .enumerate()
        {
            let bar_y = y + 4 + row * 18;
            let width = (us * scale).max(1.0);
            let _ = writeln!(
                out,
                r#"<rect x="{LABEL_W}" y="{bar_y}" width="{width:.1}" height="15" fill="{fill}"><title>{}: {}</title></rect>"#,
                escape(what),
                ms(*us)
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{}" fill="#333333">{}</text>"##,
                LABEL_W + width + 5.0,
                bar_y + 12,
                ms(*us)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="770" y="{}" text-anchor="end" font-weight="bold" fill="{colour}">{ratio:.2}x</text>"#,
            y + 25
        );
    }
    let legend_y = TOP + ROW * cases.len().max(1) + 14;
    let _ = writeln!(
        out,
        r##"<rect x="10" y="{}" width="12" height="12" fill="#2f6fdf"/><text x="27" y="{}">hotplug-agent (restore: the call; reload: kernel registration to last ack)</text>"##,
        legend_y,
        legend_y + 10
    );
    let _ = writeln!(
        out,
        r##"<rect x="10" y="{}" width="12" height="12" fill="#9aa4b1"/><text x="27" y="{}">floor (restore: the same requests back to back; reload: ip -batch, net of starting ip)</text>"##,
        legend_y + 16,
        legend_y + 26
    );
    out.push_str("</svg>\n");
    out
}

/// The headline figures as Markdown: the restore cases, the footprint and large-table figures,
/// the micro-benchmarks; dated, with the machine and the command.
pub fn markdown(results: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {} on {} with `cargo xtask bench` (guests: QEMU under TCG, so compare ratios).\n",
        results["date"].as_str().unwrap_or("?"),
        results["machine"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "![restore latency against the floor](docs/bench/restore.svg)\n");
    let _ = writeln!(out, "| case | hotplug-agent p50 | floor p50 | ratio |");
    let _ = writeln!(out, "|---|---|---|---|");
    for case in cases(results) {
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {:.2}x |",
            case.label,
            ms(case.agent_us),
            ms(case.floor_us),
            case.floor,
            case.agent_us / case.floor_us.max(1.0)
        );
    }
    let _ = writeln!(out, "\n| figure | value |");
    let _ = writeln!(out, "|---|---|");
    for run in results["runs"].as_array().into_iter().flatten() {
        let on = format!("{} {}", run["arch"].as_str().unwrap_or("?"), short_kernel(&run["kernel"]));
        let figures = &run["figures"];
        for (key, label) in [
            ("agent_idle_rss_kib", "agent idle RSS, KiB"),
            ("agent_idle_wakeups_per_second", "agent idle wake-ups per second"),
            ("agent_ready_ms", "agent start to ready in full mode, ms (eBPF verified under emulation)"),
            ("agent_probes_ms", "of which kernel probes, ms"),
            ("agent_start_seconds", "agent start to ready (events stream), s"),
            ("latency_p50_us", "kernel event to agent p50, µs"),
            ("latency_p99_us", "kernel event to agent p99, µs"),
            ("storm_events_per_second", "veth storm: NIC events per second"),
            ("storm_events_lost", "veth storm: events lost"),
            ("ebpf_ns_per_nic_event", "eBPF run time per NIC event, ns"),
        ] {
            if !figures[key].is_null() {
                let _ = writeln!(
                    out,
                    "| {label} ({on}, {}) | {} |",
                    run["scenario"].as_str().unwrap_or("?"),
                    figures[key]
                );
            }
        }
    }
    let large = &results["large_table"];
    for (key, label) in [
        ("ready_ms", "start to ready, natively (degraded mode), ms"),
        ("idle_rss_kib", "idle RSS natively, KiB"),
        ("routes_added_agent_cpu_ms", "agent CPU while 200,000 routes are added to main, ms"),
        ("ten_address_changes_agent_cpu_ms", "agent CPU for 10 address changes with those routes, ms"),
        ("churn_agent_cpu_percent", "agent CPU at 1,000 route changes/s in another table, % of a core"),
        ("churn_rss_kib", "RSS meanwhile, KiB"),
        ("routes_added_rss_kib", "RSS after the 200,000 routes were added, KiB"),
        ("overruns", "netlink overruns"),
        ("restore_n1_p50_us_idle_table", "restore of 1 address+route natively, µs"),
        ("restore_n1_p50_us_large_table", "the same with 200,000 routes in main, µs"),
        ("restore_n100_p50_us_idle_table", "restore of 100 addresses+routes natively, µs"),
        ("restore_n100_p50_us_large_table", "the same with 200,000 routes in main, µs"),
    ] {
        if !large[key].is_null() {
            let _ = writeln!(out, "| {label} | {} |", large[key]);
        }
    }
    if let Some(micro) = results["micro"].as_object() {
        for (key, value) in micro {
            let Some(value) = value.as_f64() else { continue };
            let shown = if key.ends_with(" per_second") {
                format!("{:.2} M/s", value / 1e6)
            } else {
                format!("{value:.0} ns")
            };
            let name = key.trim_end_matches(" mean_ns").trim_end_matches(" per_second");
            let what = if key.ends_with(" per_second") { "per second, one core" } else { "mean" };
            let _ = writeln!(out, "| {name} ({what}) | {shown} |");
        }
    }
    out
}

const BEGIN: &str = "<!-- bench:begin (cargo xtask bench --publish writes what follows) -->";
const END: &str = "<!-- bench:end -->";

/// Copies the picture to docs/bench/restore.svg and the table into README.md between the markers.
pub fn publish(svg: &str, summary: &str) -> Result<()> {
    let root = cmd::workspace_root();
    let docs = root.join("docs/bench");
    std::fs::create_dir_all(&docs)?;
    std::fs::write(docs.join("restore.svg"), svg)?;
    let readme_path = root.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).context("reading README.md")?;
    let (Some(begin), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
        bail!("README.md has no `{BEGIN}` ... `{END}` markers to put the table between");
    };
    if end < begin {
        bail!("README.md's bench markers are out of order");
    }
    let updated = format!("{}{BEGIN}\n{summary}{}", &readme[..begin], &readme[end..]);
    std::fs::write(&readme_path, updated).context("writing README.md")?;
    eprintln!("bench: published to docs/bench/restore.svg and README.md");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn results() -> Value {
        json!({
            "date": "2026-11-30T06:00:00Z",
            "machine": "Linux <test> x86_64",
            "runs": [
                { "scenario": "restore-bench", "arch": "amd64", "kernel": "6.1.0-57-amd64",
                  "figures": { "restore_n1_p50_us": 2366, "restore_n1_floor_p50_us": 1780,
                               "restore_n10_p50_us": 9000, "restore_n10_floor_p50_us": 4500,
                               "agent_idle_rss_kib": 13248 } },
                { "scenario": "reload-bench", "arch": "amd64", "kernel": "6.1.0-57-amd64",
                  "figures": { "reload_e1000_latency_p50_us": 57203, "reload_e1000_floor_p50_us": 57031 } }
            ],
            "large_table": { "churn_agent_cpu_percent": 0.3 },
            "micro": { "pipeline/decode+classify+decide 1000 records per_second": 1_726_700.0 }
        })
    }

    #[test]
    fn the_picture_and_table_hold_every_case_with_its_ratio() {
        let results = results();
        let svg = svg(&results);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=\"290\"").count(), 6, "three cases, two bars each");
        assert!(svg.contains("1.33x") && svg.contains("2.00x") && svg.contains("1.00x"), "{svg}");
        assert!(svg.contains("#cf222e"), "a ratio over 1.5 is red");
        assert!(svg.contains("Linux &lt;test&gt;"), "escaped");
        let table = markdown(&results);
        assert!(table.contains("| restore, 1 address+route (amd64 6.1) | 2.4 ms | 1.8 ms"), "{table}");
        assert!(table.contains("| e1000 reload (amd64 6.1) | 57 ms | 57 ms"), "{table}");
        assert!(table.contains("| agent idle RSS, KiB (amd64 6.1, restore-bench) | 13248 |"), "{table}");
        assert!(table.contains("(per second, one core) | 1.73 M/s"), "{table}");
        assert!(table.contains("0.3 |"), "{table}");
    }
}
