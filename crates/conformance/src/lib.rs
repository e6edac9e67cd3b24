//! One conformance suite for every store behind the replication seams.
//!
//! This crate exists because the replication rules (`devtables_sync::apply`) are only as good as
//! the stores they run in: a rule that reads `stored_row` trusts that it returns what `write_row`
//! stored, a resync trusts that snapshot pages cover every row once, a purge trusts the feed
//! floor. Each store (the SQLite cloud store, the agent's redb-backed device state, the
//! simulation's in-memory stores, and later PostgreSQL) runs the SAME checks here, so the
//! simulation's findings carry over to the real stores and a new store cannot drift silently.
//!
//! A store takes part by implementing a small harness trait: [`CloudStoreUnderTest`] (a write
//! transaction implementing [`CloudTxn`], commit or rollback, device registration, feed and
//! snapshot reads, tombstone purge, a new run, highest stored version, counters), with
//! [`ChangeLogUnderTest`] for a cloud store that also keeps the account-wide change log, or
//! [`DeviceStoreUnderTest`] (a write transaction implementing [`DeviceTxn`], reads of an item and
//! its version, a local write that records an outbox entry, outbox trims with the answered
//! count, the re-push after a cloud restore, what a restart restores). Then
//! [`run_cloud_suite`] / [`run_device_suite`] run every named check on a fresh store each and
//! panic with the list of failed checks.
//!
//! The suite owns its schema ([`SCHEMA`]): `Dev` and `Alt` have the same key templates (their
//! keys collide), `Other` has different ones; `Up` syncs up only, `Down` down only, `Cast` is a
//! broadcast model and `Local` lives on the device only.

use std::fmt::Debug;

use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{
    CloudTxn, Conflict, DeviceTxn, FeedMark, PushCounts, RowWrite, StoredRow, StoredVersion,
};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, Op};

mod changes;
mod cloud;
mod device;

/// The suite's schema: two models whose keys collide (`Dev`, `Alt`), one whose templates differ
/// (`Other`), and one model per replication mode.
pub const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    process: {
        Dev: {sync: 'both'},
        Alt: {sync: 'both'},
        Other: {sync: 'both'},
        Up: {sync: 'up'},
        Down: {sync: 'down'},
        Cast: {sync: 'down', broadcast: true},
        Local: {enable: 'device'},
    },
    models: {
        Dev: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'k#${name}'},
              deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        Alt: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'k#${name}'},
              deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        Other: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'o#${name}'},
              deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        Up: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'u#${name}'},
              deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        Down: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'w#${name}'},
              deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        Cast: {pk: {type: 'string', value: 'c#'}, sk: {type: 'string', value: 'c#${name}'},
              name: {type: 'string', required: true}, v: {type: 'number'}},
        Local: {pk: {type: 'string', value: 'l#'}, sk: {type: 'string', value: 'l#${name}'},
              name: {type: 'string', required: true}, v: {type: 'number'}},
    },
}"#;

/// The suite's schema, parsed.
pub fn schema() -> Schema {
    Schema::from_json5(SCHEMA).expect("the conformance schema is valid")
}

/// The account of every device the suite registers (a second account proves isolation).
pub const ACCOUNT: &str = "acme";
/// The other account.
pub const OTHER_ACCOUNT: &str = "globex";

/// A wall time in the suite's range (2023-11-14), in ms; checks add offsets to it.
pub const T0: u64 = 1_700_000_000_000;

