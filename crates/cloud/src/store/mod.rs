//! The cloud store: one table holding the items of every device, the per-device change feeds,
//! the device registry, the conflict log, and the account-wide change log with its webhooks
//! ([`changes`]).
//!
//! It sits behind the [`CloudStore`] trait so the service does not know which database it talks
//! to: SQLite ([`sqlite::SqliteStore`]) is the embedded default; PostgreSQL (`postgres`, behind
//! the default `postgres` feature) is the production store, which several cloud processes may
//! share. Every replication rule (which write wins, who may write what) lives in
//! `devtables_sync::apply`; a store only provides the transaction
//! ([`devtables_sync::apply::CloudTxn`]) those rules run in, and the queries the service and the
//! HTTP API need. `encoding` is what both stores decode and check the same way.
//!
//! The trait is synchronous: the service runs the store on one dedicated thread. For SQLite that
//! thread is also the one writer the feed's per-device sequence numbers and the change log's
//! order rely on; the PostgreSQL store keeps them with row and advisory locks instead, so it
//! stays correct with several processes (several store instances) writing at once.

pub mod changes;
mod encoding;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

/// The rustls settings of a configuration's `database_tls` (none without it).
#[cfg(all(feature = "service", feature = "postgres"))]
pub fn postgres_tls(
    config: &crate::config::CloudConfig,
) -> Result<Option<postgres::PostgresTls>, StoreError> {
    config
        .database_tls
        .as_ref()
        .map(|tls| {
            crate::tls::client_config(tls)
                .map(|c| postgres::PostgresTls(std::sync::Arc::new(c)))
                .map_err(|e| StoreError::Database(format!("database_tls: {e}")))
        })
        .transpose()
}

/// Opens the store a cloud configuration names: SQLite's `cloud.db` in its data folder, or
/// PostgreSQL. Blocking; with PostgreSQL it must not run on an async runtime's thread.
#[cfg(feature = "service")]
pub fn open_configured(
    config: &crate::config::CloudConfig,
) -> Result<Box<dyn CloudStore>, StoreError> {
    match &config.database {
        crate::config::DatabaseChoice::Sqlite => Ok(Box::new(sqlite::SqliteStore::open(
            &config.data_dir.join("cloud.db"),
            sqlite::SqliteOptions {
                synchronous_full: config.sqlite_full_sync,
                quotas: config.quotas,
                fanout_batch: config.fanout_batch,
                ..sqlite::SqliteOptions::default()
            },
        )?)),
        #[cfg(feature = "postgres")]
        crate::config::DatabaseChoice::Postgres { url, schema } => {
            Ok(Box::new(postgres::PostgresStore::connect(
                url,
                postgres::PostgresOptions {
                    schema: schema.clone(),
                    quotas: config.quotas,
                    tls: postgres_tls(config)?,
                    fanout_batch: config.fanout_batch,
                    ..postgres::PostgresOptions::default()
                },
            )?))
        }
        #[cfg(not(feature = "postgres"))]
        crate::config::DatabaseChoice::Postgres { .. } => Err(StoreError::Database(
            "this build has no PostgreSQL store (the `postgres` feature of devtables-cloud)".into(),
        )),
    }
}

pub use changes::{
    ChangeEvent, ChangeKey, ChangeOp, ChangePage, ChangePurgeStats, ChangeQuery, ChangeRead,
    ChangeRetention, NewWebhook, WebhookAttempt, WebhookRecord,
};

use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{CloudOp, CloudWriteError, PushRules};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, ChangeResult};
use serde::{Deserialize, Serialize};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cloud database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("device {0} is already registered")]
    DeviceExists(String),
    #[error("device {0} is not registered")]
    UnknownDevice(String),
    #[error("device {0} is revoked")]
    DeviceRevoked(String),
    #[error("invalid query: {0}")]
    BadQuery(String),
}

/// The stored secret hash of a revoked device. A real hash is `sha256:<64 hex>`, so no secret
/// matches it. A marker rather than a column: revocation needs no layout migration, and the row
/// stays, since the device's items and feed name it.
pub const REVOKED_SECRET_HASH: &str = "revoked";

