//! The schema a database file was written with, recorded in the file and checked at every open.
//!
//! Items are stored as the schema of their write made them, and are not rewritten when the
//! application's schema changes. So the file records the schema's [`SchemaShape`] (`meta`
//! keys `schema`, its JSON, and `schema_fingerprint`), and every open compares it with the
//! schema it is given ([`compare_shapes`]; the rules are in `devtables_schema`'s `shape`
//! module and docs/schema.md):
//! - nothing recorded (a new file, or one from before the record): the current shape is
//!   recorded;
//! - the same fingerprint: nothing to do;
//! - compatible changes (an added model or optional field, a widened enum...): accepted,
//!   logged at info, and the new shape recorded;
//! - an incompatible change: the open is refused with [`OpenError::SchemaChanged`], naming
//!   each difference, unless [`crate::DbOptions::allow_schema_change`] accepts it (logged at
//!   warn; items that no longer validate stay as they are).
//!
//! A read-only open compares the same way but records nothing. An in-memory database has no
//! earlier schema and records none (nothing outlives it; a fleet of them saves the bytes).

use std::path::Path;

use devtables_logstore::LogWrite;
use devtables_schema::{compare_shapes, SchemaChanges, SchemaShape};

use crate::{tables, DbError, Inner, OpenError};

/// `meta` key of the recorded shape (JSON).
pub(crate) const SHAPE_KEY: &str = "schema";
/// `meta` key of the recorded shape's fingerprint.
pub(crate) const FINGERPRINT_KEY: &str = "schema_fingerprint";

/// What the open found and decided about the file's schema.
pub(crate) struct SchemaState {
    /// The differences between the recorded schema and the current one (empty: none, or
    /// nothing recorded).
    pub(crate) changes: SchemaChanges,
    /// The fingerprint the file records once open.
    pub(crate) fingerprint: Option<String>,
    /// The fingerprint recorded before this open, if any.
    pub(crate) previous: Option<String>,
    /// Whether the changes were incompatible and accepted by `allow_schema_change`.
    pub(crate) forced: bool,
}

/// The record to write in the opening transaction.
pub(crate) struct Record {
    shape_json: String,
    fingerprint: String,
}

impl Record {
    pub(crate) fn write(&self, tx: &mut LogWrite<'_>) -> Result<(), DbError> {
        tables::meta_put(tx, SHAPE_KEY, &self.shape_json)?;
        tables::meta_put(tx, FINGERPRINT_KEY, &self.fingerprint)
    }
}

/// Compares the recorded schema with `inner`'s; returns what to tell the caller and the record
/// to write (none when nothing changed, for read-only opens and in-memory databases).
pub(crate) fn check(inner: &Inner) -> Result<(SchemaState, Option<Record>), OpenError> {
    let current = inner.schema.shape();
    let fingerprint = current.fingerprint();
    if inner.in_memory {
        let state = SchemaState {
            changes: SchemaChanges::default(),
            fingerprint: None,
            previous: None,
            forced: false,
        };
        return Ok((state, None));
    }
    let (recorded_json, previous) = read_record(inner)?;
    let record = || {
        (!inner.read_only).then(|| Record {
            shape_json: serde_json::to_string(&current).unwrap_or_default(),
            fingerprint: fingerprint.clone(),
        })
    };
    let Some(previous) = previous else {
        let state = SchemaState {
            changes: SchemaChanges::default(),
            fingerprint: (!inner.read_only).then(|| fingerprint.clone()),
            previous: None,
            forced: false,
        };
        return Ok((state, record()));
    };
    if previous == fingerprint {
        let state = SchemaState {
            changes: SchemaChanges::default(),
            fingerprint: Some(fingerprint),
            previous: Some(previous),
            forced: false,
        };
        return Ok((state, None));
    }
    let allow = inner.options.allow_schema_change;
    let recorded: Result<SchemaShape, String> = recorded_json
        .ok_or_else(|| "the fingerprint is recorded without its schema".to_string())
        .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()));
    let changes = match recorded {
        Ok(old) => compare_shapes(&old, &current),
        Err(detail) if allow => {
            tracing::warn!(
                path = %inner.path.display(),
                "the recorded schema cannot be read ({detail}); DbOptions::allow_schema_change records the current one over it"
            );
            SchemaChanges::default()
        }
        Err(detail) => {
            return Err(OpenError::SchemaRecord {
                path: inner.path.clone(),
                detail,
            })
        }
    };
    let compatible = changes.is_compatible();
    if !compatible && !allow {
        return Err(OpenError::SchemaChanged {
            path: inner.path.clone(),
            changes,
        });
    }
    let recording = record();
    let state = SchemaState {
        changes,
        fingerprint: Some(if recording.is_some() {
            fingerprint
        } else {
            previous.clone()
        }),
        previous: Some(previous),
        forced: !compatible,
    };
    Ok((state, recording))
}

/// The recorded shape (JSON) and fingerprint, if any.
fn read_record(inner: &Inner) -> Result<(Option<String>, Option<String>), OpenError> {
    let tables_err = |e: DbError| crate::tables_error(&inner.path, e);
    let read = inner.store.read().map_err(|e| tables_err(e.into()))?;
    let get = |key: &str| tables::meta_get(&read, key).map_err(tables_err);
    Ok((get(SHAPE_KEY)?, get(FINGERPRINT_KEY)?))
}

/// Logs what the open decided, once the opening transaction committed.
pub(crate) fn log(path: &Path, state: &SchemaState, read_only: bool) {
    let Some(previous) = &state.previous else {
        return;
    };
    if state.changes.is_empty() && state.fingerprint.as_deref() == Some(previous.as_str()) {
        return;
    }
    let outcome = if read_only {
        "accepted for this read-only open (nothing recorded)"
    } else {
        "recorded the new schema"
    };
    if state.forced {
        tracing::warn!(
            path = %path.display(),
            from = %previous,
            changes = %state.changes,
            "the schema changed incompatibly and DbOptions::allow_schema_change accepts it; {outcome}; stored items that no longer validate stay as they are"
        );
    } else {
        tracing::info!(
            path = %path.display(),
            from = %previous,
            changes = %state.changes,
            "the schema changed compatibly; {outcome}"
        );
    }
}
