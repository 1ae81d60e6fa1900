//! Device connectivity (ThingsBoard's `DefaultDeviceStateService`): the server attributes
//! `active`, `lastConnectTime`, `lastDisconnectTime`, `lastActivityTime` and
//! `inactivityAlarmTime`, folded from the log like everything else.
//!
//! Connect, disconnect and activity come from device records, stamped by the transport that
//! accepted them. Going inactive depends on a clock, so only the partition's leader decides it:
//! its check finds devices silent for longer than their timeout and appends an `Inactive`
//! record stamped with its time. Every replica applies that record, and applying checks the
//! condition again against the record's own time, so activity that committed first wins.

use std::collections::{HashMap, HashSet};

use thingraft_proto::device::Value;
use thingraft_proto::records::{EntityId, Scope};

use crate::store::{Batch, Store};

/// What the check needs to know of one device.
#[derive(Debug, Clone, Copy, Default)]
struct DeviceState {
    tenant: EntityId,
    active: bool,
    last_activity_ms: i64,
    /// The device's `inactivityTimeout` server attribute (ms), if positive.
    timeout_ms: Option<i64>,
}

/// The connectivity of one partition's devices.
pub struct Connectivity {
    devices: HashMap<EntityId, DeviceState>,
    default_timeout_ms: i64,
    /// Devices whose `Inactive` record was appended but not yet applied.
    proposed: HashSet<EntityId>,
    /// Devices whose `lastActivityTime` moved forward in the batch being applied.
    dirty: HashSet<EntityId>,
}

impl Connectivity {
    /// Loads the state of the partition's devices from the store (`in_partition` picks them).
    pub fn load(
        store: &Store,
        default_timeout_ms: i64,
        in_partition: impl Fn(&EntityId) -> bool,
    ) -> anyhow::Result<Self> {
        let mut devices: HashMap<EntityId, DeviceState> = HashMap::new();
        for (device, name, value) in
            store.server_attributes_named(&["active", "lastActivityTime", "inactivityTimeout"])?
        {
            if !in_partition(&device) {
                continue;
            }
            let s = devices.entry(device).or_default();
            match (name.as_str(), value) {
                ("active", Value::Bool(b)) => s.active = b,
                ("lastActivityTime", Value::Long(t)) => s.last_activity_ms = t,
                ("inactivityTimeout", Value::Long(t)) if t > 0 => s.timeout_ms = Some(t),
                _ => {}
            }
        }
        Ok(Self {
            devices,
            default_timeout_ms,
            proposed: HashSet::new(),
            dirty: HashSet::new(),
        })
    }

    fn timeout(&self, s: &DeviceState) -> i64 {
        s.timeout_ms.unwrap_or(self.default_timeout_ms)
    }

    fn set_active(batch: &mut Batch, d: &EntityId, ts: i64, active: bool) {
        batch.attribute(d, Scope::Server, "active", ts, &Value::Bool(active));
    }

    /// A session opened: it counts as activity too.
    pub fn on_connect(&mut self, batch: &mut Batch, d: &EntityId, tenant: &EntityId, ts: i64) {
        batch.attribute(d, Scope::Server, "lastConnectTime", ts, &Value::Long(ts));
        self.on_activity(batch, d, tenant, ts);
    }

    /// A session closed; the device stays active until its timeout passes.
    pub fn on_disconnect(&mut self, batch: &mut Batch, d: &EntityId, ts: i64) {
        batch.attribute(d, Scope::Server, "lastDisconnectTime", ts, &Value::Long(ts));
    }

    pub fn on_activity(&mut self, batch: &mut Batch, d: &EntityId, tenant: &EntityId, ts: i64) {
        let s = self.devices.entry(*d).or_default();
        s.tenant = *tenant;
        if ts > s.last_activity_ms {
            s.last_activity_ms = ts;
            // Written once per device per batch, by `flush`.
            self.dirty.insert(*d);
        }
        if !s.active {
            s.active = true;
            Self::set_active(batch, d, ts, true);
        }
        self.proposed.remove(d);
    }

    /// Writes the `lastActivityTime` of the devices active in this batch, once per device per
    /// batch, exactly: the inactivity check on applying an `Inactive` record compares against
    /// it, and a replica that restarts reloads it, so every replica, restarted or not, decides
    /// alike. (Writing it at most once a second saved little once outcomes are spaced, and let a
    /// restarted replica time a device out up to a second early, unlike its peers.)
    pub fn flush(&mut self, batch: &mut Batch) {
        for d in self.dirty.drain() {
            if let Some(s) = self.devices.get(&d) {
                let ts = s.last_activity_ms;
                batch.attribute(&d, Scope::Server, "lastActivityTime", ts, &Value::Long(ts));
            }
        }
    }

    /// The leader's `Inactive` record for `d`, stamped `ts`.
    pub fn on_inactive(&mut self, batch: &mut Batch, d: &EntityId, ts: i64) {
        self.proposed.remove(d);
        let timeout = match self.devices.get(d) {
            Some(s) => self.timeout(s),
            None => return,
        };
        let Some(s) = self.devices.get_mut(d) else { return };
        if s.active && ts >= s.last_activity_ms.saturating_add(timeout) {
            s.active = false;
            Self::set_active(batch, d, ts, false);
            batch.attribute(d, Scope::Server, "inactivityAlarmTime", ts, &Value::Long(ts));
        }
    }

    /// A server attribute was saved: `inactivityTimeout` changes the device's timeout.
    pub fn on_server_attribute(&mut self, d: &EntityId, key: &str, value: &Value) {
        if key == "inactivityTimeout" {
            let s = self.devices.entry(*d).or_default();
            s.timeout_ms = match value {
                Value::Long(t) if *t > 0 => Some(*t),
                _ => None,
            };
        }
    }

    /// Leader only: active devices silent past their timeout at `now`, not yet proposed;
    /// marks them proposed. Returns (tenant, device) pairs, at most `max`.
    pub fn due(&mut self, now: i64, max: usize) -> Vec<(EntityId, EntityId)> {
        let mut out = Vec::new();
        for (d, s) in &self.devices {
            if out.len() >= max {
                break;
            }
            if s.active
                && now >= s.last_activity_ms.saturating_add(self.timeout(s))
                && !self.proposed.contains(d)
            {
                out.push((s.tenant, *d));
            }
        }
        for (_, d) in &out {
            self.proposed.insert(*d);
        }
        out
    }

    /// Forgets what was proposed (after a failed append or a change of leader).
    pub fn clear_proposed(&mut self) {
        self.proposed.clear();
    }
}