/// A registered device and its sync status.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct DeviceRecord {
    pub account: String,
    pub device: String,
    /// Hash of the device's secret (never the secret itself).
    #[serde(skip)]
    pub secret_hash: String,
    pub registered_ms: u64,
    pub online: bool,
    pub last_seen_ms: Option<u64>,
    /// Schema version the device announced.
    pub schema_version: Option<String>,
    /// Highest feed cursor the device acknowledged.
    pub cursor_acked: u64,
    /// Head of the device's feed: `feed_head - cursor_acked` is the device's lag.
    pub feed_head: u64,
    /// Local changes waiting for the cloud's acknowledgement, as the device announced in its
    /// last hello (its outbox size when it connected).
    pub pending: u64,
    pub last_error: Option<String>,
    /// Pushed changes the cloud wrote (a replay of a stored version is not counted), so
    /// "exactly once" can be checked by counting.
    pub changes_applied: u64,
    /// Pushed changes that lost to a higher stored version (answered `stale`).
    pub changes_superseded: u64,
    /// Pushed changes the cloud refused.
    pub changes_rejected: u64,
    /// Mosquitto's password-file hash of the device's secret (`crate::broker_hash`), for an
    /// external Mosquitto's password file. `None` for a revoked device and for one registered
    /// before the registry kept it (its secret must be rotated to get one).
    #[serde(skip)]
    pub broker_hash: Option<String>,
    /// Live items stored for the device (its rows in `items`, tombstones not counted): what
    /// [`DeviceQuotas::max_rows`] limits.
    pub rows_stored: u64,
    /// Bytes of those items' JSON: what [`DeviceQuotas::max_bytes`] limits.
    pub bytes_stored: u64,
    /// Pushed changes refused for a quota (rows, bytes) or for their item's size; also counted
    /// in `changes_rejected`.
    pub changes_over_quota: u64,
    /// Messages of the device the cloud did not process because it sent over its message rate.
    pub messages_rate_limited: u64,
    /// Pushes of the device not taken because it had too many being applied.
    pub pushes_busy: u64,
    /// Conflict records of the device dropped (oldest first) to keep its
    /// [`DeviceQuotas::max_conflicts`].
    pub conflicts_dropped: u64,
}

/// What one device may store in the cloud and send in one change. A put that would pass a limit
/// is refused per change ([`devtables_sync::wire::RejectReason::QuotaExceeded`] or
/// [`devtables_sync::wire::RejectReason::ItemTooLarge`]), final and counted; deletes are always
/// taken, so a device at its quota can make room. Checked in the push's own transaction, against
/// counts the store keeps in that same transaction. API writes are counted in the device's usage
/// but not refused (the operator decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceQuotas {
    /// Largest encoded item (its JSON) a device may push, in bytes. Default 64 KiB, half the
    /// wire's message limit.
    pub max_item_bytes: u64,
    /// Most live items stored for one device. Default 100 000.
    pub max_rows: u64,
    /// Most bytes of live items (their JSON) stored for one device. Default 256 MiB.
    pub max_bytes: u64,
    /// Most conflict records kept per device (its pushes' conflicts); the oldest are dropped
    /// first and counted in `conflicts_dropped`. Default 1000. The account-wide
    /// [`Retention::max_conflicts`] still applies.
    pub max_conflicts: u64,
}

impl Default for DeviceQuotas {
    fn default() -> DeviceQuotas {
        DeviceQuotas {
            max_item_bytes: 64 * 1024,
            max_rows: 100_000,
            max_bytes: 256 * 1024 * 1024,
            max_conflicts: 1000,
        }
    }
}

