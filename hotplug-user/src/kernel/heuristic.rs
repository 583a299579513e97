//! Degraded mode's classifier: without the eBPF hooks the cause of a NIC change is inferred after
//! the fact from rtnetlink link notifications, kernel uevents and sysfs, and marked
//! `source: heuristic`.
//!
//! A change is classified a short settle time after it is seen, because the uevents that explain
//! it can arrive after the rtnetlink message, and because a PCI device stays in sysfs for about
//! 50 ms after its NIC is gone during a real hot-removal (field notes §4).
//!
//! Removal: moved to another namespace (`IFLA_NEW_NETNSID`) → netns-move; a virtual link → link-
//! deleted; its PCI device gone or a PCI `remove` uevent → device-removed; its driver's module gone,
//! going, or a module `remove` uevent → driver-unload; an `unbind` uevent, or device and module
//! still there → driver-unbind. Registration: a virtual link → link-created; a PCI `add` uevent for
//! its device → device-added; a module `add` uevent for its driver → driver-load; a `bind` uevent →
//! driver-bind. Anything else is `unknown`.
use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    rtnl::{self, LinkChange, LinkSnapshot, RtnlError},
    uevent::{self, Uevent},
    KernelEvent,
};
use crate::classify::{Action, Cause, NicEvent, Source};

/// How long after a link change its cause is decided.
pub const SETTLE: Duration = Duration::from_millis(300);
/// How old a uevent may be and still explain a change.
pub const HINT_WINDOW: Duration = Duration::from_secs(5);

/// What sysfs says about a link's device, read while the link exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's own name (`0000:01:00.0`, `virtio0`).
    pub device: Option<String>,
    /// The nearest PCI device (BDF).
    pub bus: Option<String>,
    pub driver: Option<String>,
    pub module: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    Live,
    Coming,
    Going,
    Absent,
}

/// The system facts the classifier reads; a trait so tests can stand in for sysfs.
pub trait SystemView {
    fn pci_device_present(&self, bdf: &str) -> bool;
    fn module_state(&self, module: &str) -> ModuleState;
    fn link_device(&self, name: &str) -> DeviceInfo;
}

/// The real system: sysfs.
pub struct Sysfs;

