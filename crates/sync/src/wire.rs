//! Protocol messages and their encoding.
//!
//! This module exists because it is the only place that serializes: the engines and the drivers
//! deal in typed messages, and the bytes on the wire are produced and checked here, behind a
//! version number, so the codec (JSON today) can change without touching the state machines.
//!
//! Every message travels in an envelope `{"v":1,"schema":"<sender schema version>","msg":{...}}`
//! where `msg.type` names the message. A receiver refuses any `v` other than [`PROTOCOL_VERSION`]
//! with [`WireError::UnsupportedVersion`], and any message larger than
//! [`WireConfig::max_message_bytes`] before parsing it. The `schema` string is at most
//! [`MAX_SCHEMA_BYTES`] printable ASCII characters ([`WireError::BadSchemaVersion`] otherwise):
//! the cloud keeps it per session, so its size is part of the per-session memory bound.

use devtables_schema::{Item, ItemKey};
use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, MAX_WALL_MS};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest `schema` string an envelope may carry, in bytes (printable ASCII only).
pub const MAX_SCHEMA_BYTES: usize = 64;

/// Whether `schema` may travel in an envelope: at most [`MAX_SCHEMA_BYTES`] bytes of printable
/// ASCII (space to `~`).
pub fn schema_version_ok(schema: &str) -> bool {
    schema.len() <= MAX_SCHEMA_BYTES && schema.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Why a schema's version tag (`Schema::tag`) cannot travel in envelopes, if it cannot: the
/// message the agent and the cloud refuse to start with.
pub fn schema_tag_problem(tag: &str) -> Option<String> {
    (!schema_version_ok(tag)).then(|| {
        format!(
            "the schema's version tag {tag:?} (its `version` and fingerprint) must be at most \
             {MAX_SCHEMA_BYTES} printable ASCII characters: it travels in every sync message \
             (shorten `version`)"
        )
    })
}

/// Size limits applied to every message, in both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireConfig {
    /// Largest encoded message, in bytes. Default 128 KiB, AWS IoT's MQTT payload limit, so a
    /// catch-up after a long outage is never refused whole by the broker.
    pub max_message_bytes: usize,
    /// Most changes (or items, or results) in one message. Default 1000; bounds the work one
    /// message can cause on the receiver.
    pub max_changes: usize,
}

impl Default for WireConfig {
    fn default() -> WireConfig {
        WireConfig {
            max_message_bytes: 128 * 1024,
            max_changes: 1000,
        }
    }
}

/// A message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes are not a well-formed message of this protocol.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What the decoder could not accept.
        reason: String,
    },
    /// The envelope names a protocol version this crate does not speak.
    #[error("unsupported protocol version {got} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the envelope.
        got: u32,
    },
    /// The message is over the size limit.
    #[error("message of {size} bytes is over the {max} byte limit")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The message holds more changes than allowed.
    #[error("message holds {count} entries, over the limit of {max}")]
    TooManyChanges {
        /// Entries in the message.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The envelope's schema version is too long or not printable ASCII.
    #[error(
        "the envelope's schema version ({len} bytes) must be at most {MAX_SCHEMA_BYTES} \
         printable ASCII characters"
    )]
    BadSchemaVersion {
        /// Its length in bytes.
        len: usize,
    },
}

/// What a change does to its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Create or replace the whole item.
    Put,
    /// Delete the item (receivers keep a tombstone version).
    Delete,
}

/// One replicated write of one item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The model (type) of the item.
    pub model: String,
    /// The item's primary key.
    #[serde(with = "key_wire")]
    pub key: ItemKey,
    /// Put or delete.
    pub op: Op,
    /// The whole item for a put; `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Item>,
    /// The version of this write; replicas keep the highest version per key.
    #[serde(with = "hlc_wire")]
    pub version: Hlc,
    /// The version this write replaced, as the cloud knows it: the version of the key the
    /// writer last received from or had acknowledged by the cloud (`None` when the cloud never
    /// held the key as far as the writer knows). Successive local writes of one key coalesced
    /// in the outbox keep the first one's base. A receiver holding another version has a
    /// concurrent write: a conflict, which is logged.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_hlc_wire"
    )]
    pub base: Option<Hlc>,
}