/// A cloud store under test.
///
/// Every method is what the real driver does with the store; none may be implemented by
/// "knowing" the suite. Errors are the store's own.
pub trait CloudStoreUnderTest {
    /// The store's error.
    type Error: Debug;
    /// Run `f` in ONE write transaction at wall time `now_ms` (the time rows are stamped with,
    /// which tombstone retention measures). Commit when `commit` is true and `f` returned Ok;
    /// roll back otherwise. Returns `f`'s result.
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = Self::Error>) -> Result<R, Self::Error>,
    ) -> Result<R, Self::Error>;
    /// Register a device (its feed starts empty with its floor at 1).
    fn register_device(&mut self, id: &DeviceId, now_ms: u64) -> Result<(), Self::Error>;
    /// Read a feed page (see [`FeedPage`]).
    fn read_feed(
        &mut self,
        id: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, Self::Error>;
    /// Read a snapshot page (see [`SnapshotPage`]).
    fn read_snapshot(
        &mut self,
        schema: &Schema,
        id: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, Self::Error>;
    /// Remove tombstones written before `now_ms - retention_ms` with their feed entries, raising
    /// the feed floors and the owners' purge watermarks. Returns the tombstones removed.
    fn purge(&mut self, now_ms: u64, retention_ms: u64) -> Result<u64, Self::Error>;
    /// Start a new run of the store, as a new cloud process opening it does: the next append to
    /// each feed starts a new generation of that feed ([`FeedPage::gen`]).
    fn new_run(&mut self) -> Result<(), Self::Error>;
    /// The highest version stored: items, tombstones and purge watermarks.
    fn max_version(&mut self) -> Result<Option<Hlc>, Self::Error>;
    /// The device's push counters (sums of every `count_push`).
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, Self::Error>;
    /// How many conflicts the store holds for an account.
    fn conflicts(&mut self, account: &str) -> Result<u64, Self::Error>;
    /// Most devices one transaction appends a broadcast's feed entry to (the write's own, then
    /// each [`CloudStoreUnderTest::fanout_step`]). The suite needs it between 2 and 4: its
    /// other checks broadcast to two devices of an account and expect both reached at once.
    fn fanout_batch(&self) -> usize;
    /// One step of the oldest pending broadcast fan-out, in its own transaction: the devices it
    /// reached (at most [`CloudStoreUnderTest::fanout_batch`]), or `None` when none is pending.
    fn fanout_step(&mut self) -> Result<Option<Vec<DeviceId>>, Self::Error>;
}

/// One entry of a cloud store's change log, as the change-log checks compare it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedChange {
    /// Its sequence number in the log.
    pub seq: u64,
    /// The owner of the row written.
    pub owner: Owner,
    /// The model.
    pub model: String,
    /// The key.
    pub key: ItemKey,
    /// The version written.
    pub version: Hlc,
    /// The write stored a tombstone.
    pub deleted: bool,
    /// The item written (`None` for a tombstone).
    pub item: Option<Item>,
    /// The wall time of the transaction that wrote it.
    pub at_ms: u64,
}

/// A cloud store that also keeps the account-wide change log (what backends read, and webhooks
/// deliver): every row write appends an entry in its own transaction, in one growing sequence.
pub trait ChangeLogUnderTest: CloudStoreUnderTest {
    /// Every entry of `account` after sequence number `after`, in order; or `Err(floor)` when
    /// retention removed entries after `after` (`floor`: the highest sequence number it removed
    /// for the account).
    #[allow(clippy::type_complexity)]
    fn changes(
        &mut self,
        account: &str,
        after: u64,
    ) -> Result<Result<Vec<LoggedChange>, u64>, Self::Error>;
    /// Apply the log's retention keeping at most `max_per_account` entries of each account (the
    /// newest), whatever their age.
    fn trim_changes(&mut self, max_per_account: u64) -> Result<(), Self::Error>;
}

/// What a device store holds for the next engine after a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceRestore {
    /// The feed cursor stored by the last applied page.
    pub cursor: u64,
    /// The outbox, oldest first.
    pub outbox: Vec<Change>,
    /// The highest version the device issued, which its clock resumes after.
    pub last_hlc: Option<Hlc>,
    /// The feed mark stored by the last page that stored one.
    pub mark: FeedMark,
    /// The answered count stored with outbox trims, or by `store_answered`.
    pub answered: u64,
}

/// What a re-push after a cloud restore did ([`DeviceStoreUnderTest::repush`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepushDone {
    /// Held writes put back into the outbox.
    pub requeued: u64,
    /// Transactions (slices) it took.
    pub slices: u64,
}