fn link_target_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn is_pci_address(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && name.chars().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl SystemView for Sysfs {
    fn pci_device_present(&self, bdf: &str) -> bool {
        Path::new("/sys/bus/pci/devices").join(bdf).exists()
    }

    fn module_state(&self, module: &str) -> ModuleState {
        let dir = Path::new("/sys/module").join(module);
        if !dir.exists() {
            return ModuleState::Absent;
        }
        match std::fs::read_to_string(dir.join("initstate")).as_deref().map(str::trim) {
            Ok("going") => ModuleState::Going,
            Ok("coming") => ModuleState::Coming,
            _ => ModuleState::Live,
        }
    }

    fn link_device(&self, name: &str) -> DeviceInfo {
        let device = Path::new("/sys/class/net").join(name).join("device");
        let Ok(real) = std::fs::canonicalize(&device) else { return DeviceInfo::default() };
        let bus = real
            .ancestors()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .find(|n| is_pci_address(n));
        DeviceInfo {
            device: real.file_name().map(|n| n.to_string_lossy().into_owned()),
            bus,
            driver: link_target_name(&device.join("driver")),
            module: link_target_name(&device.join("driver/module")),
        }
    }
}

#[derive(Clone, Debug)]
struct Known {
    link: LinkSnapshot,
    device: DeviceInfo,
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    seen: Instant,
    action: Action,
    known: Known,
}

/// The classifier's state: known links, recent uevents, changes waiting to settle.
#[derive(Default)]
pub struct Heuristic {
    links: HashMap<u32, Known>,
    hints: VecDeque<(Instant, Uevent)>,
    pending: Vec<Pending>,
}

impl Heuristic {
    /// Learns the links that exist at start-up (no events for them).
    pub fn seed(&mut self, links: Vec<LinkSnapshot>, view: &dyn SystemView) {
        for link in links {
            let device = view.link_device(&link.name);
            self.links.insert(link.ifindex, Known { link, device });
        }
    }

    /// After lost link notifications: the links there are now, against the ones known. A link
    /// gone is a removal, a new ifindex a registration, each classified as if its notification
    /// had come now (the uevents and sysfs still tell most causes).
    pub fn on_overrun(&mut self, links: Vec<LinkSnapshot>, view: &dyn SystemView, now: Instant) {
        let current: HashMap<u32, LinkSnapshot> = links.into_iter().map(|l| (l.ifindex, l)).collect();
        let gone: Vec<LinkSnapshot> = self
            .links
            .values()
            .filter(|k| !current.contains_key(&k.link.ifindex))
            .map(|k| k.link.clone())
            .collect();
        for link in gone {
            self.on_link(LinkChange::Deleted(link), view, now);
        }
        for (_, link) in current {
            self.on_link(LinkChange::New(link), view, now);
        }
    }

    pub fn on_uevent(&mut self, event: Uevent, now: Instant) {
        self.hints.push_back((now, event));
        while self.hints.front().is_some_and(|(at, _)| now.duration_since(*at) > HINT_WINDOW) {
            self.hints.pop_front();
        }
    }

    pub fn on_link(&mut self, change: LinkChange, view: &dyn SystemView, now: Instant) {
        match change {
            LinkChange::New(link) => {
                let new = !self.links.contains_key(&link.ifindex);
                let device = view.link_device(&link.name);
                let known = Known { link, device };
                self.links.insert(known.link.ifindex, known.clone());
                if new {
                    self.pending.push(Pending {
                        due: now + SETTLE,
                        seen: now,
                        action: Action::Registration,
                        known,
                    });
                }
            }
            LinkChange::Overrun => {}
            LinkChange::Deleted(link) => {
                let mut known = self
                    .links
                    .remove(&link.ifindex)
                    .unwrap_or_else(|| Known { link: link.clone(), device: DeviceInfo::default() });
                known.link.moved_to_netns = link.moved_to_netns;
                self.pending.push(Pending { due: now + SETTLE, seen: now, action: Action::Removal, known });
            }
        }
    }

    /// When the next pending change is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.due).min()
    }

    /// Classifies every change whose settle time has passed.
    pub fn take_due(&mut self, view: &dyn SystemView, now: Instant, timestamp_ns: u64) -> Vec<NicEvent> {
        let (due, waiting): (Vec<Pending>, Vec<Pending>) = self.pending.drain(..).partition(|p| p.due <= now);
        self.pending = waiting;
        due.into_iter()
            .map(|p| {
                let cause = match p.action {
                    Action::Removal => self.removal_cause(&p, view),
                    Action::Registration => self.registration_cause(&p),
                };
                event(&p, cause, timestamp_ns)
            })
            .collect()
    }

    fn hint(&self, since: Instant, action: &str, matches: impl Fn(&Uevent) -> bool) -> bool {
        self.hints.iter().any(|(at, u)| *at + SETTLE >= since && u.action == action && matches(u))
    }

    fn removal_cause(&self, p: &Pending, view: &dyn SystemView) -> Cause {
        let Known { link, device } = &p.known;
        let since = p.seen.checked_sub(HINT_WINDOW).unwrap_or(p.seen);
        if link.moved_to_netns {
            return Cause::NetnsMove;
        }
        if link.kind.is_some() && device.bus.is_none() {
            return Cause::LinkDeleted;
        }
        if let Some(bus) = &device.bus {
            let pci_gone = !view.pci_device_present(bus)
                || self.hint(since, "remove", |u| u.subsystem() == Some("pci") && u.name() == bus);
            if pci_gone {
                return Cause::DeviceRemoved;
            }
        }
        if let Some(module) = &device.module {
            let unloaded = matches!(view.module_state(module), ModuleState::Going | ModuleState::Absent)
                || self.hint(since, "remove", |u| u.subsystem() == Some("module") && u.name() == module);
            if unloaded {
                return Cause::DriverUnload;
            }
        }
        let unbound = self.hint(since, "unbind", |u| {
            device.device.as_deref() == Some(u.name()) || device.bus.as_deref() == Some(u.name())
        });
        if unbound || (device.bus.is_some() && device.module.is_some()) {
            return Cause::DriverUnbind;
        }
        Cause::Unknown
    }

    fn registration_cause(&self, p: &Pending) -> Cause {
        let Known { link, device } = &p.known;
        let since = p.seen.checked_sub(HINT_WINDOW).unwrap_or(p.seen);
        if link.kind.is_some() && device.bus.is_none() {
            return Cause::LinkCreated;
        }
        if let Some(bus) = &device.bus {
            if self.hint(since, "add", |u| u.subsystem() == Some("pci") && u.name() == bus) {
                return Cause::DeviceAdded;
            }
        }
        if let Some(module) = &device.module {
            if self.hint(since, "add", |u| u.subsystem() == Some("module") && u.name() == module) {
                return Cause::DriverLoad;
            }
        }
        let bound = self.hint(since, "bind", |u| {
            device.device.as_deref() == Some(u.name()) || device.bus.as_deref() == Some(u.name())
        });
        if bound {
            return Cause::DriverBind;
        }
        Cause::Unknown
    }
}

