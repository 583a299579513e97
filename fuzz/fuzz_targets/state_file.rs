//! A state file read back from disk (the agent's own in any format, release 0.1.0's, or one an
//! attacker or a crash left): it decodes or is refused; its summaries are made again from its
//! messages; what it turns into is restored only onto the NIC given, with none of the kernel's
//! transient flags, and the start-up decision is total.
#![no_main]
use hotplug::{
    control::AttachStatus,
    decide::startup::{reconcile, Persisted},
    state::{decode, Decoded, Nic},
    reconfigure::restore::{replay_plan, RestoreOptions},
};
use libfuzzer_sys::fuzz_target;
use rtnetlink::packet_route::route::{RouteAttribute, RouteFlags};

const IFINDEX: u32 = 7;

fuzz_target!(|data: &[u8]| {
    let Ok(Decoded { nic: mut nic, .. }) = decode::<Nic>(data) else { return };
    let _ = nic.refresh_summaries();
    for configured_by_hand in [false, true] {
        let persisted = Persisted {
            state: &nic.record.state,
            pending_restore: nic.pending_restore.is_some(),
            attach_waiting: nic.attach.as_ref().is_some_and(|a| a.status == AttachStatus::WaitingForImds),
            configured_by_hand,
        };
        let _ = reconcile(Some(persisted), Some(IFINDEX));
        let _ = reconcile(Some(persisted), None);
    }
    let snapshots = nic.snapshot.iter().chain(nic.pending_restore.as_ref().map(|p| &p.snapshot));
    for snapshot in snapshots {
        for leave_dynamic in [false, true] {
            let options = RestoreOptions {
                leave_dynamic,
                now_ns: snapshot.taken_ns.saturating_add(5_000_000_000),
                routes_and_rules_only: false,
            };
            let plan = replay_plan(snapshot, IFINDEX, options);
            for (_, address) in &plan.addresses {
                assert_eq!(address.header.index, IFINDEX, "an address restored onto another NIC");
            }
            for (_, route) in &plan.routes {
                assert!((route.header.flags & !RouteFlags::Onlink).is_empty(), "kernel route flags replayed");
                for attribute in &route.attributes {
                    if let RouteAttribute::Oif(oif) = attribute {
                        assert_eq!(*oif, IFINDEX, "a route restored through another NIC");
                    }
                }
            }
        }
    }
});
