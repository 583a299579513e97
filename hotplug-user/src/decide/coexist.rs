//! How the agent shares NICs with the host's other network managers (`crate::managers`): when a
//! returning NIC is restored and what of its snapshot is replayed, who configures a NIC really
//! attached, and whether the start-up pass may configure a NIC it finds unconfigured.
use crate::{
    config::{ManagerMode, PolicyKind},
    managers::Manager,
};

/// How a NIC is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestorePlan {
    /// Wait until udev is done with the returning NIC: it renames it and starts what others hang
    /// on its uevent (renaming it under udev, or setting it up before udev renamed it, fails).
    #[serde(default)]
    pub wait_for_udev: bool,
    /// Wait until the NIC's manager has configured it, then add what it did not: restoring first
    /// would have networkd delete the restored objects as foreign when it configures the link.
    pub wait_for_manager: bool,
    /// Leave addresses with a lifetime and DHCP routes to the manager's DHCP client, which gets a
    /// fresh lease (replaying the old one would only give it a stale lifetime).
    pub leave_dynamic: bool,
    /// Put back only missing routes and rules: the link itself (name, MTU, admin state) and its
    /// addresses are its manager's.
    #[serde(default)]
    pub routes_and_rules_only: bool,
}

/// The plan for a NIC back after a driver reload.
pub fn restore_plan(manager: Option<Manager>, mode: ManagerMode, udev_running: bool) -> RestorePlan {
    let plan = RestorePlan {
        wait_for_udev: udev_running,
        wait_for_manager: false,
        leave_dynamic: false,
        routes_and_rules_only: false,
    };
    match (mode, manager) {
        // ifupdown: its `ifdown` (the removal's, run late) would flush a restore made before it,
        // and its `ifup` fails on an address already there.
        (ManagerMode::Auto, Some(Manager::Networkd | Manager::Ec2NetUtils | Manager::Ifupdown)) => {
            RestorePlan { wait_for_manager: true, leave_dynamic: true, ..plan }
        }
        // NetworkManager re-activates the device's profile on its own, its DHCP included: its
        // leases are its own. It does not remove what others add, so nothing waits for it.
        (ManagerMode::Auto, Some(Manager::NetworkManager)) => RestorePlan { leave_dynamic: true, ..plan },
        (ManagerMode::None, _) | (ManagerMode::Auto, None) => plan,
    }
}

/// Routes and rules only, once the NIC's manager is done: how what a manager dropped, or what a
/// restore ahead of it could not put back, goes back.
const ROUTES_AND_RULES_AFTER_MANAGER: RestorePlan = RestorePlan {
    wait_for_udev: false,
    wait_for_manager: true,
    leave_dynamic: true,
    routes_and_rules_only: true,
};

/// What networkd (re)configuring a link it manages looks like to the agent.
#[derive(Clone, Copy, Debug)]
pub struct ManagerCycle {
    pub manager: Option<Manager>,
    pub mode: ManagerMode,
    /// Routes and rules of the last snapshot, not networkd's own, that the new one lacks.
    pub lost_foreign: usize,
    /// networkd is configuring the link, or touched it in the last few seconds.
    pub networkd_touched: bool,
    /// The link is administratively up (an operator who sets it down takes its routes with it).
    pub admin_up: bool,
    /// A restore of this NIC is pending already.
    pub restoring: bool,
}

/// After networkd (re)configured a link it manages (`networkctl reconfigure`, a reload that
/// changed its `.network`), whether the routes and rules it dropped that were not its own go
/// back, and how: once it is done, those only. Not when an operator's own doing explains the
/// loss (`ip route del` leaves networkd's state alone; `ip link set down` drops the routes).
pub fn restore_after_manager(cycle: ManagerCycle) -> Option<RestorePlan> {
    let networkd = matches!(cycle.manager, Some(Manager::Networkd | Manager::Ec2NetUtils));
    (cycle.mode == ManagerMode::Auto
        && networkd
        && cycle.lost_foreign > 0
        && cycle.networkd_touched
        && cycle.admin_up
        && !cycle.restoring)
        .then_some(ROUTES_AND_RULES_AFTER_MANAGER)
}

