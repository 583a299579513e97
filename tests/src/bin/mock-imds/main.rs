//! `mock-imds`: a stand-in for the EC2 instance metadata service (IMDSv2) that serves the network
//! keys of the NICs it is given, with a control API under `/_mock/` to attach and detach NICs with
//! a propagation lag, inject faults (status codes, delays, dropped connections, garbage, expired
//! tokens) and read what was asked. For tests and for users; `mock-imds --help` tells it all.
mod instance;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post},
    Extension, Json, Router,
};
use clap::Parser;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tower::ServiceExt as _;

use crate::instance::{split_version, Instance, Primary};

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TTL_SECONDS: u64 = 21_600;
/// The log keeps this many entries at most (the oldest go first); the counters are exact.
const LOG_CAP: usize = 100_000;
/// What the `malformed` fault answers: invalid UTF-8, then text that is no address.
const MALFORMED_BODY: &[u8] = b"\xff\xfe\xc3\x28not-an-ip";

const HELP: &str = r#"IMDS (what the agent reads):
  PUT /latest/api/token    header X-aws-ec2-metadata-token-ttl-seconds: 1..=21600
                           -> 200, a token valid that many seconds (400 if the header is missing or bad)
  GET /latest/meta-data/network/interfaces/macs/           -> one "<mac>/" a line
  GET /latest/meta-data/network/interfaces/macs/<mac>/     -> the key names, one a line
  GET .../macs/<mac>/{device-number,network-card,mac,local-ipv4s,subnet-ipv4-cidr-block,
                      ipv6s,subnet-ipv6-cidr-blocks,ipv4-prefix,ipv6-prefix,interface-id}
  With --instance, also what an instance has (what cloud-init's Ec2 datasource crawls):
  GET /latest/meta-data/   -> ami-id hostname instance-id instance-type local-hostname local-ipv4
                              mac network/ placement/ services/ (mac and local-ipv4: the NIC with
                              device number 0 on card 0)
  GET /latest/dynamic/instance-identity/document            -> the identity document (JSON)
  GET /latest/user-data    -> 404 (none)
  and the same under dated API versions (/2021-03-23/meta-data/...).
  Every GET needs header X-aws-ec2-metadata-token with a valid, unexpired token (else 401).
  An unknown MAC or key is a 404, and so are ipv6s and subnet-ipv6-cidr-blocks on a NIC without
  IPv6 (and local-ipv4s on a NIC given none). MACs are lowercase in paths.

NIC JSON (--nic, --nics-file, POST /_mock/attach):
  {"mac":"52:54:00:12:34:11","device_number":1,"local_ipv4s":["10.0.1.5","10.0.1.6"],
   "subnet_ipv4_cidr_block":"10.0.1.0/24","ipv6s":["fd00:1::5"],"subnet_ipv6_cidr_blocks":["fd00:1::/64"]}
  The first IPv4 is the primary. Optional: ipv6s, subnet_ipv6_cidr_blocks, network_card (default 0),
  ipv4_prefixes, ipv6_prefixes (delegated prefixes, e.g. ["10.0.1.32/28"], ["fd00:1::5:0:0:0/80"]),
  interface_id ("eni-..."). Several network cards: give each NIC its network_card; a card's
  device numbers are its own (card 1 has its own device-number 0).

Control API (same listeners, no token, JSON in and out, not counted as IMDS requests):
  POST   /_mock/attach {"nic": NIC, "lag_ms": 2000}  publish NIC lag_ms from now (lag_ms defaults
                                                      to 0; a MAC already published is replaced;
                                                      "device_number_lag_ms": N shows device-number
                                                      0 for N ms first, as IMDS before propagation)
  POST   /_mock/detach {"mac": MAC, "lag_ms": 500}   unpublish it lag_ms from now (404: unknown MAC)
  POST   /_mock/fault  {"kind": K, "count": N, "delay_ms": M}
         the next N IMDS requests (N = 0: until cleared) get fault K, replacing any fault before:
           "500", "503"     that status
           "403"            IMDS disabled: 403 to everything, token PUTs included
           "delay"          wait delay_ms, then answer normally
           "drop"           close the TCP connection without any response
           "malformed"      200 with a garbage body: invalid UTF-8 then "not-an-ip"
           "expire-tokens"  invalidate every token issued so far, now (count not needed, ignored)
           "redirect"       302 to "location" (given with the fault; a client that follows it
                            shows up in stats.followed_redirects, e.g. with location
                            http://127.0.0.1:8169/_mock/followed on a second listener)
         delay_ms, if given with another kind, is waited before that fault too.
  DELETE /_mock/fault                                clear the fault
  GET    /_mock/fault                                the fault in force (null if none)
  ANY    /_mock/followed                     counts a request that followed a redirect (and
                                                      whether it carried a token header)
  GET    /_mock/stats   {"requests", "token_requests", "metadata_requests", "by_status": {"200": n, ..},
                         "followed_redirects", "followed_with_token",
                         "by_client": {"hotplug-agent": n, "cloud-init": n, "curl": n, ..},
                         "connections"}   IMDS requests only (status 0: dropped); connections
                                          counts every accepted TCP connection, control ones too
  GET    /_mock/log     [{"method", "path", "status", "at_ms", "client"}]   IMDS requests, at_ms since start
  GET    /_mock/nics    {"published": [NIC..], "pending": [{"in_ms", "attach": NIC | "detach": MAC}..]}
  POST   /_mock/reset   zero the counters and the log (NICs, tokens and the fault stay)

On start it prints one line per listener to stdout, "mock-imds listening on ADDR:PORT", with the
port actually bound (so --listen 127.0.0.1:0 can be used).

Example:
  mock-imds --listen 127.0.0.1:0 --nic '{"mac":"52:54:00:12:34:11","device_number":1,
      "local_ipv4s":["10.0.1.5"],"subnet_ipv4_cidr_block":"10.0.1.0/24"}'
  TOKEN=$(curl -sX PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:PORT/latest/api/token)
  curl -H "X-aws-ec2-metadata-token: $TOKEN" \
      http://127.0.0.1:PORT/latest/meta-data/network/interfaces/macs/52:54:00:12:34:11/local-ipv4s
  curl -d '{"kind":"503","count":2}' http://127.0.0.1:PORT/_mock/fault"#;

/// A mock of the EC2 instance metadata service (IMDSv2): network keys of the NICs given, plus a
/// control API to attach and detach NICs with a lag, inject faults and count requests.
#[derive(Debug, Parser)]
#[command(name = "mock-imds", version, after_help = HELP)]
struct Cli {
    /// Address to listen on (repeatable). Only loopback, link-local (169.254.0.0/16, fe80::/10)
    /// and fd00:ec2::254 are accepted. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8169")]
    listen: Vec<SocketAddr>,
    /// A NIC to publish from the start, as JSON (repeatable; see NIC JSON below).
    #[arg(long, value_name = "JSON", value_parser = parse_nic_arg)]
    nic: Vec<Nic>,
    /// A file holding a JSON array of NICs to publish from the start (repeatable).
    #[arg(long, value_name = "FILE")]
    nics_file: Vec<PathBuf>,
    /// Also serve an instance's identity and placement (see above), as JSON: any of
    /// instance_id, instance_type, ami_id, region, availability_zone, account_id, architecture
    /// (`{}` for the defaults).
    #[arg(long, value_name = "JSON", value_parser = parse_instance)]
    instance: Option<Instance>,
    /// Log every request to stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// One NIC as IMDS publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Nic {
    mac: String,
    device_number: u32,
    #[serde(default)]
    network_card: u32,
    local_ipv4s: Vec<Ipv4Addr>,
    subnet_ipv4_cidr_block: String,
    #[serde(default)]
    ipv6s: Vec<Ipv6Addr>,
    #[serde(default)]
    subnet_ipv6_cidr_blocks: Vec<String>,
    /// Delegated prefixes (`ipv4-prefix`, `ipv6-prefix`: a 404 when none, as EC2 answers).
    #[serde(default)]
    ipv4_prefixes: Vec<String>,
    #[serde(default)]
    ipv6_prefixes: Vec<String>,
    /// `interface-id` (with --instance, one is made up from the device number when not given).
    #[serde(default)]
    interface_id: Option<String>,
    /// Published with device-number 0 before its real one (never the instance's primary).
    #[serde(skip)]
    premature: bool,
}

impl Nic {
    /// Checks the MAC and the CIDR blocks, and lowercases the MAC.
    fn validated(mut self) -> Result<Self, String> {
        let octets: Vec<&str> = self.mac.split(':').collect();
        if octets.len() != 6 || octets.iter().any(|o| o.len() != 2 || u8::from_str_radix(o, 16).is_err()) {
            return Err(format!("mac {:?} is not like 52:54:00:12:34:11", self.mac));
        }
        self.mac = self.mac.to_ascii_lowercase();
        check_cidr(&self.subnet_ipv4_cidr_block, false)?;
        for block in &self.subnet_ipv6_cidr_blocks {
            check_cidr(block, true)?;
        }
        for prefix in &self.ipv4_prefixes {
            check_cidr(prefix, false)?;
        }
        for prefix in &self.ipv6_prefixes {
            check_cidr(prefix, true)?;
        }
        Ok(self)
    }

    /// The key names under `macs/<mac>/`, sorted as IMDS lists them.
    fn keys(&self) -> Vec<&'static str> {
        let mut keys = vec!["device-number"];
        if self.interface_id.is_some() {
            keys.push("interface-id");
        }
        if !self.ipv4_prefixes.is_empty() {
            keys.push("ipv4-prefix");
        }
        if !self.ipv6_prefixes.is_empty() {
            keys.push("ipv6-prefix");
        }
        if !self.ipv6s.is_empty() {
            keys.push("ipv6s");
        }
        if !self.local_ipv4s.is_empty() {
            keys.push("local-ipv4s");
        }
        keys.extend(["mac", "network-card", "subnet-ipv4-cidr-block"]);
        if !self.subnet_ipv6_cidr_blocks.is_empty() {
            keys.push("subnet-ipv6-cidr-blocks");
        }
        keys
    }

    fn key(&self, key: &str) -> Option<String> {
        fn lines<T: ToString>(items: &[T]) -> Option<String> {
            (!items.is_empty()).then(|| items.iter().map(T::to_string).collect::<Vec<_>>().join("\n"))
        }
        match key {
            "device-number" => Some(self.device_number.to_string()),
            "network-card" => Some(self.network_card.to_string()),
            "mac" => Some(self.mac.clone()),
            "local-ipv4s" => lines(&self.local_ipv4s),
            "subnet-ipv4-cidr-block" => Some(self.subnet_ipv4_cidr_block.clone()),
            "ipv6s" => lines(&self.ipv6s),
            "subnet-ipv6-cidr-blocks" => lines(&self.subnet_ipv6_cidr_blocks),
            "ipv4-prefix" => lines(&self.ipv4_prefixes),
            "ipv6-prefix" => lines(&self.ipv6_prefixes),
            "interface-id" => self.interface_id.clone(),
            _ => None,
        }
    }
}

