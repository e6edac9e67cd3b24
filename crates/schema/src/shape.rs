//! Schema shape: what a schema means for the data stored under it, its fingerprint, and how two
//! schemas differ.
//!
//! A device database outlives the schema it was written with: the application is upgraded, its
//! schema gains a field, loses a model, narrows an enum. Items already stored are not rewritten,
//! so opening them with another schema must be a decision, not an accident. [`SchemaShape`] is
//! the part of a schema that decides how items are stored and checked (types, required fields,
//! enums, templates, keys, indexes, replication), without what only documents it
//! (`description`, `notes`, `map`, display settings), so editing the documentation does not
//! count as a change. The database records it beside the items; [`compare_shapes`] names each
//! difference between the recorded and the current shape and says whether items stored under
//! the old one stay valid under the new one.
//!
//! The compatibility rules (docs/schema.md, "A database file and its schema", says the same):
//! - compatible: an added model; an added optional field; a required field made optional; a
//!   widened or removed `enum`; a removed `validate`; a changed `default` or `generate` (they
//!   apply to new items only); an added or removed secondary index (the database builds an
//!   added one from the stored items); `unique` removed, or narrowed by an added `scope`; a
//!   removed nested `schema` or array `items`.
//! - incompatible: a removed model; a removed field; a changed type; an added required field,
//!   even with a default or a template (a default applies at creation only, so stored items
//!   lack the field and fail their next update or replication); an optional field made
//!   required; a narrowed or added `enum`; an added or changed `validate`; a changed value
//!   template (stored derived values and keys no longer match it); a changed primary key
//!   template; a changed index hash or sort attribute; a changed `process` `enable` or `sync`
//!   (they decide which side holds a model's items and which way they travel, so items written
//!   under the old setting are not where peers on the new one expect them); an added `unique`
//!   (stored items may already share a value), a removed or changed `scope`; a field made or
//!   unmade the TTL field, or a date field stored in another form (`isoDates`), since stored
//!   values keep their old form; an added nested `schema` or `items`; a changed
//!   `params.typeField`.
//!
//! The module also holds [`Model::unique_values`], the values of an item that `unique` fields
//! keep unique, which the database enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::field::{Field, FieldType};
use crate::model::Model;
use crate::schema::Schema;
use crate::settings::{Enable, SyncDirection};
use crate::template::{render_value, Rendered};
use crate::Item;

/// What a schema means for stored data, in a canonical form (maps sorted by name, enum values
/// sorted), so equal meanings serialize to equal JSON. Stored by the device database beside
/// its items (serde_json); see the module docs for what it holds and leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaShape {
    /// The schema's `version`: recorded to tell people which schema wrote a file, but not part
    /// of the fingerprint, since a version bump alone changes nothing stored.
    version: String,
    /// `params.typeField`: the attribute every stored item names its model in.
    type_field: String,
    /// Every index, `primary` included.
    indexes: BTreeMap<String, IndexShape>,
    models: BTreeMap<String, ModelShape>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct IndexShape {
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sort: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ModelShape {
    /// The value templates of the primary key attributes (`None`: given directly, or absent).
    key: KeyShape,
    process: ProcessShape,
    /// The declared fields and the maintained timestamp fields, by name.
    fields: BTreeMap<String, FieldShape>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct KeyShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sort: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ProcessShape {
    enable: String,
    sync: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldShape {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default, skip_serializing_if = "is_false")]
    required: bool,
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    enum_values: Option<Vec<Value>>,
    /// The `value` template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    validate: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    unique: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    ttl: bool,
    /// For values stored as dates: ISO 8601 text (true) or epoch milliseconds (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iso_dates: Option<bool>,
    /// An object's nested schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema: Option<BTreeMap<String, FieldShape>>,
    /// An array's element definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    items: Option<Box<FieldShape>>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The part of a shape the fingerprint covers: all of it but the version.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FingerprintInput<'a> {
    type_field: &'a str,
    indexes: &'a BTreeMap<String, IndexShape>,
    models: &'a BTreeMap<String, ModelShape>,
}

impl Schema {
    /// The schema's [`SchemaShape`]: what it means for stored data.
    pub fn shape(&self) -> SchemaShape {
        let indexes = std::iter::once(&self.primary)
            .chain(&self.secondary)
            .map(|i| {
                (
                    i.name.clone(),
                    IndexShape {
                        hash: i.hash.clone(),
                        sort: i.sort.clone(),
                    },
                )
            })
            .collect();
        let models = self
            .models
            .iter()
            .map(|(name, model)| (name.clone(), model_shape(model, self.params.iso_dates)))
            .collect();
        SchemaShape {
            version: self.version.clone(),
            type_field: self.params.type_field.clone(),
            indexes,
            models,
        }
    }
}

fn model_shape(model: &Model, schema_iso_dates: bool) -> ModelShape {
    let template_of = |attr: Option<&str>| {
        attr.and_then(|a| model.field(a))
            .and_then(Field::value_template)
            .map(str::to_string)
    };
    let key = KeyShape {
        hash: template_of(Some(&model.primary.hash)),
        sort: template_of(model.primary.sort.as_deref()),
    };
    let mut fields: BTreeMap<String, FieldShape> = model
        .fields
        .iter()
        .map(|f| (f.name.clone(), field_shape(f, schema_iso_dates)))
        .collect();
    for stamp in [&model.stamps.created, &model.stamps.updated]
        .into_iter()
        .flatten()
    {
        let mut shape = field_shape(stamp, schema_iso_dates);
        // A maintained timestamp's stored form follows its declared type (see Model::stamp_value).
        shape.iso_dates = match stamp.ty {
            FieldType::Number => Some(false),
            FieldType::String => Some(true),
            _ => shape.iso_dates,
        };
        fields.insert(stamp.name.clone(), shape);
    }
    let process = model.process;
    ModelShape {
        key,
        process: ProcessShape {
            enable: enable_name(process.enable).to_string(),
            sync: sync_name(process.sync).to_string(),
        },
        fields,
    }
}

fn field_shape(field: &Field, schema_iso_dates: bool) -> FieldShape {
    let enum_values = field.enum_values.as_ref().map(|values| {
        let mut sorted: Vec<Value> = values.iter().map(canonical).collect();
        sorted.sort_by_cached_key(Value::to_string);
        sorted.dedup();
        sorted
    });
    // TTL values are epoch seconds whatever `isoDates` says.
    let iso_dates = (field.ty == FieldType::Date && !field.ttl)
        .then(|| field.iso_dates.unwrap_or(schema_iso_dates));
    FieldShape {
        ty: field.ty.name().to_string(),
        required: field.required,
        enum_values,
        value: field.value_template().map(str::to_string),
        default: field.default.as_ref().map(canonical),
        generate: field.generate.map(|g| g.to_string()),
        validate: field.validate_pattern().map(str::to_string),
        unique: field.unique,
        scope: field.unique_scope().map(str::to_string),
        ttl: field.ttl,
        iso_dates,
        schema: field.schema.as_ref().map(|nested| {
            nested
                .iter()
                .map(|f| (f.name.clone(), field_shape(f, schema_iso_dates)))
                .collect()
        }),
        items: field
            .items
            .as_deref()
            .map(|item| Box::new(field_shape(item, schema_iso_dates))),
    }
}

/// `value` with object members in name order, whatever map serde_json was built with
/// (`preserve_order` keeps insertion order, and another crate of the process may enable it).
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(list) => Value::Array(list.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

fn enable_name(enable: Enable) -> &'static str {
    match enable {
        Enable::Device => "device",
        Enable::Cloud => "cloud",
        Enable::Both => "both",
    }
}

fn sync_name(sync: SyncDirection) -> &'static str {
    match sync {
        SyncDirection::Up => "up",
        SyncDirection::Down => "down",
        SyncDirection::Both => "both",
        SyncDirection::None => "none",
    }
}

