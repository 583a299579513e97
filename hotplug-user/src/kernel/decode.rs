//! Turns ring buffer records into typed events. The eBPF side writes fixed-size `#[repr(C)]`
//! structs from `hotplug-common` whose first `u32` is an [`EventKind`].
use hotplug_common::{EventKind, ModuleEvent, NetdevEvent};

use crate::classify::NicEvent;
pub use crate::classify::{c_string, Task};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short to hold an event kind")]
    Truncated(usize),
    #[error("unknown event kind {0}: agent and eBPF object are out of step")]
    UnknownKind(u32),
    #[error("{kind:?} record has {got} bytes, expected {expected}")]
    WrongSize { kind: EventKind, got: usize, expected: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleEventKind {
    UnloadBegin,
    UnloadEnd,
    Load,
    Free,
}

/// A module lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleLifecycle {
    pub kind: ModuleEventKind,
    pub module: String,
    pub task: Task,
    /// For `unload-end`: `delete_module`'s return value (0, or a negative errno).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ret: Option<i32>,
    /// CLOCK_MONOTONIC nanoseconds when the hook fired.
    pub timestamp_ns: u64,
}

/// A kernel-side loss counter and how much it rose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CounterRise {
    pub counter: &'static str,
    pub rise: u64,
}

/// Everything the kernel side reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum KernelEvent {
    Module(ModuleLifecycle),
    Nic(NicEvent),
    /// Records were dropped in the kernel or went out incomplete: `events` records did not fit in
    /// the ring buffer; `counters` names every loss counter that rose, with its rise (a full
    /// context map, a truncated unregister batch, a failed kernel read). Whatever state a
    /// consumer built from the stream is incomplete until the `resync` that follows.
    Lost {
        events: u64,
        counters: Vec<CounterRise>,
    },
    /// Every link that exists now (an rtnetlink dump), sent after a loss.
    Resync {
        links: Vec<crate::kernel::rtnl::LinkSnapshot>,
    },
}

fn read_pod<T: Copy>(record: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let expected = std::mem::size_of::<T>();
    if record.len() != expected {
        return Err(DecodeError::WrongSize { kind, got: record.len(), expected });
    }
    // SAFETY: the length matches, `T` is a `#[repr(C)]` plain-old-data type valid for any bytes
    // (aya::Pod), and read_unaligned makes no alignment assumption about the ring buffer slot.
    Ok(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<T>()) })
}

pub fn decode(record: &[u8]) -> Result<KernelEvent, DecodeError> {
    let head: [u8; 4] =
        record.get(..4).and_then(|h| h.try_into().ok()).ok_or(DecodeError::Truncated(record.len()))?;
    let raw_kind = u32::from_ne_bytes(head);
    let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    let module_kind = match kind {
        EventKind::ModuleUnloadBegin => ModuleEventKind::UnloadBegin,
        EventKind::ModuleUnloadEnd => ModuleEventKind::UnloadEnd,
        EventKind::ModuleLoad => ModuleEventKind::Load,
        EventKind::ModuleFree => ModuleEventKind::Free,
        EventKind::NetdevRemoval | EventKind::NetdevRegistration => {
            let record: NetdevEvent = read_pod(record, kind)?;
            return Ok(KernelEvent::Nic(NicEvent::from_kernel(&record)));
        }
    };
    let event: ModuleEvent = read_pod(record, kind)?;
    Ok(KernelEvent::Module(ModuleLifecycle {
        kind: module_kind,
        module: c_string(&event.name),
        task: Task::from_kernel(&event.task),
        ret: (kind == EventKind::ModuleUnloadEnd).then_some(event.ret),
        timestamp_ns: event.timestamp_ns,
    }))
}

#[cfg(test)]
mod tests {
    use hotplug_common::{TaskInfo, MODULE_NAME_LEN, TASK_COMM_LEN};

    use super::*;

    fn record(event: &ModuleEvent) -> Vec<u8> {
        // SAFETY: ModuleEvent is repr(C) plain old data with no padding (see hotplug-common's test).
        unsafe {
            std::slice::from_raw_parts(
                (event as *const ModuleEvent).cast::<u8>(),
                std::mem::size_of::<ModuleEvent>(),
            )
        }
        .to_vec()
    }

    fn padded<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0; N];
        out[..s.len()].copy_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn decodes_an_unload_end() {
        let event = ModuleEvent {
            kind: EventKind::ModuleUnloadEnd as u32,
            ret: -16,
            timestamp_ns: 42,
            task: TaskInfo { pid: 7, tid: 8, comm: padded::<TASK_COMM_LEN>("modprobe"), uid: 1000, ppid: 6 },
            name: padded::<MODULE_NAME_LEN>("virtio_net"),
        };
        let decoded = decode(&record(&event));
        let expected = KernelEvent::Module(ModuleLifecycle {
            kind: ModuleEventKind::UnloadEnd,
            module: "virtio_net".into(),
            task: Task { pid: 7, tid: 8, comm: "modprobe".into(), uid: Some(1000), ppid: Some(6) },
            ret: Some(-16),
            timestamp_ns: 42,
        });
        assert_eq!(decoded, Ok(expected));
    }

    #[test]
    fn load_events_carry_no_return_value_and_serialize_as_json() -> Result<(), serde_json::Error> {
        let mut event = ModuleEvent::zeroed();
        event.kind = EventKind::ModuleLoad as u32;
        event.name = padded::<MODULE_NAME_LEN>("e1000e");
        let decoded = decode(&record(&event));
        let Ok(KernelEvent::Module(module)) = &decoded else { panic!("not decoded: {decoded:?}") };
        assert_eq!(module.ret, None);
        let json = serde_json::to_value(decoded.as_ref().ok())?;
        assert_eq!(json["type"], "module");
        assert_eq!(json["kind"], "load");
        assert_eq!(json["module"], "e1000e");
        assert!(json.get("ret").is_none());
        Ok(())
    }

    #[test]
    fn rejects_short_unknown_and_missized_records() {
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Truncated(2)));
        assert_eq!(decode(&[99, 0, 0, 0]), Err(DecodeError::UnknownKind(99)));
        assert!(matches!(
            decode(&[3, 0, 0, 0, 0, 0]),
            Err(DecodeError::WrongSize { got: 6, expected: 104, .. })
        ));
    }

    #[test]
    fn c_strings_stop_at_the_first_nul() {
        assert_eq!(c_string(b"abc\0def"), "abc");
        assert_eq!(c_string(b"abc"), "abc");
        assert_eq!(c_string(b""), "");
    }

    #[test]
    fn control_characters_never_reach_a_log_line() {
        assert_eq!(c_string(b"evil\nhotplug-agent: restored\0"), "evil\\x0ahotplug-agent: restored");
        assert_eq!(c_string(b"\x1b[2Jclear"), "\\x1b[2Jclear");
        assert_eq!(c_string("a\u{85}b".as_bytes()), "a\\u{0085}b");
        assert_eq!(c_string("modprobe-\u{e9}".as_bytes()), "modprobe-\u{e9}", "printable text is kept");
    }
}