fn check_cidr(block: &str, v6: bool) -> Result<(), String> {
    let bad = || format!("{block:?} is not an IPv{} CIDR block", if v6 { 6 } else { 4 });
    let (addr, len) = block.split_once('/').ok_or_else(bad)?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let ok = if v6 {
        addr.parse::<Ipv6Addr>().is_ok() && len <= 128
    } else {
        addr.parse::<Ipv4Addr>().is_ok() && len <= 32
    };
    ok.then_some(()).ok_or_else(bad)
}

fn parse_instance(arg: &str) -> Result<Instance, String> {
    serde_json::from_str(arg).map_err(|e| e.to_string())
}

fn parse_nic_arg(arg: &str) -> Result<Nic, String> {
    serde_json::from_str::<Nic>(arg).map_err(|e| e.to_string())?.validated()
}

/// Where a listener may be: where the real IMDS is, or where nothing but this machine reaches it.
fn check_listen_addr(addr: SocketAddr) -> Result<()> {
    let ok = match addr.ip().to_canonical() {
        IpAddr::V4(ip) => ip.is_loopback() || ip.is_link_local(),
        IpAddr::V6(ip) => {
            ip.is_loopback()
                || ip.segments()[0] & 0xffc0 == 0xfe80
                || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    };
    if !ok {
        bail!(
            "refusing to listen on {addr}: mock-imds only listens on loopback (127.0.0.0/8, ::1), \
             link-local (169.254.0.0/16, fe80::/10) or fd00:ec2::254"
        );
    }
    Ok(())
}

fn load_nics(cli: &Cli) -> Result<Vec<Nic>> {
    let mut nics = cli.nic.clone();
    for path in &cli.nics_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Vec<Nic> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON array of NICs", path.display()))?;
        for nic in list {
            nics.push(
                nic.validated().map_err(anyhow::Error::msg).with_context(|| path.display().to_string())?,
            );
        }
    }
    for (i, nic) in nics.iter().enumerate() {
        for other in &nics[..i] {
            if other.mac == nic.mac {
                bail!("NIC {} is given twice", nic.mac);
            }
            if (other.network_card, other.device_number) == (nic.network_card, nic.device_number) {
                bail!("NICs {} and {} have the same device number {}", other.mac, nic.mac, nic.device_number);
            }
        }
    }
    Ok(nics)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum FaultKind {
    #[serde(rename = "500")]
    Status500,
    #[serde(rename = "503")]
    Status503,
    #[serde(rename = "403")]
    Disabled,
    #[serde(rename = "delay")]
    Delay,
    #[serde(rename = "drop")]
    Drop,
    #[serde(rename = "malformed")]
    Malformed,
    #[serde(rename = "expire-tokens")]
    ExpireTokens,
    #[serde(rename = "redirect")]
    Redirect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    kind: FaultKind,
    count: Option<u64>,
    delay_ms: Option<u64>,
    location: Option<String>,
}

/// The fault in force; `remaining: None` lasts until cleared.
#[derive(Clone, Copy, Debug, Serialize)]
struct Fault {
    kind: FaultKind,
    remaining: Option<u64>,
    delay_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachRequest {
    nic: Nic,
    #[serde(default)]
    lag_ms: u64,
    /// Publish the NIC with device-number 0 first, its real one this many ms later (IMDS
    /// before it has propagated: amazon-ec2-net-utils #90).
    #[serde(default)]
    device_number_lag_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachRequest {
    mac: String,
    #[serde(default)]
    lag_ms: u64,
}

#[derive(Debug)]
enum Change {
    Attach(Nic),
    Detach(String),
}

/// A change that IMDS will show once `due` has passed (the propagation lag).
#[derive(Debug)]
struct Pending {
    due: Instant,
    change: Change,
}

#[derive(Debug, Default, Serialize)]
struct Counters {
    requests: u64,
    token_requests: u64,
    metadata_requests: u64,
    by_status: BTreeMap<u16, u64>,
    /// IMDS requests by client, from the User-Agent: hotplug-agent, cloud-init, curl (what
    /// amazon-ec2-net-utils uses), or the header as sent.
    by_client: BTreeMap<String, u64>,
    connections: u64,
    /// Requests that came to `/_mock/followed` (a client followed a `redirect` fault), and how
    /// many of them carried a token header.
    followed_redirects: u64,
    followed_with_token: u64,
}

#[derive(Debug, Serialize)]
struct LogEntry {
    method: String,
    path: String,
    status: u16,
    at_ms: u64,
    client: String,
}

/// Who asked, from the User-Agent header.
fn client_of(headers: &HeaderMap) -> String {
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("(none)");
    for (prefix, name) in
        [("hotplug-agent/", "hotplug-agent"), ("Cloud-Init/", "cloud-init"), ("curl/", "curl")]
    {
        if agent.starts_with(prefix) {
            return name.to_owned();
        }
    }
    agent.chars().take(64).collect()
}

#[derive(Debug, Default)]
struct Mock {
    instance: Option<Instance>,
    nics: BTreeMap<String, Nic>,
    /// Sorted by `due`; equal ones in the order they were asked for.
    pending: Vec<Pending>,
    /// Token -> expiry.
    tokens: HashMap<String, Instant>,
    fault: Option<Fault>,
    /// Where a `redirect` fault points.
    redirect_to: String,
    counters: Counters,
    log: VecDeque<LogEntry>,
}

impl Mock {
    /// Applies the changes whose lag has passed.
    fn catch_up(&mut self, now: Instant) {
        let due = self.pending.partition_point(|p| p.due <= now);
        for pending in self.pending.drain(..due) {
            match pending.change {
                Change::Attach(nic) => {
                    self.nics.insert(nic.mac.clone(), nic);
                }
                Change::Detach(mac) => {
                    self.nics.remove(&mac);
                }
            }
        }
    }

    fn schedule(&mut self, due: Instant, change: Change) {
        let at = self.pending.partition_point(|p| p.due <= due);
        self.pending.insert(at, Pending { due, change });
    }

    /// The published NICs in IMDS order: by network card, then device number.
    fn published(&mut self, now: Instant) -> Vec<&Nic> {
        self.catch_up(now);
        let mut nics: Vec<&Nic> = self.nics.values().collect();
        nics.sort_by_key(|n| (n.network_card, n.device_number));
        nics
    }

    /// Whether `mac` is published or about to be.
    fn knows(&mut self, mac: &str, now: Instant) -> bool {
        self.catch_up(now);
        self.nics.contains_key(mac)
            || self.pending.iter().any(|p| matches!(&p.change, Change::Attach(nic) if nic.mac == mac))
    }

    /// The fault for the request that just came, counting it down.
    fn take_fault(&mut self) -> Option<Fault> {
        let fault = self.fault.as_mut()?;
        let taken = *fault;
        if let Some(remaining) = &mut fault.remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.fault = None;
            }
        }
        Some(taken)
    }

    fn token_valid(&self, token: Option<&str>, now: Instant) -> Option<Duration> {
        let expiry = *self.tokens.get(token?)?;
        (expiry > now).then(|| expiry - now)
    }

    /// What is at `rest` (what follows `/VERSION/`: `meta-data/...`, `dynamic/...`), if any.
    fn lookup(&mut self, rest: &str, now: Instant) -> Option<String> {
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let parts: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
        self.catch_up(now);
        let primary = self
            .nics
            .values()
            .find(|n| n.network_card == 0 && n.device_number == 0 && !n.premature)
            .map(|n| Primary { mac: &n.mac, ipv4: n.local_ipv4s.first().copied() });
        let instance = self.instance.as_ref();
        match parts.as_slice() {
            [] => Some(if instance.is_some() { "dynamic\nmeta-data" } else { "meta-data" }.into()),
            ["meta-data"] => {
                let mut keys: Vec<&str> = instance.map(|_| Instance::TOP.to_vec()).unwrap_or_default();
                keys.push("network/");
                keys.sort_unstable();
                Some(keys.join("\n"))
            }
            ["meta-data", "network"] => Some("interfaces/".into()),
            ["meta-data", "network", "interfaces"] => Some("macs/".into()),
            ["meta-data", "network", "interfaces", "macs"] => {
                Some(self.published(now).iter().map(|n| format!("{}/", n.mac)).collect::<Vec<_>>().join("\n"))
            }
            ["meta-data", "network", "interfaces", "macs", mac, tail @ ..] => {
                let nic = self.nics.get(*mac)?;
                let ipv4 = nic.local_ipv4s.first().copied();
                match (tail, instance) {
                    ([], None) => Some(nic.keys().join("\n")),
                    ([], Some(_)) => {
                        let mut keys = nic.keys();
                        keys.extend(Instance::NIC_KEYS);
                        keys.sort_unstable();
                        keys.dedup();
                        Some(keys.join("\n"))
                    }
                    ([key], instance) => nic.key(key).or_else(|| {
                        instance.and_then(|i| i.nic_key(key, (nic.network_card, nic.device_number), ipv4))
                    }),
                    _ => None,
                }
            }
            ["meta-data", tail @ ..] => instance?.lookup(tail, primary.as_ref()),
            ["dynamic", tail @ ..] => instance?.dynamic(tail, primary.as_ref()),
            _ => None,
        }
    }

    fn record(&mut self, method: &Method, path: &str, status: u16, at_ms: u64, client: String) {
        self.counters.requests += 1;
        *self.counters.by_client.entry(client.clone()).or_default() += 1;
        if path == TOKEN_PATH {
            self.counters.token_requests += 1;
        } else if split_version(path).is_some() {
            self.counters.metadata_requests += 1;
        }
        *self.counters.by_status.entry(status).or_default() += 1;
        if self.log.len() == LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(LogEntry {
            method: method.to_string(),
            path: path.to_owned(),
            status,
            at_ms,
            client,
        });
    }
}

struct App {
    start: Instant,
    verbose: bool,
    mock: Mutex<Mock>,
}

impl App {
    fn lock(&self) -> MutexGuard<'_, Mock> {
        self.mock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn since_start_ms(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    fn record(&self, method: &Method, path: &str, status: u16, arrived: Instant, client: String) {
        if self.verbose {
            eprintln!(
                "mock-imds: {client} {method} {path} -> {}",
                if status == 0 { "dropped".into() } else { status.to_string() }
            );
        }
        self.lock().record(method, path, status, self.since_start_ms(arrived), client);
    }
}

/// The connection a request came on, to close it without an answer (the `drop` fault).
#[derive(Clone)]
struct Connection(Arc<Notify>);

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let mut token = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(token, "{byte:02x}");
    }
    Ok(token)
}