impl SchemaShape {
    /// The schema `version` the shape was taken from (not part of the fingerprint).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The model names, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// 16 lowercase hex characters: the start of the SHA-256 of the shape's canonical JSON,
    /// version left out. Equal for schemas that store data alike (whatever their whitespace,
    /// key order, documentation or version), and the same in every build and run.
    pub fn fingerprint(&self) -> String {
        let input = FingerprintInput {
            type_field: &self.type_field,
            indexes: &self.indexes,
            models: &self.models,
        };
        // Serializing plain structs, maps and JSON values cannot fail; an empty input would
        // still give a stable (if useless) fingerprint.
        let bytes = serde_json::to_vec(&input).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        digest
            .as_ref()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Every difference between two shapes, in path order (models, then fields, by name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaChanges {
    pub changes: Vec<SchemaChange>,
}

impl SchemaChanges {
    /// Whether items stored under the old shape all stay valid under the new one.
    pub fn is_compatible(&self) -> bool {
        self.changes.iter().all(|c| c.compatible)
    }

    /// Whether the shapes store data alike.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes that stored items may not survive.
    pub fn incompatible(&self) -> impl Iterator<Item = &SchemaChange> {
        self.changes.iter().filter(|c| !c.compatible)
    }

    /// Every change, in path order.
    pub fn iter(&self) -> impl Iterator<Item = &SchemaChange> {
        self.changes.iter()
    }
}

/// One change per line.
impl fmt::Display for SchemaChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, change) in self.changes.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{change}")?;
        }
        Ok(())
    }
}

/// One difference between two shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaChange {
    /// Where, dotted: `models.Fault`, `models.Fault.fields.color`,
    /// `models.Command.fields.args.schema.delay`, `models.Fault.key`, `indexes.gs1`,
    /// `params.typeField`.
    pub path: String,
    pub kind: SchemaChangeKind,
    /// Whether items stored under the old shape stay valid ([`SchemaChangeKind::is_compatible`]).
    pub compatible: bool,
}

impl SchemaChange {
    fn new(path: String, kind: SchemaChangeKind) -> SchemaChange {
        SchemaChange {
            path,
            compatible: kind.is_compatible(),
            kind,
        }
    }
}

/// `models.Fault.fields.color: added optional field (compatible)`.
impl fmt::Display for SchemaChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.compatible {
            "compatible"
        } else {
            "incompatible"
        };
        write!(f, "{}: {} ({verdict})", self.path, self.kind)
    }
}

