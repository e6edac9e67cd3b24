//! The device database behind the C ABI: open and close, the item operations with JSON in and
//! out, paging, and batches that commit whole or not at all.
//!
//! Why batches and not begin/commit/rollback: a write transaction of the database is a closure
//! (`Db::write`), and it holds the database's one writer slot while it runs. Handing that slot to
//! C between calls would let a forgotten commit, an early `return` or a crash of the caller's
//! thread block every writer, the agent's included, with no way to tell. A batch is one call: its
//! operations commit together (items, indexes, outbox entries, in one redb transaction) or none
//! does, and the slot is never held by C code. A read-modify-write needs no transaction either:
//! `dt_update` changes only the fields it is given.

use std::collections::HashMap;
use std::ffi::c_char;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devtables_db::{Db, DbOptions, FindOptions, TxnOp};
use devtables_schema::{Item, Schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::changes::Subscription;
use crate::error::{guard, CapiError, DtCode};
use crate::text::{borrow, borrow_opt, clear, json, object, put};

/// An open device database (`dt_db` in C). Opaque to C; shared by every thread.
pub struct DtDb {
    pub(crate) db: Db,
    /// Set while an agent replicates this database: it may not be closed then, and a second
    /// agent may not start on it (one agent per database).
    pub(crate) agent_running: Arc<AtomicBool>,
    /// The change callbacks, by the id `dt_subscribe` gave, so they can be removed (and waited
    /// for) one by one, and all at close.
    pub(crate) subscriptions: Mutex<HashMap<u64, Subscription>>,
}

impl DtDb {
    pub(crate) fn new(db: Db) -> DtDb {
        DtDb {
            db,
            agent_running: Arc::new(AtomicBool::new(false)),
            subscriptions: Mutex::default(),
        }
    }

    /// Removes every change callback (waiting for one that runs), stops the background thread
    /// and flushes.
    pub(crate) fn close(self) -> Result<(), CapiError> {
        let subscriptions: Vec<Subscription> = self
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for subscription in subscriptions {
            subscription.remove(&self.db);
        }
        self.db.close()?;
        Ok(())
    }
}

/// The database behind a handle the caller passed.
///
/// # Safety
/// `db` is NULL or a live handle from `dt_db_open` or `dt_agent_db`.
pub(crate) unsafe fn handle<'a>(db: *const DtDb) -> Result<&'a DtDb, CapiError> {
    // SAFETY: the caller promised a live handle or NULL.
    unsafe { db.as_ref() }.ok_or(CapiError::Null("db"))
}

/// Opens the device database at `db_path` (created when missing) for the schema in the JSON5
/// file at `schema_path`; with `db_path` NULL the database is held in memory only. On success
/// `*out` is the handle, to be closed with `dt_db_close`; on failure `*out` is NULL.
///
/// Writes are durable when they return (`immediate` durability, group commit). To replicate the
/// database, pass the handle to `dt_agent_start`.
///
/// # Safety
/// `schema_path` and `db_path` are NULL or NUL-terminated strings; `out` is NULL or points to
/// writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_db_open(
    schema_path: *const c_char,
    db_path: *const c_char,
    out: *mut *mut DtDb,
) -> DtCode {
    guard("dt_db_open", || {
        if out.is_null() {
            return Err(CapiError::Null("out"));
        }
        // SAFETY: non-NULL and writable, as the caller promised.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: the strings are as the caller promised.
        let schema_path = unsafe { borrow(schema_path, "schema_path") }?;
        let db_path = unsafe { borrow_opt(db_path, "db_path") }?;
        let schema = Arc::new(Schema::load(Path::new(schema_path))?);
        let db = match db_path {
            Some(path) => Db::open(path, schema, DbOptions::default())?,
            None => Db::open_in_memory(schema, DbOptions::default())?,
        };
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(Box::new(DtDb::new(db))) };
        Ok(())
    })
}

/// Closes a database from `dt_db_open`: removes its change callbacks, makes every write durable
/// and frees the handle (also when the final flush fails: the code and `dt_last_error` say so).
/// NULL is accepted and does nothing.
///
/// Refused with `DT_ERR_STATE` (the handle stays valid) while an agent runs on the database:
/// stop the agent first. Never call it from a change callback, nor while another thread uses the
/// handle.
///
/// # Safety
/// `db` is NULL or a live handle from `dt_db_open`, not used again after a successful close.
#[no_mangle]
pub unsafe extern "C" fn dt_db_close(db: *mut DtDb) -> DtCode {
    guard("dt_db_close", || {
        if db.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle, as the caller promised.
        let dt = unsafe { &*db };
        if dt.agent_running.load(Ordering::SeqCst) {
            return Err(CapiError::State(
                "an agent runs on this database: stop it with dt_agent_stop first (a database \
                 the agent opened is closed by dt_agent_stop)"
                    .into(),
            ));
        }
        if crate::changes::in_callback() {
            return Err(CapiError::State(
                "dt_db_close was called from a change callback: close the database after the \
                 callback returned"
                    .into(),
            ));
        }
        // SAFETY: made by Box::into_raw in dt_db_open; the caller gives it up.
        let owned = unsafe { Box::from_raw(db) };
        owned.close()
    })
}

