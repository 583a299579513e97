//! Strict parsers for the IMDS network keys. Every value is size-limited, must be UTF-8, and a
//! malformed one is an error naming the key — nothing half-parsed is ever configured.
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The largest IMDS value accepted (a NIC has at most a few dozen addresses).
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed IMDS value for {key}: {problem}")]
pub struct Malformed {
    pub key: String,
    pub problem: String,
}

fn malformed(key: &str, problem: impl Into<String>) -> Malformed {
    Malformed { key: key.to_owned(), problem: problem.into() }
}

/// The body as UTF-8 text, within the size limit.
pub fn text<'a>(key: &str, body: &'a [u8]) -> Result<&'a str, Malformed> {
    if body.len() > MAX_VALUE_BYTES {
        return Err(malformed(
            key,
            format!("{} bytes, more than the {MAX_VALUE_BYTES} accepted", body.len()),
        ));
    }
    std::str::from_utf8(body).map_err(|e| malformed(key, format!("not UTF-8 ({e})")))
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// A MAC as IMDS and Linux write it: six lowercase or uppercase hex pairs separated by colons.
pub fn mac(key: &str, value: &str) -> Result<String, Malformed> {
    let value = value.trim();
    let parts: Vec<&str> = value.split(':').collect();
    let ok =
        parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(malformed(key, format!("{value:?} is not a MAC address")));
    }
    Ok(value.to_ascii_lowercase())
}

pub fn device_number(key: &str, value: &str) -> Result<u32, Malformed> {
    let value = value.trim();
    match value.parse::<u32>() {
        Ok(n) if n < 1000 && value.chars().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(malformed(key, format!("{value:?} is not a device number (0-999)"))),
    }
}

pub fn ipv4_list(key: &str, value: &str) -> Result<Vec<Ipv4Addr>, Malformed> {
    let list: Vec<Ipv4Addr> = lines(value)
        .map(|l| l.parse().map_err(|_| malformed(key, format!("{l:?} is not an IPv4 address"))))
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(malformed(key, "no address"));
    }
    Ok(list)
}

pub fn ipv6_list(key: &str, value: &str) -> Result<Vec<Ipv6Addr>, Malformed> {
    lines(value)
        .map(|l| l.parse().map_err(|_| malformed(key, format!("{l:?} is not an IPv6 address"))))
        .collect()
}

/// An IPv4 network: address, prefix length; the address must be the network's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The subnet's router: the first host address (what EC2 uses as the VPC router).
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    pub fn contains(self, address: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        u32::from(address) & mask == u32::from(self.network)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Net {
    pub network: Ipv6Addr,
    pub prefix: u8,
}

impl Ipv6Net {
    pub fn contains(self, address: Ipv6Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix.min(128))) };
        u128::from(address) & mask == u128::from(self.network) & mask
    }
}

fn split_cidr<'a>(key: &str, value: &'a str) -> Result<(&'a str, u8), Malformed> {
    let (address, prefix) =
        value.split_once('/').ok_or_else(|| malformed(key, format!("{value:?} has no /prefix")))?;
    let prefix_ok = !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_digit()) && prefix.len() <= 3;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|_| prefix_ok)
        .ok_or_else(|| malformed(key, format!("{value:?} has a bad prefix length")))?;
    Ok((address, prefix))
}

pub fn ipv4_cidr(key: &str, value: &str) -> Result<Ipv4Net, Malformed> {
    let value = value.trim();
    let (address, prefix) = split_cidr(key, value)?;
    let network: Ipv4Addr =
        address.parse().map_err(|_| malformed(key, format!("{value:?} is not an IPv4 CIDR")))?;
    if prefix > 32 {
        return Err(malformed(key, format!("{value:?}: prefix longer than 32")));
    }
    let net = Ipv4Net { network, prefix };
    if !net.contains(network) {
        return Err(malformed(key, format!("{value:?}: host bits set in a network address")));
    }
    Ok(net)
}

pub fn ipv6_cidrs(key: &str, value: &str) -> Result<Vec<Ipv6Net>, Malformed> {
    lines(value)
        .map(|l| {
            let (address, prefix) = split_cidr(key, l)?;
            let network: Ipv6Addr =
                address.parse().map_err(|_| malformed(key, format!("{l:?} is not an IPv6 CIDR")))?;
            if prefix > 128 {
                return Err(malformed(key, format!("{l:?}: prefix longer than 128")));
            }
            Ok(Ipv6Net { network, prefix })
        })
        .collect()
}

/// IPv4 CIDR blocks, one a line (`ipv4-prefix`: the ENI's delegated prefixes); empty is none.
pub fn ipv4_cidrs(key: &str, value: &str) -> Result<Vec<Ipv4Net>, Malformed> {
    lines(value).map(|l| ipv4_cidr(key, l)).collect()
}