/// What changed. Values are shown as JSON, templates and patterns as written; `None` means the
/// setting is absent on that side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaChangeKind {
    ModelAdded,
    ModelRemoved,
    /// A new field; compatible only when it is optional.
    FieldAdded {
        required: bool,
    },
    FieldRemoved,
    TypeChanged {
        from: String,
        to: String,
    },
    /// An optional field made required (incompatible), or the reverse (compatible).
    RequiredChanged {
        required: bool,
    },
    /// Values the enum gained and lost; compatible when it lost none.
    EnumChanged {
        added: Vec<Value>,
        removed: Vec<Value>,
    },
    /// An enum put on a field that had none.
    EnumAdded {
        values: Vec<Value>,
    },
    EnumRemoved,
    TemplateChanged {
        from: Option<String>,
        to: Option<String>,
    },
    DefaultChanged {
        from: Option<Value>,
        to: Option<Value>,
    },
    GenerateChanged {
        from: Option<String>,
        to: Option<String>,
    },
    /// Compatible only when the pattern was removed.
    ValidateChanged {
        from: Option<String>,
        to: Option<String>,
    },
    UniqueAdded,
    UniqueRemoved,
    /// Compatible only when a scope was added (uniqueness narrowed).
    ScopeChanged {
        from: Option<String>,
        to: Option<String>,
    },
    TtlChanged {
        ttl: bool,
    },
    /// How a date is stored: ISO 8601 text (`iso`) or epoch milliseconds.
    DateFormChanged {
        iso: bool,
    },
    /// A nested object `schema` was added (incompatible) or removed (compatible).
    NestedSchemaChanged {
        added: bool,
    },
    /// An array's `items` definition was added (incompatible) or removed (compatible).
    ItemsChanged {
        added: bool,
    },
    /// A primary key attribute's template (`part`: `hash` or `sort`).
    KeyChanged {
        part: &'static str,
        from: Option<String>,
        to: Option<String>,
    },
    IndexAdded,
    IndexRemoved,
    /// An index's hash or sort attribute, shown as `hash/sort`.
    IndexChanged {
        from: String,
        to: String,
    },
    /// A model's `process`, shown as `enable=.. sync=..`.
    ProcessChanged {
        from: String,
        to: String,
    },
    TypeFieldChanged {
        from: String,
        to: String,
    },
}

impl SchemaChangeKind {
    /// Whether items stored under the old shape stay valid under the new one (the rules are
    /// in the module docs).
    pub fn is_compatible(&self) -> bool {
        use SchemaChangeKind::*;
        match self {
            ModelAdded | EnumRemoved | IndexAdded | IndexRemoved | UniqueRemoved => true,
            DefaultChanged { .. } | GenerateChanged { .. } => true,
            FieldAdded { required } => !required,
            RequiredChanged { required } => !required,
            EnumChanged { removed, .. } => removed.is_empty(),
            ValidateChanged { to, .. } => to.is_none(),
            ScopeChanged { from, to } => from.is_none() && to.is_some(),
            NestedSchemaChanged { added } | ItemsChanged { added } => !added,
            ModelRemoved | FieldRemoved | TypeChanged { .. } | EnumAdded { .. } => false,
            TemplateChanged { .. } | UniqueAdded | TtlChanged { .. } => false,
            DateFormChanged { .. } | KeyChanged { .. } | IndexChanged { .. } => false,
            ProcessChanged { .. } | TypeFieldChanged { .. } => false,
        }
    }
}

fn show_opt(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("`{v}`"),
        None => "none".into(),
    }
}

fn show_value(value: &Option<Value>) -> String {
    value
        .as_ref()
        .map_or_else(|| "none".into(), Value::to_string)
}

fn show_values(values: &[Value]) -> String {
    let shown: Vec<String> = values.iter().map(Value::to_string).collect();
    format!("[{}]", shown.join(", "))
}

impl fmt::Display for SchemaChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SchemaChangeKind::*;
        match self {
            ModelAdded => f.write_str("added model"),
            ModelRemoved => f.write_str("removed model: its stored items belong to no model"),
            FieldAdded { required: false } => f.write_str("added optional field"),
            FieldAdded { required: true } => f.write_str(
                "added required field: stored items lack it (a default or template fills only new items)",
            ),
            FieldRemoved => {
                f.write_str("removed field: stored items that hold it no longer validate")
            }
            TypeChanged { from, to } => write!(f, "type changed from {from} to {to}"),
            RequiredChanged { required: true } => {
                f.write_str("optional field made required: stored items may lack it")
            }
            RequiredChanged { required: false } => f.write_str("required field made optional"),
            EnumChanged { added, removed } if removed.is_empty() => {
                write!(f, "enum widened with {}", show_values(added))
            }
            EnumChanged { added, removed } => {
                write!(f, "enum narrowed: {} removed", show_values(removed))?;
                if !added.is_empty() {
                    write!(f, ", {} added", show_values(added))?;
                }
                f.write_str("; stored items may hold a removed value")
            }
            EnumAdded { values } => write!(
                f,
                "enum {} added: stored values may be outside it",
                show_values(values)
            ),
            EnumRemoved => f.write_str("enum restriction removed"),
            TemplateChanged { from, to } => write!(
                f,
                "value template changed from {} to {}: stored values were derived from the old one",
                show_opt(from),
                show_opt(to)
            ),
            DefaultChanged { from, to } => write!(
                f,
                "default changed from {} to {} (applies to new items only)",
                show_value(from),
                show_value(to)
            ),
            GenerateChanged { from, to } => write!(
                f,
                "generate changed from {} to {} (applies to new items only)",
                show_opt(from),
                show_opt(to)
            ),
            ValidateChanged { from, to: None } => {
                write!(f, "validate pattern {} removed", show_opt(from))
            }
            ValidateChanged { from, to } => write!(
                f,
                "validate pattern changed from {} to {}: stored values may not match it",
                show_opt(from),
                show_opt(to)
            ),
            UniqueAdded => f.write_str("made unique: stored items may already share a value"),
            UniqueRemoved => f.write_str("no longer unique"),
            ScopeChanged { from, to } => {
                write!(
                    f,
                    "unique scope changed from {} to {}",
                    show_opt(from),
                    show_opt(to)
                )?;
                if from.is_some() {
                    f.write_str(": stored items may share a value in the new scope")?;
                }
                Ok(())
            }
            TtlChanged { ttl: true } => f.write_str(
                "made the TTL field: stored values are not in its form (epoch seconds)",
            ),
            TtlChanged { ttl: false } => {
                f.write_str("no longer the TTL field: stored values are epoch seconds")
            }
            DateFormChanged { iso } => {
                let (old, new) = if *iso {
                    ("epoch milliseconds", "ISO 8601 text")
                } else {
                    ("ISO 8601 text", "epoch milliseconds")
                };
                write!(
                    f,
                    "stored date form changed from {old} to {new} (isoDates): stored dates keep the old form"
                )
            }
            NestedSchemaChanged { added: true } => f.write_str(
                "nested schema added: stored objects may hold members it does not declare",
            ),
            NestedSchemaChanged { added: false } => f.write_str("nested schema removed"),
            ItemsChanged { added: true } => {
                f.write_str("array items definition added: stored elements may not fit it")
            }
            ItemsChanged { added: false } => f.write_str("array items definition removed"),
            KeyChanged { part, from, to } => write!(
                f,
                "primary {part} key template changed from {} to {}: stored items are filed under keys made by the old one",
                show_opt(from),
                show_opt(to)
            ),
            IndexAdded => {
                f.write_str("added index (the database builds it from the stored items)")
            }
            IndexRemoved => f.write_str("removed index"),
            IndexChanged { from, to } => write!(
                f,
                "index attributes changed from {from} to {to}: peers on the old schema query it differently"
            ),
            ProcessChanged { from, to } => write!(
                f,
                "process changed from {from} to {to}: where a model's items live and which way they replicate decide what device and cloud hold, so items written under the old setting are not where the new one expects them"
            ),
            TypeFieldChanged { from, to } => write!(
                f,
                "type field changed from {from} to {to}: stored items name their model in the old one"
            ),
        }
    }
}

