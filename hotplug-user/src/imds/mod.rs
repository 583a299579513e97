//! The IMDS client (IMDSv2): a session token cached and renewed before it expires, a 401 renews it
//! once, a 403 means IMDS is disabled (a clear error; the agent goes on with kernel data alone).
//! Only the network keys of one MAC are read, never the whole tree. Requests are bounded by a
//! per-request timeout, a global rate budget and, for retries, a per-event deadline. The token
//! never appears in logs or errors.
pub mod budget;
pub mod parse;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{sync::Mutex, time::Instant};

use self::{
    budget::{Backoff, Budget},
    parse::{Ipv4Net, Ipv6Net, Malformed},
};

#[derive(Debug, Error)]
pub enum ImdsError {
    #[error("IMDS endpoint {0:?} is not a URL like http://169.254.169.254 ({1})")]
    BadEndpoint(String, String),
    #[error("IMDS endpoint {0} refused: {1}; set imds.allow_any_endpoint = true to use it anyway")]
    EndpointRefused(String, String),
    #[error("IMDS is disabled on this instance (HTTP 403): enable the metadata service (http-endpoint enabled) or set imds.enabled = false; the agent goes on with kernel data alone")]
    Disabled,
    #[error("IMDS request {path}: {message}")]
    Transport { path: String, message: String },
    #[error("IMDS answered {status} for {path}")]
    Status { path: String, status: u16 },
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("gave up on IMDS after {attempts} requests in {elapsed_ms} ms: {last}")]
    Deadline { attempts: u32, elapsed_ms: u128, last: String },
}

/// `[imds]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImdsConfig {
    /// Ask IMDS at all (attach needs it; driver reloads never do).
    pub enabled: bool,
    pub endpoint: String,
    pub token_ttl_seconds: u32,
    pub request_timeout_ms: u64,
    /// Global budget, far below the ~1024 packets/s link-local limit per ENI.
    pub requests_per_second: u32,
    /// How long an attach waits for IMDS to publish a new NIC.
    pub attach_deadline_seconds: u64,
    pub allow_any_endpoint: bool,
    /// Use IMDS only where the firmware says EC2 (`crate::platform`); `false` for an
    /// IMDS-compatible service elsewhere, or a test bench.
    pub require_ec2: bool,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: "http://169.254.169.254".into(),
            token_ttl_seconds: 21_600,
            request_timeout_ms: 2_000,
            requests_per_second: 20,
            attach_deadline_seconds: 120,
            allow_any_endpoint: false,
            require_ec2: true,
        }
    }
}

/// What IMDS says about one NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicMetadata {
    pub mac: String,
    pub device_number: u32,
    /// The network card the ENI is on (0 on instances with one card; absent key: 0).
    #[serde(default)]
    pub network_card: u32,
    /// The instance's primary ENI's MAC (`meta-data/mac`), when IMDS gave it.
    #[serde(default)]
    pub primary_mac: Option<String>,
    pub local_ipv4s: Vec<Ipv4Addr>,
    pub subnet_ipv4: Ipv4Net,
    pub ipv6s: Vec<Ipv6Addr>,
    pub subnet_ipv6: Vec<Ipv6Net>,
    /// Whether IMDS has a `network-card` key at all (instance types without one get the altname
    /// `device-number-N`, the others `device-number-N.C`, as amazon-ec2-net-utils names them).
    #[serde(default)]
    pub network_card_listed: bool,
    /// `interface-id`: the ENI's id (`eni-…`), an altname of the NIC.
    #[serde(default)]
    pub interface_id: Option<String>,
    /// `ipv4-prefix`: IPv4 prefixes delegated to the ENI.
    #[serde(default)]
    pub ipv4_prefixes: Vec<Ipv4Net>,
    /// `ipv6-prefix`: IPv6 prefixes delegated to the ENI.
    #[serde(default)]
    pub ipv6_prefixes: Vec<Ipv6Net>,
}

/// The values IMDS answered for a NIC's keys (`None`: the key is absent, a 404).
#[derive(Clone, Copy, Debug)]
pub struct NicValues<'a> {
    pub mac: &'a str,
    pub device_number: &'a str,
    pub network_card: Option<&'a str>,
    pub primary_mac: Option<&'a str>,
    pub local_ipv4s: &'a str,
    pub subnet_ipv4_cidr_block: &'a str,
    pub ipv6s: Option<&'a str>,
    pub subnet_ipv6_cidr_blocks: Option<&'a str>,
    pub interface_id: Option<&'a str>,
    pub ipv4_prefix: Option<&'a str>,
    pub ipv6_prefix: Option<&'a str>,
}

