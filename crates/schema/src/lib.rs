//! # devtables-schema
//!
//! Parses and validates a OneTable 1.1.0-compatible JSON5 schema and performs everything the
//! schema defines per item: casting, validation, defaults, generated ids, `${field}` value
//! templates for keys, timestamps, hidden fields, TTL and query-key resolution.
//!
//! The database crate stores what this crate prepares; the replication layer uses the same
//! models to check items arriving from other nodes ([`Model::normalize_stored`]). Nothing
//! here does I/O except [`Schema::load`], and the caller owns the clock (`now_ms`).
//!
//! ```
//! use devtables_schema::{Item, Schema};
//! let schema = Schema::from_json5(r#"{
//!     format: 'onetable:1.1.0', version: '1.0.0',
//!     indexes: {primary: {hash: 'pk', sort: 'sk'}},
//!     models: {Setting: {
//!         pk: {type: 'string', value: 'device#${deviceId}'},
//!         sk: {type: 'string', value: 'setting#${name}'},
//!         deviceId: {type: 'string', required: true},
//!         name: {type: 'string', required: true},
//!     }},
//! }"#).unwrap();
//! let model = schema.model("Setting").unwrap();
//! let input: Item = serde_json::from_str(r#"{"deviceId": "d1", "name": "volume"}"#).unwrap();
//! let item = model.prepare_create(&input, 0).unwrap();
//! assert_eq!(item["pk"], "device#d1");
//! assert_eq!(item["sk"], "setting#volume");
//! ```
//!
//! Modules: `parse` (loading and schema rules), `schema` (schema-wide types), `model`
//! (per-item operations), `field` (types, casting, validation), `template` (`${field}`
//! templates), `query` (find properties → key condition and filters), `date`, `error`.

mod date;
mod error;
mod field;
mod model;
mod parse;
mod query;
mod schema;
mod template;

pub use error::{Reason, SchemaError, ValidationError};
pub use field::{Field, FieldType};
pub use model::{ItemKey, Model};
pub use query::{Filter, FilterOp, Query, SortCondition};
pub use schema::{Enable, Index, Params, Process, Schema, SyncDirection};

/// A stored or input item: a JSON object.
pub type Item = serde_json::Map<String, serde_json::Value>;
