//! Errors of the device database.
//!
//! One enum for opening (`OpenError`) and one for operations (`DbError`): a caller can tell an
//! invalid input (nothing written, fix the input) from a storage failure (the disk or file is at
//! fault) from a policy refusal (the schema says the device may not write this model), and a
//! damaged file (`Damaged`: restore it from a backup) from everything else.

use std::path::PathBuf;

use devtables_logstore::{LogError, LogOpenError};
use devtables_schema::{SchemaChanges, ValidationError};

/// Longest text from outside (an engine's message, an item's key) kept in an error, in
/// characters: a 10 MB key must not become 10 MB of error message.
const MAX_DETAIL: usize = 300;

/// `text` cut to [`MAX_DETAIL`] characters.
pub(crate) fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL) {
        Some((at, _)) => format!("{}... ({} bytes in all)", &text[..at], text.len()),
        None => text.to_string(),
    }
}

/// Why [`crate::Db::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    // The store's error is part of the message, so it is not also the `source()` (see the
    // `From`s below): a caller printing the chain would show it twice.
    #[error("cannot open database file {path}: {}", open_cause(.error))]
    Storage {
        path: PathBuf,
        error: Box<LogOpenError>,
    },
    #[error("cannot prepare tables in database file {path}: {error}")]
    Tables { path: PathBuf, error: Box<LogError> },
    /// A database file of the redb formats (1 to 3) could not be converted to the log, for a
    /// reason other than damage (an I/O error, a full disk): the file is left as it was.
    #[error("cannot convert database file {path} from the redb format of earlier versions: {detail} (the file was left as it was; free space or fix the cause, then open it again)")]
    Convert { path: PathBuf, detail: String },
    #[error("database file {path} is in format {found}, but this version of devtables reads format {supported} (and converts older files at open): was it written by a newer devtables?")]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error("database file {path} is damaged: {detail}. Restore it from a backup; Db::open_read_only reads what is left without changing the file")]
    Damaged { path: PathBuf, detail: String },
    #[error("database file {path} does not exist: check the path (only Db::open creates a new database)")]
    Missing { path: PathBuf },
    #[error("no permission to {access} database file {path}: {source} (to read a file this process may not write, use Db::open_read_only)")]
    Permission {
        path: PathBuf,
        /// `read` or `read and write`.
        access: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the database's background thread: {0}")]
    Thread(std::io::Error),
    /// The schema differs from the one the file was written with in ways stored items may not
    /// survive; `changes` holds every difference (the message names the incompatible ones).
    #[error("database file {path} was written with a schema its items may not survive; this schema differs from it:\n{}\nTo accept the change, open the file allowing it (`devtables db --schema-change`, the agent's `allow_schema_change: true`, DbOptions::allow_schema_change; stored items that no longer validate stay as they are); or export its items with the old schema, then import them into a new file with this one", incompatible_list(.changes))]
    SchemaChanged {
        path: PathBuf,
        changes: SchemaChanges,
    },
    #[error("database file {path} records the schema it was written with in a form this devtables cannot read ({detail}): was it written by a newer devtables? Opening it allowing a schema change (`devtables db --schema-change`, the agent's `allow_schema_change: true`) records this schema over it")]
    SchemaRecord { path: PathBuf, detail: String },
    /// A field is `unique` in the schema, but two stored items hold the same value.
    #[error("{0}")]
    NotUnique(Box<UniqueCollision>),
}

/// Two stored items holding one value of a field the schema makes `unique`, found at open.
#[derive(Debug, thiserror::Error)]
#[error("database file {path}: {model}.{field} is unique in this schema, but items {} and {} both hold the value {}{}: open the file with a schema where the field is not unique and change or remove one of them (or export, fix the lines and import), then open it again", cut(.first), cut(.second), cut(.value), in_scope(.scope))]
pub struct UniqueCollision {
    pub path: PathBuf,
    pub model: String,
    pub field: String,
    pub value: String,
    /// The rendered `scope`, when the field has one.
    pub scope: Option<String>,
    /// The keys of the two items.
    pub first: String,
    pub second: String,
}

/// The incompatible changes, one per line.
fn incompatible_list(changes: &SchemaChanges) -> String {
    let lines: Vec<String> = changes.incompatible().map(|c| format!("  - {c}")).collect();
    lines.join("\n")
}

fn in_scope(scope: &Option<String>) -> String {
    match scope {
        Some(scope) => format!(" in scope {}", cut(scope)),
        None => String::new(),
    }
}

