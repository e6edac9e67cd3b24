//! Loading: JSON5 text → raw JSON → validated [`Schema`].
//!
//! Schema files are authored by people (often for OneTable or the Ioto agent first) and may also
//! arrive from untrusted places. Loading accepts every key OneTable and Ioto schemas use, as the
//! catalogue in `keys` classifies it: supported keys get OneTable's meaning here, keys devtables
//! keeps but ignores become [`crate::SchemaWarning`]s, and unknown keys (typos), refused
//! features, contradictions and malformed definitions are errors naming their dotted path
//! (`models.Fault.severity.enum`). Loading is bounded (text size, nesting, number of models and
//! fields, template and regex sizes, warnings). Everything per-item later relies on the
//! invariants checked here.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use regex::RegexBuilder;
use serde_json::{Map, Value};

use crate::error::SchemaError;
use crate::field::{Ctx, Field, FieldType, Generate, MappedAttribute, Pattern, MAX_UID_LEN};
use crate::keys::{check_keys, Place, Warnings};
use crate::model::{Model, Stamps};
use crate::schema::Schema;
use crate::settings::{Enable, Index, Params, Process, SyncDirection, Timestamps};
use crate::template::Template;

/// Largest accepted schema text.
pub(crate) const MAX_TEXT: usize = 4 * 1024 * 1024;
/// Most models in one schema.
pub(crate) const MAX_MODELS: usize = 1000;
/// Most fields in one model (or nested schema).
pub(crate) const MAX_FIELDS: usize = 500;
/// Deepest nested object schema.
const MAX_SCHEMA_DEPTH: usize = 8;
/// Deepest JSON5 nesting accepted before parsing (protects the recursive parser).
const MAX_NESTING: usize = 64;
/// Deepest blend chain.
const MAX_BLEND_DEPTH: usize = 8;
/// Compiled regex size limit.
const REGEX_SIZE_LIMIT: usize = 1024 * 1024;

type Obj = Map<String, Value>;
type Res<T> = Result<T, SchemaError>;

fn invalid<T>(path: impl Into<String>, reason: impl Into<String>) -> Res<T> {
    Err(SchemaError::invalid(path, reason))
}

/// Parse schema text; `blend` is an error because there is no file to resolve it against.
impl Schema {
    /// Parse and validate a schema from JSON5 text. `blend` is rejected (it needs a file).
    pub fn from_json5(text: &str) -> Result<Schema, SchemaError> {
        from_text(text)
    }

    /// Read, blend and validate a schema file.
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        from_file(path)
    }
}

fn from_text(text: &str) -> Res<Schema> {
    let root = parse_json5(text)?;
    if root.contains_key("blend") {
        return invalid(
            "blend",
            "blend is only supported when loading a schema file (Schema::load)",
        );
    }
    build(root)
}

/// Read a schema file, resolving `blend` relative to each file.
fn from_file(path: &Path) -> Res<Schema> {
    let mut stack = Vec::new();
    let root = load_blended(path, &mut stack)?;
    build(root)
}

fn read_file(path: &Path) -> Res<String> {
    let io = |source| SchemaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_TEXT as u64 + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text)
}

fn load_blended(path: &Path, stack: &mut Vec<PathBuf>) -> Res<Obj> {
    let canonical = path.canonicalize().map_err(|source| SchemaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if stack.contains(&canonical) {
        return invalid("blend", format!("blend cycle through {}", path.display()));
    }
    if stack.len() > MAX_BLEND_DEPTH {
        return invalid(
            "blend",
            format!("blend nesting deeper than {MAX_BLEND_DEPTH} files"),
        );
    }
    let mut root = parse_json5(&read_file(path)?)?;
    let Some(blend) = root.remove("blend") else {
        return Ok(root);
    };
    let Value::Array(list) = blend else {
        return invalid("blend", "blend must be a list of file paths");
    };
    stack.push(canonical);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut merged = Obj::new();
    for (i, entry) in list.iter().enumerate() {
        let Some(name) = entry.as_str() else {
            return invalid(
                format!("blend[{i}]"),
                "blend entries must be file path strings",
            );
        };
        let other = load_blended(&dir.join(name), stack)?;
        merge_into(&mut merged, other);
    }
    stack.pop();
    merge_into(&mut merged, root);
    Ok(merged)
}

/// Merge `src` over `dst`: section maps (models, indexes, process, params) merge key by key,
/// other keys are replaced. `control` merges as `process` (unless a file has both).
fn merge_into(dst: &mut Obj, mut src: Obj) {
    if !src.contains_key("process") {
        if let Some(control) = src.remove("control") {
            src.insert("process".into(), control);
        }
    }
    for (key, value) in src {
        let section = matches!(key.as_str(), "models" | "indexes" | "process" | "params");
        match (section, dst.get_mut(&key), value) {
            (true, Some(Value::Object(existing)), Value::Object(add)) => existing.extend(add),
            (_, _, value) => {
                dst.insert(key, value);
            }
        }
    }
}

fn parse_json5(text: &str) -> Res<Obj> {
    if text.len() > MAX_TEXT {
        return invalid(
            "schema",
            format!("schema text is larger than {MAX_TEXT} bytes"),
        );
    }
    if max_nesting(text) > MAX_NESTING {
        return Err(SchemaError::Syntax(format!(
            "nesting deeper than {MAX_NESTING} levels"
        )));
    }
    match json5::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => invalid("schema", "the schema must be an object"),
        Err(e) => Err(SchemaError::Syntax(e.to_string())),
    }
}

/// Deepest `{`/`[` nesting outside strings and comments (a conservative pre-parse bound).
fn max_nesting(text: &str) -> usize {
    let bytes = text.as_bytes();
    let at = |i: usize| bytes.get(i).copied();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while let Some(b) = at(i) {
        match b {
            b'"' | b'\'' => {
                i += 1;
                while let Some(c) = at(i).filter(|&c| c != b) {
                    i += if c == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if at(i + 1) == Some(b'/') => {
                while at(i).is_some_and(|c| c != b'\n') {
                    i += 1;
                }
            }
            b'/' if at(i + 1) == Some(b'*') => {
                i += 2;
                while at(i).is_some() && !(at(i) == Some(b'*') && at(i + 1) == Some(b'/')) {
                    i += 1;
                }
                i += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn as_obj<'a>(value: &'a Value, path: &str) -> Res<&'a Obj> {
    value
        .as_object()
        .ok_or_else(|| SchemaError::invalid(path, "must be an object"))
}

fn opt_bool(obj: &Obj, key: &str, path: &str) -> Res<Option<bool>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => invalid(join(path, key), "must be a boolean (true or false)"),
    }
}

fn opt_str<'a>(obj: &'a Obj, key: &str, path: &str) -> Res<Option<&'a str>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => invalid(join(path, key), "must be a string"),
    }
}

