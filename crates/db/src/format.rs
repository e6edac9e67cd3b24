//! The file's format number, checked at every open before anything else is read.
//!
//! The format (`meta` key `format`) names the layout of the tables and the stored form of the
//! items:
//! - 1 to 3: the redb files of earlier versions (`legacy`), converted to a log at open;
//! - 4 (this version): the tables of format 3 (`tables`), in the log of `devtables-logstore`;
//! - none recorded and no tables: a new database, which gets the current format;
//! - anything else in a log (a newer version wrote the file) is refused with
//!   [`OpenError::UnsupportedFormat`]: nothing is written.

use crate::{tables, tables_error, DbError, Inner, OpenError};

/// The format this version writes and reads.
pub(crate) const FORMAT: u32 = 4;

/// Reads the log's format; records it in a new database, refuses one it does not know.
pub(crate) fn check_format(inner: &Inner) -> Result<(), OpenError> {
    let tables_err = |e: DbError| tables_error(&inner.path, e);
    let (found, empty) = {
        let read = inner.store.read().map_err(|e| tables_err(e.into()))?;
        let found = tables::meta_get(&read, tables::FORMAT_KEY).map_err(tables_err)?;
        (found, read.table_names().is_empty())
    };
    match found {
        Some(f) if f == FORMAT.to_string() => Ok(()),
        Some(f) => Err(OpenError::UnsupportedFormat {
            path: inner.path.clone(),
            found: f,
            supported: FORMAT,
        }),
        None if empty && !inner.store.is_read_only() => record_format(inner).map_err(tables_err),
        // A read-only open of a log that holds nothing yet: nothing to read, nothing written.
        None if empty => Ok(()),
        None => Err(OpenError::UnsupportedFormat {
            path: inner.path.clone(),
            found: "none recorded".into(),
            supported: FORMAT,
        }),
    }
}

/// Records the current format in a new database, durably.
fn record_format(inner: &Inner) -> Result<(), DbError> {
    let mut tx = inner.store.write()?;
    tables::meta_put(&mut tx, tables::FORMAT_KEY, &FORMAT.to_string())?;
    tx.commit(true)?;
    Ok(())
}