impl NicMetadata {
    /// Parses a NIC's values, strictly (form only: what they mean is `decide::attach_plan`'s).
    pub fn parse(values: &NicValues<'_>) -> Result<Self, Malformed> {
        let ipv6s = values.ipv6s.map(|v| parse::ipv6_list("ipv6s", v)).transpose()?.unwrap_or_default();
        let ipv6_prefixes =
            values.ipv6_prefix.map(|v| parse::ipv6_cidrs("ipv6-prefix", v)).transpose()?.unwrap_or_default();
        let subnet_ipv6 = match (ipv6s.is_empty() && ipv6_prefixes.is_empty(), values.subnet_ipv6_cidr_blocks)
        {
            (false, Some(v)) => parse::ipv6_cidrs("subnet-ipv6-cidr-blocks", v)?,
            _ => Vec::new(),
        };
        Ok(Self {
            mac: parse::mac("mac", values.mac)?,
            device_number: parse::device_number("device-number", values.device_number)?,
            network_card: values
                .network_card
                .map(|v| parse::device_number("network-card", v))
                .transpose()?
                .unwrap_or(0),
            primary_mac: values.primary_mac.map(|v| parse::mac("meta-data/mac", v)).transpose()?,
            local_ipv4s: parse::ipv4_list("local-ipv4s", values.local_ipv4s)?,
            subnet_ipv4: parse::ipv4_cidr("subnet-ipv4-cidr-block", values.subnet_ipv4_cidr_block)?,
            ipv6s,
            subnet_ipv6,
            network_card_listed: values.network_card.is_some(),
            interface_id: values.interface_id.map(|v| parse::interface_id("interface-id", v)).transpose()?,
            ipv4_prefixes: values
                .ipv4_prefix
                .map(|v| parse::ipv4_cidrs("ipv4-prefix", v))
                .transpose()?
                .unwrap_or_default(),
            ipv6_prefixes,
        })
    }
}

/// The session token; its Debug output is redacted so it cannot reach a log by accident.
struct Token {
    value: String,
    renew_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

enum Fetched {
    Value(String),
    NotFound,
}

pub struct ImdsClient {
    http: reqwest::Client,
    base: String,
    ttl: u32,
    token: Mutex<Option<Token>>,
    budget: Budget,
    deadline: Duration,
    requests: AtomicU64,
    /// The instance's primary MAC (`meta-data/mac`), asked once: it never changes while the
    /// instance runs.
    primary_mac: Mutex<Option<String>>,
}

/// The base URL the client talks to, checked as a URL (never as a string): `http`, no user or
/// password, nothing after the host but `/`, and an IP address (no name to resolve). Unless
/// `allow_any`: the metadata service's addresses (link-local, `fd00:ec2::254`) on port 80, or a
/// loopback address on a privileged port (below 1024: no unprivileged local user can listen
/// there and pose as IMDS).
fn check_endpoint(endpoint: &str, allow_any: bool) -> Result<String, ImdsError> {
    let bad = |why: &str| ImdsError::BadEndpoint(endpoint.to_owned(), why.to_owned());
    let url = reqwest::Url::parse(endpoint).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "http" {
        return Err(bad("only http: IMDS speaks nothing else"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it names a user or password"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it has a path, query or fragment"));
    }
    let ip: IpAddr = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.into(),
        Some(url::Host::Ipv6(ip)) => ip.into(),
        Some(url::Host::Domain("localhost")) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(url::Host::Domain(_)) => {
            return Err(bad(
                "a name, not an IP address (the agent resolves no names, allow_any_endpoint or not)",
            ))
        }
        None => return Err(bad("no host")),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let socket = std::net::SocketAddr::new(ip, port);
    if !allow_any {
        let imds = match ip {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => {
                (a.segments()[0] & 0xffc0) == 0xfe80
                    || a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            }
        };
        let refuse = |why: &str| ImdsError::EndpointRefused(endpoint.to_owned(), why.to_owned());
        if !imds && !ip.is_loopback() {
            return Err(refuse("neither the metadata service's link-local address nor loopback"));
        }
        if port >= 1024 {
            return Err(refuse(&format!(
                "port {port} is not privileged: any local user could listen there and answer as IMDS"
            )));
        }
    }
    Ok(format!("http://{socket}"))
}

impl ImdsClient {
    pub fn new(config: &ImdsConfig) -> Result<Self, ImdsError> {
        let base = check_endpoint(&config.endpoint, config.allow_any_endpoint)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            // The token header must never follow a redirect to another host; IMDS never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hotplug-agent/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_millis(config.request_timeout_ms.max(1)))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms.max(1)))
            .build()
            .map_err(|e| ImdsError::Transport { path: String::new(), message: e.to_string() })?;
        Ok(Self {
            http,
            base,
            ttl: config.token_ttl_seconds.clamp(1, 21_600),
            token: Mutex::new(None),
            budget: Budget::new(config.requests_per_second),
            deadline: Duration::from_secs(config.attach_deadline_seconds.max(1)),
            requests: AtomicU64::new(0),
            primary_mac: Mutex::new(None),
        })
    }