/// Every difference between `old` (the shape stored data was written with) and `new`.
pub fn compare_shapes(old: &SchemaShape, new: &SchemaShape) -> SchemaChanges {
    let mut out = Vec::new();
    if old.type_field != new.type_field {
        out.push(SchemaChange::new(
            "params.typeField".into(),
            SchemaChangeKind::TypeFieldChanged {
                from: old.type_field.clone(),
                to: new.type_field.clone(),
            },
        ));
    }
    for (name, change) in pair_up(&old.indexes, &new.indexes) {
        let path = format!("indexes.{name}");
        let kind = match change {
            Pair::Added(_) => SchemaChangeKind::IndexAdded,
            Pair::Removed => SchemaChangeKind::IndexRemoved,
            Pair::Both(a, b) if a == b => continue,
            Pair::Both(a, b) => SchemaChangeKind::IndexChanged {
                from: show_index(a),
                to: show_index(b),
            },
        };
        out.push(SchemaChange::new(path, kind));
    }
    // Field templates of the primary key attributes are reported once, as key changes.
    let primary = new.indexes.get("primary");
    let key_attrs: Vec<&str> = primary
        .map(|p| std::iter::once(p.hash.as_str()).chain(p.sort.as_deref()))
        .into_iter()
        .flatten()
        .collect();
    for (name, change) in pair_up(&old.models, &new.models) {
        let path = format!("models.{name}");
        match change {
            Pair::Added(_) => out.push(SchemaChange::new(path, SchemaChangeKind::ModelAdded)),
            Pair::Removed => out.push(SchemaChange::new(path, SchemaChangeKind::ModelRemoved)),
            Pair::Both(a, b) => compare_models(&path, a, b, &key_attrs, &mut out),
        }
    }
    SchemaChanges { changes: out }
}

fn show_index(index: &IndexShape) -> String {
    format!("{}/{}", index.hash, index.sort.as_deref().unwrap_or(""))
}

fn compare_models(
    path: &str,
    old: &ModelShape,
    new: &ModelShape,
    key_attrs: &[&str],
    out: &mut Vec<SchemaChange>,
) {
    for (part, from, to) in [
        ("hash", &old.key.hash, &new.key.hash),
        ("sort", &old.key.sort, &new.key.sort),
    ] {
        if from != to {
            out.push(SchemaChange::new(
                format!("{path}.key"),
                SchemaChangeKind::KeyChanged {
                    part,
                    from: from.clone(),
                    to: to.clone(),
                },
            ));
        }
    }
    if old.process != new.process {
        let show = |p: &ProcessShape| format!("enable={} sync={}", p.enable, p.sync);
        out.push(SchemaChange::new(
            format!("{path}.process"),
            SchemaChangeKind::ProcessChanged {
                from: show(&old.process),
                to: show(&new.process),
            },
        ));
    }
    compare_fields(
        &format!("{path}.fields"),
        &old.fields,
        &new.fields,
        key_attrs,
        out,
    );
}

fn compare_fields(
    path: &str,
    old: &BTreeMap<String, FieldShape>,
    new: &BTreeMap<String, FieldShape>,
    key_attrs: &[&str],
    out: &mut Vec<SchemaChange>,
) {
    for (name, change) in pair_up(old, new) {
        let path = format!("{path}.{name}");
        match change {
            Pair::Added(f) => out.push(SchemaChange::new(
                path,
                SchemaChangeKind::FieldAdded {
                    required: f.required,
                },
            )),
            Pair::Removed => out.push(SchemaChange::new(path, SchemaChangeKind::FieldRemoved)),
            Pair::Both(a, b) => {
                let is_key = key_attrs.contains(&name.as_str());
                compare_field(&path, a, b, is_key, out);
            }
        }
    }
}