/// Runs a push change by change in the push's transaction `t`: a change `refusal` refuses (a
/// store's quota check, reading the usage the changes before it left) is answered `Rejected`
/// with that reason and counted; every other one goes through
/// [`devtables_sync::apply::cloud_apply_push`]. Returns the results in order and how many were
/// refused for a quota. One loop for every store, so they refuse alike.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_within_quotas<T: devtables_sync::apply::CloudTxn<Error = StoreError>>(
    t: &mut T,
    mut refusal: impl FnMut(
        &mut T,
        &Change,
    ) -> Result<Option<devtables_sync::wire::RejectReason>, StoreError>,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    rules: &PushRules,
    from: &DeviceId,
    changes: &[Change],
) -> Result<(Vec<ChangeResult>, u64), StoreError> {
    let mut results = Vec::with_capacity(changes.len());
    let mut over_quota = 0;
    for change in changes {
        if let Some(reason) = refusal(t, change)? {
            over_quota += 1;
            results.push(ChangeResult {
                model: change.model.clone(),
                key: change.key.clone(),
                version: change.version,
                kept: None,
                status: devtables_sync::wire::ChangeStatus::Rejected { reason },
            });
            continue;
        }
        let one = std::slice::from_ref(change);
        results.extend(devtables_sync::apply::cloud_apply_push(
            t, schema, clock, now_ms, rules, from, one,
        )?);
    }
    Ok((results, over_quota))
}

/// What an API key may do. The order matters: each scope may do everything the ones before it
/// may (`read` < `write` < `admin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    /// Read the account's devices, items and conflicts (GET only).
    Read,
    /// Also write the account's items.
    Write,
    /// Also register devices, manage the account's keys, and read the service status.
    Admin,
}

impl KeyScope {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::Read => "read",
            KeyScope::Write => "write",
            KeyScope::Admin => "admin",
        }
    }

    /// Parses `read`, `write` or `admin`.
    pub fn parse(s: &str) -> Option<KeyScope> {
        match s {
            "read" => Some(KeyScope::Read),
            "write" => Some(KeyScope::Write),
            "admin" => Some(KeyScope::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored API key of the HTTP API. The key a client sends is `dt_<id>_<secret>`; only the
/// hash of the secret is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ApiKeyRecord {
    pub id: String,
    pub account: String,
    pub scope: KeyScope,
    /// Hash of the key's secret (never the secret itself).
    #[serde(skip)]
    pub secret_hash: String,
    pub created_ms: u64,
    /// When the key was revoked; a revoked key is refused.
    pub revoked_ms: Option<u64>,
}

/// A status change the service records for a device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusUpdate {
    pub online: Option<bool>,
    pub last_seen_ms: Option<u64>,
    pub schema_version: Option<String>,
    pub cursor_acked: Option<u64>,
    pub pending: Option<u64>,
    pub last_error: Option<Option<String>>,
}

/// A stored item (live or tombstone) with its owner and version.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct StoredItem {
    pub account: String,
    /// The owning device, or `None` for an account-wide (broadcast) item.
    pub device: Option<String>,
    pub model: String,
    pub pk: String,
    pub sk: String,
    /// `None` for a tombstone.
    #[cfg_attr(feature = "service", schema(value_type = Option<Object>))]
    pub item: Option<Item>,
    /// The version (HLC) as text: wall ms, counter and node in hex, ordered like the version.
    #[serde(serialize_with = "ser_hlc")]
    #[cfg_attr(feature = "service", schema(value_type = String, pattern = "^[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{16}$"))]
    pub version: Hlc,
    pub updated_ms: u64,
}

fn ser_hlc<S: serde::Serializer>(v: &Hlc, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&devtables_sync::wire::hlc_to_string(*v))
}

/// An item query of the HTTP API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemQuery {
    pub account: String,
    pub model: String,
    /// Only this device's items (`None`: every device of the account, and broadcast items).
    pub device: Option<String>,
    /// Only items whose pk equals this.
    pub pk: Option<String>,
    /// Only items whose sk begins with this.
    pub sk_prefix: Option<String>,
    /// Field equality filters on the item JSON (top-level fields).
    pub filters: Vec<(String, serde_json::Value)>,
    pub limit: usize,
    /// The `next` token of the previous page.
    pub next: Option<String>,
}

/// A page of items.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ItemPage {
    pub items: Vec<StoredItem>,
    pub next: Option<String>,
}

/// A logged conflict.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ConflictRecord {
    pub id: u64,
    pub at_ms: u64,
    pub account: String,
    pub device: Option<String>,
    pub model: String,
    pub pk: String,
    pub sk: String,
    pub winner: String,
    pub loser: String,
    /// "stored" or "incoming": which write lost.
    pub lost: String,
    /// The losing item when it is known (`None` for a delete).
    #[cfg_attr(feature = "service", schema(value_type = Option<Object>))]
    pub loser_item: Option<Item>,
}

