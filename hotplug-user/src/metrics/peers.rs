//! Who holds the metrics endpoint's connections: at most [`PER_PEER`] at once per local user, so
//! that one user's idle connections cannot take every slot from the scraper. A Unix socket's
//! peer is its `SO_PEERCRED` uid; a loopback TCP peer's uid is its socket's, found in
//! `/proc/net/tcp` or `tcp6` by the connection's two ends (the owner the kernel lists for the
//! client's socket).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

/// Connections one local user may hold at once.
pub const PER_PEER: usize = 4;
/// The peer whose uid could not be read (they share one allowance).
pub const UNKNOWN: u32 = u32::MAX;

/// Connections held, by uid.
#[derive(Clone, Default)]
pub struct Peers(Arc<Mutex<HashMap<u32, usize>>>);

/// One connection's place, given back when dropped.
pub struct Held {
    peers: Peers,
    uid: u32,
}

impl Peers {
    /// A place for a connection of `uid`, unless it holds [`PER_PEER`] already.
    pub fn take(&self, uid: u32) -> Option<Held> {
        let mut held = self.0.lock().ok()?;
        let count = held.entry(uid).or_default();
        if *count >= PER_PEER {
            return None;
        }
        *count += 1;
        Some(Held { peers: self.clone(), uid })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut held) = self.peers.0.lock() {
            if let Some(count) = held.get_mut(&self.uid) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    held.remove(&self.uid);
                }
            }
        }
    }
}

/// The uid owning the local socket at `peer` connected to `ours` (both loopback), read from
/// `/proc/net/tcp` (IPv4) or `/proc/net/tcp6`.
pub fn tcp_peer_uid(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    let table = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    uid_in(&std::fs::read_to_string(table).ok()?, peer, ours)
}

/// The uid of the line whose local end is `peer` and remote end `ours`, in a `/proc/net/tcp`
/// text.
pub fn uid_in(table: &str, peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    let (local, remote) = (hex_end(peer), hex_end(ours));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (l.eq_ignore_ascii_case(&local) && r.eq_ignore_ascii_case(&remote)).then(|| uid.parse().ok())?
    })
}

/// An address and port as `/proc/net/tcp` prints them: the address's 32-bit words in the host's
/// byte order, each as 8 hex digits, then `:PORT` in hex.
fn hex_end(end: SocketAddr) -> String {
    let words: Vec<u32> = match end.ip() {
        IpAddr::V4(v4) => vec![u32::from_ne_bytes(v4.octets())],
        IpAddr::V6(v6) => {
            v6.octets().chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
    };
    let address: String = words.iter().map(|w| format!("{w:08X}")).collect();
    format!("{address}:{:04X}", end.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_holds_a_bounded_number_and_gives_them_back() {
        let peers = Peers::default();
        let held: Vec<Held> = (0..PER_PEER).filter_map(|_| peers.take(1000)).collect();
        assert_eq!(held.len(), PER_PEER);
        assert!(peers.take(1000).is_none(), "its allowance is spent");
        assert!(peers.take(0).is_some(), "another user's is not");
        drop(held);
        assert!(peers.take(1000).is_some());
    }

    #[test]
    fn a_loopback_peers_uid_is_read_from_proc_net_tcp() -> Result<(), std::net::AddrParseError> {
        // As a little-endian host prints 127.0.0.1:9464 (ours) and 127.0.0.1:41234 (the peer).
        let ours: SocketAddr = "127.0.0.1:9464".parse()?;
        let peer: SocketAddr = "127.0.0.1:41234".parse()?;
        let listening = format!("{}:24F8", hex_end(ours).split(':').next().unwrap_or_default());
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             \x20  0: {listening} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1\n\
             \x20  1: {} {} 01 00000000:00000000 00:00000000 00000000  1000        0 101 1\n\
             \x20  2: {} {} 01 00000000:00000000 00:00000000 00000000     0        0 102 1\n",
            hex_end(peer),
            hex_end(ours),
            hex_end(ours),
            hex_end(peer),
        );
        assert_eq!(uid_in(&table, peer, ours), Some(1000), "the client's socket, not the agent's end");
        let other: SocketAddr = "127.0.0.1:41235".parse()?;
        assert_eq!(uid_in(&table, other, ours), None);
        if cfg!(target_endian = "little") {
            assert_eq!(hex_end(ours), "0100007F:24F8");
        }
        Ok(())
    }
}