fn compare_field(
    path: &str,
    old: &FieldShape,
    new: &FieldShape,
    is_key: bool,
    out: &mut Vec<SchemaChange>,
) {
    use SchemaChangeKind::*;
    let mut push = |kind| out.push(SchemaChange::new(path.to_string(), kind));
    if old.ty != new.ty {
        // Every other setting follows the type: one change says it all.
        push(TypeChanged {
            from: old.ty.clone(),
            to: new.ty.clone(),
        });
        return;
    }
    if old.required != new.required {
        push(RequiredChanged {
            required: new.required,
        });
    }
    match (&old.enum_values, &new.enum_values) {
        (None, Some(values)) => push(EnumAdded {
            values: values.clone(),
        }),
        (Some(_), None) => push(EnumRemoved),
        (Some(a), Some(b)) if a != b => push(EnumChanged {
            added: b.iter().filter(|v| !a.contains(v)).cloned().collect(),
            removed: a.iter().filter(|v| !b.contains(v)).cloned().collect(),
        }),
        _ => {}
    }
    if old.value != new.value && !is_key {
        push(TemplateChanged {
            from: old.value.clone(),
            to: new.value.clone(),
        });
    }
    if old.default != new.default {
        push(DefaultChanged {
            from: old.default.clone(),
            to: new.default.clone(),
        });
    }
    if old.generate != new.generate {
        push(GenerateChanged {
            from: old.generate.clone(),
            to: new.generate.clone(),
        });
    }
    if old.validate != new.validate {
        push(ValidateChanged {
            from: old.validate.clone(),
            to: new.validate.clone(),
        });
    }
    match (old.unique, new.unique) {
        (false, true) => push(UniqueAdded),
        (true, false) => push(UniqueRemoved),
        (true, true) if old.scope != new.scope => push(ScopeChanged {
            from: old.scope.clone(),
            to: new.scope.clone(),
        }),
        _ => {}
    }
    if old.ttl != new.ttl {
        push(TtlChanged { ttl: new.ttl });
    }
    if let (Some(a), Some(b)) = (old.iso_dates, new.iso_dates) {
        if a != b {
            push(DateFormChanged { iso: b });
        }
    }
    match (&old.schema, &new.schema) {
        (None, Some(_)) => push(NestedSchemaChanged { added: true }),
        (Some(_), None) => push(NestedSchemaChanged { added: false }),
        (Some(a), Some(b)) => compare_fields(&format!("{path}.schema"), a, b, &[], out),
        (None, None) => {}
    }
    match (&old.items, &new.items) {
        (None, Some(_)) => out.push(SchemaChange::new(
            path.to_string(),
            ItemsChanged { added: true },
        )),
        (Some(_), None) => out.push(SchemaChange::new(
            path.to_string(),
            ItemsChanged { added: false },
        )),
        (Some(a), Some(b)) => compare_field(&format!("{path}.items"), a, b, false, out),
        (None, None) => {}
    }
}

/// One name of two maps: only in the new one, only in the old one, or in both.
enum Pair<'a, T> {
    Added(&'a T),
    Removed,
    Both(&'a T, &'a T),
}

/// The entries of two maps by name, in name order.
fn pair_up<'a, T>(
    old: &'a BTreeMap<String, T>,
    new: &'a BTreeMap<String, T>,
) -> Vec<(&'a String, Pair<'a, T>)> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let pair = match (old.get(name), new.get(name)) {
                (Some(a), Some(b)) => Pair::Both(a, b),
                (None, Some(b)) => Pair::Added(b),
                (Some(_), None) => Pair::Removed,
                (None, None) => return None,
            };
            Some((name, pair))
        })
        .collect()
}

/// Where a unique value is unique: in the whole model, or among the items whose `scope`
/// template renders the same.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UniqueScope {
    /// The field has no `scope`: one value per model.
    Model,
    /// The rendered `scope` template.
    Scoped(String),
    /// The item lacks `variable`, which the `scope` template needs. Such items form one
    /// scope of their own (OneTable renders every such scope to the same text), so their
    /// values are unique among them.
    Unresolved { variable: String },
}

/// One value an item holds in a `unique` field: what the database keeps unique.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UniqueValue {
    /// The unique field's name.
    pub field: String,
    pub scope: UniqueScope,
    /// The value, rendered as in templates (`3`, `true`, the text of a string), so values
    /// that are equal as stored render equal.
    pub value: String,
}

impl Model {
    /// The values of `item` (a stored item) that the model's `unique` fields keep unique, in
    /// field order. A field that is absent or null holds no value (OneTable's rule: only
    /// present values are unique).
    pub fn unique_values(&self, item: &Item) -> Vec<UniqueValue> {
        self.fields
            .iter()
            .filter(|f| f.unique)
            .filter_map(|field| {
                let value = item.get(&field.name).and_then(render_value)?;
                let scope = match &field.unique_scope {
                    None => UniqueScope::Model,
                    Some(template) => match template.render(|var| self.variable(item, var)) {
                        Rendered::Full(text) => UniqueScope::Scoped(text),
                        Rendered::Partial { missing, .. } => {
                            UniqueScope::Unresolved { variable: missing }
                        }
                    },
                };
                Some(UniqueValue {
                    field: field.name.clone(),
                    scope,
                    value,
                })
            })
            .collect()
    }

    /// Whether any field of the model is `unique`.
    pub fn has_unique_fields(&self) -> bool {
        self.fields.iter().any(|f| f.unique)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = r#"{
        format: 'onetable:1.1.0', version: '1.0.0',
        indexes: {primary: {hash: 'pk', sort: 'sk'}, gs1: {hash: 'gs1pk', sort: 'gs1sk'}},
        params: {isoDates: true},
        process: {Fault: {sync: 'up'}},
        models: {
            Fault: {
                pk: {type: 'string', value: 'device#${deviceId}'},
                sk: {type: 'string', value: 'fault#${id}'},
                id: {type: 'string', generate: 'ulid'},
                deviceId: {type: 'string', required: true},
                level: {type: 'string', enum: ['info', 'warn'], default: 'info'},
                FIELDS
            },
        },
    }"#;