/// Every request outside `/_mock/`: the fault in force first, then IMDS itself.
async fn imds(
    State(app): State<Arc<App>>,
    Extension(connection): Extension<Connection>,
    method: Method,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let arrived = Instant::now();
    let path = request.uri().path().to_owned();
    let client = client_of(&headers);
    let fault = app.lock().take_fault();
    if let Some(fault) = fault {
        if fault.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
        }
        let response = match fault.kind {
            FaultKind::Status500 => Some(text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")),
            FaultKind::Status503 => Some(text(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")),
            FaultKind::Disabled => Some(text(StatusCode::FORBIDDEN, "Forbidden")),
            FaultKind::Malformed => {
                Some((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], MALFORMED_BODY).into_response())
            }
            FaultKind::Drop => {
                app.record(&method, &path, 0, arrived, client);
                connection.0.notify_one();
                // The connection's task drops the connection, and this future with it.
                return std::future::pending().await;
            }
            FaultKind::Redirect => {
                let location = app.lock().redirect_to.clone();
                Some((StatusCode::FOUND, [(header::LOCATION, location)], "Found").into_response())
            }
            FaultKind::Delay | FaultKind::ExpireTokens => None,
        };
        if let Some(response) = response {
            app.record(&method, &path, response.status().as_u16(), arrived, client);
            return response;
        }
    }
    let response = answer(&app, &method, &path, &headers);
    app.record(&method, &path, response.status().as_u16(), arrived, client);
    response
}

fn answer(app: &App, method: &Method, path: &str, headers: &HeaderMap) -> Response {
    let now = Instant::now();
    if path == TOKEN_PATH {
        if method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl));
        let Some(ttl) = ttl else {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        };
        let token = match new_token() {
            Ok(token) => token,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("no randomness: {e}")),
        };
        let mut mock = app.lock();
        mock.tokens.retain(|_, expiry| *expiry > now);
        mock.tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        drop(mock);
        let mut response = text(StatusCode::OK, token);
        response.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl));
        return response;
    }
    let Some((_version, rest)) = split_version(path) else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let mut mock = app.lock();
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let Some(left) = mock.token_valid(token, now) else {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    match mock.lookup(rest, now) {
        Some(body) => {
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(TTL_HEADER, HeaderValue::from(left.as_secs()));
            response
        }
        None => text(StatusCode::NOT_FOUND, "Not Found"),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))
}

