//! How the agent shares NICs with the host's other network managers (`crate::managers`): when a
//! returning NIC is restored and what of its snapshot is replayed, who configures a NIC really
//! attached, and whether the start-up pass may configure a NIC it finds unconfigured.
use crate::{
    config::{ManagerMode, PolicyKind},
    managers::Manager,
};

/// How a NIC that came back after a driver reload is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// Wait until the NIC's manager has configured it, then add what it did not: restoring first
    /// would have networkd delete the restored objects as foreign when it configures the link.
    pub wait_for_manager: bool,
    /// Leave addresses with a lifetime and DHCP routes to the manager's DHCP client, which gets a
    /// fresh lease (replaying the old one would only give it a stale lifetime).
    pub leave_dynamic: bool,
}

pub fn restore_plan(manager: Option<Manager>, mode: ManagerMode) -> RestorePlan {
    match (mode, manager) {
        (ManagerMode::Auto, Some(Manager::Networkd | Manager::Ec2NetUtils)) => {
            RestorePlan { wait_for_manager: true, leave_dynamic: true }
        }
        // NetworkManager re-activates the device's profile on its own (DHCP included); it does
        // not remove what others add, so what it does not own goes back at once.
        (ManagerMode::Auto, Some(Manager::NetworkManager)) => {
            RestorePlan { wait_for_manager: false, leave_dynamic: true }
        }
        (ManagerMode::None, _) | (ManagerMode::Auto, None) => {
            RestorePlan { wait_for_manager: false, leave_dynamic: false }
        }
    }
}

/// After networkd (re)configured a link it manages (`networkctl reconfigure`, a reload that
/// changed its `.network`), whether the routes and rules it dropped that were not its own go
/// back: when it dropped some, and nothing is being restored already. An operator's own `ip route
/// del` leaves networkd's state alone, and stays.
pub fn restore_after_manager(
    manager: Option<Manager>,
    lost_foreign: usize,
    networkd_touched: bool,
    restoring: bool,
) -> bool {
    matches!(manager, Some(Manager::Networkd | Manager::Ec2NetUtils))
        && lost_foreign > 0
        && networkd_touched
        && !restoring
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

pub fn attach_owner(policy: PolicyKind, cloud_init_hotplug: bool) -> AttachOwner {
    match (policy, cloud_init_hotplug) {
        (PolicyKind::Ignore, _) => AttachOwner::None,
        (_, true) => AttachOwner::CloudInit,
        (_, false) => AttachOwner::Agent,
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
        for manager in [Manager::Networkd, Manager::Ec2NetUtils] {
            assert_eq!(
                restore_plan(Some(manager), ManagerMode::Auto),
                RestorePlan { wait_for_manager: true, leave_dynamic: true }
            );
            assert_eq!(
                restore_plan(Some(manager), ManagerMode::None),
                RestorePlan { wait_for_manager: false, leave_dynamic: false },
                "the operator said nothing else manages it"
            );
        }
        assert_eq!(
            restore_plan(None, ManagerMode::Auto),
            RestorePlan { wait_for_manager: false, leave_dynamic: false }
        );
        assert!(!restore_plan(Some(Manager::NetworkManager), ManagerMode::Auto).wait_for_manager);
    }

    #[test]
    fn what_networkd_drops_goes_back_what_an_operator_deletes_stays() {
        assert!(restore_after_manager(Some(Manager::Networkd), 2, true, false));
        assert!(restore_after_manager(Some(Manager::Ec2NetUtils), 1, true, false));
        assert!(
            !restore_after_manager(Some(Manager::Networkd), 2, false, false),
            "networkd did nothing: the operator did"
        );
        assert!(!restore_after_manager(Some(Manager::Networkd), 0, true, false));
        assert!(
            !restore_after_manager(Some(Manager::Networkd), 2, true, true),
            "a restore is already under way"
        );
        assert!(!restore_after_manager(None, 2, true, false));
    }

    #[test]
    fn attaches_go_to_cloud_init_when_its_hook_runs() {
        assert_eq!(attach_owner(PolicyKind::Restore, true), AttachOwner::CloudInit);
        assert_eq!(attach_owner(PolicyKind::Restore, false), AttachOwner::Agent);
        assert_eq!(attach_owner(PolicyKind::Command, false), AttachOwner::Agent);
        assert_eq!(attach_owner(PolicyKind::Ignore, false), AttachOwner::None);
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