/// A device store under test.
pub trait DeviceStoreUnderTest {
    /// The store's error.
    type Error: Debug;
    /// Run `f` in ONE write transaction as a remote write (no outbox entry is recorded); commit
    /// when `commit` is true and `f` returned Ok, roll back otherwise.
    fn txn<R>(
        &mut self,
        commit: bool,
        f: impl FnOnce(&mut dyn DeviceTxn<Error = Self::Error>) -> Result<R, Self::Error>,
    ) -> Result<R, Self::Error>;
    /// The live item at a key and its model, if any.
    fn item(&mut self, key: &ItemKey) -> Result<Option<(String, Item)>, Self::Error>;
    /// The version held for a key (item or tombstone), if any.
    fn version(&mut self, key: &ItemKey) -> Result<Option<StoredVersion>, Self::Error>;
    /// A local write through the device database (the application's path): create or replace
    /// the item with these fields (`delete`: remove the item they name). A model that syncs up
    /// gets its outbox entry in the same transaction. `now_ms` is a hint: a store may stamp on
    /// its own clock.
    fn local_write(
        &mut self,
        model: &str,
        fields: &Item,
        delete: bool,
        now_ms: u64,
    ) -> Result<(), Self::Error>;
    /// Remove acknowledged outbox entries whose version still matches, and raise the stored
    /// answered count to `answered` if it is higher, in one transaction (the driver's
    /// `OutboxRemove`).
    fn outbox_remove(
        &mut self,
        acked: &[(String, ItemKey, Hlc)],
        answered: Option<u64>,
    ) -> Result<(), Self::Error>;
    /// Replace the stored answered count (the driver's `StoreAnswered`).
    fn store_answered(&mut self, answered: u64) -> Result<(), Self::Error>;
    /// The re-push after a cloud restore (the driver's `Repush`), the whole scan, in slices of at
    /// most `slice` held writes examined per transaction: every live item and every tombstone of
    /// a model that syncs up, without an outbox entry, gets one carrying it (its stored version,
    /// no base). Entries already pending are left as they are; nothing else is touched.
    fn repush(&mut self, slice: usize) -> Result<RepushDone, Self::Error>;
    /// What a restart restores.
    fn restore(&mut self) -> Result<DeviceRestore, Self::Error>;
}

/// A check's verdict: `Err` names what differed.
pub type Outcome = Result<(), String>;

/// Turn a store error into a failed check naming the step.
pub(crate) trait OrFail<T> {
    fn or_fail(self, what: &str) -> Result<T, String>;
}

impl<T, E: Debug> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: store failed: {e:?}"))
    }
}

/// Fail the check with a message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
pub(crate) use ensure;

/// Fail the check unless the two values are equal.
macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{}: got {:?}, expected {:?}", format!($($fmt)+), a, b));
        }
    }};
}
pub(crate) use ensure_eq;

/// One named check of a suite.
pub struct Check<H> {
    /// The check's name (a function name in this crate).
    pub name: &'static str,
    /// The check.
    pub run: fn(&mut H) -> Outcome,
}

fn run_checks<H>(what: &str, checks: Vec<Check<H>>, make: impl Fn() -> H) {
    let mut failed = Vec::new();
    for check in &checks {
        let mut store = make();
        let verdict =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (check.run)(&mut store)));
        match verdict {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failed.push(format!("{}: {why}", check.name)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: panicked: {msg}", check.name));
            }
        }
    }
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("{what} conformance FAILED {f}");
        }
        panic!(
            "{} of {} {what} conformance checks failed:\n{}",
            failed.len(),
            checks.len(),
            failed.join("\n")
        );
    }
    eprintln!("{what} conformance: {} checks passed", checks.len());
}

/// Run every cloud-store check, each on a fresh store from `make`; panics naming every check
/// that failed.
pub fn run_cloud_suite<H: CloudStoreUnderTest>(make: impl Fn() -> H) {
    run_checks("cloud store", cloud::checks::<H>(), make);
}

/// Run every change-log check, each on a fresh store from `make`; panics naming every check
/// that failed.
pub fn run_change_log_suite<H: ChangeLogUnderTest>(make: impl Fn() -> H) {
    run_checks("change log", changes::checks::<H>(), make);
}

/// Run every device-store check, each on a fresh store from `make`; panics naming every check
/// that failed.
pub fn run_device_suite<H: DeviceStoreUnderTest>(make: impl Fn() -> H) {
    run_checks("device store", device::checks::<H>(), make);
}

/// A device of [`ACCOUNT`].
pub fn dev(name: &str) -> DeviceId {
    DeviceId::new(ACCOUNT, name).expect("valid device id")
}

/// A version at wall time `T0 + offset_ms`, issued by `node`.
pub fn ver(offset_ms: u64, node: u64) -> Hlc {
    Hlc {
        wall_ms: T0 + offset_ms,
        counter: 0,
        node,
    }
}

/// The fields of an item of `model` named `name` (owned by `device` when the model has an owner
/// field).
pub fn fields(schema: &Schema, model: &str, device: &str, name: &str, v: u64) -> Item {
    let m = schema.model(model).expect("suite model");
    let mut input = Item::new();
    if m.field("deviceId").is_some() {
        input.insert("deviceId".into(), device.into());
    }
    input.insert("name".into(), name.into());
    input.insert("v".into(), v.into());
    input
}

