//! Integration tests of schema loading: an Ioto-style schema, blended from parts the way the
//! published Ioto apps are (`schema.json5` blending `parts/*.json5` and an app schema), loaded
//! from files and used through the public API only.

use std::path::{Path, PathBuf};

use devtables_schema::{
    Field, FieldType, Generate, Item, MappedAttribute, Reason, Schema, SchemaError, SyncDirection,
    Timestamps,
};
use serde_json::{json, Value};

const NOW: i64 = 1_795_629_600_000;
const LATER: i64 = NOW + 60_000;

/// The OneTable part: format, indexes, params and the tool keys OneTable schemas carry.
const ONETABLE_PART: &str = r#"
// Shared by every app: the table layout.
{
    format: 'onetable:1.1.0',
    version: '0.0.1',
    indexes: {
        primary: {hash: 'pk', sort: 'sk', description: 'the table key'},
        gs1: {hash: 'gs1pk', sort: 'gs1sk', project: 'all', follow: true},
    },
    params: {isoDates: true, timestamps: 'create', typeField: '_type', separator: '#', warn: false},
    queries: {
        'Recent logs': {index: 'primary', limit: 100, model: 'Log', operation: 'Begins with', type: 'Entity'},
    },
    extensions: {designer: {layout: 'grid'}},
}
"#;

/// The cloud part: device-side logs and a key/value store, with the agent's `process` keys.
const CLOUD_PART: &str = r#"
{
    process: {
        Log: {enable: 'both', sync: 'up', show: true, actions: true},
        Store: {enable: 'both', notify: 'default', sync: 'up', actions: true, delay: 0},
        SyncState: {enable: 'device', show: false},
    },
    models: {
        Log: {
            pk: {type: 'string', value: 'l#${deviceId}', hidden: true},
            sk: {type: 'string', value: 'l#${id}', hidden: true},
            id: {type: 'string', generate: 'ulid', notes: 'Unique ID'},
            deviceId: {type: 'string', required: true, readonly: true, notes: 'Owning device'},
            message: {type: 'string'},
            context: {type: 'object', default: {}},
            created: {type: 'date', readonly: true},
            updated: {type: 'date', readonly: true},
            expires: {type: 'date', ttl: true},
            _source: {type: 'string', hidden: true},
        },
        Store: {
            pk: {type: 'string', value: 's#${deviceId}', hidden: true},
            sk: {type: 'string', value: 's#${key}', hidden: true},
            deviceId: {type: 'string', required: true, readonly: true},
            key: {type: 'string', required: true},
            value: {type: 'object', required: true},
            type: {type: 'string', required: true},
            description: {type: 'string'},
        },
        SyncState: {
            description: 'Device-side sync state',
            sk: {type: 'string', value: 'state#'},
            lastSync: {type: 'date', notes: 'Last time the device was synced with the cloud'},
        },
    },
}
"#;

/// The local part: users and dashboards kept on the device only.
const LOCAL_PART: &str = r#"
{
    process: {
        User: {enable: 'device', show: true},
        Dashboard: {enable: 'device', show: false},
    },
    models: {
        User: {
            sk: {type: 'string', value: 'user#${id}', hidden: true},
            id: {type: 'string', generate: 'uid'},
            username: {type: 'string', required: true, unique: true},
            password: {type: 'string', sync: 'none', discard: true},
            role: {type: 'string', required: true, enum: ['user', 'admin', 'super'], default: 'user'},
        },
        Dashboard: {
            sk: {type: 'string', value: 'dashboard#${id}', hidden: true},
            id: {type: 'string', generate: 'uid(16)'},
            name: {type: 'string', required: true},
            css: {type: 'array', default: [], partial: false},
            range: {type: 'object', partial: false},
            refresh: {type: 'number', default: 60},
            widgets: {
                type: 'array',
                default: [],
                partial: false,
                items: {
                    type: 'object',
                    default: {},
                    partial: false,
                    schema: {
                        css: {type: 'array', default: []},
                        dimensions: {type: 'object', default: {}},
                        height: {type: 'string'},
                        type: {type: 'string', required: true},
                        z: {type: 'number'},
                    },
                },
            },
        },
    },
}
"#;