/// Why the cloud refused a change. The device removes the change from its outbox and reports it;
/// it is never retried, since the same change would be refused again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The cloud schema has no such model.
    UnknownModel,
    /// The item does not satisfy the cloud's model (unknown field, wrong type, key mismatch...).
    Validation(String),
    /// The model does not live in the cloud.
    NotEnabledInCloud,
    /// The model does not replicate up (down-only, broadcast, or not synced).
    NotSyncedUp,
    /// The item names another device as its owner.
    Ownership,
    /// The change alone is larger than a message may be.
    TooLarge,
    /// The key is held by a live item of another model: a change under one model may only
    /// touch rows of that model.
    WrongModel {
        /// The model of the item that holds the key.
        stored: String,
    },
    /// The key is not one the model's key templates can produce.
    KeyNotOfModel,
    /// The put's item is larger, encoded, than the cloud accepts for one item.
    ItemTooLarge {
        /// The largest encoded item the cloud accepts, in bytes.
        max: u64,
    },
    /// The put would take the device past one of its storage quotas in the cloud (rows or
    /// bytes of live items). Deletes are always accepted, so the device can make room.
    QuotaExceeded {
        /// Which quota.
        what: Quota,
        /// Its limit.
        limit: u64,
    },
    /// The change's version is further in the future than the cloud accepts (the device clock
    /// is ahead). Unlike other reasons this one is not final: the device re-stamps the change
    /// with a version on the cloud's time and sends it again.
    VersionAhead {
        /// The cloud's time when it refused the change, in ms since the Unix epoch.
        cloud_ms: u64,
        /// How far past `cloud_ms` a version may be, in ms.
        max_drift_ms: u64,
    },
    /// The device runs another schema version than the cloud (its envelope says so) and the
    /// cloud's schema does not have the change's model yet: a device upgraded before its cloud.
    /// Not final: the device keeps the change and sends it again in its next session (an
    /// upgraded cloud restarts, and so starts one).
    NewerSchema {
        /// The cloud's schema version tag.
        cloud_schema: String,
    },
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::UnknownModel => f.write_str("the cloud schema has no such model"),
            RejectReason::Validation(m) => write!(f, "invalid item: {m}"),
            RejectReason::NotEnabledInCloud => f.write_str("the model is not enabled in the cloud"),
            RejectReason::NotSyncedUp => f.write_str("the model does not replicate up"),
            RejectReason::Ownership => f.write_str("the item belongs to another device"),
            RejectReason::TooLarge => f.write_str("the change is larger than a message may be"),
            RejectReason::WrongModel { stored } => {
                write!(f, "the key belongs to an item of model {stored}")
            }
            RejectReason::KeyNotOfModel => {
                f.write_str("the key is not one the model's key templates produce")
            }
            RejectReason::ItemTooLarge { max } => write!(
                f,
                "the item is larger than the {max} bytes the cloud accepts for one item"
            ),
            RejectReason::QuotaExceeded { what, limit } => write!(
                f,
                "the device's {what} quota in the cloud ({limit}) is full: delete items to make \
                 room, or ask the operator to raise the quota"
            ),
            RejectReason::VersionAhead {
                cloud_ms,
                max_drift_ms,
            } => write!(
                f,
                "the version is more than {max_drift_ms} ms ahead of the cloud's time {cloud_ms}: \
                 the device clock is ahead; the change is re-stamped and sent again"
            ),
            RejectReason::NewerSchema { cloud_schema } => write!(
                f,
                "the cloud's schema ({cloud_schema}) does not have this model yet: the change is \
                 kept on the device and sent again in its next session (upgrade the cloud's schema)"
            ),
        }
    }
}

/// A storage quota of a device in the cloud (see [`RejectReason::QuotaExceeded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quota {
    /// Live items stored for the device.
    Rows,
    /// Bytes of the live items stored for the device (their JSON).
    Bytes,
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quota::Rows => "rows",
            Quota::Bytes => "bytes",
        })
    }
}

/// The cloud's verdict on one pushed change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStatus {
    /// Stored (or already stored: pushes are idempotent).
    Applied,
    /// The cloud holds a higher version; this write lost (and was logged as a conflict).
    Stale {
        /// The version that won, so the device can report what superseded its write.
        #[serde(with = "hlc_wire")]
        winner: Hlc,
    },
    /// Refused; see the reason.
    Rejected {
        /// Why.
        reason: RejectReason,
    },
}

/// The result for one change of a [`UpMsg::Push`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    /// The change's model.
    pub model: String,
    /// The change's key.
    #[serde(with = "key_wire")]
    pub key: ItemKey,
    /// The change's version: the device removes its outbox entry only if it still holds exactly
    /// this version, so an ack never removes a newer local write.
    #[serde(with = "hlc_wire")]
    pub version: Hlc,
    /// The verdict.
    pub status: ChangeStatus,
    /// Set when the cloud applied the item although its strict check refused it: the device
    /// runs a neighbouring schema version, and the cloud kept the fields and enum values its own
    /// schema does not define (see `Model::normalize_from_neighbour`). Names what was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

