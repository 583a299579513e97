//! Whether cloud-init's hotplug hook should handle a NIC uevent. Not when the agent knows it for
//! half of a driver reload: the agent restores that NIC from its snapshot, without the metadata
//! service, and cloud-init would crawl IMDS for minutes and re-apply its own view. Yes for a NIC
//! really attached or detached (cloud-init configures it as at boot), for a NIC whose policy is
//! not `restore`, and whenever the agent cannot tell.
use serde::{Deserialize, Serialize};

use super::NicState;
use crate::{
    classify::{Action as NicAction, Cause},
    config::PolicyKind,
};

/// The uevent cloud-init's hook was started for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UeventAction {
    Add,
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// cloud-init handles it, as it would without hotplug-agent.
    Handle,
    /// Half of a driver reload: the agent restores the NIC; cloud-init is not run.
    Skip,
    /// The agent has not seen the kernel event for this NIC yet: ask again shortly.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateAnswer {
    pub verdict: Verdict,
    pub reason: String,
}

fn answer(verdict: Verdict, reason: impl Into<String>) -> GateAnswer {
    GateAnswer { verdict, reason: reason.into() }
}

/// What the agent knows of the NIC a uevent is about.
#[derive(Clone, Copy, Debug)]
pub struct GateFacts<'a> {
    pub state: &'a NicState,
    /// The last kernel event of the NIC.
    pub last: Option<(NicAction, Cause)>,
    /// The cause of its last removal, if it had one (cloud-init's hook may ask about a removal
    /// long after the NIC came back: it handles one uevent at a time, slowly).
    pub last_removal: Option<Cause>,
    /// It registered again after its driver had left (the registration the agent restores).
    pub returned_from_driver_gone: bool,
    pub policy: PolicyKind,
}

pub fn cloud_init_gate(action: UeventAction, facts: Option<GateFacts<'_>>) -> GateAnswer {
    let Some(facts) = facts else {
        return answer(Verdict::Unknown, "hotplug-agent knows no such NIC (yet)");
    };
    if facts.policy != PolicyKind::Restore {
        return answer(Verdict::Handle, "its policy is not restore: hotplug-agent leaves it to others");
    }
    match (action, facts.last, facts.state) {
        (UeventAction::Remove, Some((NicAction::Removal, cause)), NicState::DriverGone { .. })
            if cause.expects_return() =>
        {
            answer(
                Verdict::Skip,
                format!(
                    "its driver left ({}): hotplug-agent holds its configuration until it returns",
                    cause.as_str()
                ),
            )
        }
        (UeventAction::Remove, Some((NicAction::Removal, cause)), _) => {
            answer(Verdict::Handle, format!("it left for good ({})", cause.as_str()))
        }
        // The removal half of a reload the agent has completed since.
        (UeventAction::Remove, Some((NicAction::Registration, _)), NicState::Present { .. })
            if facts.returned_from_driver_gone && facts.last_removal.is_some_and(Cause::expects_return) =>
        {
            answer(Verdict::Skip, "its driver left and came back: hotplug-agent restored its configuration")
        }
        (UeventAction::Add, Some((NicAction::Registration, cause)), NicState::Present { .. })
            if facts.returned_from_driver_gone =>
        {
            answer(
                Verdict::Skip,
                format!(
                    "its driver came back ({}): hotplug-agent restores its configuration",
                    cause.as_str()
                ),
            )
        }
        (UeventAction::Add, Some((NicAction::Registration, Cause::DeviceAdded)), _) => {
            answer(Verdict::Handle, "a NIC really attached")
        }
        (UeventAction::Add, Some((NicAction::Registration, cause)), _) => answer(
            Verdict::Handle,
            format!("registered ({}) with nothing for hotplug-agent to restore", cause.as_str()),
        ),
        // The event this uevent stands for has not reached the agent yet.
        (_, _, _) => answer(Verdict::Unknown, "the kernel event for this uevent has not been seen yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: &NicState, last: (NicAction, Cause), returned: bool) -> GateFacts<'_> {
        GateFacts {
            state,
            last: Some(last),
            last_removal: (last.0 == NicAction::Removal).then_some(last.1),
            returned_from_driver_gone: returned,
            policy: PolicyKind::Restore,
        }
    }

    #[test]
    fn a_driver_reload_is_not_cloud_inits_a_real_attach_or_detach_is() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        let back = NicState::Present { ifindex: 7, name: "eth0".into() };
        let removed = NicState::Removed { cause: Cause::DeviceRemoved, since_ns: 1 };
        let unload = (NicAction::Removal, Cause::DriverUnload);
        let load = (NicAction::Registration, Cause::DriverLoad);
        let cases = [
            (UeventAction::Remove, facts(&gone, unload, false), Verdict::Skip),
            (UeventAction::Add, facts(&back, load, true), Verdict::Skip),
            (
                UeventAction::Add,
                facts(&back, (NicAction::Registration, Cause::DriverBind), true),
                Verdict::Skip,
            ),
            (
                UeventAction::Remove,
                facts(&removed, (NicAction::Removal, Cause::DeviceRemoved), false),
                Verdict::Handle,
            ),
            (
                UeventAction::Add,
                facts(&back, (NicAction::Registration, Cause::DeviceAdded), false),
                Verdict::Handle,
            ),
            // A driver loaded for a NIC the agent held nothing for (first load after boot).
            (UeventAction::Add, facts(&back, load, false), Verdict::Handle),
            // The uevent is ahead of the kernel event the agent reads.
            (UeventAction::Add, facts(&gone, unload, false), Verdict::Unknown),
            (UeventAction::Remove, facts(&back, load, true), Verdict::Unknown),
            // cloud-init asks about the removal after the NIC came back and was restored.
            (
                UeventAction::Remove,
                GateFacts { last_removal: Some(Cause::DriverUnload), ..facts(&back, load, true) },
                Verdict::Skip,
            ),
            (
                UeventAction::Remove,
                GateFacts {
                    last_removal: Some(Cause::DeviceRemoved),
                    ..facts(&back, (NicAction::Registration, Cause::DeviceAdded), false)
                },
                Verdict::Unknown,
            ),
        ];
        for (action, facts, want) in cases {
            let got = cloud_init_gate(action, Some(facts));
            assert_eq!(got.verdict, want, "{action:?} {:?} {:?}: {}", facts.state, facts.last, got.reason);
            assert!(!got.reason.is_empty());
        }
        assert_eq!(cloud_init_gate(UeventAction::Add, None).verdict, Verdict::Unknown);
    }

    #[test]
    fn a_nic_the_agent_does_not_restore_is_left_to_cloud_init() {
        let gone = NicState::DriverGone { cause: Cause::DriverUnload, since_ns: 1, deadline_ns: 2 };
        for policy in [PolicyKind::Ignore, PolicyKind::Command] {
            let facts = GateFacts {
                state: &gone,
                last: Some((NicAction::Removal, Cause::DriverUnload)),
                last_removal: Some(Cause::DriverUnload),
                returned_from_driver_gone: false,
                policy,
            };
            assert_eq!(cloud_init_gate(UeventAction::Remove, Some(facts)).verdict, Verdict::Handle);
        }
    }
}