    /// HTTP requests sent so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn attach_deadline(&self) -> Duration {
        self.deadline
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<reqwest::Response, ImdsError> {
        self.budget.acquire().await;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = request.send().await;
        let outcome = match &sent {
            Ok(response) => match response.status().as_u16() {
                200..=299 => "ok",
                404 => "not-found",
                400..=499 => "http-4xx",
                500..=599 => "http-5xx",
                _ => "http-other",
            },
            Err(error) if error.is_timeout() => "timeout",
            Err(_) => "error",
        };
        crate::metrics::global().imds_request(outcome);
        sent.map_err(|e| ImdsError::Transport { path: path.to_owned(), message: crate::error_chain(&e) })
    }

    async fn token(&self, renew: bool) -> Result<String, ImdsError> {
        let mut token = self.token.lock().await;
        if let Some(t) = token.as_ref().filter(|t| !renew && Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let path = "/latest/api/token";
        let request = self
            .http
            .put(format!("{}{path}", self.base))
            .header("X-aws-ec2-metadata-token-ttl-seconds", self.ttl.to_string());
        let response = self.send(request, path).await?;
        match response.status().as_u16() {
            200 => {}
            403 => return Err(ImdsError::Disabled),
            status => return Err(ImdsError::Status { path: path.into(), status }),
        }
        let body = read_limited(response, path).await?;
        let value = parse::text(path, &body)?.trim().to_owned();
        if value.is_empty() || value.len() > 512 || !value.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Malformed { key: path.into(), problem: "not a token".into() }.into());
        }
        // Renew well before expiry: at 80 % of the TTL.
        let renew_at = Instant::now() + Duration::from_secs(u64::from(self.ttl)) * 4 / 5;
        *token = Some(Token { value: value.clone(), renew_at });
        Ok(value)
    }

    /// One GET of a metadata key; a 401 renews the token once.
    async fn get(&self, key: &str) -> Result<Fetched, ImdsError> {
        let path = format!("/latest/meta-data/{key}");
        for renew in [false, true] {
            let token = self.token(renew).await?;
            let request =
                self.http.get(format!("{}{path}", self.base)).header("X-aws-ec2-metadata-token", token);
            let response = self.send(request, &path).await?;
            match response.status().as_u16() {
                200 => {
                    let body = read_limited(response, &path).await?;
                    return Ok(Fetched::Value(parse::text(key, &body)?.to_owned()));
                }
                404 => return Ok(Fetched::NotFound),
                401 if !renew => continue,
                403 => return Err(ImdsError::Disabled),
                status => return Err(ImdsError::Status { path, status }),
            }
        }
        Err(ImdsError::Status { path, status: 401 })
    }

    /// The instance's primary MAC, asked once and remembered once it parses (`None` while IMDS
    /// has no `mac`); a malformed answer is an error and never remembered.
    async fn primary_mac(&self) -> Result<Option<String>, ImdsError> {
        if let Some(mac) = self.primary_mac.lock().await.clone() {
            return Ok(Some(mac));
        }
        match self.get("mac").await? {
            Fetched::Value(value) => {
                let mac = parse::mac("meta-data/mac", &value)?;
                *self.primary_mac.lock().await = Some(mac.clone());
                Ok(Some(mac))
            }
            Fetched::NotFound => Ok(None),
        }
    }

    /// The NIC's network keys, or `None` while IMDS does not list the MAC.
    pub async fn nic(&self, mac: &str) -> Result<Option<NicMetadata>, ImdsError> {
        let mac = parse::mac("mac", mac)?;
        let base = format!("network/interfaces/macs/{mac}");
        let value = |fetched: Fetched| match fetched {
            Fetched::Value(v) => Some(v),
            Fetched::NotFound => None,
        };
        let Some(device_number) = value(self.get(&format!("{base}/device-number")).await?) else {
            return Ok(None);
        };
        let Some(local_ipv4s) = value(self.get(&format!("{base}/local-ipv4s")).await?) else {
            return Ok(None);
        };
        let Some(subnet_ipv4_cidr_block) = value(self.get(&format!("{base}/subnet-ipv4-cidr-block")).await?)
        else {
            return Ok(None);
        };
        let network_card = value(self.get(&format!("{base}/network-card")).await?);
        let primary_mac = self.primary_mac().await?;
        let ipv6s = value(self.get(&format!("{base}/ipv6s")).await?);
        let interface_id = value(self.get(&format!("{base}/interface-id")).await?);
        // Absent (a 404) when the ENI has no delegated prefix; any other failure is an error and
        // the whole look-up is asked again (amazon-ec2-net-utils takes every error for "none").
        let ipv4_prefix = value(self.get(&format!("{base}/ipv4-prefix")).await?);
        let ipv6_prefix = value(self.get(&format!("{base}/ipv6-prefix")).await?);
        let subnet_ipv6_cidr_blocks = match (&ipv6s, &ipv6_prefix) {
            (None, None) => None,
            _ => value(self.get(&format!("{base}/subnet-ipv6-cidr-blocks")).await?),
        };
        let values = NicValues {
            mac: &mac,
            device_number: &device_number,
            network_card: network_card.as_deref(),
            primary_mac: primary_mac.as_deref(),
            local_ipv4s: &local_ipv4s,
            subnet_ipv4_cidr_block: &subnet_ipv4_cidr_block,
            ipv6s: ipv6s.as_deref(),
            subnet_ipv6_cidr_blocks: subnet_ipv6_cidr_blocks.as_deref(),
            interface_id: interface_id.as_deref(),
            ipv4_prefix: ipv4_prefix.as_deref(),
            ipv6_prefix: ipv6_prefix.as_deref(),
        };
        Ok(Some(NicMetadata::parse(&values)?))
    }