/// The app's own models (Eco-house style): pivots, metrics, `map`, notes.
const APP_PART: &str = r#"
{
    process: {
        Flow: {
            enable: 'both',
            sync: 'up',
            metrics: [{fields: ['grid', 'solar'], buffer: {count: 10, elapsed: 30}}],
            pivot: true,
            actions: true,
        },
    },
    models: {
        Flow: {
            pk: {type: 'string', value: 'device#${deviceId}', hidden: true},
            sk: {type: 'string', value: 'flow#', hidden: true},
            deviceId: {type: 'string', required: true, readonly: true},
            grid: {type: 'number', default: 0, note: 'Grid supply in kW'},
            solar: {type: 'number', default: 0, note: 'Solar supply in kW', map: 'pv'},
            readings: {type: 'array', items: {type: 'number'}},
            updated: {type: 'date', readonly: true, hidden: true},
        },
    },
}
"#;

/// The app's schema file: it blends the parts, as the Ioto apps' `config/schema.json5` do.
const APP_SCHEMA: &str = r#"
/*
    schema.json5 -- the app's schema
 */
{
    version: 'latest',
    description: 'Eco house schema',
    blend: [
        '../schemas/parts/OneTable.json5',
        '../schemas/parts/CloudSchema.json5',
        '../schemas/parts/LocalSchema.json5',
        'AppSchema.json5',
    ],
    process: {},
    models: {},
}
"#;

/// Write the parts and the app schema under a temporary directory; returns the directory and
/// the app schema's path.
fn write_app(app_part: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let parts = dir.path().join("schemas/parts");
    let app = dir.path().join("app");
    std::fs::create_dir_all(&parts).expect("parts directory");
    std::fs::create_dir_all(&app).expect("app directory");
    for (path, text) in [
        (parts.join("OneTable.json5"), ONETABLE_PART),
        (parts.join("CloudSchema.json5"), CLOUD_PART),
        (parts.join("LocalSchema.json5"), LOCAL_PART),
        (app.join("AppSchema.json5"), app_part),
        (app.join("schema.json5"), APP_SCHEMA),
    ] {
        std::fs::write(&path, text).expect("write schema part");
    }
    let main = app.join("schema.json5");
    (dir, main)
}

fn load_app() -> (tempfile::TempDir, Schema) {
    let (dir, main) = write_app(APP_PART);
    let schema = Schema::load(&main).unwrap_or_else(|e| panic!("the Ioto-style schema loads: {e}"));
    (dir, schema)
}

fn item(v: Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// The `path.key` of each warning, sorted.
fn warned(schema: &Schema) -> Vec<String> {
    let mut keys: Vec<String> = schema.warnings().iter().map(|w| w.dotted()).collect();
    keys.sort();
    keys
}

#[test]
fn the_blended_ioto_schema_loads_with_onetable_meaning() {
    let (_dir, s) = load_app();
    assert_eq!(s.version(), "latest", "the loading file wins");
    assert_eq!(s.description(), Some("Eco house schema"));
    assert_eq!(s.params().timestamps, Timestamps::Create);
    assert_eq!(
        s.models().map(|m| m.name()).collect::<Vec<_>>(),
        ["Dashboard", "Flow", "Log", "Store", "SyncState", "User"]
    );
    assert_eq!(
        s.primary_index().description.as_deref(),
        Some("the table key")
    );
    let sync = |m: &str| {
        s.model(m)
            .map(|m| (m.process().sync, m.process().on_device()))
    };
    assert_eq!(sync("Log"), Some((SyncDirection::Up, true)));
    assert_eq!(sync("User"), Some((SyncDirection::None, true)));
    assert!(s
        .model("SyncState")
        .is_some_and(|m| !m.process().in_cloud()));
    assert_eq!(
        s.model("SyncState").and_then(|m| m.description()),
        Some("Device-side sync state")
    );
    let store = s.model("Store").unwrap();
    assert_eq!(
        (
            store.description(),
            store.field("description").map(Field::field_type)
        ),
        (None, Some(FieldType::String)),
        "Store's `description` is a field"
    );
}

#[test]
fn ignored_keys_are_listed_with_path_and_reason() {
    let (_dir, s) = load_app();
    let got = warned(&s);
    for expected in [
        "queries",
        "extensions",
        "params.separator",
        "params.warn",
        "process.Log.show",
        "process.Log.actions",
        "process.Store.notify",
        "process.Store.delay",
        "process.Flow.metrics",
        "process.Flow.pivot",
        "process.User.show",
        "models.User.password.sync",
        "models.User.password.discard",
        "models.Flow.solar.map",
        "models.Dashboard.widgets.items.default",
    ] {
        assert!(
            got.contains(&expected.to_string()),
            "{expected} missing from {got:?}"
        );
    }
    // Documentation and supported keys are not warnings.
    for quiet in [
        "models.Log.id.notes",
        "models.User.username.unique",
        "indexes.gs1.follow",
    ] {
        assert!(!got.contains(&quiet.to_string()), "{quiet} in {got:?}");
    }
    let show = s
        .warnings()
        .iter()
        .find(|w| w.path == "process.Log" && w.key == "show")
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        show.starts_with("process.Log.show: kept but ignored: ") && show.len() > 40,
        "{show}"
    );
}

