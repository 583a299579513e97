//! Where a NIC is reconfigured: restoring a snapshot over netlink (`restore`), or handing the NIC
//! to a site's own command (`command`).
pub mod attach;
pub mod command;
pub mod restore;

/// Whether a netlink request failed with `errno` (e.g. EEXIST: already there, which is fine).
pub(crate) fn failed_with(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message) if message.raw_code() == -errno)
}
