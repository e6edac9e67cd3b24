//! Replication protocol of devtables, sans-IO.
//!
//! This crate is deterministic: it has no networking code, no tokio, reads no clock
//! (`Instant::now` and `SystemTime::now` are never called) and uses no thread RNG. Time comes in
//! as a `now_ms` parameter on every input, randomness from a seed in each engine's config, and
//! bytes go in and out through `handle_message` / `poll_transmit`. The drivers (`agent` on the
//! device, `cloud` in the cloud) own the MQTT client, the storage and the clock; this crate owns
//! every protocol decision, so the simulator in `tests/sim/` runs the exact code the drivers run.
//!
//! The protocol is described in `docs/protocol.md` (messages, state machines, invariants).
//!
//! # Layout
//! - [`hlc`]: hybrid logical clock; the version of every replicated write.
//! - [`identity`]: validated device ids and item owners.
//! - [`topics`]: MQTT topic names, pure string functions.
//! - [`wire`]: the only place that serializes; versioned envelope, size limits, typed errors.
//! - [`apply`]: the pure replication rules (who wins, who may write what, resync sweeps) over the
//!   [`apply::DeviceTxn`] and [`apply::CloudTxn`] storage seams.
//! - [`device`]: the device engine (outbox, batches, retransmits, feed and resync intake).
//! - [`cloud`]: the cloud engine for all devices (sessions, feed streaming, resyncs).
//! - [`rate`]: token buckets, the rate-limiting rule of device sessions and API keys.

#![deny(missing_docs)]

pub mod apply;
pub mod cloud;
pub mod device;
pub mod hlc;
pub mod identity;
pub mod rate;
mod rng;
mod rtt;
pub mod topics;
pub mod wire;

pub use apply::{
    cloud_apply_push, cloud_write, device_apply, ApplyError, ApplyOutcome, ApplyPage, CloudOp,
    CloudTxn, CloudWriteError, Conflict, DeviceTxn, Loser, PushCounts, PushRules, RowWrite,
    Skipped, StoredRow, StoredVersion, DEFAULT_MAX_DRIFT_MS, OWNER_FIELD,
};
pub use cloud::{
    CloudAction, CloudEngine, CloudEngineConfig, FeedPage, SnapshotCursor, SnapshotPage,
    UnreadableRow,
};
pub use device::{DeviceAction, DeviceConfig, DeviceEngine, DeviceEvent, Restored};
pub use hlc::{cloud_node_name, node_id_for, ClockExhausted, Hlc, HlcClock, CLOUD_NODE_NAME};
pub use identity::{DeviceId, IdError, Owner};
pub use rate::{RateLimit, TokenBucket};
pub use wire::{
    Change, ChangeResult, ChangeStatus, DownMsg, ErrorCode, Op, RejectReason, UpMsg, WireConfig,
    WireError, PROTOCOL_VERSION,
};