/// Runs one item operation: the shared frame of `dt_create`, `dt_update`, `dt_upsert`.
///
/// # Safety
/// As for the exported functions.
unsafe fn write_op(
    what: &'static str,
    db: *const DtDb,
    model: *const c_char,
    item_json: *const c_char,
    out_json: *mut *mut c_char,
    op: impl FnOnce(&Db, &str, &Item) -> Result<Item, devtables_db::DbError>,
) -> DtCode {
    // SAFETY: `out_json` as the caller promised.
    unsafe { clear(out_json) };
    guard(what, || {
        // SAFETY: the pointers are as the caller promised.
        let dt = unsafe { handle(db) }?;
        let model = unsafe { borrow(model, "model") }?;
        let item = unsafe { object(item_json, "item_json", false) }?;
        let written = op(&dt.db, model, &item)?;
        // SAFETY: as above.
        unsafe { put(out_json, &written) };
        Ok(())
    })
}

/// Creates an item of `model` from the JSON object `item_json` (generated fields, such as a
/// `ulid` id, and key templates are filled in). When `out_json` is not NULL, `*out_json` is the
/// item as stored (hidden fields left out), owned by the caller: free it with `dt_free`. It is
/// NULL after a failure.
///
/// `DT_ERR_CONFLICT`: the item exists (use `dt_update` or `dt_upsert`). `DT_ERR_INVALID`: the
/// schema refuses it. `DT_ERR_REFUSED`: the model may not be written on the device.
/// `DT_ERR_FULL`: the sync outbox is full.
///
/// # Safety
/// `db` is a live handle; `model` and `item_json` are NUL-terminated strings; `out_json` is NULL
/// or points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_create(
    db: *mut DtDb,
    model: *const c_char,
    item_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: forwarded as the caller promised.
    unsafe { write_op("dt_create", db, model, item_json, out_json, Db::create) }
}

/// Changes the fields of the item that `item_json` holds (its key fields name the item; other
/// fields are left as they are). `DT_NOT_FOUND` when the item does not exist. `*out_json`, when
/// asked for, is the whole item after the change (free it with `dt_free`).
///
/// # Safety
/// As for `dt_create`.
#[no_mangle]
pub unsafe extern "C" fn dt_update(
    db: *mut DtDb,
    model: *const c_char,
    item_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: forwarded as the caller promised.
    unsafe { write_op("dt_update", db, model, item_json, out_json, Db::update) }
}

/// Like `dt_update`, but creates the item when it does not exist.
///
/// # Safety
/// As for `dt_create`.
#[no_mangle]
pub unsafe extern "C" fn dt_upsert(
    db: *mut DtDb,
    model: *const c_char,
    item_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: forwarded as the caller promised.
    unsafe { write_op("dt_upsert", db, model, item_json, out_json, Db::upsert) }
}

/// Reads the item of `model` that the key fields in `key_json` name. `DT_NOT_FOUND` (and
/// `*out_json` NULL) when there is none; otherwise `*out_json` is the item, owned by the caller
/// (free it with `dt_free`).
///
/// # Safety
/// `db` is a live handle; `model` and `key_json` are NUL-terminated strings; `out_json` points to
/// writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_get(
    db: *mut DtDb,
    model: *const c_char,
    key_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: as the caller promised.
    unsafe { clear(out_json) };
    guard("dt_get", || {
        if out_json.is_null() {
            return Err(CapiError::Null("out_json"));
        }
        // SAFETY: the pointers are as the caller promised.
        let dt = unsafe { handle(db) }?;
        let model = unsafe { borrow(model, "model") }?;
        let key = unsafe { object(key_json, "key_json", false) }?;
        match dt.db.get(model, &key)? {
            Some(item) => {
                // SAFETY: as above.
                unsafe { put(out_json, &item) };
                Ok(())
            }
            None => Err(not_found(model, &key)),
        }
    })
}

/// Removes the item of `model` that the key fields in `key_json` name. `DT_NOT_FOUND` when there
/// was none. `*out_json`, when asked for, is the item removed (free it with `dt_free`).
///
/// # Safety
/// As for `dt_create`.
#[no_mangle]
pub unsafe extern "C" fn dt_remove(
    db: *mut DtDb,
    model: *const c_char,
    key_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: as the caller promised.
    unsafe { clear(out_json) };
    guard("dt_remove", || {
        // SAFETY: the pointers are as the caller promised.
        let dt = unsafe { handle(db) }?;
        let model = unsafe { borrow(model, "model") }?;
        let key = unsafe { object(key_json, "key_json", false) }?;
        match dt.db.remove(model, &key)? {
            Some(item) => {
                // SAFETY: as above.
                unsafe { put(out_json, &item) };
                Ok(())
            }
            None => Err(not_found(model, &key)),
        }
    })
}