/// The documentation of a definition: `description`, else `notes`, else `note` (the keys
/// are known to be strings once `check_keys` passed).
fn doc(obj: &Obj) -> Option<String> {
    ["description", "notes", "note"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .map(str::to_string)
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Validate a raw (blended) schema object.
fn build(root: Obj) -> Res<Schema> {
    let mut warnings = Warnings::default();
    let w = &mut warnings;
    check_keys(&root, "", Place::Top, w)?;
    let format = match opt_str(&root, "format", "")? {
        Some(f) if f.starts_with("onetable:") => f.to_string(),
        Some(_) => {
            return invalid(
                "format",
                "format must start with 'onetable:' (e.g. 'onetable:1.1.0')",
            )
        }
        None => return invalid("format", "format is required (e.g. 'onetable:1.1.0')"),
    };
    let version = opt_str(&root, "version", "")?
        .ok_or_else(|| SchemaError::invalid("version", "version is required (a string)"))?
        .to_string();
    // Kept and ignored, but their shape is the OneTable specification's.
    for (key, object) in [("queries", true), ("extensions", true), ("items", false)] {
        match (root.get(key), object) {
            (None, _) | (Some(Value::Object(_)), true) | (Some(Value::Array(_)), false) => {}
            (Some(_), true) => return invalid(key, "must be an object"),
            (Some(_), false) => return invalid(key, "must be a list"),
        }
    }
    if root.contains_key("process") && root.contains_key("control") {
        return invalid(
            "control",
            "both `process` and `control` are present: use only `process`",
        );
    }
    let params = match root.get("params") {
        Some(v) => parse_params(as_obj(v, "params")?, w)?,
        None => Params::default(),
    };
    let (primary, secondary) = parse_indexes(root.get("indexes"), w)?;
    let mut models = BTreeMap::new();
    let no_models = Value::Object(Obj::new());
    let raw_models = as_obj(root.get("models").unwrap_or(&no_models), "models")?;
    if raw_models.len() > MAX_MODELS {
        return invalid("models", format!("more than {MAX_MODELS} models"));
    }
    let mut all_indexes = vec![primary.clone()];
    all_indexes.extend(secondary.iter().cloned());
    for (name, def) in raw_models {
        let model = parse_model(name, def, &params, &primary, &all_indexes, w)?;
        models.insert(name.clone(), model);
    }
    let (process_key, process) = match (root.get("process"), root.get("control")) {
        (Some(p), _) => ("process", Some(p)),
        (None, Some(c)) => ("control", Some(c)),
        (None, None) => ("process", None),
    };
    if let Some(process) = process {
        for (name, def) in as_obj(process, process_key)? {
            let path = join(process_key, name);
            let Some(model) = models.get_mut(name) else {
                return invalid(path, format!("`{name}` is not a model of this schema"));
            };
            model.process = parse_process(def, &path, w)?;
        }
    }
    for model in models.values() {
        check_local_only(model)?;
    }
    let doc_of = |key: &str| root.get(key).and_then(Value::as_str).map(str::to_string);
    Ok(Schema {
        version,
        format,
        name: doc_of("name"),
        description: doc_of("description"),
        params,
        primary,
        secondary,
        models,
        warnings: warnings.finish(),
        tag: std::sync::OnceLock::new(),
    })
}

/// Ioto's `sync: 'none'` on a field keeps its value on the device; devtables replicates whole
/// items, so it can honour that only in a model that does not replicate.
fn check_local_only(model: &Model) -> Res<()> {
    if model.process.sync == SyncDirection::None {
        return Ok(());
    }
    match model.fields.iter().find(|f| f.local_only) {
        None => Ok(()),
        Some(field) => invalid(
            format!("models.{}.{}.sync", model.name, field.name),
            format!(
                "the field must stay on the device (sync: 'none'), but model {} replicates and \
                 devtables replicates whole items: move the field to a model that does not sync, \
                 or remove `sync` from the field",
                model.name
            ),
        ),
    }
}

fn parse_params(obj: &Obj, w: &mut Warnings) -> Res<Params> {
    check_keys(obj, "params", Place::Params, w)?;
    let mut params = Params::default();
    for (key, slot) in [
        ("typeField", &mut params.type_field),
        ("createdField", &mut params.created_field),
        ("updatedField", &mut params.updated_field),
    ] {
        if let Some(name) = opt_str(obj, key, "params")? {
            if name.is_empty() {
                return invalid(join("params", key), "must be a non-empty attribute name");
            }
            *slot = name.to_string();
        }
    }
    if params.created_field == params.updated_field
        || params.type_field == params.created_field
        || params.type_field == params.updated_field
    {
        return invalid(
            "params",
            "typeField, createdField and updatedField must name three different attributes",
        );
    }
    params.timestamps = match obj.get("timestamps") {
        None | Some(Value::Bool(false)) => Timestamps::Off,
        Some(Value::Bool(true)) => Timestamps::Both,
        Some(Value::String(s)) if s == "create" => Timestamps::Create,
        Some(Value::String(s)) if s == "update" => Timestamps::Update,
        Some(_) => {
            return invalid(
                "params.timestamps",
                "must be true (both timestamps), false, 'create' or 'update'",
            )
        }
    };
    params.iso_dates = opt_bool(obj, "isoDates", "params")?.unwrap_or(false);
    params.nulls = opt_bool(obj, "nulls", "params")?.unwrap_or(false);
    params.hidden = opt_bool(obj, "hidden", "params")?.unwrap_or(true);
    params.partial = opt_bool(obj, "partial", "params")?.unwrap_or(false);
    Ok(params)
}

fn parse_indexes(value: Option<&Value>, w: &mut Warnings) -> Res<(Index, Vec<Index>)> {
    let Some(value) = value else {
        return invalid(
            "indexes",
            "indexes are required (at least `primary: {hash: 'pk', sort: 'sk'}`)",
        );
    };
    let obj = as_obj(value, "indexes")?;
    let primary_def = obj
        .get("primary")
        .ok_or_else(|| SchemaError::invalid("indexes.primary", "the primary index is required"))?;
    let primary = parse_index("primary", primary_def, None, w)?;
    let mut secondary = Vec::new();
    for (name, def) in obj {
        if name != "primary" {
            if name.is_empty() {
                return invalid("indexes", "index names must not be empty");
            }
            secondary.push(parse_index(name, def, Some(&primary), w)?);
        }
    }
    secondary.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((primary, secondary))
}

fn parse_index(name: &str, def: &Value, primary: Option<&Index>, w: &mut Warnings) -> Res<Index> {
    let path = join("indexes", name);
    let obj = as_obj(def, &path)?;
    let place = match primary {
        None => Place::PrimaryIndex,
        Some(_) => Place::Index,
    };
    check_keys(obj, &path, place, w)?;
    let kind = opt_str(obj, "type", &path)?;
    if let Some(kind) = kind {
        if kind != "local" && kind != "global" {
            return invalid(
                join(&path, "type"),
                "index type must be 'local' or 'global'",
            );
        }
    }
    opt_bool(obj, "follow", &path)?;
    match obj.get("project") {
        None => {}
        Some(Value::String(p)) if p == "all" || p == "keys" => {}
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {}
        Some(_) => {
            return invalid(
                join(&path, "project"),
                "project must be 'all', 'keys' or a list of attribute names",
            )
        }
    }
    let hash = match (opt_str(obj, "hash", &path)?, primary, kind) {
        (Some(h), _, _) if !h.is_empty() => h.to_string(),
        (None, Some(p), Some("local")) => p.hash.clone(),
        _ => {
            return invalid(
                join(&path, "hash"),
                "hash is required (a non-empty attribute name)",
            )
        }
    };
    let sort = match opt_str(obj, "sort", &path)? {
        Some("") => {
            return invalid(
                join(&path, "sort"),
                "sort must be a non-empty attribute name",
            )
        }
        other => other.map(str::to_string),
    };
    Ok(Index {
        name: name.to_string(),
        hash,
        sort,
        description: doc(obj),
    })
}

fn parse_process(def: &Value, path: &str, w: &mut Warnings) -> Res<Process> {
    let obj = as_obj(def, path)?;
    check_keys(obj, path, Place::Process, w)?;
    let mut process = Process::default();
    match obj.get("enable") {
        None => {}
        Some(Value::String(s)) if s == "device" => process.enable = Enable::Device,
        Some(Value::String(s)) if s == "cloud" => process.enable = Enable::Cloud,
        Some(Value::String(s)) if s == "both" => process.enable = Enable::Both,
        Some(_) => {
            return invalid(
                join(path, "enable"),
                "enable value not allowed: use 'device', 'cloud' or 'both'",
            )
        }
    }
    match obj.get("sync") {
        None => {}
        Some(Value::String(s)) if s == "up" => process.sync = SyncDirection::Up,
        Some(Value::String(s)) if s == "down" => process.sync = SyncDirection::Down,
        Some(Value::String(s)) if s == "both" => process.sync = SyncDirection::Both,
        Some(Value::String(s)) if s == "none" => process.sync = SyncDirection::None,
        Some(_) => {
            return invalid(
                join(path, "sync"),
                "sync value not allowed: use 'up', 'down', 'both' or 'none'",
            )
        }
    }
    process.lossy = opt_bool(obj, "lossy", path)?.unwrap_or(false);
    process.broadcast = opt_bool(obj, "broadcast", path)?.unwrap_or(false);
    if process.sync != SyncDirection::None && process.enable != Enable::Both {
        let side = if process.enable == Enable::Device {
            "device"
        } else {
            "cloud"
        };
        return invalid(
            join(path, "sync"),
            format!(
                "a model enabled only in the {side} cannot sync: use sync 'none' or enable 'both'"
            ),
        );
    }
    if process.broadcast && process.sync != SyncDirection::Down {
        return invalid(join(path, "broadcast"), "broadcast requires sync 'down'");
    }
    Ok(process)
}

fn parse_model(
    name: &str,
    def: &Value,
    params: &Params,
    primary: &Index,
    indexes: &[Index],
    w: &mut Warnings,
) -> Res<Model> {
    let path = join("models", name);
    if !is_identifier(name) {
        return invalid(path, "model names must be non-empty ASCII identifiers");
    }
    let obj = as_obj(def, &path)?;
    if obj.len() > MAX_FIELDS {
        return invalid(path, format!("more than {MAX_FIELDS} fields"));
    }
    let ctx = Ctx {
        model: name,
        iso_dates: params.iso_dates,
        nulls: params.nulls,
        neighbour: false,
    };
    let env = FieldEnv {
        ctx: &ctx,
        place: Place::Field,
        depth: 0,
        partial: params.partial,
    };
    let mut fields = Vec::with_capacity(obj.len());
    let mut stamps = Stamps::default();
    let mut description = None;
    for (field_name, field_def) in obj {
        let fpath = join(&path, field_name);
        if field_name.is_empty() {
            return invalid(fpath, "field names must not be empty");
        }
        // A model's documentation: a field definition is always an object.
        if let ("description", Value::String(text)) = (field_name.as_str(), field_def) {
            description = Some(text.clone());
            continue;
        }
        if *field_name == params.type_field {
            return invalid(
                fpath,
                format!("`{field_name}` is reserved by params.typeField: rename the field"),
            );
        }
        if *field_name == params.created_field && params.timestamps.sets_created() {
            stamps.created = Some(parse_stamp(field_name, field_def, &fpath, w)?);
            continue;
        }
        if *field_name == params.updated_field && params.timestamps.sets_updated() {
            stamps.updated = Some(parse_stamp(field_name, field_def, &fpath, w)?);
            continue;
        }
        let mut field = parse_field(field_name, field_def, &fpath, &env, w)?;
        if field.hidden.is_none() && field.template.is_some() && !params.hidden {
            field.hidden = Some(false);
        }
        fields.push(field);
    }
    if params.timestamps.sets_created() && stamps.created.is_none() {
        stamps.created = Some(Field::new(&params.created_field, FieldType::Date));
    }
    if params.timestamps.sets_updated() && stamps.updated.is_none() {
        stamps.updated = Some(Field::new(&params.updated_field, FieldType::Date));
    }
    fields.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(sort) = &primary.sort {
        if !fields.iter().any(|f| &f.name == sort) {
            return invalid(
                path,
                format!("the model must define the primary sort key field `{sort}`"),
            );
        }
    }
    let ttl_fields: Vec<&Field> = fields.iter().filter(|f| f.ttl).collect();
    if ttl_fields.len() > 1 {
        return invalid(
            join(&path, &ttl_fields[1].name),
            "only one ttl field is allowed per model",
        );
    }
    check_maps(&fields, &path)?;
    check_key_maps(&fields, &path, indexes)?;
    let known = |var: &str| {
        var == params.type_field
            || fields.iter().any(|f| f.name == var)
            || [&stamps.created, &stamps.updated]
                .into_iter()
                .flatten()
                .any(|s| s.name == var)
    };
    for field in &fields {
        if let Some(scope) = &field.unique_scope {
            if let Some(var) = scope.variables().find(|v| !known(v)) {
                return invalid(
                    format!("{path}.{}.scope", field.name),
                    format!("scope variable `${{{var}}}` does not name a field of model {name}"),
                );
            }
        }
    }
    let template_order = template_order(name, &fields, &known)?;
    let mut model = Model::new(
        name,
        fields,
        template_order,
        params.clone(),
        primary.clone(),
        indexes.to_vec(),
        stamps,
    );
    model.description = description;
    Ok(model)
}

/// The declaration of a timestamp field that `params.timestamps` maintains: only its type
/// (date, number or string), visibility and documentation mean something.
fn parse_stamp(name: &str, def: &Value, path: &str, w: &mut Warnings) -> Res<Field> {
    let obj = as_obj(def, path)?;
    check_keys(obj, path, Place::Timestamp, w)?;
    let ty = parse_type(obj, path)?;
    if !matches!(ty, FieldType::Date | FieldType::Number | FieldType::String) {
        return invalid(
            join(path, "type"),
            "a timestamp field must be a date, a number (epoch milliseconds) or a string (ISO 8601)",
        );
    }
    let mut field = Field::new(name, ty);
    field.hidden = opt_bool(obj, "hidden", path)?;
    field.readonly = opt_bool(obj, "readonly", path)?.unwrap_or(false);
    field.required = opt_bool(obj, "required", path)?.unwrap_or(false);
    field.iso_dates = opt_bool(obj, "isoDates", path)?;
    field.description = doc(obj);
    Ok(field)
}

/// Within one block of fields (a model, or one nested schema), OneTable refuses two fields
/// stored in the same attribute, or in the same property of a packed attribute.
fn check_maps(fields: &[Field], path: &str) -> Res<()> {
    let mut whole: BTreeMap<&str, &str> = BTreeMap::new();
    let mut packed: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for field in fields {
        let Some(map) = &field.map else {
            continue;
        };
        let at = format!("{path}.{}.map", field.name);
        let attr = map.attribute.as_str();
        let taken = match &map.property {
            None => whole
                .get(attr)
                .or_else(|| packed.iter().find(|((a, _), _)| *a == attr).map(|(_, f)| f)),
            Some(p) => whole.get(attr).or_else(|| packed.get(&(attr, p.as_str()))),
        };
        if let Some(other) = taken {
            return invalid(
                at,
                format!("field `{other}` is already stored in `{map}`: map each field to its own attribute"),
            );
        }
        match &map.property {
            None => whole.insert(attr, &field.name),
            Some(p) => packed.insert((attr, p), &field.name),
        };
    }
    Ok(())
}

/// devtables stores fields under their own names, and indexes read the attribute named by the
/// index: a key attribute mapped elsewhere would leave the index empty.
fn check_key_maps(fields: &[Field], path: &str, indexes: &[Index]) -> Res<()> {
    let is_key = |attr: &str| {
        indexes
            .iter()
            .any(|i| i.hash == attr || i.sort.as_deref() == Some(attr))
    };
    for field in fields {
        let Some(map) = &field.map else {
            continue;
        };
        if map.property.is_none() && map.attribute == field.name {
            continue;
        }
        let key = [field.name.as_str(), map.attribute.as_str()]
            .into_iter()
            .find(|a| is_key(a));
        if let Some(attr) = key {
            return invalid(
                format!("{path}.{}.map", field.name),
                format!(
                    "`{attr}` is an index attribute and devtables stores each field under its own \
                     name: name the field `{attr}` and remove `map`"
                ),
            );
        }
    }
    Ok(())
}

/// Check template variables and order templated fields so that dependencies come first.
/// `known`: whether a variable names something an item holds when templates run (a field,
/// the type field, a maintained timestamp).
fn template_order(model: &str, fields: &[Field], known: &dyn Fn(&str) -> bool) -> Res<Vec<usize>> {
    let index_of = |n: &str| fields.iter().position(|f| f.name == n);
    for f in fields {
        if let Some(t) = f.template() {
            for var in t.variables() {
                let target = index_of(var).and_then(|i| fields.get(i));
                if !known(var) {
                    return invalid(
                        format!("models.{model}.{}.value", f.name),
                        format!(
                            "template variable `${{{var}}}` does not name a field of model {model}"
                        ),
                    );
                }
                if target.is_some_and(|t| matches!(t.ty, FieldType::Object | FieldType::Array)) {
                    return invalid(
                        format!("models.{model}.{}.value", f.name),
                        format!("template variable `${{{var}}}` names an {} field, which has no text form", target.map_or("", |t| t.ty.name())),
                    );
                }
            }
        }
    }
    // Depth-first post-order; `state`: 0 new, 1 in progress, 2 done.
    let mut state = vec![0u8; fields.len()];
    let mut order = Vec::new();
    for start in 0..fields.len() {
        if fields[start].template().is_none() || state[start] == 2 {
            continue;
        }
        let mut trail: Vec<usize> = Vec::new();
        visit(start, fields, &index_of, &mut state, &mut order, &mut trail).map_err(|cycle| {
            let names: Vec<&str> = cycle.iter().map(|&i| fields[i].name.as_str()).collect();
            SchemaError::invalid(
                format!("models.{model}.{}.value", fields[cycle[0]].name),
                format!("template cycle: {}", names.join(" -> ")),
            )
        })?;
    }
    Ok(order)
}

fn visit(
    i: usize,
    fields: &[Field],
    index_of: &dyn Fn(&str) -> Option<usize>,
    state: &mut [u8],
    order: &mut Vec<usize>,
    trail: &mut Vec<usize>,
) -> Result<(), Vec<usize>> {
    match state[i] {
        2 => return Ok(()),
        1 => {
            let from = trail.iter().position(|&t| t == i).unwrap_or(0);
            let mut cycle = trail[from..].to_vec();
            cycle.push(i);
            return Err(cycle);
        }
        _ => {}
    }
    let Some(t) = fields[i].template() else {
        state[i] = 2;
        return Ok(());
    };
    state[i] = 1;
    trail.push(i);
    for var in t.variables() {
        if let Some(j) = index_of(var) {
            if fields[j].template().is_some() {
                visit(j, fields, index_of, state, order, trail)?;
            }
        }
    }
    trail.pop();
    state[i] = 2;
    order.push(i);
    Ok(())
}

/// Where a field definition is parsed: its place (top-level, nested, array element), depth and
/// the `partial` it inherits.
struct FieldEnv<'a> {
    ctx: &'a Ctx<'a>,
    place: Place,
    depth: usize,
    partial: bool,
}

fn parse_type(obj: &Obj, path: &str) -> Res<FieldType> {
    match obj.get("type") {
        Some(Value::String(t)) => FieldType::parse(t).ok_or_else(|| {
            SchemaError::invalid(join(path, "type"), format!("unknown type {t:?} (use string, number, boolean, date, object, array or binary)"))
        }),
        Some(_) => invalid(join(path, "type"), "type must be a string"),
        None => invalid(join(path, "type"), "type is required"),
    }
}

/// `generate`: 'ulid', 'uuid', 'uid' or 'uid(N)'.
fn parse_generate(value: &Value, path: &str) -> Res<Option<Generate>> {
    let text =
        match value {
            Value::String(text) => text.as_str(),
            Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return invalid(
                path,
                "`generate: true` calls the custom generator function of OneTable's Table params, \
                 which a schema file cannot carry: use 'ulid', 'uuid', 'uid' or 'uid(N)'",
            ),
            _ => return invalid(path, "generate must be 'ulid', 'uuid', 'uid' or 'uid(N)'"),
        };
    let size = |digits: &str| {
        digits
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_UID_LEN).contains(n))
    };
    Ok(Some(match text {
        "ulid" => Generate::Ulid,
        "uuid" => Generate::Uuid,
        "uid" => Generate::Uid(10),
        _ => match text
            .strip_prefix("uid(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(size)
        {
            Some(n) => Generate::Uid(n),
            None => {
                let shown: String = text.chars().take(40).collect();
                return invalid(
                    path,
                    format!(
                        "generate {shown:?} is not known: use 'ulid', 'uuid', 'uid' or 'uid(N)' \
                         with N from 1 to {MAX_UID_LEN}"
                    ),
                );
            }
        },
    }))
}

