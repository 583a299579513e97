//! A QMP client for the one thing the harness asks QEMU: hot-unplug and hot-plug a NIC.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Takes a connected QMP socket, reads the greeting and enters command mode.
    pub fn new(stream: UnixStream) -> Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting expected, got {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed the QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message: {line}"))
    }

    /// Runs a command and returns its `return` value (events that arrive meanwhile are dropped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let message = self.read()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                bail!("QMP {command} failed: {}", error.get("desc").unwrap_or(error));
            }
        }
    }

    /// `device_del`, then waits for the `DEVICE_DELETED` event of that device (the guest ejected
    /// it). An earlier event for the device's `.../virtio-backend` child has no `device` field.
    pub fn device_del(&mut self, id: &str, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let request = json!({ "execute": "device_del", "arguments": { "id": id } });
        writeln!(self.writer, "{request}")?;
        loop {
            if started.elapsed() > timeout {
                bail!("QEMU did not report {id} deleted within {timeout:?}");
            }
            let message = self.read()?;
            if let Some(error) = message.get("error") {
                bail!("QMP device_del {id} failed: {}", error.get("desc").unwrap_or(error));
            }
            let deleted = message.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
                && message.pointer("/data/device").and_then(Value::as_str) == Some(id);
            if deleted {
                return Ok(started.elapsed());
            }
        }
    }
}