/// Why an operation on the database failed. Nothing was written when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unknown model \"{0}\": the schema has no such model")]
    UnknownModel(String),
    #[error("invalid input: {0}")]
    Invalid(ValidationError),
    #[error("{model} item {} already exists: use update or upsert to change it", cut(.key))]
    Exists { model: String, key: String },
    #[error("{model} item {} does not exist: create it first, or use upsert", cut(.key))]
    NotFound { model: String, key: String },
    #[error("model {0} is enabled only in the cloud (process.enable = 'cloud'): it cannot be written on the device")]
    NotOnDevice(String),
    #[error("model {0} is synced down from the cloud (process.sync = 'down'): change it through the cloud API")]
    DownOnly(String),
    #[error("{model} item {} is {size} bytes, above the limit of {max} bytes (DbOptions::max_item_bytes)", cut(.key))]
    TooLarge {
        model: String,
        key: String,
        size: usize,
        max: usize,
    },
    /// A value of a `unique` field that another item holds (within the field's scope).
    #[error("{model}.{field} is unique{}: the value {} is already held by item {}; choose another value, or change or remove that item first", in_scope(.scope), cut(.value), cut(.holder))]
    NotUnique {
        model: String,
        field: String,
        value: String,
        /// The rendered `scope`, when the field has one.
        scope: Option<String>,
        /// The key of the item holding the value.
        holder: String,
    },
    #[error("{model}: the value of index attribute {field} contains a NUL character, which keys cannot hold")]
    BadIndexValue { model: String, field: String },
    #[error("index \"{0}\" is not defined in the schema")]
    UnknownIndex(String),
    #[error(
        "invalid pagination token: {0} (pass back the `next` value of a previous page unchanged)"
    )]
    BadCursor(String),
    #[error("a transaction holds at most {max} operations, this one has {count}: split it")]
    TooManyOperations { count: usize, max: usize },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Input that cannot be imported as it is (not UTF-8, a line too long, an item naming no
    /// model): what is wrong with it, never a guess at what was meant.
    #[error("invalid input: {0}")]
    BadInput(String),
    #[error("write refused: {0}")]
    Refused(Box<dyn std::error::Error + Send + Sync>),
    #[error("import line {line}: {source}")]
    Import {
        line: u64,
        #[source]
        source: Box<DbError>,
    },
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("storage error: {0}")]
    Storage(LogError),
    #[error("database file {path} is damaged: {detail}. Restore it from a backup; Db::open_read_only reads what is left without changing the file")]
    Damaged { path: PathBuf, detail: String },
    #[error("database file {path} was opened read-only (Db::open_read_only): open it with Db::open to write")]
    ReadOnly { path: PathBuf },
    #[error("the database is closed")]
    Closed,
}

/// What [`OpenError::Storage`] says went wrong: the log store's error without its path (the
/// variant names the file), with a hint for a file another handle holds.
fn open_cause(source: &LogOpenError) -> String {
    match source {
        LogOpenError::InUse { .. } => {
            "it is already open, locked by another handle or process (is another process using it?)"
                .into()
        }
        LogOpenError::Io { source, .. } => source.to_string(),
        LogOpenError::NotALog { .. } => "it is not a devtables database file".into(),
        LogOpenError::NewerFormat { found, .. } => format!(
            "its log format {found} is newer than this build reads ({})",
            devtables_logstore::FORMAT_VERSION
        ),
        LogOpenError::Damaged { offset, detail, .. } => {
            format!("damaged at byte {offset}: {}", cut(detail))
        }
    }
}

// The wrapped errors below are part of their variant's message, so they are not also returned
// as its `source()`: a caller that prints the error with its chain (anyhow's `{:#}`) would show
// the same text twice. Hence these `From`s by hand instead of thiserror's `#[from]` (which makes
// the field the source).
impl From<ValidationError> for DbError {
    fn from(e: ValidationError) -> Self {
        DbError::Invalid(e)
    }
}

impl From<serde_json::Error> for DbError {
    fn from(e: serde_json::Error) -> Self {
        DbError::Json(e)
    }
}

impl From<std::io::Error> for DbError {
    fn from(e: std::io::Error) -> Self {
        DbError::Io(e)
    }
}

impl From<LogError> for DbError {
    /// Without the file's path: `Inner::engine` turns damage into [`DbError::Damaged`] and a
    /// refused write into [`DbError::ReadOnly`], naming the file.
    fn from(e: LogError) -> Self {
        match e {
            LogError::Closed => DbError::Closed,
            other => DbError::Storage(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_is_cut_on_a_character_boundary_and_says_how_long_it_was() {
        let long = "é".repeat(MAX_DETAIL + 50);
        let short = cut(&long);
        let kept: String = long.chars().take(MAX_DETAIL).collect();
        assert_eq!(short, format!("{kept}... ({} bytes in all)", long.len()));
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn a_huge_key_is_not_echoed_whole() {
        let key = "k".repeat(10 * 1024 * 1024);
        for e in [
            DbError::Exists {
                model: "M".into(),
                key: key.clone(),
            },
            DbError::NotFound {
                model: "M".into(),
                key: key.clone(),
            },
            DbError::TooLarge {
                model: "M".into(),
                key: key.clone(),
                size: 1,
                max: 0,
            },
        ] {
            let shown = e.to_string();
            assert!(shown.len() < 600, "{} bytes", shown.len());
            assert!(shown.contains("10485760 bytes in all"), "{shown}");
        }
    }
}