/// Device → cloud messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UpMsg {
    /// Sent on every connect (and resent until welcomed).
    Hello {
        /// A fresh id per connection, echoed by [`DownMsg::Welcome`] so a stale welcome is ignored.
        session: u64,
        /// The device's durable feed cursor: the cloud streams entries after it.
        cursor: u64,
        /// Outbox size, for monitoring.
        pending: u64,
        /// What the device holds of the cloud's history; the cloud compares it with what it
        /// holds itself to tell whether it lost some of it (restored from a backup). Absent
        /// from devices that predate it: no comparison.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mark: Option<DeviceMark>,
    },
    /// A batch of local changes.
    Push {
        /// The batch id, echoed by [`DownMsg::PushAck`].
        batch: u64,
        /// The changes, oldest first, at most one per key.
        changes: Vec<Change>,
        /// The session (of the device's hello) the push was sent in. The cloud applies it only
        /// in that session: a push delayed past the device's next hello is dropped (the device
        /// resends it from its outbox), so nothing is applied between the cloud reading what it
        /// holds for the welcome and the device acting on it. Absent: applied in any session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<u64>,
    },
    /// The device applied and durably stored the feed up to `cursor`.
    FeedAck {
        /// The device's cursor after the apply.
        cursor: u64,
    },
    /// The device's connection ended: its MQTT last will, or its last word before a clean
    /// disconnect. The cloud drops the session and marks the device offline.
    Bye,
    /// The device applied and durably stored snapshot pages up to a position.
    SnapshotAck {
        /// The resync the pages belong to.
        resync: u64,
        /// The device's position in the resync: the last key covered (`None`: nothing yet).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pos: Option<SnapshotCursor>,
        /// Whether the final page was applied (the resync is over).
        done: bool,
    },
}

/// What a device holds of the cloud's history, sent in [`UpMsg::Hello`]. Every figure only grows
/// in one history of the cloud store; a cloud restored from an older backup holds less than a
/// device that heard from it after the backup was taken, which is how the loss is seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMark {
    /// The generation of the device's feed that its last applied page came from (0: none, or
    /// a cloud that does not say). The cloud starts a new generation of a feed when a new run
    /// of the store first appends to it, so cursors the cloud hands out again after a restore
    /// are told apart from those the device already holds.
    pub gen: u64,
    /// The highest feed head the device's applied pages reflect: each page's `seen`, the head
    /// when the cloud read it.
    pub seen: u64,
    /// The cloud's count of this device's pushed changes answered, as of the last
    /// acknowledgement the device acted on ([`DownMsg::PushAck`]'s `answered`).
    pub answered: u64,
}

/// A position in a resync: the last item covered. Items are ordered by (model, key) across the
/// device's own rows and its account's broadcast rows. On the wire: `[model, pk, sk]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotCursor {
    /// The model of the last item covered.
    pub model: String,
    /// The key of the last item covered.
    pub key: ItemKey,
}

impl Serialize for SnapshotCursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.model, &self.key.pk, &self.key.sk).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SnapshotCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SnapshotCursor, D::Error> {
        let (model, pk, sk) = <(String, String, String)>::deserialize(d)?;
        Ok(SnapshotCursor {
            model,
            key: ItemKey { pk, sk },
        })
    }
}

/// Why the cloud sent [`DownMsg::Error`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The device's protocol version is not spoken here.
    UnsupportedVersion {
        /// The version the cloud speaks.
        supported: u32,
    },
    /// The cloud could not decode the device's message.
    Malformed,
    /// The device's message was over the size limit.
    TooLarge,
    /// The cloud has no session for the device (it restarted, or dropped an idle session):
    /// the device must send [`UpMsg::Hello`] again.
    NoSession,
    /// The cloud tracks as many sessions as it may; try again later.
    TooManySessions,
    /// The device sends faster than its session's message rate: its message was not processed
    /// (nothing is lost: pushes are resent, acknowledgements and pages recover on their timers).
    /// The device sends no push before `retry_after_ms` has passed. Sent at most once per
    /// `retry_after_ms`, so the refusals themselves are bounded.
    RateLimited {
        /// How long to wait before sending again, in ms.
        retry_after_ms: u64,
    },
    /// The device has as many pushes being applied as the cloud allows; this push was not
    /// taken. The device resends it, not before `retry_after_ms`.
    Busy {
        /// How long to wait before sending again, in ms.
        retry_after_ms: u64,
        /// The batch refused. The device resends only that one: its other pushes were taken
        /// and are being applied. Clouds before this field named none, and a device then
        /// resends every push in flight.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch: Option<u64>,
    },
    /// The push held more changes than the cloud takes in one push; the device cuts its batches
    /// to `max` changes and resends.
    TooManyChanges {
        /// Most changes per push.
        max: u64,
    },
}