fn event(p: &Pending, cause: Cause, timestamp_ns: u64) -> NicEvent {
    let Known { link, device } = &p.known;
    let mac = link.permanent_mac.clone().or_else(|| link.mac.clone()).unwrap_or_default();
    NicEvent {
        action: p.action,
        cause,
        source: Source::Heuristic,
        ifindex: i32::try_from(link.ifindex).unwrap_or(0),
        name: link.name.clone(),
        mac,
        permanent_mac: link.permanent_mac.clone(),
        bus: device.bus.clone(),
        driver: device.driver.clone().or_else(|| link.kind.clone()),
        module: device.module.clone(),
        context_module: None,
        task: None,
        timestamp_ns,
        netns: None,
    }
}

/// Degraded mode's event source: watches links and uevents and sends classified NIC events.
pub async fn run(tx: mpsc::Sender<KernelEvent>) -> Result<(), RtnlError> {
    use futures::StreamExt as _;

    let view = Sysfs;
    // Subscribe before the dump so that nothing falls between them.
    let links = rtnl::watch_links()?;
    tokio::pin!(links);
    let uevents = match uevent::stream() {
        Ok(stream) => stream.boxed(),
        Err(error) => {
            tracing::warn!(%error, "no uevent socket: degraded classification has fewer hints");
            futures::stream::pending().boxed()
        }
    };
    tokio::pin!(uevents);
    let mut heuristic = Heuristic::default();
    heuristic.seed(rtnl::dump_links().await?, &view);
    loop {
        let next_due = heuristic.next_due();
        tokio::select! {
            change = links.next() => match change {
                Some(LinkChange::Overrun) => {
                    tracing::warn!("link notifications lost (socket buffer overrun): re-reading every link");
                    heuristic.on_overrun(rtnl::dump_links().await?, &view, Instant::now());
                }
                Some(change) => heuristic.on_link(change, &view, Instant::now()),
                None => return Err(RtnlError::Ended("link notifications")),
            },
            event = uevents.next() => match event {
                Some(event) => heuristic.on_uevent(event, Instant::now()),
                None => return Err(RtnlError::Ended("uevent")),
            },
            () = crate::clock::sleep_until(next_due.map(Into::into)) => {}
        }
        for event in heuristic.take_due(&view, Instant::now(), crate::clock::monotonic_ns()) {
            if tx.send(KernelEvent::Nic(event)).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashSet};

    use super::*;

    #[derive(Default)]
    struct FakeSystem {
        pci: RefCell<HashSet<String>>,
        modules: RefCell<HashMap<String, ModuleState>>,
        devices: HashMap<String, DeviceInfo>,
    }

    impl SystemView for FakeSystem {
        fn pci_device_present(&self, bdf: &str) -> bool {
            self.pci.borrow().contains(bdf)
        }
        fn module_state(&self, module: &str) -> ModuleState {
            self.modules.borrow().get(module).copied().unwrap_or(ModuleState::Absent)
        }
        fn link_device(&self, name: &str) -> DeviceInfo {
            self.devices.get(name).cloned().unwrap_or_default()
        }
    }

    fn nic(ifindex: u32, name: &str) -> LinkSnapshot {
        LinkSnapshot {
            ifindex,
            name: name.into(),
            mac: Some("52:54:00:12:34:11".into()),
            permanent_mac: Some("52:54:00:12:34:11".into()),
            kind: None,
            moved_to_netns: false,
        }
    }

    fn system() -> FakeSystem {
        let mut system = FakeSystem::default();
        system.pci.borrow_mut().insert("0000:02:00.0".into());
        system.modules.borrow_mut().insert("e1000e".into(), ModuleState::Live);
        system.devices.insert(
            "eth1".into(),
            DeviceInfo {
                device: Some("0000:02:00.0".into()),
                bus: Some("0000:02:00.0".into()),
                driver: Some("e1000e".into()),
                module: Some("e1000e".into()),
            },
        );
        system
    }

    fn uevent(action: &str, devpath: &str, subsystem: &str) -> Uevent {
        let mut vars = HashMap::new();
        vars.insert("SUBSYSTEM".to_owned(), subsystem.to_owned());
        Uevent { action: action.into(), devpath: devpath.into(), vars }
    }

    /// Runs one change through the classifier and returns the cause it settles on.
    fn classify(h: &mut Heuristic, system: &FakeSystem, change: LinkChange, t0: Instant) -> Cause {
        h.on_link(change, system, t0);
        assert!(h.take_due(system, t0, 0).is_empty(), "nothing is decided before the settle time");
        let events = h.take_due(system, t0 + SETTLE, 0);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].source, Source::Heuristic);
        events[0].cause
    }

    #[test]
    fn driver_unload_then_load() {
        let system = system();
        let mut h = Heuristic::default();
        h.seed(vec![nic(3, "eth1")], &system);
        let t0 = Instant::now();
        system.modules.borrow_mut().insert("e1000e".into(), ModuleState::Absent);
        h.on_uevent(uevent("remove", "/module/e1000e", "module"), t0);
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(nic(3, "eth1")), t0), Cause::DriverUnload);
        system.modules.borrow_mut().insert("e1000e".into(), ModuleState::Live);
        let t1 = t0 + Duration::from_secs(1);
        h.on_uevent(uevent("add", "/module/e1000e", "module"), t1);
        assert_eq!(classify(&mut h, &system, LinkChange::New(nic(6, "eth1")), t1), Cause::DriverLoad);
    }

    #[test]
    fn a_quick_reload_is_still_an_unload_thanks_to_the_uevent() {
        let system = system();
        let mut h = Heuristic::default();
        h.seed(vec![nic(3, "eth1")], &system);
        let t0 = Instant::now();
        // The module is back (live) by the time the removal settles; the uevent tells the story.
        h.on_uevent(uevent("remove", "/module/e1000e", "module"), t0);
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(nic(3, "eth1")), t0), Cause::DriverUnload);
    }

    #[test]
    fn pci_removal_and_addition() {
        let system = system();
        let mut h = Heuristic::default();
        h.seed(vec![nic(3, "eth1")], &system);
        let t0 = Instant::now();
        system.pci.borrow_mut().clear();
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(nic(3, "eth1")), t0), Cause::DeviceRemoved);
        system.pci.borrow_mut().insert("0000:02:00.0".into());
        h.on_uevent(uevent("add", "/devices/pci0000:00/0000:00:02.1/0000:02:00.0", "pci"), t0);
        assert_eq!(classify(&mut h, &system, LinkChange::New(nic(8, "eth1")), t0), Cause::DeviceAdded);
    }

    #[test]
    fn unbind_and_bind() {
        let system = system();
        let mut h = Heuristic::default();
        h.seed(vec![nic(3, "eth1")], &system);
        let t0 = Instant::now();
        h.on_uevent(uevent("unbind", "/devices/pci0000:00/0000:00:02.1/0000:02:00.0", "pci"), t0);
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(nic(3, "eth1")), t0), Cause::DriverUnbind);
        h.on_uevent(uevent("bind", "/devices/pci0000:00/0000:00:02.1/0000:02:00.0", "pci"), t0);
        assert_eq!(classify(&mut h, &system, LinkChange::New(nic(7, "eth1")), t0), Cause::DriverBind);
    }

    #[test]
    fn virtual_links_and_namespace_moves() {
        let system = FakeSystem::default();
        let mut h = Heuristic::default();
        let t0 = Instant::now();
        let mut veth = nic(9, "va");
        veth.kind = Some("veth".into());
        assert_eq!(classify(&mut h, &system, LinkChange::New(veth.clone()), t0), Cause::LinkCreated);
        let mut moved = veth.clone();
        moved.moved_to_netns = true;
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(moved), t0), Cause::NetnsMove);
        assert_eq!(classify(&mut h, &system, LinkChange::Deleted(veth), t0), Cause::LinkDeleted);
    }

    #[test]
    fn updates_of_known_links_are_no_registrations_and_stale_hints_expire() {
        let system = system();
        let mut h = Heuristic::default();
        h.seed(vec![nic(3, "eth1")], &system);
        let t0 = Instant::now();
        h.on_link(LinkChange::New(nic(3, "eth1")), &system, t0);
        assert_eq!(h.next_due(), None);
        h.on_uevent(uevent("add", "/module/e1000e", "module"), t0);
        h.on_uevent(uevent("add", "/module/other", "module"), t0 + HINT_WINDOW + SETTLE * 2);
        assert_eq!(h.hints.len(), 1, "hints older than the window are dropped");
        assert!(is_pci_address("0000:02:00.0"));
        assert!(!is_pci_address("virtio0"));
    }
}