async fn attach(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: AttachRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let nic = match request.nic.validated() {
        Ok(nic) => nic,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let mac = nic.mac.clone();
    let visible = Instant::now() + Duration::from_millis(request.lag_ms);
    let mut mock = app.lock();
    if request.device_number_lag_ms > 0 {
        mock.schedule(visible, Change::Attach(Nic { device_number: 0, premature: true, ..nic.clone() }));
        mock.schedule(visible + Duration::from_millis(request.device_number_lag_ms), Change::Attach(nic));
    } else {
        mock.schedule(visible, Change::Attach(nic));
    }
    Json(json!({ "mac": mac, "visible_in_ms": request.lag_ms })).into_response()
}

async fn detach(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: DetachRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let mac = request.mac.to_ascii_lowercase();
    let now = Instant::now();
    let mut mock = app.lock();
    if !mock.knows(&mac, now) {
        return json_error(StatusCode::NOT_FOUND, format!("no NIC {mac} published or being attached"));
    }
    mock.schedule(now + Duration::from_millis(request.lag_ms), Change::Detach(mac.clone()));
    Json(json!({ "mac": mac, "gone_in_ms": request.lag_ms })).into_response()
}

async fn set_fault(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: FaultRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let mut mock = app.lock();
    if request.kind == FaultKind::ExpireTokens {
        let expired = mock.tokens.len();
        mock.tokens.clear();
        return Json(json!({ "expired_tokens": expired })).into_response();
    }
    let Some(count) = request.count else {
        return json_error(StatusCode::BAD_REQUEST, "count is needed (0: until cleared)");
    };
    if request.kind == FaultKind::Delay && request.delay_ms.is_none() {
        return json_error(StatusCode::BAD_REQUEST, "a delay fault needs delay_ms");
    }
    match (request.kind, request.location) {
        (FaultKind::Redirect, Some(location)) => mock.redirect_to = location,
        (FaultKind::Redirect, None) => {
            return json_error(StatusCode::BAD_REQUEST, "a redirect fault needs location")
        }
        (_, Some(_)) => {
            return json_error(StatusCode::BAD_REQUEST, "location goes with a redirect fault only")
        }
        (_, None) => {}
    }
    let fault = Fault {
        kind: request.kind,
        remaining: (count > 0).then_some(count),
        delay_ms: request.delay_ms.unwrap_or(0),
    };
    mock.fault = Some(fault);
    Json(fault).into_response()
}

async fn get_fault(State(app): State<Arc<App>>) -> Response {
    Json(app.lock().fault).into_response()
}

async fn clear_fault(State(app): State<Arc<App>>) -> Response {
    let cleared = app.lock().fault.take();
    Json(json!({ "cleared": cleared })).into_response()
}

async fn followed(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let mut mock = app.lock();
    mock.counters.followed_redirects += 1;
    if headers.contains_key(TOKEN_HEADER) {
        mock.counters.followed_with_token += 1;
    }
    text(StatusCode::NOT_FOUND, "you followed a redirect")
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    Json(&app.lock().counters).into_response()
}

async fn log(State(app): State<Arc<App>>) -> Response {
    Json(&app.lock().log).into_response()
}

async fn nics(State(app): State<Arc<App>>) -> Response {
    let now = Instant::now();
    let mut mock = app.lock();
    let published: Vec<Nic> = mock.published(now).into_iter().cloned().collect();
    let pending: Vec<serde_json::Value> = mock
        .pending
        .iter()
        .map(|p| {
            let in_ms = u64::try_from(p.due.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
            match &p.change {
                Change::Attach(nic) => json!({ "in_ms": in_ms, "attach": nic }),
                Change::Detach(mac) => json!({ "in_ms": in_ms, "detach": mac }),
            }
        })
        .collect();
    Json(json!({ "published": published, "pending": pending })).into_response()
}

async fn reset(State(app): State<Arc<App>>) -> Response {
    let mut mock = app.lock();
    mock.counters = Counters::default();
    mock.log.clear();
    Json(json!({ "reset": true })).into_response()
}

async fn control_not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such control endpoint; see mock-imds --help")
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/_mock/attach", post(attach))
        .route("/_mock/detach", post(detach))
        .route("/_mock/fault", post(set_fault).get(get_fault).delete(clear_fault))
        .route("/_mock/stats", get(stats))
        .route("/_mock/followed", any(followed))
        .route("/_mock/log", get(log))
        .route("/_mock/nics", get(nics))
        .route("/_mock/reset", post(reset))
        .route("/_mock", any(control_not_found))
        .route("/_mock/{*rest}", any(control_not_found))
        .fallback(imds)
        .with_state(app)
}

async fn serve_connection(stream: TcpStream, router: Router, verbose: bool) {
    let _ = stream.set_nodelay(true);
    let kill = Arc::new(Notify::new());
    let connection = Connection(kill.clone());
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(connection.clone());
        router.clone().oneshot(request)
    });
    let http = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = http => {
            if let Err(e) = result {
                if verbose {
                    eprintln!("mock-imds: connection: {e}");
                }
            }
        }
        // Dropping the connection closes the socket with nothing written.
        () = kill.notified() => {}
    }
}

