//! The instance's own metadata, served with `--instance`: identity, placement and the primary
//! NIC's address, under every API version (`latest` and the dated ones such as `2021-03-23`),
//! plus `dynamic/instance-identity/document`. That is what cloud-init's Ec2 datasource crawls
//! before it trusts a metadata service; without `--instance` only the network keys are served.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::json;

/// `--instance` JSON; every field optional.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Instance {
    pub instance_id: String,
    pub instance_type: String,
    pub ami_id: String,
    pub region: String,
    pub availability_zone: String,
    pub account_id: String,
    pub architecture: String,
}

impl Default for Instance {
    fn default() -> Self {
        Self {
            instance_id: "i-0123456789abcdef0".into(),
            instance_type: "m5.large".into(),
            ami_id: "ami-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            account_id: "123456789012".into(),
            architecture: std::env::consts::ARCH.into(),
        }
    }
}

/// What the instance keys need to know of the NICs: the primary one's MAC and address.
pub struct Primary<'a> {
    pub mac: &'a str,
    pub ipv4: Option<Ipv4Addr>,
}

/// Splits `/VERSION/REST` where VERSION is `latest` or a date like `2021-03-23`.
pub fn split_version(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let dated = version.len() == 10
        && version
            .bytes()
            .enumerate()
            .all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    (version == "latest" || dated).then_some((version, rest))
}

impl Instance {
    fn hostname(primary: Option<&Primary<'_>>, region: &str) -> Option<String> {
        let ip = primary?.ipv4?.to_string().replace('.', "-");
        Some(format!("ip-{ip}.{region}.compute.internal"))
    }

    /// The keys of `meta-data/` this module answers (the network keys are the caller's): those
    /// of a real Nitro instance, so that a crawl costs what it costs there.
    pub const TOP: [&'static str; 20] = [
        "ami-id",
        "ami-launch-index",
        "ami-manifest-path",
        "block-device-mapping/",
        "events/",
        "hostname",
        "identity-credentials/",
        "instance-action",
        "instance-id",
        "instance-life-cycle",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "metrics/",
        "placement/",
        "profile",
        "reservation-id",
        "security-groups",
        "services/",
    ];

    /// Per-NIC keys a real instance has besides the network ones the mock always serves.
    pub const NIC_KEYS: [&'static str; 9] = [
        "interface-id",
        "local-hostname",
        "owner-id",
        "security-group-ids",
        "security-groups",
        "subnet-id",
        "vpc-id",
        "vpc-ipv4-cidr-block",
        "vpc-ipv4-cidr-blocks",
    ];

    /// One of [`Instance::NIC_KEYS`] for the NIC in `slot` (network card, device number) with
    /// first address `ipv4`.
    pub fn nic_key(&self, key: &str, slot: (u32, u32), ipv4: Option<Ipv4Addr>) -> Option<String> {
        let (network_card, device_number) = slot;
        match key {
            "interface-id" => Some(format!("eni-0{network_card:08x}{device_number:08x}")),
            "local-hostname" => ipv4.map(|ip| {
                format!("ip-{}.{}.compute.internal", ip.to_string().replace('.', "-"), self.region)
            }),
            "owner-id" => Some(self.account_id.clone()),
            "security-group-ids" => Some("sg-0123456789abcdef0".into()),
            "security-groups" => Some("default".into()),
            "subnet-id" => Some(format!("subnet-0{device_number:016x}")),
            "vpc-id" => Some("vpc-0123456789abcdef0".into()),
            "vpc-ipv4-cidr-block" | "vpc-ipv4-cidr-blocks" => Some("10.0.0.0/16".into()),
            _ => None,
        }
    }