    /// The shape of BASE with `fields` added to Fault.
    fn shape_with(fields: &str) -> SchemaShape {
        load(&BASE.replace("FIELDS", fields)).shape()
    }

    fn load(text: &str) -> Schema {
        match Schema::from_json5(text) {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    /// Compares BASE with `old` and with `new` added to Fault, expecting exactly one change.
    fn check(old: &str, new: &str, path: &str, kind: SchemaChangeKind, compatible: bool) {
        check_texts(
            &BASE.replace("FIELDS", old),
            &BASE.replace("FIELDS", new),
            path,
            kind,
            compatible,
        );
    }

    fn check_texts(old: &str, new: &str, path: &str, kind: SchemaChangeKind, compatible: bool) {
        let changes = compare_shapes(&load(old).shape(), &load(new).shape());
        assert_eq!(
            changes.changes,
            vec![SchemaChange {
                path: path.into(),
                kind,
                compatible
            }],
            "{changes}"
        );
        assert_eq!(changes.is_compatible(), compatible);
        assert_eq!(changes.incompatible().count(), usize::from(!compatible));
    }

    const COLOR: &str = "models.Fault.fields.color";

    #[test]
    fn equal_shapes_have_no_changes() {
        let a = shape_with("");
        let changes = compare_shapes(&a, &a.clone());
        assert!(changes.is_empty() && changes.is_compatible());
        assert_eq!(changes.to_string(), "");
    }

    #[test]
    fn fingerprint_is_a_literal_for_a_small_schema() {
        // Pinned: a change here re-fingerprints every recorded database (their next open
        // compares the recorded shape and records the new fingerprint). Change it only with the
        // shape's format.
        let s = load(
            "{format:'onetable:1.1.0', version:'1', indexes:{primary:{hash:'pk'}},
              models:{M:{pk:{type:'string', value:'m#${id}'}, id:{type:'string', required:true}}}}",
        );
        let shape = s.shape();
        // The canonical JSON hashed (version left out); `sha256sum` of it starts the same.
        let input = FingerprintInput {
            type_field: &shape.type_field,
            indexes: &shape.indexes,
            models: &shape.models,
        };
        assert_eq!(
            serde_json::to_string(&input).unwrap(),
            r#"{"typeField":"_type","indexes":{"primary":{"hash":"pk"}},"models":{"M":{"key":{"hash":"m#${id}"},"process":{"enable":"both","sync":"none"},"fields":{"id":{"type":"string","required":true},"pk":{"type":"string","value":"m#${id}"}}}}}"#
        );
        assert_eq!(shape.fingerprint(), "79c8fdaedac0fb34");
    }

    #[test]
    fn fingerprint_ignores_layout_order_documentation_and_version() {
        let a = load(
            "{format:'onetable:1.1.0', version:'1.0.0', indexes:{primary:{hash:'pk', sort:'sk'}, gs1:{hash:'g', sort:'h'}},
              models:{
                M:{pk:{type:'string', value:'m#${id}'}, sk:{type:'string', value:'m#'}, id:{type:'string'},
                   e:{type:'string', enum:['a','b']}, o:{type:'object', default:{x:1, y:2}}},
                N:{pk:{type:'string'}, sk:{type:'string'}}}}",
        );
        let b = load(
            "// reordered, documented, reformatted
            {  version: '2.0.0', description: 'the same data', format: 'onetable:1.1.0',
               models: {
                 N: {sk: {type: 'string', description: 'sort'}, pk: {type: 'String'}},
                 M: {
                   description: 'a model',
                   o: {default: {y: 2, x: 1}, type: 'object', notes: 'an object'},
                   e: {enum: ['b', 'a'], type: 'string'},
                   id: {type: 'string', description: 'the id'},
                   sk: {value: 'm#', type: 'string'},
                   pk: {type: 'string', value: 'm#${id}'},
                 },
               },
               indexes: {gs1: {sort: 'h', hash: 'g', description: 'an index'}, primary: {sort: 'sk', hash: 'pk'}},
            }",
        );
        assert_eq!(a.shape().fingerprint(), b.shape().fingerprint());
        assert!(compare_shapes(&a.shape(), &b.shape()).is_empty());
        assert_ne!(a.shape().version(), b.shape().version());
        // ...while a change of meaning changes it.
        let c = load(&BASE.replace("FIELDS", "color: {type: 'string'}"));
        assert_ne!(
            c.shape().fingerprint(),
            load(&BASE.replace("FIELDS", "")).shape().fingerprint()
        );
    }