/// How a restore that waited for the NIC's manager turned out.
#[derive(Clone, Copy, Debug)]
pub struct Replayed {
    pub plan: RestorePlan,
    /// The manager was done when the restore ran (false: the wait ran out and it went ahead).
    pub manager_done: bool,
    /// Something could not be put back (an error, or a difference read back).
    pub incomplete: bool,
    /// This restore was itself the replay this function asks for.
    pub replay: bool,
}

/// Whether what a restore could not put back is replayed once the NIC's manager is done. Only
/// when the restore went ahead because the manager had not configured the NIC in time -- a route
/// through the address its DHCP client has not got back yet fails with ENETUNREACH -- and only
/// once: routes and rules, after another wait (the link and addresses are the manager's).
pub fn replay_when_manager_done(replayed: Replayed) -> Option<RestorePlan> {
    (replayed.plan.wait_for_manager && !replayed.manager_done && replayed.incomplete && !replayed.replay)
        .then_some(ROUTES_AND_RULES_AFTER_MANAGER)
}

/// What the agent sees of a NIC re-read shortly after it restored it from a driver reload.
#[derive(Clone, Copy, Debug)]
pub struct AfterRestore {
    pub mode: ManagerMode,
    /// The restore ended less than the settle window ago.
    pub settling: bool,
    /// Objects the restore put back (addresses without a lifetime, routes but a lease's, rules)
    /// that the NIC lacks now.
    pub lost: usize,
    /// The link is administratively up (an operator who sets it down takes its routes with it).
    pub admin_up: bool,
    /// A restore of this NIC is pending already.
    pub restoring: bool,
    /// The NIC's manager (its `ifup` is what comes after an `ifdown`).
    pub manager: Option<Manager>,
}

/// Whether a loss right after a restore is a peer's teardown to undo -- never the operator's new
/// configuration. ifupdown's `ifdown` for the removal can run after the NIC is back and restored,
/// flushing it, and its `ifup` then puts back only the stanza: taken as the NIC's configuration,
/// that reduced set would be all every later reload restores. Within the settle window the agent
/// keeps the restored snapshot and puts back what went, once the manager is done again (or at
/// once when there is none to wait for). Once per restore.
pub fn teardown_after_restore(after: AfterRestore) -> Option<RestorePlan> {
    (after.mode == ManagerMode::Auto
        && after.settling
        && after.lost > 0
        && after.admin_up
        && !after.restoring)
        .then_some(RestorePlan {
            wait_for_udev: false,
            wait_for_manager: matches!(
                after.manager,
                Some(Manager::Networkd | Manager::Ec2NetUtils | Manager::Ifupdown)
            ),
            leave_dynamic: true,
            routes_and_rules_only: false,
        })
}

/// Whether persisted state belongs to this boot: only then may it be restored. State written by
/// an agent that recorded no boot id is taken as this boot's (it predates the field).
pub fn same_boot(written_in: &str, now: &str) -> bool {
    written_in.is_empty() || written_in == now
}

/// Who configures a NIC really attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOwner {
    /// The agent, through its IMDS client.
    Agent,
    /// cloud-init's hotplug hook (the gate passes real attaches to it).
    CloudInit,
    /// Nobody: the policy says another manager owns the NIC.
    None,
}

/// cloud-init's hotplug hook on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudInitHotplug {
    /// No hook (its udev rule is not installed).
    Absent,
    /// Installed, and `cloud-init-hotplugd.socket` is listening.
    Listening,
    /// Installed, but its socket is not listening (failed, say, after its trigger limit): the
    /// uevents its rule writes reach nobody.
    NotListening,
}

