//! rtnetlink link notifications and dumps: what degraded mode watches instead of the eBPF hooks,
//! and what a consumer resynchronises from after kernel events were lost.
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        RouteNetlinkMessage,
    },
    MulticastGroup,
};
use serde::Serialize;
use thiserror::Error;

use crate::identity::format_mac;

#[derive(Debug, Error)]
pub enum RtnlError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("rtnetlink request failed: {0}")]
    Request(#[from] rtnetlink::Error),
    #[error("the {0} stream ended (its socket closed)")]
    Ended(&'static str),
}

/// What one RTM_NEWLINK/RTM_DELLINK message says about a link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkSnapshot {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<String>,
    pub permanent_mac: Option<String>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...): set for virtual links only.
    pub kind: Option<String>,
    /// `IFLA_NEW_NETNSID` on a deletion: the link moved to another namespace.
    pub moved_to_netns: bool,
}

impl LinkSnapshot {
    pub fn from_message(message: &LinkMessage) -> Self {
        let mut snapshot = Self {
            ifindex: message.header.index,
            name: String::new(),
            mac: None,
            permanent_mac: None,
            kind: None,
            moved_to_netns: false,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => snapshot.name.clone_from(name),
                LinkAttribute::Address(bytes) => snapshot.mac = Some(format_mac(bytes, bytes.len())),
                LinkAttribute::PermAddress(bytes) => {
                    snapshot.permanent_mac = Some(format_mac(bytes, bytes.len()));
                }
                LinkAttribute::NewNetnsId(_) => snapshot.moved_to_netns = true,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            snapshot.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        snapshot
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(name) => name.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A link notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    New(LinkSnapshot),
    Deleted(LinkSnapshot),
    /// The socket's buffer overflowed: notifications were lost (re-read the links).
    Overrun,
}

/// Every link in the caller's network namespace.
pub async fn dump_links() -> Result<Vec<LinkSnapshot>, RtnlError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    task.abort();
    Ok(links.iter().map(LinkSnapshot::from_message).collect())
}

/// Link notifications (`RTNLGRP_LINK`) as they come.
pub fn watch_links() -> Result<impl Stream<Item = LinkChange>, RtnlError> {
    let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(connection);
    Ok(messages.filter_map(|(message, _)| async move {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                Some(LinkChange::New(LinkSnapshot::from_message(&link)))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Some(LinkChange::Deleted(LinkSnapshot::from_message(&link)))
            }
            NetlinkPayload::Overrun(_) => Some(LinkChange::Overrun),
            _ => None,
        }
    }))
}