    #[test]
    fn shape_round_trips_through_json() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
        let shape = Schema::load(std::path::Path::new(example)).unwrap().shape();
        let text = serde_json::to_string(&shape).unwrap();
        let back: SchemaShape = serde_json::from_str(&text).unwrap();
        assert_eq!(back, shape);
        assert_eq!(back.fingerprint(), shape.fingerprint());
        assert!(shape.model_names().any(|m| m == "Fault"));
        assert!(!text.contains("description"), "{text}");
    }

    #[test]
    fn models_added_and_removed() {
        let one = BASE.replace("FIELDS", "");
        let two = one.replace(
            "models: {",
            "models: {Extra: {pk: {type: 'string'}, sk: {type: 'string'}},",
        );
        check_texts(
            &one,
            &two,
            "models.Extra",
            SchemaChangeKind::ModelAdded,
            true,
        );
        check_texts(
            &two,
            &one,
            "models.Extra",
            SchemaChangeKind::ModelRemoved,
            false,
        );
    }

    #[test]
    fn fields_added_and_removed() {
        let added = |required| SchemaChangeKind::FieldAdded { required };
        check("", "color: {type: 'string'}", COLOR, added(false), true);
        check(
            "",
            "color: {type: 'string', required: true}",
            COLOR,
            added(true),
            false,
        );
        // A default fills only new items: stored ones still lack the field.
        check(
            "",
            "color: {type: 'string', required: true, default: 'red'}",
            COLOR,
            added(true),
            false,
        );
        check(
            "color: {type: 'string'}",
            "",
            COLOR,
            SchemaChangeKind::FieldRemoved,
            false,
        );
    }

    #[test]
    fn type_and_required_changes() {
        check(
            "color: {type: 'string'}",
            "color: {type: 'number'}",
            COLOR,
            SchemaChangeKind::TypeChanged {
                from: "string".into(),
                to: "number".into(),
            },
            false,
        );
        check(
            "color: {type: 'string'}",
            "color: {type: 'string', required: true}",
            COLOR,
            SchemaChangeKind::RequiredChanged { required: true },
            false,
        );
        check(
            "color: {type: 'string', required: true}",
            "color: {type: 'string'}",
            COLOR,
            SchemaChangeKind::RequiredChanged { required: false },
            true,
        );
    }

    #[test]
    fn enum_rules() {
        let level = "models.Fault.fields.level";
        let widened = BASE.replace("['info', 'warn']", "['info', 'warn', 'critical']");
        let narrowed = BASE.replace("['info', 'warn']", "['info']");
        let base = BASE.replace("FIELDS", "");
        check_texts(
            &base,
            &widened.replace("FIELDS", ""),
            level,
            SchemaChangeKind::EnumChanged {
                added: vec![json!("critical")],
                removed: vec![],
            },
            true,
        );
        check_texts(
            &base,
            &narrowed.replace("FIELDS", ""),
            level,
            SchemaChangeKind::EnumChanged {
                added: vec![],
                removed: vec![json!("warn")],
            },
            false,
        );
        check(
            "color: {type: 'string', enum: ['red']}",
            "color: {type: 'string'}",
            COLOR,
            SchemaChangeKind::EnumRemoved,
            true,
        );
        check(
            "color: {type: 'string'}",
            "color: {type: 'string', enum: ['red']}",
            COLOR,
            SchemaChangeKind::EnumAdded {
                values: vec![json!("red")],
            },
            false,
        );
    }

    #[test]
    fn template_default_generate_and_validate() {
        check(
            "color: {type: 'string', value: 'c#${id}'}",
            "color: {type: 'string', value: 'c#${deviceId}'}",
            COLOR,
            SchemaChangeKind::TemplateChanged {
                from: Some("c#${id}".into()),
                to: Some("c#${deviceId}".into()),
            },
            false,
        );
        check(
            "color: {type: 'string', default: 'red'}",
            "color: {type: 'string', default: 'blue'}",
            COLOR,
            SchemaChangeKind::DefaultChanged {
                from: Some(json!("red")),
                to: Some(json!("blue")),
            },
            true,
        );
        check(
            "color: {type: 'string', generate: 'ulid'}",
            "color: {type: 'string', generate: 'uuid'}",
            COLOR,
            SchemaChangeKind::GenerateChanged {
                from: Some("ulid".into()),
                to: Some("uuid".into()),
            },
            true,
        );
        check(
            "color: {type: 'string', validate: '/^a/'}",
            "color: {type: 'string'}",
            COLOR,
            SchemaChangeKind::ValidateChanged {
                from: Some("/^a/".into()),
                to: None,
            },
            true,
        );
        check(
            "color: {type: 'string'}",
            "color: {type: 'string', validate: '/^a/'}",
            COLOR,
            SchemaChangeKind::ValidateChanged {
                from: None,
                to: Some("/^a/".into()),
            },
            false,
        );
    }

    #[test]
    fn unique_and_scope() {
        check(
            "color: {type: 'string'}",
            "color: {type: 'string', unique: true}",
            COLOR,
            SchemaChangeKind::UniqueAdded,
            false,
        );
        check(
            "color: {type: 'string', unique: true}",
            "color: {type: 'string'}",
            COLOR,
            SchemaChangeKind::UniqueRemoved,
            true,
        );
        let scoped = "color: {type: 'string', unique: true, scope: '${deviceId}'}";
        check(
            "color: {type: 'string', unique: true}",
            scoped,
            COLOR,
            SchemaChangeKind::ScopeChanged {
                from: None,
                to: Some("${deviceId}".into()),
            },
            true,
        );
        check(
            scoped,
            "color: {type: 'string', unique: true}",
            COLOR,
            SchemaChangeKind::ScopeChanged {
                from: Some("${deviceId}".into()),
                to: None,
            },
            false,
        );
    }

    #[test]
    fn ttl_and_date_form() {
        check(
            "when: {type: 'date'}",
            "when: {type: 'date', ttl: true}",
            "models.Fault.fields.when",
            SchemaChangeKind::TtlChanged { ttl: true },
            false,
        );
        check(
            "when: {type: 'date'}",
            "when: {type: 'date', isoDates: false}",
            "models.Fault.fields.when",
            SchemaChangeKind::DateFormChanged { iso: false },
            false,
        );
    }

    #[test]
    fn nested_schema_and_items() {
        let args = "models.Fault.fields.args";
        check(
            "args: {type: 'object'}",
            "args: {type: 'object', schema: {x: {type: 'number'}}}",
            args,
            SchemaChangeKind::NestedSchemaChanged { added: true },
            false,
        );
        check(
            "args: {type: 'object', schema: {x: {type: 'number'}}}",
            "args: {type: 'object'}",
            args,
            SchemaChangeKind::NestedSchemaChanged { added: false },
            true,
        );
        check(
            "args: {type: 'object', schema: {x: {type: 'number'}}}",
            "args: {type: 'object', schema: {x: {type: 'number'}, y: {type: 'string'}}}",
            "models.Fault.fields.args.schema.y",
            SchemaChangeKind::FieldAdded { required: false },
            true,
        );
        check(
            "args: {type: 'object', schema: {x: {type: 'number'}}}",
            "args: {type: 'object', schema: {x: {type: 'string'}}}",
            "models.Fault.fields.args.schema.x",
            SchemaChangeKind::TypeChanged {
                from: "number".into(),
                to: "string".into(),
            },
            false,
        );
        check(
            "tags: {type: 'array'}",
            "tags: {type: 'array', items: {type: 'string'}}",
            "models.Fault.fields.tags",
            SchemaChangeKind::ItemsChanged { added: true },
            false,
        );
        check(
            "tags: {type: 'array', items: {type: 'string', enum: ['a']}}",
            "tags: {type: 'array', items: {type: 'string', enum: ['a', 'b']}}",
            "models.Fault.fields.tags.items",
            SchemaChangeKind::EnumChanged {
                added: vec![json!("b")],
                removed: vec![],
            },
            true,
        );
    }

    #[test]
    fn key_index_process_and_type_field() {
        let base = BASE.replace("FIELDS", "");
        check_texts(
            &base,
            &base.replace("'fault#${id}'", "'f#${id}'"),
            "models.Fault.key",
            SchemaChangeKind::KeyChanged {
                part: "sort",
                from: Some("fault#${id}".into()),
                to: Some("f#${id}".into()),
            },
            false,
        );
        check_texts(
            &base,
            &base.replace(
                "gs1: {hash: 'gs1pk', sort: 'gs1sk'}",
                "gs1: {hash: 'gs1pk'}",
            ),
            "indexes.gs1",
            SchemaChangeKind::IndexChanged {
                from: "gs1pk/gs1sk".into(),
                to: "gs1pk/".into(),
            },
            false,
        );
        check_texts(
            &base,
            &base.replace(
                "gs1: {hash: 'gs1pk', sort: 'gs1sk'}",
                "gs1: {hash: 'gs1pk', sort: 'gs1sk'}, gs2: {hash: 'x'}",
            ),
            "indexes.gs2",
            SchemaChangeKind::IndexAdded,
            true,
        );
        check_texts(
            &base,
            &base.replace(", gs1: {hash: 'gs1pk', sort: 'gs1sk'}", ""),
            "indexes.gs1",
            SchemaChangeKind::IndexRemoved,
            true,
        );
        check_texts(
            &base,
            &base.replace("Fault: {sync: 'up'}", "Fault: {sync: 'both'}"),
            "models.Fault.process",
            SchemaChangeKind::ProcessChanged {
                from: "enable=both sync=up".into(),
                to: "enable=both sync=both".into(),
            },
            false,
        );
        check_texts(
            &base,
            &base.replace("isoDates: true", "isoDates: true, typeField: 'kind'"),
            "params.typeField",
            SchemaChangeKind::TypeFieldChanged {
                from: "_type".into(),
                to: "kind".into(),
            },
            false,
        );
    }

    #[test]
    fn timestamps_turned_on_add_optional_fields_and_off_remove_them() {
        let base = BASE.replace("FIELDS", "");
        let stamped = base.replace("isoDates: true", "isoDates: true, timestamps: 'create'");
        check_texts(
            &base,
            &stamped,
            "models.Fault.fields.created",
            SchemaChangeKind::FieldAdded { required: false },
            true,
        );
        check_texts(
            &stamped,
            &base,
            "models.Fault.fields.created",
            SchemaChangeKind::FieldRemoved,
            false,
        );
    }

    #[test]
    fn messages_name_the_path_the_difference_and_the_verdict() {
        let changes = compare_shapes(
            &shape_with("color: {type: 'string'}"),
            &shape_with("color: {type: 'number'}, size: {type: 'number'}"),
        );
        assert_eq!(
            changes.to_string(),
            "models.Fault.fields.color: type changed from string to number (incompatible)\n\
             models.Fault.fields.size: added optional field (compatible)"
        );
        assert_eq!(
            changes
                .incompatible()
                .map(|c| c.path.as_str())
                .collect::<Vec<_>>(),
            [COLOR]
        );
    }

    #[test]
    fn unique_values_render_value_and_scope() {
        let s = load(&BASE.replace(
            "FIELDS",
            "name: {type: 'string', unique: true, scope: 'dev#${deviceId}'}, \
             serial: {type: 'number', unique: true}, note: {type: 'string'}",
        ));
        let m = s.model("Fault").unwrap();
        assert!(m.has_unique_fields());
        let item: Item = serde_json::from_value(json!({
            "deviceId": "d1", "name": "fan", "serial": 3.0, "note": "x"
        }))
        .unwrap();
        assert_eq!(
            m.unique_values(&item),
            vec![
                UniqueValue {
                    field: "name".into(),
                    scope: UniqueScope::Scoped("dev#d1".into()),
                    value: "fan".into(),
                },
                UniqueValue {
                    field: "serial".into(),
                    scope: UniqueScope::Model,
                    value: "3".into(),
                },
            ]
        );
        let item: Item = serde_json::from_value(json!({"name": "fan", "serial": null})).unwrap();
        assert_eq!(
            m.unique_values(&item),
            vec![UniqueValue {
                field: "name".into(),
                scope: UniqueScope::Unresolved {
                    variable: "deviceId".into()
                },
                value: "fan".into(),
            }]
        );
        assert!(!load(&BASE.replace("FIELDS", ""))
            .model("Fault")
            .unwrap()
            .has_unique_fields());
    }
}