/// A stored (normalized) item of `model` named `name`, and its key.
pub fn item(schema: &Schema, model: &str, device: &str, name: &str, v: u64) -> (Item, ItemKey) {
    let m = schema.model(model).expect("suite model");
    let created = m
        .prepare_create(&fields(schema, model, device, name, v), T0 as i64)
        .expect("valid suite item");
    let item = m.normalize_stored(created).expect("normalized suite item");
    let key = m.primary_key(&item).expect("suite key");
    (item, key)
}

/// A put change of `model` named `name`.
pub fn put(
    schema: &Schema,
    model: &str,
    device: &str,
    name: &str,
    version: Hlc,
    base: Option<Hlc>,
) -> Change {
    let (item, key) = item(schema, model, device, name, version.wall_ms % 1000);
    Change {
        model: model.into(),
        key,
        op: Op::Put,
        item: Some(item),
        version,
        base,
    }
}

/// A delete change of `model` named `name`.
pub fn del(
    schema: &Schema,
    model: &str,
    device: &str,
    name: &str,
    version: Hlc,
    base: Option<Hlc>,
) -> Change {
    let (_, key) = item(schema, model, device, name, 0);
    Change {
        model: model.into(),
        key,
        op: Op::Delete,
        item: None,
        version,
        base,
    }
}

/// A [`CloudTxn`] over a `&mut dyn CloudTxn`, so the generic rules (`cloud_apply_push`,
/// `cloud_write`, which take a sized transaction) run over a harness's transaction.
pub struct DynCloud<'a, E>(pub &'a mut dyn CloudTxn<Error = E>);

impl<E> CloudTxn for DynCloud<'_, E> {
    type Error = E;
    fn stored_row(&mut self, owner: &Owner, key: &ItemKey) -> Result<Option<StoredRow>, E> {
        self.0.stored_row(owner, key)
    }
    fn purge_watermark(&mut self, owner: &Owner) -> Result<Option<Hlc>, E> {
        self.0.purge_watermark(owner)
    }
    fn write_row(&mut self, write: &RowWrite<'_>) -> Result<(), E> {
        self.0.write_row(write)
    }
    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), E> {
        self.0.append_feed(owner, model, key)
    }
    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), E> {
        self.0.log_conflict(conflict)
    }
    fn count_push(&mut self, device: &DeviceId, counts: &PushCounts) -> Result<(), E> {
        self.0.count_push(device, counts)
    }
}

/// A [`DeviceTxn`] over a `&mut dyn DeviceTxn`, so `device_apply` runs over a harness's
/// transaction.
pub struct DynDevice<'a, E>(pub &'a mut dyn DeviceTxn<Error = E>);

impl<E> DeviceTxn for DynDevice<'_, E> {
    type Error = E;
    fn stored_version(&mut self, model: &str, key: &ItemKey) -> Result<Option<StoredVersion>, E> {
        self.0.stored_version(model, key)
    }
    fn put_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        item: Item,
        version: Hlc,
    ) -> Result<(), E> {
        self.0.put_remote(model, key, item, version)
    }
    fn delete_remote(&mut self, model: &str, key: &ItemKey, version: Hlc) -> Result<(), E> {
        self.0.delete_remote(model, key, version)
    }
    fn has_pending(&mut self, model: &str, key: &ItemKey) -> Result<bool, E> {
        self.0.has_pending(model, key)
    }
    fn take_superseded(
        &mut self,
        model: &str,
        key: &ItemKey,
        winner: Hlc,
    ) -> Result<Option<Change>, E> {
        self.0.take_superseded(model, key, winner)
    }
    fn live_model(&mut self, key: &ItemKey) -> Result<Option<String>, E> {
        self.0.live_model(key)
    }
    fn set_cursor(&mut self, cursor: u64) -> Result<(), E> {
        self.0.set_cursor(cursor)
    }
    fn set_feed_mark(&mut self, mark: FeedMark) -> Result<(), E> {
        self.0.set_feed_mark(mark)
    }
    fn resync_mark_seen(&mut self, model: &str, key: &ItemKey) -> Result<(), E> {
        self.0.resync_mark_seen(model, key)
    }
    fn resync_clear(&mut self) -> Result<(), E> {
        self.0.resync_clear()
    }
    fn resync_sweep(&mut self) -> Result<Vec<(String, ItemKey)>, E> {
        self.0.resync_sweep()
    }
}