fn not_found(model: &str, key: &Item) -> CapiError {
    CapiError::NotFound {
        model: model.to_string(),
        key: Value::Object(key.clone()).to_string(),
    }
}

/// The options of `dt_find`, as JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FindArgs {
    /// At most this many items in the page.
    #[serde(default)]
    limit: Option<usize>,
    /// The `next` of the previous page.
    #[serde(default)]
    next: Option<String>,
    /// A secondary index of the schema.
    #[serde(default)]
    index: Option<String>,
    #[serde(default)]
    reverse: bool,
    /// Include hidden fields (keys, index attributes).
    #[serde(default)]
    hidden: bool,
}

/// One page of `dt_find`, as JSON.
#[derive(Serialize)]
struct PageOut<'a> {
    items: &'a [Item],
    next: Option<&'a str>,
}

/// Finds items of `model`: `props_json` (NULL: `{}`) holds key fields (a partly resolved sort
/// key is a begins-with) and filters on other fields; `options_json` (NULL: none) is
/// `{"limit": N, "next": "...", "index": "gs1", "reverse": false, "hidden": false}`.
/// `*out_json` is one page, `{"items": [...], "next": "..." | null}`, owned by the caller (free
/// it with `dt_free`): pass `next` back in the options for the following page, until it is
/// null.
///
/// # Safety
/// `db` is a live handle; `model` is a NUL-terminated string, `props_json` and `options_json`
/// NULL or NUL-terminated strings; `out_json` points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_find(
    db: *mut DtDb,
    model: *const c_char,
    props_json: *const c_char,
    options_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: as the caller promised.
    unsafe { clear(out_json) };
    guard("dt_find", || {
        if out_json.is_null() {
            return Err(CapiError::Null("out_json"));
        }
        // SAFETY: the pointers are as the caller promised.
        let dt = unsafe { handle(db) }?;
        let model = unsafe { borrow(model, "model") }?;
        let props = unsafe { object(props_json, "props_json", true) }?;
        let args: FindArgs = if options_json.is_null() {
            FindArgs::default()
        } else {
            // SAFETY: as above.
            let value = unsafe { json(options_json, "options_json") }?;
            serde_json::from_value(value).map_err(|source| CapiError::Json {
                name: "options_json",
                source,
            })?
        };
        let options = FindOptions {
            index: args.index,
            limit: args.limit,
            next: args.next,
            reverse: args.reverse,
            hidden: args.hidden,
        };
        let page = dt.db.find(model, &props, &options)?;
        // SAFETY: as above.
        unsafe {
            put(
                out_json,
                &PageOut {
                    items: &page.items,
                    next: page.next.as_deref(),
                },
            )
        };
        Ok(())
    })
}

/// One operation of `dt_batch`, as JSON: the `--stdin` operation shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOp {
    op: BatchKind,
    model: String,
    item: Item,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BatchKind {
    Create,
    Update,
    Upsert,
    Remove,
}

/// Runs the operations of the JSON array `ops_json` in one transaction: every one commits, or
/// none does (the first failure's code and message are returned, and nothing is written). Each
/// operation is `{"op": "create" | "update" | "upsert" | "remove", "model": "...", "item":
/// {...}}` (for `remove`, `item` holds the key fields). `*out_json`, when asked for, is an array
/// with one entry per operation: the item written, the item removed, or null for a `remove` of
/// nothing (free it with `dt_free`). A batch holds at most 10,000 operations.
///
/// # Safety
/// `db` is a live handle; `ops_json` is a NUL-terminated string; `out_json` is NULL or points to
/// writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_batch(
    db: *mut DtDb,
    ops_json: *const c_char,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: as the caller promised.
    unsafe { clear(out_json) };
    guard("dt_batch", || {
        // SAFETY: the pointers are as the caller promised.
        let dt = unsafe { handle(db) }?;
        let value = unsafe { json(ops_json, "ops_json") }?;
        if !value.is_array() {
            return Err(CapiError::Shape {
                name: "ops_json",
                expected: "a JSON array of operations",
            });
        }
        let ops: Vec<BatchOp> =
            serde_json::from_value(value).map_err(|source| CapiError::Json {
                name: "ops_json",
                source,
            })?;
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op.op {
                BatchKind::Create => TxnOp::Create {
                    model: op.model,
                    item: op.item,
                },
                BatchKind::Update | BatchKind::Upsert => TxnOp::Update {
                    model: op.model,
                    item: op.item,
                    upsert: matches!(op.op, BatchKind::Upsert),
                },
                BatchKind::Remove => TxnOp::Remove {
                    model: op.model,
                    key: op.item,
                },
            })
            .collect();
        let results = dt.db.transaction(&ops)?;
        // SAFETY: as above.
        unsafe { put(out_json, &results) };
        Ok(())
    })
}