/// Retention settings, applied by [`CloudStore::purge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Tombstones (and their feed entries) older than this are removed; a device whose cursor is
    /// older then gets a full resync instead of the deletes. Default 30 days.
    pub tombstone_ms: u64,
    /// Most conflict records kept per account (oldest dropped first). Default 10 000.
    pub max_conflicts: u64,
    /// Most tombstones one call of [`CloudStore::purge`] removes, and most conflict records it
    /// trims, each call one transaction: a backlog of old tombstones is purged in several short
    /// transactions rather than one that holds the store (and, on PostgreSQL, the locks of every
    /// owner it touches) for its whole length. 0 counts as 1. Default 1000
    /// ([`Retention::DEFAULT_BATCH`]).
    pub batch: u64,
}

impl Retention {
    /// The default of [`Retention::batch`].
    pub const DEFAULT_BATCH: u64 = 1000;
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            tombstone_ms: 30 * 24 * 3600 * 1000,
            max_conflicts: 10_000,
            batch: Retention::DEFAULT_BATCH,
        }
    }
}

/// What a purge removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeStats {
    pub tombstones: u64,
    pub conflicts: u64,
    /// The call stopped at its [`Retention::batch`]: more may be left to purge, and the caller
    /// should call again (the service does, letting other work on the store run in between).
    pub more: bool,
}

impl PurgeStats {
    /// Adds what a later call of the same retention pass removed.
    pub fn add(&mut self, later: PurgeStats) {
        self.tombstones += later.tombstones;
        self.conflicts += later.conflicts;
        self.more = later.more;
    }
}

/// The devices whose feed advanced in a write, with their new feed heads: the service tells the
/// sync engine so it streams the change.
pub type Advanced = Vec<(DeviceId, u64)>;

/// Most devices one transaction appends a broadcast item's feed entry to, unless configured
/// (`fanout_batch`): the write's own transaction reaches the first ones, and
/// [`CloudStore::fanout_step`] the rest, as many per step.
pub const DEFAULT_FANOUT_BATCH: usize = 500;