#[test]
fn timestamps_create_sets_created_and_not_updated() {
    let (_dir, s) = load_app();
    let log = s.model("Log").unwrap();
    assert_eq!(
        log.created_field().map(Field::field_type),
        Some(FieldType::Date)
    );
    assert!(log.updated_field().is_none() && log.field("updated").is_some());
    let created = log
        .prepare_create(&item(json!({"deviceId": "d1", "message": "boot"})), NOW)
        .unwrap();
    assert_eq!(
        created.get("created"),
        Some(&json!("2026-11-25T18:00:00.000Z"))
    );
    assert!(!created.contains_key("updated"), "{created:?}");
    assert_eq!(created.get("context"), Some(&json!({})));
    let id = created
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert_eq!(id.len(), 26, "ulid");
    assert_eq!(created.get("sk"), Some(&json!(format!("l#{id}"))));

    let updated = log
        .prepare_update(&created, &item(json!({"message": "rebooted"})), LATER)
        .unwrap();
    assert_eq!(updated.get("created"), created.get("created"));
    assert!(!updated.contains_key("updated"));
    assert_eq!(log.normalize_stored(updated.clone()), Ok(updated.clone()));
    assert!(!log.project(&updated, false).contains_key("sk"));

    // The app sets its own `updated` under 'create'; Flow declares it hidden.
    let flow = s.model("Flow").unwrap();
    let f = flow
        .prepare_create(&item(json!({"deviceId": "d1", "updated": LATER})), NOW)
        .unwrap();
    assert_eq!(f.get("updated"), Some(&json!("2026-11-25T18:01:00.000Z")));
    assert!(!flow.project(&f, false).contains_key("updated"));
}

#[test]
fn uid_ids_and_unique_fields() {
    let (_dir, s) = load_app();
    let user = s.model("User").unwrap();
    assert_eq!(
        user.field("id").and_then(Field::generate),
        Some(Generate::Uid(10))
    );
    assert!(user.field("username").is_some_and(Field::unique));
    let ids: Vec<String> = (0..20)
        .map(|_| {
            let u = user
                .prepare_create(&item(json!({"username": "ann", "password": "pw"})), NOW)
                .unwrap();
            assert_eq!(u.get("role"), Some(&json!("user")));
            u.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    for id in &ids {
        assert_eq!(id.len(), 10, "{id}");
        assert!(
            id.bytes()
                .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b)),
            "{id}"
        );
    }
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    let dashboard = s.model("Dashboard").unwrap();
    let d = dashboard
        .prepare_create(&item(json!({"name": "home"})), NOW)
        .unwrap();
    assert_eq!(d.get("id").and_then(Value::as_str).map(str::len), Some(16));

    let err = user
        .prepare_create(&item(json!({"username": "bob", "role": "root"})), NOW)
        .unwrap_err();
    assert!(matches!(err.reason, Reason::NotInEnum { .. }), "{err}");
}

#[test]
fn array_items_are_validated_when_writing() {
    let (_dir, s) = load_app();
    let dashboard = s.model("Dashboard").unwrap();
    let d = dashboard
        .prepare_create(
            &item(json!({"name": "home", "widgets": [{"type": "graph", "z": "2"}]})),
            NOW,
        )
        .unwrap();
    assert_eq!(
        d.get("widgets"),
        Some(&json!([{"type": "graph", "z": 2, "css": [], "dimensions": {}}])),
        "elements cast, nested defaults filled"
    );
    assert_eq!(
        (d.get("css"), d.get("refresh")),
        (Some(&json!([])), Some(&json!(60)))
    );
    let fails = |widgets: Value| {
        let e = dashboard
            .prepare_update(&d, &item(json!({"widgets": widgets})), LATER)
            .unwrap_err();
        (e.field, e.reason)
    };
    assert_eq!(
        fails(json!([{"type": "graph"}, "gauge"])),
        (
            "widgets[1]".to_string(),
            Reason::WrongType {
                expected: "object".into(),
                found: "string \"gauge\"".into()
            }
        )
    );
    assert_eq!(
        fails(json!([{"type": "graph", "colour": "red"}])),
        ("widgets[0].colour".to_string(), Reason::UnknownField)
    );
    assert_eq!(
        fails(json!([{"z": 1}])),
        ("widgets[0].type".to_string(), Reason::Required)
    );
    let flow = s.model("Flow").unwrap();
    let err = flow
        .prepare_create(&item(json!({"deviceId": "d", "readings": [1, "x"]})), NOW)
        .unwrap_err();
    assert_eq!(err.to_string().split(':').next(), Some("Flow.readings[1]"));
}