/// Cloud → device messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DownMsg {
    /// The answer to [`UpMsg::Hello`]: the device may push.
    Welcome {
        /// The session of the hello answered.
        session: u64,
        /// The cloud's time when it answered, in ms since the Unix epoch: devices stamp their
        /// versions on the cloud's time, so a wrong device clock never moves the fleet's.
        now_ms: u64,
        /// How far past its own time the cloud accepts a version, in ms.
        max_drift_ms: u64,
        /// The cloud's count of this device's pushed changes answered, read before any push of
        /// this session was applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answered: Option<u64>,
        /// The cloud holds less than the device's hello says it heard from it (the cloud was
        /// restored from a backup): before pushing anything else the device puts every write it
        /// holds of its up-syncing models back into its outbox, so the cloud gets back what it
        /// had acknowledged (see `docs/protocol.md`, "Cloud restored from a backup").
        #[serde(default, skip_serializing_if = "is_false")]
        repush: bool,
    },
    /// The results of one [`UpMsg::Push`] (possibly split over several messages).
    PushAck {
        /// The batch answered.
        batch: u64,
        /// One result per change answered.
        results: Vec<ChangeResult>,
        /// The cloud's count of this device's pushed changes answered, once this push was
        /// applied: the device keeps the highest it acted on (its [`DeviceMark::answered`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answered: Option<u64>,
        /// The session the push was answered in: a device acts only on answers of its current
        /// session. An answer delayed past a reconnect may come from a cloud process since
        /// replaced (restored from a backup that does not hold the change); the device resent
        /// the change in its new session anyway.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<u64>,
    },
    /// Feed entries with cursor in `(from, to]`; the device applies it only if `from` equals its
    /// cursor, then stores `to`.
    Feed {
        /// The cursor the page follows.
        from: u64,
        /// The cursor after the page.
        to: u64,
        /// The changes, in feed order, at most one per key.
        changes: Vec<Change>,
        /// The session the page streams in: a device applies only pages of its current session,
        /// so a page delayed past a reconnect (perhaps from a cloud process since replaced) is
        /// not taken.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<u64>,
        /// The generation of the feed when the page was read (see [`DeviceMark::gen`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gen: Option<u64>,
        /// The feed head when the page was read. The page reflects the feed as of that head, not
        /// of `to`: an entry a later write moved past `to` (one entry per key) is missing from it,
        /// so the device's mark says this head ([`DeviceMark::seen`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seen: Option<u64>,
    },
    /// One page of a full resync.
    Snapshot {
        /// The resync id, fresh for every resync.
        resync: u64,
        /// The session (of the device's hello) the resync streams in: a device starts a new
        /// resync only from a page of its current session, so a delayed page of an earlier
        /// session's resync cannot take it over.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<u64>,
        /// The position the page follows (`None`: the start); the device applies the page only
        /// if this equals its own position, so pages apply contiguously whatever the re-reads.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<SnapshotCursor>,
        /// The position after the page: the last key it covers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<SnapshotCursor>,
        /// Live items (puts), ordered by (model, key).
        items: Vec<Change>,
        /// Whether this is the final page.
        done: bool,
        /// The feed head when the resync began; the device stores it with the final page.
        cursor: u64,
        /// The generation of the feed when the page was read (see [`DeviceMark::gen`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gen: Option<u64>,
        /// The feed head when the page was read: the items may reflect writes up to it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seen: Option<u64>,
        /// The resync repairs a device that holds data the cloud lost (restored from a backup):
        /// for models the device does not write up, the pages are the truth even where the
        /// device holds a higher version.
        #[serde(default, skip_serializing_if = "is_false")]
        restore: bool,
    },
    /// The cloud refused a message.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A sentence for logs.
        message: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A decoded message with its envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded<M> {
    /// The sender's schema version.
    pub schema: String,
    /// The message.
    pub msg: M,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, M> {
    v: u32,
    schema: &'a str,
    msg: &'a M,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    v: u32,
    #[serde(default)]
    schema: String,
    msg: serde_json::Value,
}

/// [`EnvelopeIn`] with the message parsed in the same pass (see `decode`).
#[derive(Deserialize)]
struct TypedEnvelopeIn<M> {
    v: u32,
    #[serde(default)]
    schema: String,
    msg: M,
}

fn encode<M: Serialize>(
    schema: &str,
    msg: &M,
    count: usize,
    cfg: &WireConfig,
) -> Result<Vec<u8>, WireError> {
    if count > cfg.max_changes {
        return Err(WireError::TooManyChanges {
            count,
            max: cfg.max_changes,
        });
    }
    if !schema_version_ok(schema) {
        return Err(WireError::BadSchemaVersion { len: schema.len() });
    }
    let bytes = serde_json::to_vec(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        schema,
        msg,
    })
    .map_err(|e| WireError::Malformed {
        reason: e.to_string(),
    })?;
    if bytes.len() > cfg.max_message_bytes {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: cfg.max_message_bytes,
        });
    }
    Ok(bytes)
}

