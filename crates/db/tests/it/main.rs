//! Integration tests of the device database: one binary, one module per concern.

mod compaction;
mod crash;
mod create_owned;
mod damaged;
mod format;
mod layout;
mod memory;
mod ops;
mod oracle;
mod schema_change;
mod unique;
mod view;

use std::sync::Arc;

use devtables_db::{Db, DbOptions};
use devtables_schema::{Item, Schema};
use serde_json::{json, Value};

/// A small schema with every feature the tests touch: templates, a secondary index, a TTL field.
pub const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {
        primary: {hash: 'pk', sort: 'sk'},
        gs1: {hash: 'gs1pk', sort: 'gs1sk'},
    },
    params: {timestamps: true, isoDates: true},
    process: {Reading: {sync: 'up'}, Cfg: {enable: 'cloud'}, Cmd: {sync: 'down'}},
    models: {
        Reading: {
            pk: {type: 'string', value: 'dev#${deviceId}'},
            sk: {type: 'string', value: 'r#${id}'},
            id: {type: 'string', required: true},
            deviceId: {type: 'string', required: true},
            value: {type: 'number', required: true},
            status: {type: 'string', enum: ['ok', 'warn', 'fault'], default: 'ok'},
            note: {type: 'string'},
            gs1pk: {type: 'string', value: 'status#${status}'},
            gs1sk: {type: 'string', value: 'r#${id}'},
            expires: {type: 'date', ttl: true},
        },
        Cfg: {
            pk: {type: 'string', value: 'cfg#'},
            sk: {type: 'string', value: 'cfg#${name}'},
            name: {type: 'string', required: true},
        },
        Cmd: {
            pk: {type: 'string', value: 'cmd#'},
            sk: {type: 'string', value: 'cmd#${name}'},
            name: {type: 'string', required: true},
        },
    },
}"#;

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::from_json5(SCHEMA).expect("test schema loads"))
}

pub fn item(v: Value) -> Item {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

pub fn reading(id: &str, value: f64, status: &str) -> Item {
    item(json!({"id": id, "deviceId": "d1", "value": value, "status": status}))
}

pub fn key(id: &str) -> Item {
    item(json!({"id": id, "deviceId": "d1"}))
}

pub fn open(path: &std::path::Path, options: DbOptions) -> Db {
    Db::open(path, schema(), options).expect("database opens")
}