/// The cloud database.
pub trait CloudStore: Send + 'static {
    /// Registers a device with the hash of its secret and, optionally, Mosquitto's hash of it
    /// ([`DeviceRecord::broker_hash`]).
    fn register_device(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    /// Revokes a device: its secret hash becomes [`REVOKED_SECRET_HASH`], which no secret hashes
    /// to, so the broker refuses it and its later pushes are refused ([`StoreError::DeviceRevoked`]);
    /// its broker hash is removed, so an exported Mosquitto password file no longer holds it.
    /// With `delete_items`, its rows, feed and purge watermark are deleted in the same
    /// transaction. `false` when the device is not registered.
    fn revoke_device(&mut self, id: &DeviceId, delete_items: bool) -> Result<bool, StoreError>;
    /// Revoked devices ordered by (account, device), after `after`, at most `limit`.
    fn revoked_devices(
        &mut self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>, StoreError>;
    /// Replaces a device's secret hash and broker hash (a rotation, which also lifts a
    /// revocation); its rows, feed and cursor stay. `false` when the device is not registered.
    fn set_device_secret(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Devices of an account (every account when `None`), ordered by (account, device), after
    /// `after`, at most `limit`.
    fn devices(
        &mut self,
        account: Option<&str>,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, StoreError>;
    fn update_status(&mut self, id: &DeviceId, update: &StatusUpdate) -> Result<(), StoreError>;
    /// Marks every device offline (at service start: nobody is connected yet).
    fn reset_online(&mut self) -> Result<(), StoreError>;
    /// Marks offline those of `devices` that are still online and were not seen at or after
    /// `since_ms` (no `last_seen_ms`, or an older one), in one transaction; returns how many.
    /// A node of a scaled-out cloud that took over their partitions prompted them and heard
    /// nothing: they left while their node was dead, and no `bye` reached a live node. The
    /// condition keeps a device that a node heard from meanwhile online.
    fn mark_offline_unseen(
        &mut self,
        devices: &[DeviceId],
        since_ms: u64,
    ) -> Result<u64, StoreError>;

    /// Stores a new API key of `account` with the hash of its secret; returns the key's id (a
    /// fresh random one).
    fn create_api_key(
        &mut self,
        account: &str,
        scope: KeyScope,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<String, StoreError>;
    /// The API keys of an account (revoked ones included), oldest first.
    fn api_keys(&mut self, account: &str) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revokes the key `id` of `account` (a key already revoked keeps its first revocation
    /// time). `false` when the account has no such key.
    fn revoke_api_key(&mut self, account: &str, id: &str, now_ms: u64) -> Result<bool, StoreError>;
    /// One API key by id, whatever its account.
    fn api_key(&mut self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// How many API keys are not revoked, over every account (at start, the service warns when
    /// there are none: the API would refuse every request).
    fn live_api_keys(&mut self) -> Result<u64, StoreError>;

    /// Runs [`devtables_sync::apply::cloud_apply_push`] in one transaction, refusing (per change,
    /// in that transaction) what passes the store's [`DeviceQuotas`].
    #[allow(clippy::too_many_arguments)]
    fn apply_push(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        now_ms: u64,
        rules: &PushRules,
        from: &DeviceId,
        changes: &[Change],
    ) -> Result<(Vec<ChangeResult>, Advanced), StoreError>;
    /// Runs [`devtables_sync::apply::cloud_write`] in one transaction (a write through the API).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        now_ms: u64,
        max_message_bytes: usize,
        owner: &Owner,
        model: &str,
        op: CloudOp,
    ) -> Result<(Change, Advanced), CloudWriteError<StoreError>>;

    /// Feed entries of a device after `after` (see [`FeedPage`]).
    fn read_feed(
        &mut self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError>;
    /// Live items a device should hold, for a full resync (see [`SnapshotPage`]); only models
    /// that sync down, the device's own rows and its account's broadcast rows.
    fn read_snapshot(
        &mut self,
        schema: &Schema,
        device: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError>;
    /// Records the cursor a device acknowledged.
    fn ack_cursor(&mut self, device: &DeviceId, cursor: u64) -> Result<(), StoreError>;
    /// Adds to a device's counts of messages refused for its rate and pushes refused as busy.
    fn count_throttled(
        &mut self,
        device: &DeviceId,
        rate_limited: u64,
        busy: u64,
    ) -> Result<(), StoreError>;

    fn get_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredItem>, StoreError>;
    /// Live items matching the query, ordered by (device, pk, sk).
    fn query_items(&mut self, query: &ItemQuery) -> Result<ItemPage, StoreError>;
    /// Conflicts of an account, newest first, with id below `before`.
    fn conflicts(
        &mut self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError>;

    /// The highest version stored (items and tombstones): the cloud clock resumes after it.
    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError>;

    /// Applies retention (tombstones, feed entries, conflict log) in one transaction, bounded by
    /// [`Retention::batch`]: it removes at most that many tombstones (the oldest first) with
    /// their feed entries and at most that many conflict records, and says with
    /// [`PurgeStats::more`] when it stopped at the bound. Every call leaves the marks of what it
    /// removed: each owner's purge watermark rises to the newest version it purged of that
    /// owner, each device's feed floor to the highest feed entry it purged of that device. So
    /// calling again until `more` is false, with the same `now_ms`, leaves what one unbounded
    /// purge would.
    fn purge(&mut self, now_ms: u64, retention: &Retention) -> Result<PurgeStats, StoreError>;

    /// A page of an account's change log (see [`changes`]): the entries after `query.after`
    /// matching its filters, in sequence order, or [`ChangeRead::Expired`] when retention removed
    /// entries after the cursor.
    ///
    /// The contract every store keeps: an entry is appended in the transaction of the row write
    /// it describes (every `CloudTxn::write_row`: pushes and API writes; retention purges and a
    /// revocation's deletion of a device's rows are not changes), it is visible only once that
    /// transaction commits, and entries become visible in sequence order: a reader that has read
    /// up to N never later finds an entry below N it did not see. Sequence numbers only grow,
    /// across accounts and restarts.
    fn read_changes(&mut self, query: &ChangeQuery) -> Result<ChangeRead, StoreError>;

    /// Applies the change log's retention: entries older than `retention.max_age_ms` and each
    /// account's oldest beyond `retention.max_per_account` are removed, and each account's floor
    /// (the highest sequence number removed) rises so later reads from below it are
    /// [`ChangeRead::Expired`]. One transaction, removing at most `retention.batch` entries
    /// (by age first, the log's oldest; then by count); [`ChangePurgeStats::more`] says it
    /// stopped at the bound. Every call raises the floors of what it removed, so calling again
    /// until `more` is false, with the same `now_ms`, leaves what one unbounded purge would.
    fn purge_changes(
        &mut self,
        now_ms: u64,
        retention: &ChangeRetention,
    ) -> Result<ChangePurgeStats, StoreError>;

    /// The highest change sequence number this store has appended or found at open, committed
    /// or not: a cheap hint the store thread compares after each job to wake the readers of the
    /// change log (a rolled-back append only wakes them for nothing). 0 for a store without a
    /// change log.
    fn change_head_hint(&self) -> u64 {
        0
    }

    /// Works off one bounded step of the oldest pending broadcast fan-out, in one transaction:
    /// the next devices of its account (at most the store's fan-out batch, in device order) get
    /// the key's feed entry. `Ok(None)` when no fan-out is pending.
    ///
    /// The contract every store keeps: a write of an account-wide item appends its entry to at
    /// most a batch of the account's devices in its own transaction, and records the rest as a
    /// pending fan-out in that same transaction (durable with the item); calling this until it
    /// returns `None` leaves every device of the account with one entry of the key newer than
    /// the write; a later write of the key starts its fan-out over; retention that purges the
    /// key ends its fan-out. Safe to call from several processes sharing a store.
    fn fanout_step(&mut self) -> Result<Option<Advanced>, StoreError>;

    /// Whether a fan-out may be pending, as far as this process knows (found at open, or queued
    /// by its writes): a cheap hint the service reads after each job to run steps; fan-outs
    /// other processes queued are found by calling [`CloudStore::fanout_step`] now and then.
    fn fanout_pending_hint(&self) -> bool {
        false
    }

    /// Stores a new webhook (a fresh random id) whose cursor is `new.after`, or the account's
    /// head when `None`.
    fn create_webhook(
        &mut self,
        new: &NewWebhook,
        now_ms: u64,
    ) -> Result<WebhookRecord, StoreError>;
    /// The webhooks of an account (every account when `None`), oldest first.
    fn webhooks(&mut self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError>;
    /// One webhook by id, whatever its account.
    fn webhook(&mut self, id: &str) -> Result<Option<WebhookRecord>, StoreError>;
    /// Deletes the webhook `id` of `account`; `false` when the account has no such webhook.
    fn delete_webhook(&mut self, account: &str, id: &str) -> Result<bool, StoreError>;
    /// Records a delivery attempt of webhook `id` (its cursor moves only on
    /// [`WebhookAttempt::Delivered`] and [`WebhookAttempt::Skipped`], and never back); `false`
    /// when the webhook no longer exists (deleted meanwhile).
    fn record_webhook_attempt(
        &mut self,
        id: &str,
        attempt: &WebhookAttempt,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// When the oldest change webhook `hook` has still to deliver was stored (`None`: nothing
    /// pending among the first `scan` entries of the account after its cursor).
    fn webhook_pending_since(
        &mut self,
        hook: &WebhookRecord,
        scan: usize,
    ) -> Result<Option<u64>, StoreError>;

    /// Opens a group: the operations until [`CloudStore::commit_group`] share one durable commit
    /// (group commit: one flush to disk for many pushes, the store's throughput under load).
    /// Each operation in a group still takes effect whole or not at all, but none is durable
    /// before the group commits, so the caller tells nobody of a result before that. A store
    /// without groups keeps these defaults: every operation commits on its own, and the group
    /// calls do nothing.
    fn begin_group(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Commits the open group (nothing when none is open). On an error, no operation of the
    /// group took effect (or, when the database dropped the group on its own, the operations
    /// after the drop committed one by one: the caller answers them all as failed, which a
    /// device's retransmission repairs, since a replayed version is not applied twice).
    fn commit_group(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}