fn decode<M: serde::de::DeserializeOwned>(
    bytes: &[u8],
    cfg: &WireConfig,
) -> Result<Decoded<M>, WireError> {
    if bytes.len() > cfg.max_message_bytes {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: cfg.max_message_bytes,
        });
    }
    // One pass into the typed message: the usual case. Only a message that does not parse so
    // is parsed again as a generic envelope, which says why in the order the checks are made
    // (the version before the message), so every refusal is the one it always was.
    if let Ok(typed) = serde_json::from_slice::<TypedEnvelopeIn<M>>(bytes) {
        if typed.v != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { got: typed.v });
        }
        if !schema_version_ok(&typed.schema) {
            return Err(WireError::BadSchemaVersion {
                len: typed.schema.len(),
            });
        }
        return Ok(Decoded {
            schema: typed.schema,
            msg: typed.msg,
        });
    }
    let env: EnvelopeIn = serde_json::from_slice(bytes).map_err(|e| WireError::Malformed {
        reason: e.to_string(),
    })?;
    if env.v != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { got: env.v });
    }
    if !schema_version_ok(&env.schema) {
        return Err(WireError::BadSchemaVersion {
            len: env.schema.len(),
        });
    }
    let msg = serde_json::from_value(env.msg).map_err(|e| WireError::Malformed {
        reason: e.to_string(),
    })?;
    Ok(Decoded {
        schema: env.schema,
        msg,
    })
}

fn up_count(msg: &UpMsg) -> usize {
    match msg {
        UpMsg::Push { changes, .. } => changes.len(),
        _ => 0,
    }
}

fn down_count(msg: &DownMsg) -> usize {
    match msg {
        DownMsg::PushAck { results, .. } => results.len(),
        DownMsg::Feed { changes, .. } => changes.len(),
        DownMsg::Snapshot { items, .. } => items.len(),
        _ => 0,
    }
}

/// Encode a device → cloud message, checking the limits.
pub fn encode_up(schema: &str, msg: &UpMsg, cfg: &WireConfig) -> Result<Vec<u8>, WireError> {
    encode(schema, msg, up_count(msg), cfg)
}

/// Decode a device → cloud message, checking the size before parsing and the count after.
pub fn decode_up(bytes: &[u8], cfg: &WireConfig) -> Result<Decoded<UpMsg>, WireError> {
    let d: Decoded<UpMsg> = decode(bytes, cfg)?;
    let count = up_count(&d.msg);
    if count > cfg.max_changes {
        return Err(WireError::TooManyChanges {
            count,
            max: cfg.max_changes,
        });
    }
    Ok(d)
}

/// Encode a cloud → device message, checking the limits.
pub fn encode_down(schema: &str, msg: &DownMsg, cfg: &WireConfig) -> Result<Vec<u8>, WireError> {
    encode(schema, msg, down_count(msg), cfg)
}

/// Decode a cloud → device message, checking the size before parsing and the count after.
pub fn decode_down(bytes: &[u8], cfg: &WireConfig) -> Result<Decoded<DownMsg>, WireError> {
    let d: Decoded<DownMsg> = decode(bytes, cfg)?;
    let count = down_count(&d.msg);
    if count > cfg.max_changes {
        return Err(WireError::TooManyChanges {
            count,
            max: cfg.max_changes,
        });
    }
    Ok(d)
}