async fn accept_loop(listener: TcpListener, app: Arc<App>, router: Router) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                app.lock().counters.connections += 1;
                tokio::spawn(serve_connection(stream, router.clone(), app.verbose));
            }
            Err(e) => {
                eprintln!("mock-imds: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mock-imds: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-imds: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    for addr in &cli.listen {
        check_listen_addr(*addr)?;
    }
    let nics = load_nics(&cli)?;
    let mock = Mock {
        instance: cli.instance.clone(),
        nics: nics.into_iter().map(|n| (n.mac.clone(), n)).collect(),
        ..Mock::default()
    };
    let app = Arc::new(App { start: Instant::now(), verbose: cli.verbose, mock: Mutex::new(mock) });
    let router = router(app.clone());

    let mut listeners = Vec::new();
    for addr in &cli.listen {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr().with_context(|| format!("listener on {addr}"))?;
        listeners.push((listener, local));
    }
    {
        let mut stdout = std::io::stdout().lock();
        for (_, local) in &listeners {
            // A closed stdout only loses the announcement; the mock still serves.
            let _ = writeln!(stdout, "mock-imds listening on {local}");
        }
        let _ = stdout.flush();
    }
    let tasks: Vec<_> = listeners
        .into_iter()
        .map(|(l, _)| tokio::spawn(accept_loop(l, app.clone(), router.clone())))
        .collect();
    for task in tasks {
        task.await.context("listener task")?;
    }
    Ok(())
}