    /// Asks until IMDS lists the NIC (it lags an attach), retrying transport errors and 5xx, with
    /// backoff, within the deadline. A 403 or a malformed value stops at once.
    ///
    /// `ready` says whether an answer is final; its reason for not (a secondary NIC listed with
    /// device-number 0 before IMDS has propagated it) is retried like an unpublished NIC.
    pub async fn nic_until_published(
        &self,
        mac: &str,
        deadline: Duration,
        ready: impl Fn(&NicMetadata) -> Result<(), String>,
    ) -> Result<NicMetadata, ImdsError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match self.nic(mac).await {
                Ok(Some(metadata)) => match ready(&metadata) {
                    Ok(()) => return Ok(metadata),
                    Err(why) => why,
                },
                Ok(None) => "not published yet".to_owned(),
                Err(
                    error @ (ImdsError::Disabled | ImdsError::Malformed(_) | ImdsError::EndpointRefused(..)),
                ) => {
                    return Err(error);
                }
                Err(error) => error.to_string(),
            };
            let delay = backoff.next_delay();
            if started.elapsed() + delay >= deadline {
                return Err(ImdsError::Deadline {
                    attempts,
                    elapsed_ms: started.elapsed().as_millis(),
                    last,
                });
            }
            tracing::debug!(%mac, attempts, ?delay, "IMDS: {last}; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

async fn read_limited(mut response: reqwest::Response, path: &str) -> Result<Vec<u8>, ImdsError> {
    if response.content_length().is_some_and(|l| l > parse::MAX_VALUE_BYTES as u64) {
        return Err(Malformed {
            key: path.into(),
            problem: format!("more than the {} bytes accepted", parse::MAX_VALUE_BYTES),
        }
        .into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ImdsError::Transport { path: path.into(), message: crate::error_chain(&e) })?
    {
        body.extend_from_slice(&chunk);
        if body.len() > parse::MAX_VALUE_BYTES {
            return Err(Malformed {
                key: path.into(),
                problem: format!("more than the {} bytes accepted", parse::MAX_VALUE_BYTES),
            }
            .into());
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_metadata_service_or_privileged_loopback_by_default() {
        let config = |endpoint: &str| ImdsConfig { endpoint: endpoint.into(), ..ImdsConfig::default() };
        for ok in [
            "http://169.254.169.254",
            "http://169.254.169.254/",
            "http://[fd00:ec2::254]",
            "http://127.0.0.1:80",
            "http://[::1]:80",
            "http://localhost",
        ] {
            assert!(ImdsClient::new(&config(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.1",
            "http://[2001:db8::1]",
            "http://127.0.0.1:8169",
            "http://169.254.169.254:8080",
        ] {
            assert!(
                matches!(ImdsClient::new(&config(refused)), Err(ImdsError::EndpointRefused(..))),
                "{refused}"
            );
        }
        for bad in [
            "https://169.254.169.254",
            // A string check once read this as host 169.254.169.254.
            "http://169.254.169.254:x@10.0.0.5/",
            "http://user@169.254.169.254/",
            "http://169.254.169.254/latest",
            "http://imds.example.invalid",
            "169.254.169.254",
        ] {
            assert!(matches!(ImdsClient::new(&config(bad)), Err(ImdsError::BadEndpoint(..))), "{bad}");
        }
        let any = ImdsConfig {
            endpoint: "http://10.0.0.1:8080".into(),
            allow_any_endpoint: true,
            ..ImdsConfig::default()
        };
        assert!(ImdsClient::new(&any).is_ok());
    }

    #[test]
    fn the_token_is_never_printed() {
        let token = Token { value: "AQAEAsecret".into(), renew_at: Instant::now() };
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    }
}