/// An ENI's id as EC2 writes it (`eni-` and 8 or 17 lowercase hex digits): the agent makes it an
/// altname, so nothing else may pass (an altname shares the namespace of interface names).
pub fn interface_id(key: &str, value: &str) -> Result<String, Malformed> {
    let value = value.trim();
    let ok = value.strip_prefix("eni-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    });
    if !ok {
        return Err(malformed(key, format!("{value:?} is not an ENI id (eni- and 8 or 17 hex digits)")));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_well_formed_values() -> Result<(), Malformed> {
        assert_eq!(mac("mac", "52:54:00:AB:cd:11\n")?, "52:54:00:ab:cd:11");
        assert_eq!(device_number("device-number", "1")?, 1);
        assert_eq!(
            ipv4_list("local-ipv4s", "10.0.1.5\n10.0.1.6\n")?,
            vec![Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 6)]
        );
        let net = ipv4_cidr("subnet-ipv4-cidr-block", "10.0.1.0/24")?;
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 0, 1, 1));
        assert!(net.contains(Ipv4Addr::new(10, 0, 1, 200)) && !net.contains(Ipv4Addr::new(10, 0, 2, 1)));
        assert_eq!(ipv6_cidrs("subnet-ipv6-cidr-blocks", "fd00:1::/64")?.len(), 1);
        assert!(ipv6_list("ipv6s", "")?.is_empty());
        assert_eq!(ipv4_cidrs("ipv4-prefix", "10.0.1.16/28\n10.0.1.32/28\n")?.len(), 2);
        assert!(ipv4_cidrs("ipv4-prefix", "")?.is_empty());
        assert_eq!(interface_id("interface-id", "eni-0123456789abcdef0\n")?, "eni-0123456789abcdef0");
        assert_eq!(interface_id("interface-id", "eni-12345678")?, "eni-12345678");
        Ok(())
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        let cases: [(Result<(), Malformed>, &str); 14] = [
            (mac("mac", "52:54:00:12:34").map(|_| ()), "mac"),
            (mac("mac", "52:54:00:12:34:zz").map(|_| ()), "mac"),
            (device_number("device-number", "-1").map(|_| ()), "device-number"),
            (device_number("device-number", "+1").map(|_| ()), "device-number"),
            (ipv4_list("local-ipv4s", "10.0.1.300").map(|_| ()), "local-ipv4s"),
            (ipv4_list("local-ipv4s", "").map(|_| ()), "local-ipv4s"),
            (ipv4_cidr("subnet-ipv4-cidr-block", "10.0.1.5/24").map(|_| ()), "host bits"),
            (ipv4_cidr("subnet-ipv4-cidr-block", "10.0.1.0/33").map(|_| ()), "longer than 32"),
            (ipv4_cidr("subnet-ipv4-cidr-block", "10.0.1.0").map(|_| ()), "no /prefix"),
            (ipv6_cidrs("subnet-ipv6-cidr-blocks", "fd00::/129").map(|_| ()), "longer than 128"),
            (ipv4_cidrs("ipv4-prefix", "10.0.1.17/28").map(|_| ()), "host bits"),
            (interface_id("interface-id", "eth0").map(|_| ()), "not an ENI id"),
            (interface_id("interface-id", "eni-0123456789ABCDEF0").map(|_| ()), "not an ENI id"),
            (interface_id("interface-id", "eni-0123456789abcdef0 x").map(|_| ()), "not an ENI id"),
        ];
        for (result, expected) in cases {
            let error = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
        }
        assert!(text("ipv6s", b"\xff\xfe").is_err_and(|e| e.problem.contains("UTF-8")));
        assert!(
            text("ipv6s", &vec![b'1'; MAX_VALUE_BYTES + 1]).is_err_and(|e| e.problem.contains("more than"))
        );
    }

    proptest! {
        #[test]
        fn no_input_makes_a_parser_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(value) = text("k", &bytes) {
                let _ = mac("k", value);
                let _ = device_number("k", value);
                let _ = ipv4_list("k", value);
                let _ = ipv6_list("k", value);
                let _ = ipv4_cidr("k", value);
                let _ = ipv6_cidrs("k", value);
                let _ = ipv4_cidrs("k", value);
                let _ = interface_id("k", value);
            }
        }

        #[test]
        fn every_valid_cidr_round_trips(a in any::<u32>(), prefix in 0u8..=32) {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            let network = Ipv4Addr::from(a & mask);
            let parsed = ipv4_cidr("k", &format!("{network}/{prefix}"));
            prop_assert_eq!(parsed, Ok(Ipv4Net { network, prefix }));
        }

        #[test]
        fn ipv4_lists_round_trip(list in proptest::collection::vec(any::<u32>(), 1..8)) {
            let addresses: Vec<Ipv4Addr> = list.into_iter().map(Ipv4Addr::from).collect();
            let text = addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
            prop_assert_eq!(ipv4_list("k", &text), Ok(addresses));
        }
    }
}