pub fn attach_owner(policy: PolicyKind, cloud_init_hotplug: CloudInitHotplug) -> AttachOwner {
    match (policy, cloud_init_hotplug) {
        (PolicyKind::Ignore, _) => AttachOwner::None,
        (_, CloudInitHotplug::Listening) => AttachOwner::CloudInit,
        (_, CloudInitHotplug::Absent | CloudInitHotplug::NotListening) => AttachOwner::Agent,
    }
}

/// What the start-up pass knows of a NIC present when the agent starts.
#[derive(Clone, Copy, Debug)]
pub struct Unconfigured {
    /// The agent had state for it (it is not new).
    pub known: bool,
    /// It carries an address somebody configured.
    pub configured: bool,
    /// A virtual link (VLAN, bridge, veth): nothing IMDS could know.
    pub virtual_link: bool,
    pub policy: PolicyKind,
    /// Another manager configures NICs on this host (at boot the agent starts before them).
    pub other_managers: bool,
}

/// Whether the start-up pass looks a NIC up in IMDS (once) and configures it: only a physical
/// NIC the agent never saw, that nobody configured, on a host where nothing else would.
pub fn startup_lookup(nic: Unconfigured) -> bool {
    !nic.known
        && !nic.configured
        && !nic.virtual_link
        && nic.policy != PolicyKind::Ignore
        && !nic.other_managers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networkd_nics_wait_and_keep_their_leases() {
        for manager in [Manager::Networkd, Manager::Ec2NetUtils, Manager::Ifupdown] {
            let plan = restore_plan(Some(manager), ManagerMode::Auto, true);
            assert!(plan.wait_for_udev && plan.wait_for_manager && plan.leave_dynamic);
            assert!(!plan.routes_and_rules_only, "a reload restores the whole NIC");
            let none = restore_plan(Some(manager), ManagerMode::None, false);
            assert!(
                !none.wait_for_manager && !none.leave_dynamic,
                "the operator said nothing else manages it"
            );
        }
        let bare = restore_plan(None, ManagerMode::Auto, false);
        assert!(
            !bare.wait_for_udev && !bare.wait_for_manager && !bare.leave_dynamic,
            "a busybox host: at once"
        );
        let nm = restore_plan(Some(Manager::NetworkManager), ManagerMode::Auto, true);
        assert!(!nm.wait_for_manager && nm.leave_dynamic && nm.wait_for_udev);
    }

    #[test]
    fn what_networkd_drops_goes_back_what_an_operator_deletes_stays() {
        let cycle = ManagerCycle {
            manager: Some(Manager::Networkd),
            mode: ManagerMode::Auto,
            lost_foreign: 2,
            networkd_touched: true,
            admin_up: true,
            restoring: false,
        };
        let plan = restore_after_manager(cycle).map(|p| (p.wait_for_manager, p.routes_and_rules_only));
        assert_eq!(plan, Some((true, true)), "routes and rules only, once networkd is done");
        assert!(
            restore_after_manager(ManagerCycle { manager: Some(Manager::Ec2NetUtils), ..cycle }).is_some()
        );
        for (why, other) in [
            ("networkd did nothing: the operator did", ManagerCycle { networkd_touched: false, ..cycle }),
            ("nothing lost", ManagerCycle { lost_foreign: 0, ..cycle }),
            ("a restore is under way", ManagerCycle { restoring: true, ..cycle }),
            ("the operator set it down", ManagerCycle { admin_up: false, ..cycle }),
            ("manager = none", ManagerCycle { mode: ManagerMode::None, ..cycle }),
            ("no networkd", ManagerCycle { manager: None, ..cycle }),
        ] {
            assert!(restore_after_manager(other).is_none(), "{why}");
        }
    }

    #[test]
    fn a_restore_ahead_of_a_late_manager_replays_what_failed_once() {
        let plan = restore_plan(Some(Manager::Ec2NetUtils), ManagerMode::Auto, true);
        let late = Replayed { plan, manager_done: false, incomplete: true, replay: false };
        let again = replay_when_manager_done(late);
        assert_eq!(
            again.map(|p| (p.wait_for_manager, p.routes_and_rules_only, p.wait_for_udev)),
            Some((true, true, false)),
            "routes and rules, once the manager is done"
        );
        for (why, other) in [
            (
                "the manager was done: waiting again would change nothing",
                Replayed { manager_done: true, ..late },
            ),
            ("nothing failed", Replayed { incomplete: false, ..late }),
            ("the replay itself failed: once only", Replayed { replay: true, ..late }),
            (
                "no manager was waited for",
                Replayed { plan: restore_plan(None, ManagerMode::Auto, true), ..late },
            ),
        ] {
            assert!(replay_when_manager_done(other).is_none(), "{why}");
        }
    }

    #[test]
    fn a_teardown_right_after_a_restore_is_undone_not_adopted() {
        let after = AfterRestore {
            mode: ManagerMode::Auto,
            settling: true,
            lost: 2,
            admin_up: true,
            restoring: false,
            manager: Some(Manager::Ifupdown),
        };
        let plan = teardown_after_restore(after);
        assert_eq!(
            plan.map(|p| (p.wait_for_manager, p.routes_and_rules_only, p.leave_dynamic)),
            Some((true, false, true)),
            "addresses too, once ifup is done, leases left to it"
        );
        assert!(
            teardown_after_restore(AfterRestore { manager: None, ..after })
                .is_some_and(|p| !p.wait_for_manager),
            "nobody to wait for: at once"
        );
        for (why, other) in [
            ("long after the restore: the operator's doing", AfterRestore { settling: false, ..after }),
            ("nothing lost", AfterRestore { lost: 0, ..after }),
            ("the link set down", AfterRestore { admin_up: false, ..after }),
            ("a restore already pending", AfterRestore { restoring: true, ..after }),
            (
                "manager = none: the operator said nobody else touches it",
                AfterRestore { mode: ManagerMode::None, ..after },
            ),
        ] {
            assert!(teardown_after_restore(other).is_none(), "{why}");
        }
    }

    #[test]
    fn state_from_another_boot_is_never_restored() {
        assert!(same_boot("b1", "b1"));
        assert!(!same_boot("b0", "b1"));
        assert!(same_boot("", "b1"), "written before boot ids were recorded");
    }

    #[test]
    fn attaches_go_to_cloud_init_when_its_hook_runs() {
        use CloudInitHotplug::{Absent, Listening, NotListening};
        assert_eq!(attach_owner(PolicyKind::Restore, Listening), AttachOwner::CloudInit);
        assert_eq!(attach_owner(PolicyKind::Restore, Absent), AttachOwner::Agent);
        // Its socket failed: nobody would configure the NIC.
        assert_eq!(attach_owner(PolicyKind::Restore, NotListening), AttachOwner::Agent);
        assert_eq!(attach_owner(PolicyKind::Command, Absent), AttachOwner::Agent);
        assert_eq!(attach_owner(PolicyKind::Ignore, Absent), AttachOwner::None);
        assert_eq!(attach_owner(PolicyKind::Ignore, NotListening), AttachOwner::None);
    }

    #[test]
    fn the_start_up_pass_leaves_nics_to_other_managers() {
        let bare = Unconfigured {
            known: false,
            configured: false,
            virtual_link: false,
            policy: PolicyKind::Restore,
            other_managers: false,
        };
        assert!(startup_lookup(bare));
        assert!(
            !startup_lookup(Unconfigured { other_managers: true, ..bare }),
            "networkd or cloud-init will"
        );
        assert!(!startup_lookup(Unconfigured { known: true, ..bare }));
        assert!(!startup_lookup(Unconfigured { configured: true, ..bare }));
        assert!(!startup_lookup(Unconfigured { virtual_link: true, ..bare }));
        assert!(!startup_lookup(Unconfigured { policy: PolicyKind::Ignore, ..bare }));
    }
}
