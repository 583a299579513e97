//! Where a NIC is reconfigured: restoring a snapshot over netlink (`restore`), or handing the NIC
//! to a site's own command (`command`).
pub mod attach;
pub mod command;
pub mod restore;
