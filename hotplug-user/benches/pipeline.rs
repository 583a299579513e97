//! Micro-benchmarks of the agent's user-space path (criterion): decoding a ring buffer record,
//! which classifies a NIC event as it builds it, the per-NIC decision, and the snapshot
//! comparisons made after every re-read and restore; and the whole path for a batch of records,
//! whose throughput is the agent's ceiling in records per second on one core.
//!
//! `cargo xtask bench micro` runs them and writes the figures to target/bench/micro.json.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hotplug::{
    classify::Cause as NicCause,
    config::PolicyKind,
    decide::{decide, Input, NicState},
    kernel::{decode::decode, KernelEvent},
    snapshot::{to_hex, Entry, NicSnapshot},
};
use hotplug_common::{Cause, EventKind, ModuleEvent, NetdevEvent};
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0; N];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

/// The bytes of a `#[repr(C)]` record as the ring buffer holds them.
fn bytes<T: Copy>(record: &T) -> Vec<u8> {
    // SAFETY: the records are repr(C) plain old data without padding (hotplug-common's tests
    // check their layouts); the slice lives no longer than `record`.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn removal(ifindex: i32) -> Vec<u8> {
    let mut event = NetdevEvent::zeroed();
    event.kind = EventKind::NetdevRemoval as u32;
    event.cause = Cause::DriverUnload as u32;
    event.timestamp_ns = 1_000_000;
    event.task.pid = 4242;
    event.task.comm = padded("modprobe");
    event.ifindex = ifindex;
    event.addr_len = 6;
    event.name = padded("ens5");
    event.perm_addr = padded("\u{2}\u{0}\u{0}\u{12}\u{34}\u{56}");
    event.dev_addr = event.perm_addr;
    event.bus_addr = padded("0000:00:05.0");
    event.driver = padded("ena");
    event.module = padded("ena");
    event.context_module = padded("ena");
    bytes(&event)
}

fn module_unload() -> Vec<u8> {
    let mut event = ModuleEvent::zeroed();
    event.kind = EventKind::ModuleUnloadBegin as u32;
    event.task.comm = padded("modprobe");
    event.name = padded("ena");
    bytes(&event)
}

fn snapshot(n: u8) -> NicSnapshot {
    let addresses = (0..n)
        .map(|i| {
            let mut message = AddressMessage::default();
            message.header.prefix_len = 24;
            message.attributes.push(AddressAttribute::Address([10, 0, i, 5].into()));
            Entry { summary: format!("10.0.{i}.5/24"), message: to_hex(&message) }
        })
        .collect();
    let routes = (0..n)
        .map(|i| {
            let mut message = RouteMessage::default();
            message.header.destination_prefix_length = 24;
            message.attributes.push(RouteAttribute::Destination(RouteAddress::Inet([192, 168, i, 0].into())));
            message.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet([10, 0, i, 1].into())));
            Entry { summary: format!("192.168.{i}.0/24 via 10.0.{i}.1"), message: to_hex(&message) }
        })
        .collect();
    NicSnapshot {
        mac: "02:00:00:12:34:56".into(),
        ifindex: 2,
        name: "ens5".into(),
        mtu: Some(9001),
        up: true,
        altnames: vec!["enp0s5".into()],
        addresses,
        routes,
        rules: Vec::new(),
        taken_ns: 1_000_000_000,
        manager: None,
        tuning: Default::default(),
    }
}

const TIMEOUT_NS: u64 = 60_000_000_000;

fn stages(c: &mut Criterion) {
    let record = removal(2);
    let module = module_unload();
    c.bench_function("decode+classify a NIC removal record", |b| b.iter(|| decode(black_box(&record))));
    c.bench_function("decode a module record", |b| b.iter(|| decode(black_box(&module))));
    let Ok(KernelEvent::Nic(event)) = decode(&record) else { panic!("the record does not decode") };
    assert_eq!(event.cause, NicCause::DriverUnload);
    let present = NicState::Present { ifindex: 2, name: "ens5".into() };
    c.bench_function("decide on a removal", |b| {
        b.iter(|| {
            decide(
                black_box(Some(&present)),
                &Input::Event(black_box(&event)),
                PolicyKind::Restore,
                TIMEOUT_NS,
            )
        })
    });
    let (want, mut have) = (snapshot(10), snapshot(10));
    have.taken_ns += 5_000_000_000;
    c.bench_function("snapshot differences, 10 addresses + 10 routes", |b| {
        b.iter(|| black_box(&want).differences(black_box(&have)))
    });
    c.bench_function("snapshot same_configuration, 10 addresses + 10 routes", |b| {
        b.iter(|| black_box(&want).same_configuration(black_box(&have)))
    });
}

/// Decoding (with classification) and the decision for a batch of records, as the agent's loop
/// does for each ring buffer record: the records per second one core can take.
fn pipeline(c: &mut Criterion) {
    const BATCH: usize = 1000;
    let records: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| if i % 4 == 0 { module_unload() } else { removal(i32::try_from(i).unwrap_or(0)) })
        .collect();
    let present = NicState::Present { ifindex: 2, name: "ens5".into() };
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode+classify+decide 1000 records", |b| {
        b.iter_batched(
            || (),
            |()| {
                let mut decided = 0usize;
                for record in &records {
                    if let Ok(KernelEvent::Nic(event)) = decode(black_box(record)) {
                        let transition =
                            decide(Some(&present), &Input::Event(&event), PolicyKind::Restore, TIMEOUT_NS);
                        decided += transition.actions.len();
                    }
                }
                decided
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, stages, pipeline);
criterion_main!(benches);