#[test]
fn map_is_exposed_and_the_field_stored_under_its_name() {
    let (_dir, s) = load_app();
    let flow = s.model("Flow").unwrap();
    let solar = flow.field("solar").unwrap();
    assert_eq!(
        solar.map(),
        Some(&MappedAttribute {
            attribute: "pv".into(),
            property: None
        })
    );
    assert_eq!(solar.description(), Some("Solar supply in kW"));
    let f = flow
        .prepare_create(&item(json!({"deviceId": "d", "solar": 4.5})), NOW)
        .unwrap();
    assert_eq!((f.get("solar"), f.get("pv")), (Some(&json!(4.5)), None));
}

/// Load the app with `replace` applied to the app part; returns the error's path and reason.
fn refusal(from: &str, to: &str) -> (String, String) {
    assert!(APP_PART.contains(from), "{from}");
    let (_dir, main) = write_app(&APP_PART.replace(from, to));
    match Schema::load(&main) {
        Err(SchemaError::Invalid { path, reason }) => (path, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn what_devtables_cannot_honour_is_refused_with_its_path() {
    let (path, reason) = refusal(
        "grid: {type: 'number', default: 0,",
        "grid: {type: 'number', default: 0, encode: ['sk', '#', 1],",
    );
    assert_eq!(path, "models.Flow.grid.encode");
    assert!(
        reason.contains("`encode` is not supported by devtables"),
        "{reason}"
    );

    let (path, reason) = refusal(
        "deviceId: {type: 'string', required: true, readonly: true},",
        "deviceId: {type: 'string', required: true, readonly: true, crypt: true},",
    );
    assert_eq!(path, "models.Flow.deviceId.crypt");
    assert!(
        reason.contains("`crypt` is not supported by devtables"),
        "{reason}"
    );
    assert!(reason.contains("encryption key"), "{reason}");

    // A field that must stay on the device, in a model that syncs up.
    let (path, reason) = refusal(
        "grid: {type: 'number', default: 0,",
        "grid: {type: 'number', sync: 'none', default: 0,",
    );
    assert_eq!(path, "models.Flow.grid.sync");
    assert!(reason.contains("stay on the device"), "{reason}");
}

#[test]
fn a_typo_is_still_an_error() {
    let (path, reason) = refusal("readings: {type: 'array',", "readings: {typ: 'array',");
    assert_eq!(path, "models.Flow.readings.typ");
    assert!(reason.contains("unknown key `typ`"), "{reason}");
}

#[test]
fn schema_show_can_describe_every_model() {
    // What a `schema show` needs is reachable through read-only accessors.
    let (_dir, s) = load_app();
    let mut lines = Vec::new();
    for m in s.models() {
        for f in m.fields() {
            lines.push(format!(
                "{}.{} {:?}{}{}",
                m.name(),
                f.name(),
                f.field_type(),
                f.value_template()
                    .map(|t| format!(" = {t}"))
                    .unwrap_or_default(),
                f.generate()
                    .map(|g| format!(" generate {g}"))
                    .unwrap_or_default(),
            ));
        }
        if let Some(c) = m.created_field() {
            lines.push(format!("{}.{} (created)", m.name(), c.name()));
        }
    }
    for expected in [
        "Log.sk String = l#${id}",
        "Dashboard.id String generate uid(16)",
        "Log.created (created)",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected} not in {lines:#?}"
        );
    }
    let roles = s
        .model("User")
        .and_then(|m| m.field("role"))
        .and_then(Field::enum_values)
        .map(<[Value]>::len);
    assert_eq!(roles, Some(3));
}

#[test]
fn warnings_survive_a_clone_and_a_reload_from_text() {
    let (dir, s) = load_app();
    let again = s.clone();
    assert_eq!(again.warnings(), s.warnings());
    // A part alone (no blend) loads from text and warns about its own keys.
    let text = std::fs::read_to_string(Path::new(dir.path()).join("schemas/parts/OneTable.json5"))
        .unwrap_or_default();
    let part = Schema::from_json5(&text).unwrap();
    assert_eq!(
        warned(&part),
        ["extensions", "params.separator", "params.warn", "queries"]
    );
}