/// `map`: `attribute` or `attribute.property`.
fn parse_map(value: &Value, path: &str) -> Res<MappedAttribute> {
    let Value::String(text) = value else {
        return invalid(
            path,
            "map must be an attribute name ('name' or 'attribute.property')",
        );
    };
    let mut parts = text.split('.');
    let attribute = parts.next().unwrap_or_default();
    let property = parts.next();
    if attribute.is_empty() || property == Some("") || parts.next().is_some() {
        return invalid(
            path,
            "map must be 'attribute' or 'attribute.property' (one dot at most, no empty part)",
        );
    }
    Ok(MappedAttribute {
        attribute: attribute.to_string(),
        property: property.map(str::to_string),
    })
}

fn parse_field(
    name: &str,
    def: &Value,
    path: &str,
    env: &FieldEnv,
    w: &mut Warnings,
) -> Res<Field> {
    let obj = as_obj(def, path)?;
    check_keys(obj, path, env.place, w)?;
    let ctx = env.ctx;
    let ty = parse_type(obj, path)?;
    let mut field = Field::new(name, ty);
    field.description = doc(obj);
    field.required = opt_bool(obj, "required", path)?.unwrap_or(false);
    field.hidden = opt_bool(obj, "hidden", path)?;
    field.readonly = opt_bool(obj, "readonly", path)?.unwrap_or(false);
    field.ttl = opt_bool(obj, "ttl", path)?.unwrap_or(false);
    field.nulls = opt_bool(obj, "nulls", path)?;
    field.iso_dates = opt_bool(obj, "isoDates", path)?;
    if field.iso_dates.is_some() && ty != FieldType::Date {
        w.push(
            path,
            "isoDates",
            "only date fields have a date form to choose",
        );
    }
    if field.ttl && !matches!(ty, FieldType::Date | FieldType::Number) {
        return invalid(
            join(path, "ttl"),
            "ttl is only allowed on date or number fields",
        );
    }
    if opt_bool(obj, "crypt", path)? == Some(true) {
        return invalid(
            join(path, "crypt"),
            "`crypt` is not supported by devtables: it has no encryption key to encrypt with; \
             remove crypt, or encrypt the value in the application before writing it",
        );
    }
    field.unique = opt_bool(obj, "unique", path)?.unwrap_or(false);
    if field.unique && matches!(ty, FieldType::Object | FieldType::Array) {
        return invalid(
            join(path, "unique"),
            "unique values must be scalars (string, number, boolean, date or binary)",
        );
    }
    if let Some(text) = opt_str(obj, "scope", path)? {
        let spath = join(path, "scope");
        field.unique_scope =
            Some(Template::parse(text).map_err(|r| SchemaError::invalid(&spath, r))?);
        if !field.unique {
            w.push(
                path,
                "scope",
                "it only narrows `unique`, and this field is not unique",
            );
        }
    }
    if let Some(value) = obj.get("map") {
        let map = parse_map(value, &join(path, "map"))?;
        if map.property.is_some() || map.attribute != name {
            w.push(
                path,
                "map",
                format!(
                    "devtables stores the field under its own name `{name}`; `{map}` is kept for reference"
                ),
            );
        }
        field.map = Some(map);
    }
    // Ioto: a field that never leaves the device (checked against `process` later).
    field.local_only = obj.get("sync").and_then(Value::as_str) == Some("none");
    let declared_partial = opt_bool(obj, "partial", path)?;
    field.partial = declared_partial.unwrap_or(env.partial);
    if let Some(value) = obj.get("generate") {
        field.generate = parse_generate(value, &join(path, "generate"))?;
        if field.generate.is_some() && ty != FieldType::String {
            return invalid(
                join(path, "generate"),
                "generate is only allowed on string fields",
            );
        }
    }
    if let Some(text) = opt_str(obj, "value", path)? {
        field.template =
            Some(Template::parse(text).map_err(|r| SchemaError::invalid(join(path, "value"), r))?);
    }
    let inner = |place| FieldEnv {
        ctx,
        place,
        depth: env.depth + 1,
        partial: field.partial,
    };
    if let Some(schema) = obj.get("schema") {
        let spath = join(path, "schema");
        if ty != FieldType::Object {
            return invalid(spath, "schema is only allowed on object fields");
        }
        field.schema = Some(parse_nested(schema, &spath, &inner(Place::NestedField), w)?);
    }
    if let Some(items) = obj.get("items") {
        let ipath = join(path, "items");
        if ty != FieldType::Array {
            return invalid(ipath, "items is only allowed on array fields");
        }
        if env.depth + 1 > MAX_SCHEMA_DEPTH {
            return invalid(
                ipath,
                format!("nested schemas deeper than {MAX_SCHEMA_DEPTH} levels"),
            );
        }
        field.items = Some(Box::new(parse_field(
            "",
            items,
            &ipath,
            &inner(Place::Items),
            w,
        )?));
    }
    if declared_partial == Some(true) && !field.merges() {
        w.push(
            path,
            "partial",
            "updates merge only object fields with a nested schema; this field's value is replaced whole",
        );
    }
    if let Some(v) = obj.get("validate") {
        let vpath = join(path, "validate");
        let Value::String(source) = v else {
            return invalid(vpath, "validate must be a regular expression string");
        };
        if matches!(ty, FieldType::Object | FieldType::Array | FieldType::Binary) {
            return invalid(
                vpath,
                "validate is only allowed on string, number, boolean or date fields",
            );
        }
        field.validate = Some(compile_pattern(source).map_err(|r| SchemaError::invalid(vpath, r))?);
    }
    if let Some(v) = obj.get("enum") {
        let epath = join(path, "enum");
        let list = match v {
            Value::Array(list) if !list.is_empty() => list,
            _ => return invalid(epath, "enum must be a non-empty list"),
        };
        let mut values = Vec::with_capacity(list.len());
        for item in list {
            let cast = field.cast(item, name, ctx).map_err(|e| {
                SchemaError::invalid(
                    &epath,
                    format!(
                        "enum value {item} does not match type {}: {}",
                        ty.name(),
                        e.reason
                    ),
                )
            })?;
            values.push(cast);
        }
        field.enum_values = Some(values);
    }
    // An array element's default is ignored (a warning says so): elements are never filled.
    if let Some(v) = obj.get("default").filter(|_| env.place != Place::Items) {
        let dpath = join(path, "default");
        if v.is_null() {
            return invalid(dpath, "default must not be null");
        }
        let cast = field
            .cast(v, name, ctx)
            .and_then(|c| field.check(&c, name, ctx).map(|()| c))
            .map_err(|e| SchemaError::invalid(dpath, format!("invalid default: {}", e.reason)))?;
        field.default = Some(cast);
    }
    Ok(field)
}

