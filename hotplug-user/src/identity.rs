//! A NIC's identity across a driver reload: names and ifindexes change, the MAC does not.

/// The identity the agent keys a NIC by: its permanent MAC; without one, its current MAC for a
/// device on a bus (drivers keep it across a reload); for a virtual link (VLAN, bond, bridge,
/// veth: they borrow or invent MACs) its current MAC and name, so that it never takes a
/// physical NIC's place.
pub fn nic_key(permanent: Option<&str>, current: &str, name: &str, is_virtual: bool) -> String {
    match permanent {
        Some(permanent) => permanent.to_ascii_lowercase(),
        None if is_virtual => format!("{}@{name}", current.to_ascii_lowercase()),
        None => current.to_ascii_lowercase(),
    }
}

/// `aa:bb:cc:dd:ee:ff` for the first `len` bytes.
pub fn format_mac(bytes: &[u8], len: usize) -> String {
    let len = len.min(bytes.len());
    bytes[..len].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