/// Counts the bytes written to it: the encoded size of a value without the buffer.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `v`'s JSON, counted as it is written rather than in a buffer: every pushed
/// change, acknowledged result and page entry is measured for the budgets, so the allocation
/// would be paid per entry. `usize::MAX` if it cannot be encoded.
fn encoded_len<T: Serialize + ?Sized>(v: &T) -> usize {
    let mut n = ByteCount(0);
    match serde_json::to_writer(&mut n, v) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

/// Encoded size of an item (its JSON), in bytes: what the cloud's per-item limit and storage
/// quota count.
pub fn item_len(item: &Item) -> usize {
    encoded_len(item)
}

/// Encoded size of one change inside a message's change list, in bytes. A list of `n` changes
/// costs the sum of their sizes plus `n - 1` separators, which lets batches be cut to fit a limit
/// exactly.
pub fn change_len(change: &Change) -> usize {
    encoded_len(change)
}

/// Whether one more entry fits a message being filled; see [`MessageBudget::add`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The entry was counted in: it goes in this message.
    Added,
    /// The message is full (bytes or count): the entry goes in the next one.
    Full,
    /// The entry is larger than any message may be, even alone.
    Never,
}

/// The room left in one message for a list of entries (changes, items or results): the one rule
/// for cutting lists to [`WireConfig`]'s limits exactly, shared by pushes, acks and pages.
///
/// An empty message costs `overhead` (its encoding with an empty list, from [`up_overhead`] or
/// [`down_overhead`] plus any reserve); each entry costs its encoded length plus one separator
/// after the first.
#[derive(Clone, Debug)]
pub struct MessageBudget {
    overhead: usize,
    max_bytes: usize,
    max_count: usize,
    size: usize,
    count: usize,
}

impl MessageBudget {
    /// An empty message of `overhead` bytes that may grow to `max_bytes` and `max_count` entries.
    pub fn new(overhead: usize, max_bytes: usize, max_count: usize) -> MessageBudget {
        MessageBudget {
            overhead,
            max_bytes,
            max_count: max_count.max(1),
            size: overhead,
            count: 0,
        }
    }

    /// Counts in an entry of `len` encoded bytes if it fits.
    pub fn add(&mut self, len: usize) -> Fit {
        if self.overhead.saturating_add(len) > self.max_bytes {
            return Fit::Never;
        }
        let add = len + usize::from(self.count > 0);
        if self.count >= self.max_count || self.size.saturating_add(add) > self.max_bytes {
            return Fit::Full;
        }
        self.size += add;
        self.count += 1;
        Fit::Added
    }

    /// Empties the message (after sending it) so entries count toward the next one.
    pub fn reset(&mut self) {
        self.size = self.overhead;
        self.count = 0;
    }

    /// Entries counted in.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Encoded size of a snapshot position.
pub fn cursor_len(cursor: &SnapshotCursor) -> usize {
    encoded_len(cursor)
}

/// Encoded size of one result inside a [`DownMsg::PushAck`].
pub fn result_len(result: &ChangeResult) -> usize {
    encoded_len(result)
}

/// Encoded size of `msg` as sent with an empty change list: add [`change_len`] per change and
/// one byte per separator to get the full size.
pub fn up_overhead(schema: &str, msg: &UpMsg) -> usize {
    encoded_len(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        schema,
        msg,
    })
}

/// Like [`up_overhead`] for cloud → device messages.
pub fn down_overhead(schema: &str, msg: &DownMsg) -> usize {
    encoded_len(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        schema,
        msg,
    })
}

/// An [`Hlc`] as text: `wwwwwwwwwwww-cccccccc-nnnnnnnnnnnnnnnn` in fixed-width lowercase hex
/// (wall ms, counter, node), so that the text order equals the version order; drivers may store
/// it in a SQL column and compare it there. A wall time beyond [`MAX_WALL_MS`] (which no clock
/// issues and the wire refuses) is written as [`MAX_WALL_MS`], never wider.
pub fn hlc_to_string(v: Hlc) -> String {
    format!(
        "{:012x}-{:08x}-{:016x}",
        v.wall_ms.min(MAX_WALL_MS),
        v.counter,
        v.node
    )
}