fn parse_nested(def: &Value, path: &str, env: &FieldEnv, w: &mut Warnings) -> Res<Vec<Field>> {
    if env.depth > MAX_SCHEMA_DEPTH {
        return invalid(
            path,
            format!("nested schemas deeper than {MAX_SCHEMA_DEPTH} levels"),
        );
    }
    let obj = as_obj(def, path)?;
    if obj.len() > MAX_FIELDS {
        return invalid(path, format!("more than {MAX_FIELDS} fields"));
    }
    let mut fields = Vec::with_capacity(obj.len());
    for (name, fdef) in obj {
        let fpath = join(path, name);
        if name.is_empty() {
            return invalid(fpath, "field names must not be empty");
        }
        fields.push(parse_field(name, fdef, &fpath, env, w)?);
    }
    fields.sort_by(|a, b| a.name.cmp(&b.name));
    check_maps(&fields, path)?;
    Ok(fields)
}

/// Compile `/pattern/flags` (flags i, m, s, x) or a bare pattern, with a size limit.
fn compile_pattern(source: &str) -> Result<Pattern, String> {
    if source.len() > 1024 {
        return Err("validate pattern is longer than 1024 bytes".into());
    }
    let (pattern, flags) = match source
        .strip_prefix('/')
        .and_then(|rest| rest.rfind('/').map(|end| (rest, end)))
    {
        Some((rest, end)) => (&rest[..end], &rest[end + 1..]),
        None => (source, ""),
    };
    let mut builder = RegexBuilder::new(pattern);
    builder
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT);
    for flag in flags.chars() {
        match flag {
            'i' => builder.case_insensitive(true),
            'm' => builder.multi_line(true),
            's' => builder.dot_matches_new_line(true),
            'x' => builder.ignore_whitespace(true),
            other => {
                return Err(format!(
                    "unsupported regex flag `{other}` (use i, m, s or x)"
                ))
            }
        };
    }
    let regex = builder.build().map_err(|e| format!("invalid regex: {e}"))?;
    Ok(Pattern {
        source: source.to_string(),
        regex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "format: 'onetable:1.1.0', version: '1.0.0', indexes: {primary: {hash: 'pk', sort: 'sk'}, gs1: {hash: 'gs1pk', sort: 'gs1sk'}}";
    const FAULT: &str = "pk: {type: 'string', value: 'device#${deviceId}'}, sk: {type: 'string', value: 'fault#${id}'},
        id: {type: 'string', generate: 'ulid'}, deviceId: {type: 'string', required: true}";

    /// Load `{BASE, <extra>}` and expect an error at `path`.
    fn check(extra: &str, path: &str) {
        let text = format!("{{{BASE}, {extra}}}");
        match Schema::from_json5(&text) {
            Err(SchemaError::Invalid { path: got, reason }) => {
                assert_eq!(got, path, "reason: {reason}")
            }
            other => panic!("expected error at {path}, got {other:?}"),
        }
    }

    fn fault(fields: &str) -> String {
        format!("models: {{Fault: {{{FAULT}, {fields}}}}}")
    }

    fn ok(extra: &str) -> Schema {
        Schema::from_json5(&format!("{{{BASE}, {extra}}}")).unwrap()
    }

    #[test]
    fn minimal_schema_loads() {
        let s = ok(&fault("severity: {type: 'string'}"));
        assert_eq!(s.version(), "1.0.0");
        assert_eq!(s.format(), "onetable:1.1.0");
        assert!(s.model("Fault").is_some());
    }

    #[test]
    fn unknown_type() {
        check(
            &fault("severity: {type: 'strin'}"),
            "models.Fault.severity.type",
        );
    }

    #[test]
    fn capitalized_type_is_accepted() {
        let s = ok(&fault(
            "severity: {type: 'String'}, n: {type: Number}"
                .replace("Number", "'Number'")
                .as_str(),
        ));
        assert_eq!(
            s.model("Fault")
                .and_then(|m| m.field("n"))
                .map(|f| f.field_type()),
            Some(FieldType::Number)
        );
    }

    #[test]
    fn missing_type() {
        check(
            &fault("severity: {required: true}"),
            "models.Fault.severity.type",
        );
    }

    #[test]
    fn template_unknown_field() {
        let text =
            "models: {Fault: {pk: {type: 'string'}, sk: {type: 'string', value: 'fault#${nope}'}}}";
        check(text, "models.Fault.sk.value");
    }

    #[test]
    fn template_may_use_type_field() {
        ok("models: {Fault: {pk: {type: 'string', value: '${_type}#x'}, sk: {type: 'string'}}}");
    }

    #[test]
    fn template_variable_must_be_scalar() {
        check("models: {M: {pk: {type: 'string', value: '${o}'}, sk: {type: 'string'}, o: {type: 'object'}}}", "models.M.pk.value");
    }

    #[test]
    fn template_unclosed() {
        check(
            "models: {Fault: {pk: {type: 'string', value: 'a${b'}, sk: {type: 'string'}}}",
            "models.Fault.pk.value",
        );
    }

    #[test]
    fn template_too_long() {
        let long = "a".repeat(2000);
        check(&format!("models: {{Fault: {{pk: {{type: 'string', value: '{long}'}}, sk: {{type: 'string'}}}}}}"), "models.Fault.pk.value");
    }

    #[test]
    fn template_cycle() {
        let text = "models: {M: {pk: {type: 'string', value: '${a}'}, sk: {type: 'string'},
            a: {type: 'string', value: '${b}'}, b: {type: 'string', value: '${a}'}}}";
        check(text, "models.M.a.value");
    }

    #[test]
    fn template_self_cycle() {
        check(
            "models: {M: {pk: {type: 'string', value: 'x${pk}'}, sk: {type: 'string'}}}",
            "models.M.pk.value",
        );
    }

    #[test]
    fn sync_value_not_allowed() {
        check(
            &format!(
                "{}, process: {{Fault: {{sync: 'sideways'}}}}",
                fault("s: {type: 'string'}")
            ),
            "process.Fault.sync",
        );
    }

    #[test]
    fn enable_value_not_allowed() {
        check(
            &format!(
                "{}, process: {{Fault: {{enable: 'moon'}}}}",
                fault("s: {type: 'string'}")
            ),
            "process.Fault.enable",
        );
    }

    #[test]
    fn process_contradictions() {
        let m = fault("s: {type: 'string'}");
        check(
            &format!("{m}, process: {{Fault: {{enable: 'device', sync: 'up'}}}}"),
            "process.Fault.sync",
        );
        check(
            &format!("{m}, process: {{Fault: {{enable: 'cloud', sync: 'down'}}}}"),
            "process.Fault.sync",
        );
        check(
            &format!("{m}, process: {{Fault: {{sync: 'up', broadcast: true}}}}"),
            "process.Fault.broadcast",
        );
        check(
            &format!("{m}, process: {{Fault: {{broadcast: true}}}}"),
            "process.Fault.broadcast",
        );
    }

    #[test]
    fn process_extra_agent_keys_accepted() {
        let m = fault("s: {type: 'string'}");
        let s = ok(&format!(
            "{m}, process: {{Fault: {{sync: 'up', show: true, mem: 1, notify: 'x', actions: [], \
             delay: 5, period: 5, pivot: true, metrics: [{{fields: ['s']}}], drop: 1, discard: 1}}}}"
        ));
        assert_eq!(
            keys_of(&s),
            [
                "actions", "delay", "discard", "drop", "mem", "metrics", "notify", "period",
                "pivot", "show"
            ]
            .map(|k| format!("process.Fault.{k}"))
        );
        assert!(reason_of(&s, "process.Fault", "mem").contains("in memory only"));
        assert!(s.model("Fault").is_some_and(|m| m.process().syncs_up()));
    }

    #[test]
    fn process_unknown_key() {
        check(
            &format!(
                "{}, process: {{Fault: {{speed: 1}}}}",
                fault("s: {type: 'string'}")
            ),
            "process.Fault.speed",
        );
    }

    #[test]
    fn process_unknown_model() {
        check(
            &format!(
                "{}, process: {{Ghost: {{sync: 'up'}}}}",
                fault("s: {type: 'string'}")
            ),
            "process.Ghost",
        );
    }

    #[test]
    fn control_is_older_name_of_process() {
        let s = ok(&format!(
            "{}, control: {{Fault: {{sync: 'up'}}}}",
            fault("s: {type: 'string'}")
        ));
        assert!(s
            .model("Fault")
            .map(|m| m.process().syncs_up())
            .unwrap_or(false));
        check(
            &format!("{}, control: {{Ghost: {{}}}}", fault("s: {type: 'string'}")),
            "control.Ghost",
        );
    }

    #[test]
    fn control_and_process_both() {
        check(
            &format!(
                "{}, control: {{}}, process: {{}}",
                fault("s: {type: 'string'}")
            ),
            "control",
        );
    }

    #[test]
    fn unknown_top_level_key() {
        check("models: {}, tables: {}", "tables");
    }

    #[test]
    fn unknown_field_key() {
        check(
            &fault("severity: {type: 'string', colour: 'red'}"),
            "models.Fault.severity.colour",
        );
    }

    #[test]
    fn unsupported_field_key() {
        let text = format!(
            "{{{BASE}, {}}}",
            fault("secret: {type: 'string', crypt: true}")
        );
        let err = Schema::from_json5(&text).unwrap_err().to_string();
        assert!(
            err.contains("models.Fault.secret.crypt") && err.contains("not supported by devtables"),
            "{err}"
        );
    }

    #[test]
    fn unknown_params_key() {
        check("params: {isoDate: true}, models: {}", "params.isoDate");
    }

    #[test]
    fn ignored_params_accepted() {
        ok("params: {separator: '#', hidden: false, warn: true, partial: false}, models: {}");
    }

    #[test]
    fn params_wrong_type() {
        check(
            "params: {timestamps: 'yes'}, models: {}",
            "params.timestamps",
        );
        check("params: {typeField: ''}, models: {}", "params.typeField");
    }

    #[test]
    fn unknown_index_key() {
        let text = "{format: 'onetable:1.1.0', version: '1', indexes: {primary: {hash: 'pk'}, gs1: {hash: 'a', kind: 'x'}}, models: {}}";
        match Schema::from_json5(text) {
            Err(SchemaError::Invalid { path, .. }) => assert_eq!(path, "indexes.gs1.kind"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn index_rules() {
        let load = |idx: &str| {
            Schema::from_json5(&format!(
                "{{format: 'onetable:1', version: '1', indexes: {idx}, models: {{}}}}"
            ))
        };
        let path = |r: Result<Schema, SchemaError>| match r {
            Err(SchemaError::Invalid { path, .. }) => path,
            other => format!("{other:?}"),
        };
        assert_eq!(path(load("{gs1: {hash: 'a'}}")), "indexes.primary");
        assert_eq!(
            path(load("{primary: {sort: 'sk'}}")),
            "indexes.primary.hash"
        );
        assert_eq!(
            path(load("{primary: {hash: 'pk', project: 'all'}}")),
            "indexes.primary.project"
        );
        assert_eq!(
            path(load("{primary: {hash: 'pk'}, ls1: {sort: 'x'}}")),
            "indexes.ls1.hash"
        );
        assert_eq!(
            path(load(
                "{primary: {hash: 'pk'}, g: {hash: 'a', project: 'some'}}"
            )),
            "indexes.g.project"
        );
        assert_eq!(
            path(load(
                "{primary: {hash: 'pk'}, g: {hash: 'a', type: 'lokal'}}"
            )),
            "indexes.g.type"
        );
        let s = load("{primary: {hash: 'pk'}, ls1: {type: 'local', sort: 'x', project: ['a']}}")
            .unwrap();
        assert_eq!(s.index("ls1").map(|i| i.hash.as_str()), Some("pk"));
        assert_eq!(s.primary_index().sort, None);
    }

    #[test]
    fn bad_regex() {
        check(
            &fault("severity: {type: 'string', validate: '/[a-/'}"),
            "models.Fault.severity.validate",
        );
        check(
            &fault("severity: {type: 'string', validate: '/a/q'}"),
            "models.Fault.severity.validate",
        );
    }

    #[test]
    fn regex_forms() {
        assert!(compile_pattern("/^A$/i")
            .map(|p| p.regex.is_match("a"))
            .unwrap_or(false));
        assert!(compile_pattern("^a+$")
            .map(|p| p.regex.is_match("aa"))
            .unwrap_or(false));
        assert!(compile_pattern("/a/b/")
            .map(|p| p.regex.is_match("a/b"))
            .unwrap_or(false));
        assert!(
            compile_pattern("a{1000}{1000}").is_err(),
            "size limit applies"
        );
    }

    #[test]
    fn default_not_in_enum() {
        check(
            &fault("severity: {type: 'string', enum: ['a', 'b'], default: 'c'}"),
            "models.Fault.severity.default",
        );
    }

    #[test]
    fn default_wrong_type() {
        check(
            &fault("n: {type: 'number', default: 'many'}"),
            "models.Fault.n.default",
        );
    }

    #[test]
    fn enum_rules() {
        check(
            &fault("n: {type: 'number', enum: []}"),
            "models.Fault.n.enum",
        );
        check(
            &fault("n: {type: 'number', enum: [1, 'x']}"),
            "models.Fault.n.enum",
        );
        ok(&fault("n: {type: 'number', enum: [1, '2'], default: 2}"));
    }

    #[test]
    fn generate_rules() {
        check(
            &fault("g: {type: 'string', generate: 'serial'}"),
            "models.Fault.g.generate",
        );
        check(
            &fault("g: {type: 'number', generate: 'ulid'}"),
            "models.Fault.g.generate",
        );
    }

    #[test]
    fn ttl_rules() {
        check(
            &fault("t: {type: 'string', ttl: true}"),
            "models.Fault.t.ttl",
        );
        check(
            &fault("t: {type: 'date', ttl: true}, u: {type: 'number', ttl: true}"),
            "models.Fault.u",
        );
        let s = ok(&fault("t: {type: 'date', ttl: true}"));
        assert_eq!(s.model("Fault").and_then(|m| m.ttl_field()), Some("t"));
    }

    #[test]
    fn schema_and_items_rules() {
        check(
            &fault("o: {type: 'string', schema: {}}"),
            "models.Fault.o.schema",
        );
        check(
            &fault("o: {type: 'object', schema: {x: {type: 'nope'}}}"),
            "models.Fault.o.schema.x.type",
        );
        check(
            &fault("o: {type: 'object', schema: {x: {type: 'string', value: 'a'}}}"),
            "models.Fault.o.schema.x.value",
        );
        check(
            &fault("a: {type: 'string', items: {type: 'string'}}"),
            "models.Fault.a.items",
        );
        check(
            &fault("a: {type: 'array', items: {type: 'string', value: 'x'}}"),
            "models.Fault.a.items.value",
        );
        check(
            &fault("a: {type: 'array', items: {type: 'string', unique: true}}"),
            "models.Fault.a.items.unique",
        );
        check(
            &fault("a: {type: 'array', items: {type: 'string', enum: []}}"),
            "models.Fault.a.items.enum",
        );
        let s = ok(&fault(
            "a: {type: 'array', items: {type: 'object', default: {}, partial: false, \
                 schema: {n: {type: 'number'}}}}",
        ));
        assert_eq!(keys_of(&s), ["models.Fault.a.items.default"]);
        let items = s
            .model("Fault")
            .and_then(|m| m.field("a"))
            .and_then(Field::items);
        assert_eq!(
            items
                .and_then(Field::nested_fields)
                .map(|f| f.iter().map(Field::name).collect::<Vec<_>>()),
            Some(vec!["n"])
        );
    }

    #[test]
    fn items_nesting_is_bounded() {
        let mut inner = "{type: 'string'}".to_string();
        for _ in 0..10 {
            inner = format!("{{type: 'array', items: {inner}}}");
        }
        let err = Schema::from_json5(&format!("{{{BASE}, {}}}", fault(&format!("a: {inner}"))))
            .unwrap_err();
        assert!(err.to_string().contains("deeper than 8"), "{err}");
    }

    #[test]
    fn nested_schema_depth_bounded() {
        let mut inner = "{type: 'string'}".to_string();
        for _ in 0..10 {
            inner = format!("{{type: 'object', schema: {{x: {inner}}}}}");
        }
        let err = Schema::from_json5(&format!("{{{BASE}, {}}}", fault(&format!("o: {inner}"))))
            .unwrap_err();
        assert!(err.to_string().contains("deeper than 8"), "{err}");
    }

    #[test]
    fn reserved_field_names() {
        check(&fault("_type: {type: 'string'}"), "models.Fault._type");
        // Without timestamps, `created` is an ordinary field the application sets.
        let s = ok(&fault("created: {type: 'date'}"));
        let m = s.model("Fault").unwrap();
        assert!(m.field("created").is_some() && m.created_field().is_none());
    }

    /// `{BASE, params: {<params>}, models: {Fault: {..., <fields>}}}`.
    fn with_params(params: &str, fields: &str) -> String {
        format!("params: {{{params}}}, {}", fault(fields))
    }

    #[test]
    fn timestamps_forms() {
        let mode = |p: &str| ok(&with_params(p, "")).params().timestamps;
        assert_eq!(mode(""), Timestamps::Off);
        assert_eq!(mode("timestamps: false"), Timestamps::Off);
        assert_eq!(mode("timestamps: true"), Timestamps::Both);
        assert_eq!(mode("timestamps: 'create'"), Timestamps::Create);
        assert_eq!(mode("timestamps: 'update'"), Timestamps::Update);
        check(&with_params("timestamps: 'both'", ""), "params.timestamps");
        check(&with_params("timestamps: 1", ""), "params.timestamps");
        check(
            &with_params("createdField: 'at', updatedField: 'at'", ""),
            "params",
        );

        let s = ok(&with_params("timestamps: 'create'", ""));
        let m = s.model("Fault").unwrap();
        assert_eq!(
            (
                m.created_field().map(Field::name),
                m.updated_field().is_none()
            ),
            (Some("created"), true)
        );
        let s = ok(&with_params("timestamps: 'update'", ""));
        let m = s.model("Fault").unwrap();
        assert_eq!(
            (
                m.created_field().is_none(),
                m.updated_field().map(Field::name)
            ),
            (true, Some("updated"))
        );
    }

    #[test]
    fn timestamp_declarations() {
        // The declaration is the maintained field's: its type and visibility count.
        let s = ok(&with_params(
            "timestamps: true",
            "created: {type: 'date', readonly: true, notes: 'set by the database'}, \
             updated: {type: 'number', hidden: true}",
        ));
        let m = s.model("Fault").unwrap();
        assert!(m.field("created").is_none() && m.field("updated").is_none());
        let created = m.created_field().unwrap();
        assert_eq!(
            (created.field_type(), created.description()),
            (FieldType::Date, Some("set by the database"))
        );
        let updated = m.updated_field().unwrap();
        assert_eq!(
            (updated.field_type(), updated.hidden()),
            (FieldType::Number, true)
        );
        assert!(m.is_hidden("updated") && !m.is_hidden("created"));
        // Under 'create', `updated` is an ordinary field again.
        let s = ok(&with_params(
            "timestamps: 'create'",
            "updated: {type: 'date', readonly: true}",
        ));
        assert!(s.model("Fault").and_then(|m| m.field("updated")).is_some());
        for (decl, path) in [
            ("created: {type: 'object'}", "models.Fault.created.type"),
            (
                "created: {type: 'date', value: 'x'}",
                "models.Fault.created.value",
            ),
            (
                "created: {type: 'date', default: 1}",
                "models.Fault.created.default",
            ),
            (
                "created: {type: 'date', generate: 'ulid'}",
                "models.Fault.created.generate",
            ),
            (
                "updated: {type: 'date', ttl: true}",
                "models.Fault.updated.ttl",
            ),
            (
                "updated: {type: 'date', colour: 1}",
                "models.Fault.updated.colour",
            ),
            ("updated: 'date'", "models.Fault.updated"),
        ] {
            check(&with_params("timestamps: true", decl), path);
        }
        let text = format!(
            "{{{BASE}, {}}}",
            with_params("timestamps: true", "created: {type: 'date', enum: [1]}")
        );
        let err = Schema::from_json5(&text).unwrap_err().to_string();
        assert!(err.contains("set by params.timestamps"), "{err}");
    }

    #[test]
    fn template_may_use_a_timestamp() {
        ok(&with_params(
            "timestamps: true",
            "gs1sk: {type: 'string', value: 'at#${created}'}",
        ));
        check(
            &fault("gs1sk: {type: 'string', value: 'at#${created}'}"),
            "models.Fault.gs1sk.value",
        );
    }

    #[test]
    fn padded_template_variable_refused() {
        check(
            &fault("gs1sk: {type: 'string', value: 'n#${id:8:0}'}"),
            "models.Fault.gs1sk.value",
        );
    }

    /// The `path.key` of each warning of a schema, sorted.
    fn keys_of(s: &Schema) -> Vec<String> {
        let mut keys: Vec<String> = s.warnings().iter().map(|w| w.dotted()).collect();
        keys.sort();
        keys
    }

    /// The reason of the warning for `key` at `path`.
    fn reason_of<'a>(s: &'a Schema, path: &str, key: &str) -> &'a str {
        s.warnings()
            .iter()
            .find(|w| w.path == path && w.key == key)
            .map_or("", |w| w.reason.as_str())
    }

    #[test]
    fn documentation_keys() {
        let s = ok("name: 'Current', description: 'an Ioto schema', \
             models: {Fault: {description: 'a fault the device raised', \
                pk: {type: 'string', value: 'device#${deviceId}', description: 'the partition'}, \
                sk: {type: 'string', value: 'fault#${id}', notes: 'by id'}, \
                id: {type: 'string', generate: 'ulid', note: 'singular'}, \
                deviceId: {type: 'string', required: true}}}");
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        assert_eq!(
            (s.name(), s.description()),
            (Some("Current"), Some("an Ioto schema"))
        );
        let m = s.model("Fault").unwrap();
        assert_eq!(m.description(), Some("a fault the device raised"));
        let doc = |f: &str| m.field(f).and_then(Field::description);
        assert_eq!(
            (doc("pk"), doc("sk"), doc("id"), doc("deviceId")),
            (Some("the partition"), Some("by id"), Some("singular"), None)
        );
        let s = ok(&fault("description: {type: 'string'}"));
        let m = s.model("Fault").unwrap();
        assert_eq!(
            (
                m.field("description").map(Field::field_type),
                m.description()
            ),
            (Some(FieldType::String), None),
            "an object named description is a field"
        );
        check(
            &fault("x: {type: 'string', notes: 3}"),
            "models.Fault.x.notes",
        );
        check(
            "models: {Fault: {label: 'x', sk: {type: 'string'}}}",
            "models.Fault.label",
        );
        let idx = Schema::from_json5(
            "{format: 'onetable:1.1.0', version: '1', models: {}, indexes: {\
               primary: {hash: 'pk', description: 'main'}, gs1: {hash: 'g', description: 'by g'}}}",
        )
        .unwrap();
        assert_eq!(
            (
                idx.primary_index().description.as_deref(),
                idx.index("gs1").and_then(|i| i.description.as_deref())
            ),
            (Some("main"), Some("by g"))
        );
    }

    #[test]
    fn tool_keys_at_the_top_are_kept_and_ignored() {
        let s = ok(
            "models: {}, queries: {'by user': {index: 'gs1', limit: 10}}, \
                    items: [{pk: 'a'}], extensions: {sensedeep: {colour: 'red'}}",
        );
        assert_eq!(keys_of(&s), ["extensions", "items", "queries"]);
        assert!(reason_of(&s, "", "extensions").contains("other tools"));
        check("models: {}, queries: []", "queries");
        check("models: {}, extensions: 'x'", "extensions");
        check("models: {}, items: {}", "items");
        check("models: {}, tables: {}", "tables");
    }

    #[test]
    fn params_tool_keys() {
        let s = ok(
            "params: {separator: '#', warn: true, legacyEmpties: false, hidden: false, \
                    partial: true}, models: {}",
        );
        assert_eq!(
            keys_of(&s),
            ["params.legacyEmpties", "params.separator", "params.warn"]
        );
        assert!(!s.params().hidden && s.params().partial);
    }

    #[test]
    fn params_hidden_false_shows_templated_fields() {
        let s = ok(&with_params(
            "hidden: false",
            "secret: {type: 'string', hidden: true}",
        ));
        let m = s.model("Fault").unwrap();
        assert!(!m.is_hidden("pk") && !m.is_hidden("sk") && m.is_hidden("secret"));
        let s = ok(&fault(""));
        assert!(s.model("Fault").is_some_and(|m| m.is_hidden("pk")));
    }

    #[test]
    fn generate_forms() {
        let gen = |g: &str| {
            ok(&fault(&format!("g: {{type: 'string', generate: {g}}}")))
                .model("Fault")
                .and_then(|m| m.field("g"))
                .and_then(Field::generate)
        };
        assert_eq!(gen("'uid'"), Some(Generate::Uid(10)));
        assert_eq!(gen("'uid(4)'"), Some(Generate::Uid(4)));
        assert_eq!(gen("'uid(128)'"), Some(Generate::Uid(128)));
        assert_eq!(gen("'uuid'"), Some(Generate::Uuid));
        assert_eq!(gen("'ulid'"), Some(Generate::Ulid));
        assert_eq!(gen("false"), None);
        for bad in ["'uid(0)'", "'uid(129)'", "'uid(x)'", "'uid4'", "true", "3"] {
            check(
                &fault(&format!("g: {{type: 'string', generate: {bad}}}")),
                "models.Fault.g.generate",
            );
        }
        check(
            &fault("g: {type: 'number', generate: 'uid'}"),
            "models.Fault.g.generate",
        );
    }

    #[test]
    fn refused_features_name_the_path_and_the_feature() {
        let refused = |fields: &str, path: &str, feature: &str| {
            let text = format!("{{{BASE}, {}}}", fault(fields));
            match Schema::from_json5(&text) {
                Err(SchemaError::Invalid { path: got, reason }) => {
                    assert_eq!(got, path, "{reason}");
                    assert!(
                        reason.contains(&format!("`{feature}` is not supported by devtables")),
                        "{reason}"
                    );
                }
                other => panic!("expected {path} refused, got {other:?}"),
            }
        };
        refused(
            "n: {type: 'string', encode: ['sk', '#', 1]}",
            "models.Fault.n.encode",
            "encode",
        );
        refused(
            "s: {type: 'string', crypt: true}",
            "models.Fault.s.crypt",
            "crypt",
        );
        refused(
            "s: {type: 'string', uuid: true}",
            "models.Fault.s.uuid",
            "uuid",
        );
        refused(
            "o: {type: 'object', schema: {x: {type: 'string', unique: true}}}",
            "models.Fault.o.schema.x.unique",
            "unique",
        );
        ok(&fault("s: {type: 'string', crypt: false}"));
    }

    #[test]
    fn map_is_kept_and_ignored() {
        let s = ok(&fault(
            "city: {type: 'string', map: 'data.city'}, zip: {type: 'string', map: 'data.zip'}, \
             same: {type: 'string', map: 'same'}, short: {type: 'number', map: 's'}",
        ));
        assert_eq!(
            keys_of(&s),
            [
                "models.Fault.city.map",
                "models.Fault.short.map",
                "models.Fault.zip.map"
            ]
        );
        assert!(reason_of(&s, "models.Fault.city", "map").contains("under its own name `city`"));
        let m = s.model("Fault").unwrap();
        assert_eq!(
            m.field("city").and_then(Field::map),
            Some(&MappedAttribute {
                attribute: "data".into(),
                property: Some("city".into())
            })
        );
        assert_eq!(
            m.field("short")
                .and_then(Field::map)
                .map(ToString::to_string),
            Some("s".to_string())
        );
        for (fields, path) in [
            ("a: {type: 'string', map: 'x'}, b: {type: 'string', map: 'x'}", "models.Fault.b.map"),
            ("a: {type: 'string', map: 'x.p'}, b: {type: 'string', map: 'x.p'}", "models.Fault.b.map"),
            ("a: {type: 'string', map: 'x'}, b: {type: 'string', map: 'x.p'}", "models.Fault.b.map"),
            ("a: {type: 'string', map: 'x.y.z'}", "models.Fault.a.map"),
            ("a: {type: 'string', map: '.y'}", "models.Fault.a.map"),
            ("a: {type: 'string', map: 3}", "models.Fault.a.map"),
            ("a: {type: 'string', map: 'gs1pk'}", "models.Fault.a.map"),
            ("gs1sk: {type: 'string', map: 'other'}", "models.Fault.gs1sk.map"),
            (
                "o: {type: 'object', schema: {a: {type: 'number', map: 'q'}, b: {type: 'number', map: 'q'}}}",
                "models.Fault.o.schema.b.map",
            ),
        ] {
            check(&fault(fields), path);
        }
    }

    #[test]
    fn unique_and_scope() {
        let s = ok(&fault(
            "name: {type: 'string', unique: true, scope: '${deviceId}'}, \
             other: {type: 'string', scope: 'x'}",
        ));
        assert_eq!(keys_of(&s), ["models.Fault.other.scope"]);
        let m = s.model("Fault").unwrap();
        let name = m.field("name").unwrap();
        assert!(name.unique() && !m.field("other").unwrap().unique());
        assert_eq!(name.unique_scope(), Some("${deviceId}"));
        check(
            &fault("name: {type: 'string', unique: true, scope: '${ghost}'}"),
            "models.Fault.name.scope",
        );
        check(
            &fault("tags: {type: 'array', unique: true}"),
            "models.Fault.tags.unique",
        );
    }

    #[test]
    fn ioto_field_keys_are_kept_and_ignored() {
        let s = ok(&fault(
            "password: {type: 'string', sync: 'none', discard: true}, \
             car: {type: 'number', default: 0, note: 'kW'}, \
             ref: {type: 'string', reference: 'User:primary:id=id', filter: false, timestamp: false}",
        ));
        assert_eq!(
            keys_of(&s),
            [
                "models.Fault.password.discard",
                "models.Fault.password.sync",
                "models.Fault.ref.filter",
                "models.Fault.ref.reference",
                "models.Fault.ref.timestamp",
            ]
        );
    }

    #[test]
    fn field_kept_on_device_refused_in_a_syncing_model() {
        let m = fault("password: {type: 'string', sync: 'none'}");
        ok(&format!("{m}, process: {{Fault: {{enable: 'device'}}}}"));
        match Schema::from_json5(&format!(
            "{{{BASE}, {m}, process: {{Fault: {{sync: 'up'}}}}}}"
        )) {
            Err(SchemaError::Invalid { path, reason }) => {
                assert_eq!(path, "models.Fault.password.sync");
                assert!(reason.contains("must stay on the device"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Another field-level sync value is only kept.
        ok(&format!(
            "{}, process: {{Fault: {{sync: 'up'}}}}",
            fault("note: {type: 'string', sync: 'up'}")
        ));
    }

    #[test]
    fn partial_declared_and_inherited() {
        let s = ok(&with_params(
            "partial: true",
            "o: {type: 'object', schema: {inner: {type: 'object', schema: {n: {type: 'number'}}}, \
                 flat: {type: 'object', partial: false, schema: {n: {type: 'number'}}}}}, \
             raw: {type: 'object', partial: true}, list: {type: 'array', partial: true}",
        ));
        assert_eq!(
            keys_of(&s),
            ["models.Fault.list.partial", "models.Fault.raw.partial"]
        );
        let m = s.model("Fault").unwrap();
        let o = m.field("o").unwrap();
        let nested = |n: &str| {
            o.nested_fields()
                .and_then(|f| f.iter().find(|f| f.name() == n))
                .map(Field::partial)
        };
        assert!(o.partial());
        assert_eq!((nested("inner"), nested("flat")), (Some(true), Some(false)));
        let s = ok(&fault("o: {type: 'object', schema: {n: {type: 'number'}}}"));
        assert!(!s
            .model("Fault")
            .and_then(|m| m.field("o"))
            .unwrap()
            .partial());
    }

    #[test]
    fn field_nulls_and_iso_dates() {
        let s = ok(&fault(
            "at: {type: 'date', isoDates: true}, n: {type: 'number', nulls: true, isoDates: false}",
        ));
        assert_eq!(keys_of(&s), ["models.Fault.n.isoDates"]);
        let m = s.model("Fault").unwrap();
        assert!(m.field("n").is_some_and(|f| f.keeps_null(false)));
        assert!(m.field("at").is_some_and(|f| !f.keeps_null(false)));
    }

    #[test]
    fn model_must_have_primary_sort_field() {
        check("models: {M: {pk: {type: 'string'}}}", "models.M");
        ok("models: {M: {sk: {type: 'string'}}}");
    }

    #[test]
    fn model_name_must_be_identifier() {
        check(
            "models: {'bad name': {sk: {type: 'string'}}}",
            "models.bad name",
        );
    }

    #[test]
    fn format_and_version_required() {
        let err = |t: &str| match Schema::from_json5(t) {
            Err(SchemaError::Invalid { path, .. }) => path,
            other => format!("{other:?}"),
        };
        assert_eq!(
            err("{version: '1', indexes: {primary: {hash: 'pk'}}}"),
            "format"
        );
        assert_eq!(
            err("{format: 'dynamo', version: '1', indexes: {primary: {hash: 'pk'}}}"),
            "format"
        );
        assert_eq!(
            err("{format: 'onetable:1.1.0', indexes: {primary: {hash: 'pk'}}}"),
            "version"
        );
    }

    #[test]
    fn syntax_errors() {
        assert!(matches!(
            Schema::from_json5("{format: "),
            Err(SchemaError::Syntax(_))
        ));
        assert!(matches!(
            Schema::from_json5("[1]"),
            Err(SchemaError::Invalid { .. })
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(
            Schema::from_json5(&deep),
            Err(SchemaError::Syntax(_))
        ));
    }

    #[test]
    fn text_size_bounded() {
        let big = format!("{{description: '{}'}}", "a".repeat(MAX_TEXT));
        assert!(matches!(
            Schema::from_json5(&big),
            Err(SchemaError::Invalid { .. })
        ));
    }

    #[test]
    fn nesting_scanner_ignores_strings_and_comments() {
        assert_eq!(
            max_nesting("{a: '[[[[', b: \"{{\\\"{{\" /* [[[ */ // {{{\n}"),
            1
        );
        assert_eq!(max_nesting("{a: [{}]}"), 3);
    }

    #[test]
    fn blend_rejected_from_string() {
        check("models: {}, blend: ['x.json5']", "blend");
    }

    #[test]
    fn blend_from_files() {
        let dir =
            std::env::temp_dir().join(format!("devtables-schema-blend-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("sub/base.json5"),
            "{format: 'onetable:1.1.0', version: '0', indexes: {primary: {hash: 'pk'}},
              params: {timestamps: true}, models: {A: {x: {type: 'string'}}, B: {y: {type: 'string'}}},
              control: {A: {sync: 'up'}}}",
        )
        .unwrap();
        std::fs::write(
            dir.join("main.json5"),
            "{blend: ['sub/base.json5'], format: 'onetable:1.1.0', version: '1',
              indexes: {primary: {hash: 'pk'}}, models: {B: {z: {type: 'number'}}}, process: {B: {sync: 'down'}}}",
        )
        .unwrap();
        let s = Schema::load(&dir.join("main.json5")).unwrap();
        assert_eq!(s.version(), "1");
        assert_eq!(s.params().timestamps, Timestamps::Both);
        assert!(s
            .model("A")
            .map(|m| m.process().syncs_up())
            .unwrap_or(false));
        let b = s.model("B").unwrap();
        assert!(
            b.field("z").is_some() && b.field("y").is_none(),
            "the loading file wins"
        );
        assert!(b.process().syncs_down());

        std::fs::write(dir.join("c1.json5"), "{blend: ['c2.json5']}").unwrap();
        std::fs::write(dir.join("c2.json5"), "{blend: ['c1.json5']}").unwrap();
        let err = Schema::load(&dir.join("c1.json5")).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
        let err = Schema::load(&dir.join("missing.json5")).unwrap_err();
        assert!(matches!(err, SchemaError::Io { .. }));
        std::fs::remove_dir_all(&dir).ok();
    }
}