    /// A listing or a leaf under `meta-data/`, for the keys of [`Instance::TOP`].
    pub fn lookup(&self, parts: &[&str], primary: Option<&Primary<'_>>) -> Option<String> {
        match parts {
            ["ami-id"] => Some(self.ami_id.clone()),
            ["instance-id"] => Some(self.instance_id.clone()),
            ["instance-type"] => Some(self.instance_type.clone()),
            ["hostname" | "local-hostname"] => Self::hostname(primary, &self.region),
            ["local-ipv4"] => primary?.ipv4.map(|ip| ip.to_string()),
            ["mac"] => primary.map(|p| p.mac.to_owned()),
            ["ami-launch-index"] => Some("0".into()),
            ["ami-manifest-path"] => Some("(unknown)".into()),
            ["block-device-mapping"] => Some("ami\nroot".into()),
            ["block-device-mapping", "ami"] => Some("/dev/xvda".into()),
            ["block-device-mapping", "root"] => Some("/dev/xvda".into()),
            ["events"] => Some("maintenance/".into()),
            ["events", "maintenance"] => Some("history\nscheduled".into()),
            ["events", "maintenance", "history" | "scheduled"] => Some("[]".into()),
            ["identity-credentials"] => Some("ec2/".into()),
            ["identity-credentials", "ec2"] => Some("info".into()),
            ["identity-credentials", "ec2", "info"] => Some(format!(
                "{{\"Code\":\"Success\",\"LastUpdated\":\"2026-11-29T00:00:00Z\",\"AccountId\":\"{}\"}}",
                self.account_id
            )),
            ["instance-action"] => Some("none".into()),
            ["instance-life-cycle"] => Some("on-demand".into()),
            ["metrics"] => Some("vhostmd".into()),
            ["metrics", "vhostmd"] => Some("<?xml version=\"1.0\" encoding=\"UTF-8\"?>".into()),
            ["placement"] => Some("availability-zone\navailability-zone-id\nregion".into()),
            ["placement", "availability-zone"] => Some(self.availability_zone.clone()),
            ["placement", "availability-zone-id"] => Some("use1-az1".into()),
            ["placement", "region"] => Some(self.region.clone()),
            ["profile"] => Some("default-hvm".into()),
            ["reservation-id"] => Some("r-0123456789abcdef0".into()),
            ["security-groups"] => Some("default".into()),
            ["services"] => Some("domain\npartition".into()),
            ["services", "domain"] => Some("amazonaws.com".into()),
            ["services", "partition"] => Some("aws".into()),
            _ => None,
        }
    }

    /// `dynamic/...`: the instance identity document and the listings above it.
    pub fn dynamic(&self, parts: &[&str], primary: Option<&Primary<'_>>) -> Option<String> {
        match parts {
            [] => Some("instance-identity/".into()),
            ["instance-identity"] => Some("document".into()),
            ["instance-identity", "document"] => Some(
                serde_json::to_string_pretty(&json!({
                    "accountId": self.account_id,
                    "architecture": self.architecture,
                    "availabilityZone": self.availability_zone,
                    "imageId": self.ami_id,
                    "instanceId": self.instance_id,
                    "instanceType": self.instance_type,
                    "pendingTime": "2026-11-29T00:00:00Z",
                    "privateIp": primary.and_then(|p| p.ipv4).map(|ip| ip.to_string()),
                    "region": self.region,
                    "version": "2017-09-30",
                }))
                .ok()?,
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_latest_or_dated() {
        assert_eq!(split_version("/latest/meta-data/mac"), Some(("latest", "meta-data/mac")));
        assert_eq!(split_version("/2021-03-23/meta-data/"), Some(("2021-03-23", "meta-data/")));
        assert_eq!(split_version("/2021-03-23"), Some(("2021-03-23", "")));
        assert_eq!(split_version("/2021-3-23/meta-data"), None);
        assert_eq!(split_version("/_mock/stats"), None);
        assert_eq!(split_version("latest/meta-data"), None);
    }

    #[test]
    fn identity_follows_the_primary_nic() {
        let instance = Instance::default();
        let primary = Primary { mac: "52:54:00:12:34:10", ipv4: Some(Ipv4Addr::new(10, 0, 0, 5)) };
        assert_eq!(instance.lookup(&["local-ipv4"], Some(&primary)).as_deref(), Some("10.0.0.5"));
        assert_eq!(
            instance.lookup(&["local-hostname"], Some(&primary)).as_deref(),
            Some("ip-10-0-0-5.us-east-1.compute.internal")
        );
        assert_eq!(instance.lookup(&["mac"], None), None);
        let document =
            instance.dynamic(&["instance-identity", "document"], Some(&primary)).unwrap_or_default();
        let document: serde_json::Value = serde_json::from_str(&document).unwrap_or_default();
        assert_eq!(document["privateIp"], "10.0.0.5");
        assert_eq!(document["instanceId"], "i-0123456789abcdef0");
    }
}