/// Parse the text form of [`hlc_to_string`]: exactly 12, 8 and 16 lowercase hex digits, so
/// that every accepted text sorts like its version (in SQL as in Rust) and the wall time never
/// exceeds [`MAX_WALL_MS`].
pub fn hlc_from_str(s: &str) -> Result<Hlc, WireError> {
    let bad = || WireError::Malformed {
        reason: format!(
            "bad version {:?}: expected wall-counter-node as 12, 8 and 16 lowercase hex digits",
            s.chars().take(64).collect::<String>()
        ),
    };
    let mut parts = s.split('-');
    let (Some(w), Some(c), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let hex = |p: &str, len: usize| {
        p.len() == len
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(w, 12) || !hex(c, 8) || !hex(n, 16) {
        return Err(bad());
    }
    Ok(Hlc {
        wall_ms: u64::from_str_radix(w, 16).map_err(|_| bad())?,
        counter: u32::from_str_radix(c, 16).map_err(|_| bad())?,
        node: u64::from_str_radix(n, 16).map_err(|_| bad())?,
    })
}

mod hlc_wire {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &Hlc, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hlc_to_string(*v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Hlc, D::Error> {
        let s = String::deserialize(d)?;
        hlc_from_str(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_hlc_wire {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &Option<Hlc>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&hlc_to_string(*v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Hlc>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| hlc_from_str(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod key_wire {
    use super::*;

    pub fn serialize<S: serde::Serializer>(k: &ItemKey, s: S) -> Result<S::Ok, S::Error> {
        (&k.pk, &k.sk).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ItemKey, D::Error> {
        let (pk, sk) = <(String, String)>::deserialize(d)?;
        Ok(ItemKey { pk, sk })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        let mut item = Item::new();
        item.insert("name".into(), serde_json::json!("x"));
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "d#1".into(),
                sk: "s#x".into(),
            },
            op: Op::Put,
            item: Some(item),
            version: Hlc {
                wall_ms: 1,
                counter: 2,
                node: 3,
            },
            base: None,
        }
    }

    #[test]
    fn round_trips_and_sizes_are_exact() {
        let cfg = WireConfig::default();
        let changes = vec![change(), change()];
        let msg = UpMsg::Push {
            batch: 9,
            changes: changes.clone(),
            session: Some(4),
        };
        let bytes = encode_up("1.0.0", &msg, &cfg).unwrap();
        let expected = up_overhead(
            "1.0.0",
            &UpMsg::Push {
                batch: 9,
                changes: vec![],
                session: Some(4),
            },
        ) + changes.iter().map(change_len).sum::<usize>()
            + 1;
        assert_eq!(bytes.len(), expected);
        let d = decode_up(&bytes, &cfg).unwrap();
        assert_eq!(d.msg, msg);
        assert_eq!(d.schema, "1.0.0");
    }

    #[test]
    fn a_budget_cuts_lists_exactly_at_the_limits() {
        let cfg = WireConfig {
            max_message_bytes: 2000,
            max_changes: 3,
        };
        let overhead = up_overhead(
            "1",
            &UpMsg::Push {
                batch: 1,
                changes: vec![],
                session: None,
            },
        );
        let one = change_len(&change());
        let mut b = MessageBudget::new(overhead, overhead + 2 * one + 1, cfg.max_changes);
        assert_eq!(b.add(one), Fit::Added);
        assert_eq!(b.add(one), Fit::Added);
        assert_eq!(b.add(one), Fit::Full, "a third would pass the byte limit");
        let msg = UpMsg::Push {
            batch: 1,
            changes: vec![change(), change()],
            session: None,
        };
        assert_eq!(
            encode_up("1", &msg, &cfg).unwrap().len(),
            overhead + 2 * one + 1
        );
        b.reset();
        assert_eq!(b.add(overhead + 2 * one + 2), Fit::Never);
        let mut b = MessageBudget::new(overhead, usize::MAX, 2);
        assert_eq!(
            (b.add(1), b.add(1), b.add(1)),
            (Fit::Added, Fit::Added, Fit::Full)
        );
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn decode_errors_are_typed() {
        let cfg = WireConfig {
            max_message_bytes: 100,
            max_changes: 1,
        };
        assert!(matches!(
            decode_up(b"{", &cfg),
            Err(WireError::Malformed { .. })
        ));
        assert_eq!(
            decode_up(br#"{"v":2,"schema":"","msg":{"type":"nope"}}"#, &cfg),
            Err(WireError::UnsupportedVersion { got: 2 })
        );
        assert!(matches!(
            decode_up(&[b' '; 101], &cfg),
            Err(WireError::TooLarge {
                size: 101,
                max: 100
            })
        ));
        assert!(matches!(
            decode_up(br#"{"v":1,"msg":{"type":"feed_ack"}}"#, &cfg),
            Err(WireError::Malformed { .. })
        ));
        let v = hlc_to_string(Hlc {
            wall_ms: 1,
            counter: 2,
            node: 3,
        });
        let two = format!(
            r#"{{"v":1,"msg":{{"type":"push","batch":1,"changes":[{{"model":"M","key":["a","b"],"op":"delete","version":"{v}"}},{{"model":"M","key":["a","b"],"op":"delete","version":"{v}"}}]}}}}"#
        );
        let cfg = WireConfig {
            max_message_bytes: 1000,
            max_changes: 1,
        };
        assert_eq!(
            decode_up(two.as_bytes(), &cfg),
            Err(WireError::TooManyChanges { count: 2, max: 1 })
        );
    }

    #[test]
    fn the_schema_string_is_bounded_and_printable() {
        let cfg = WireConfig::default();
        let long = "x".repeat(MAX_SCHEMA_BYTES + 1);
        let at_limit = "x".repeat(MAX_SCHEMA_BYTES);
        let env = |schema: &str| format!(r#"{{"v":1,"schema":"{schema}","msg":{{"type":"bye"}}}}"#);
        assert_eq!(
            decode_up(env(&long).as_bytes(), &cfg),
            Err(WireError::BadSchemaVersion {
                len: MAX_SCHEMA_BYTES + 1
            })
        );
        assert_eq!(
            decode_up(env("1.0\\u0001").as_bytes(), &cfg),
            Err(WireError::BadSchemaVersion { len: 4 }),
            "a control character is refused"
        );
        assert_eq!(
            decode_up(env(&at_limit).as_bytes(), &cfg).unwrap().schema,
            at_limit
        );
        assert_eq!(decode_up(env("").as_bytes(), &cfg).unwrap().msg, UpMsg::Bye);
        assert_eq!(
            encode_up(&long, &UpMsg::Bye, &cfg),
            Err(WireError::BadSchemaVersion {
                len: MAX_SCHEMA_BYTES + 1
            }),
            "a sender cannot produce what receivers refuse"
        );
        // The new verdicts and errors travel.
        let reason = RejectReason::QuotaExceeded {
            what: Quota::Rows,
            limit: 5,
        };
        let text = serde_json::to_string(&reason).unwrap();
        assert_eq!(text, r#"{"quota_exceeded":{"what":"rows","limit":5}}"#);
        assert_eq!(serde_json::from_str::<RejectReason>(&text).unwrap(), reason);
        let err = DownMsg::Error {
            code: ErrorCode::RateLimited { retry_after_ms: 7 },
            message: String::new(),
        };
        let bytes = encode_down("1", &err, &cfg).unwrap();
        assert_eq!(decode_down(&bytes, &cfg).unwrap().msg, err);
    }

    #[test]
    fn hlc_text_order_matches_version_order() {
        let a = Hlc {
            wall_ms: 0xff,
            counter: 1,
            node: u64::MAX,
        };
        let b = Hlc {
            wall_ms: 0x100,
            counter: 0,
            node: 0,
        };
        assert!(hlc_to_string(a) < hlc_to_string(b));
        assert_eq!(hlc_from_str(&hlc_to_string(a)).unwrap(), a);
        assert!(hlc_from_str("1-2").is_err());
        assert!(hlc_from_str("zz-1-1").is_err());
        assert!(
            hlc_from_str("1-2-3").is_err(),
            "short fields would sort wrongly as text"
        );
        assert!(hlc_from_str("0000000000FF-00000001-0000000000000001").is_err());
        assert!(hlc_from_str("00000000000000ff-00000001-0000000000000001").is_err());
    }

    #[test]
    fn every_accepted_version_sorts_as_text_like_in_rust() {
        use proptest::prelude::*;
        proptest!(|(a in (0..=MAX_WALL_MS, any::<u32>(), any::<u64>()),
                    b in (0..=MAX_WALL_MS, any::<u32>(), any::<u64>()))| {
            let a = Hlc { wall_ms: a.0, counter: a.1, node: a.2 };
            let b = Hlc { wall_ms: b.0, counter: b.1, node: b.2 };
            let (ta, tb) = (hlc_to_string(a), hlc_to_string(b));
            prop_assert_eq!(hlc_from_str(&ta).unwrap(), a);
            prop_assert_eq!(ta.cmp(&tb), a.cmp(&b));
        });
        let top = Hlc {
            wall_ms: MAX_WALL_MS,
            counter: u32::MAX,
            node: u64::MAX,
        };
        assert_eq!(hlc_from_str(&hlc_to_string(top)).unwrap(), top);
    }
}
