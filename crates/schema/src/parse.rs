//! Loading: JSON5 text → raw JSON → validated [`Schema`].
//!
//! Schema files are authored by people and may also arrive from untrusted places, so loading
//! is strict (every unknown key, contradiction or malformed definition is an error naming its
//! dotted path, e.g. `models.Fault.severity.enum`) and bounded (text size, nesting, number of
//! models and fields, template and regex sizes). Everything per-item later relies on the
//! invariants checked here.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use regex::RegexBuilder;
use serde_json::{Map, Value};

use crate::error::SchemaError;
use crate::field::{Ctx, Field, FieldType, Generate, Pattern};
use crate::model::Model;
use crate::schema::Schema;
use crate::settings::{Enable, Index, Params, Process, SyncDirection};
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

fn check_keys(obj: &Obj, path: &str, allowed: &[&str]) -> Res<()> {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            return invalid(
                join(path, key),
                format!("unknown key `{key}` (allowed: {})", allowed.join(", ")),
            );
        }
    }
    Ok(())
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

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

const TOP_KEYS: &[&str] = &[
    "format",
    "version",
    "indexes",
    "models",
    "params",
    "process",
    "control",
    "blend",
    "name",
    "description",
];

/// Validate a raw (blended) schema object.
fn build(root: Obj) -> Res<Schema> {
    check_keys(&root, "", TOP_KEYS)?;
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
    for key in ["name", "description"] {
        opt_str(&root, key, "")?;
    }
    if root.contains_key("process") && root.contains_key("control") {
        return invalid(
            "control",
            "both `process` and `control` are present: use only `process`",
        );
    }
    let params = match root.get("params") {
        Some(v) => parse_params(as_obj(v, "params")?)?,
        None => Params::default(),
    };
    let (primary, secondary) = parse_indexes(root.get("indexes"))?;
    let mut models = BTreeMap::new();
    let no_models = Value::Object(Obj::new());
    let raw_models = as_obj(root.get("models").unwrap_or(&no_models), "models")?;
    if raw_models.len() > MAX_MODELS {
        return invalid("models", format!("more than {MAX_MODELS} models"));
    }
    let mut all_indexes = vec![primary.clone()];
    all_indexes.extend(secondary.iter().cloned());
    for (name, def) in raw_models {
        let model = parse_model(name, def, &params, &primary, &all_indexes)?;
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
            model.process = parse_process(def, &path)?;
        }
    }
    Ok(Schema {
        version,
        format,
        params,
        primary,
        secondary,
        models,
    })
}

fn parse_params(obj: &Obj) -> Res<Params> {
    check_keys(
        obj,
        "params",
        &[
            "typeField",
            "createdField",
            "updatedField",
            "timestamps",
            "isoDates",
            "nulls",
            "separator",
            "hidden",
            "warn",
            "partial",
        ],
    )?;
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
    params.timestamps = opt_bool(obj, "timestamps", "params")?.unwrap_or(false);
    params.iso_dates = opt_bool(obj, "isoDates", "params")?.unwrap_or(false);
    params.nulls = opt_bool(obj, "nulls", "params")?.unwrap_or(false);
    Ok(params)
}

fn parse_indexes(value: Option<&Value>) -> Res<(Index, Vec<Index>)> {
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
    let primary = parse_index("primary", primary_def, None)?;
    let mut secondary = Vec::new();
    for (name, def) in obj {
        if name != "primary" {
            if name.is_empty() {
                return invalid("indexes", "index names must not be empty");
            }
            secondary.push(parse_index(name, def, Some(&primary))?);
        }
    }
    secondary.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((primary, secondary))
}

fn parse_index(name: &str, def: &Value, primary: Option<&Index>) -> Res<Index> {
    let path = join("indexes", name);
    let obj = as_obj(def, &path)?;
    match primary {
        None => check_keys(obj, &path, &["hash", "sort"])?,
        Some(_) => check_keys(obj, &path, &["hash", "sort", "project", "type", "follow"])?,
    }
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
    })
}

fn parse_process(def: &Value, path: &str) -> Res<Process> {
    let obj = as_obj(def, path)?;
    check_keys(
        obj,
        path,
        &[
            "enable",
            "sync",
            "lossy",
            "broadcast",
            "show",
            "mem",
            "notify",
            "actions",
            "delay",
        ],
    )?;
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
        nulls: false,
    };
    let mut fields = Vec::with_capacity(obj.len());
    for (field_name, field_def) in obj {
        let fpath = join(&path, field_name);
        if field_name.is_empty() {
            return invalid(fpath, "field names must not be empty");
        }
        for (reserved, param) in [
            (&params.type_field, "typeField"),
            (&params.created_field, "createdField"),
            (&params.updated_field, "updatedField"),
        ] {
            if field_name == reserved {
                return invalid(
                    fpath,
                    format!("`{field_name}` is reserved by params.{param}: rename the field"),
                );
            }
        }
        fields.push(parse_field(field_name, field_def, &fpath, &ctx, 0)?);
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
    let ttl = ttl_fields.first().map(|f| f.name.clone());
    let template_order = template_order(name, &fields, &params.type_field)?;
    Ok(Model::new(
        name,
        fields,
        template_order,
        params.clone(),
        primary.clone(),
        indexes.to_vec(),
        ttl,
    ))
}

/// Check template variables and order templated fields so that dependencies come first.
fn template_order(model: &str, fields: &[Field], type_field: &str) -> Res<Vec<usize>> {
    let index_of = |n: &str| fields.iter().position(|f| f.name == n);
    for f in fields {
        if let Some(t) = f.template() {
            for var in t.variables() {
                let target = index_of(var).and_then(|i| fields.get(i));
                if var != type_field && target.is_none() {
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

const FIELD_KEYS: &[&str] = &[
    "type", "required", "default", "enum", "validate", "value", "generate", "schema", "items",
    "hidden", "readonly", "ttl",
];
const UNSUPPORTED_FIELD_KEYS: &[&str] = &[
    "crypt",
    "encode",
    "map",
    "unique",
    "reference",
    "filter",
    "scope",
    "transform",
    "partial",
    "nulls",
    "isoDates",
    "uuid",
    "timestamps",
];

fn parse_field(name: &str, def: &Value, path: &str, ctx: &Ctx, depth: usize) -> Res<Field> {
    let obj = as_obj(def, path)?;
    for key in obj.keys() {
        if UNSUPPORTED_FIELD_KEYS.contains(&key.as_str()) {
            return invalid(
                join(path, key),
                format!("`{key}` is not supported by devtables"),
            );
        }
        let nested_only = depth > 0 && matches!(key.as_str(), "value" | "generate" | "ttl");
        if nested_only {
            return invalid(
                join(path, key),
                format!("`{key}` is not supported in a nested schema"),
            );
        }
    }
    check_keys(obj, path, FIELD_KEYS)?;
    let ty = match obj.get("type") {
        Some(Value::String(t)) => FieldType::parse(t).ok_or_else(|| {
            SchemaError::invalid(join(path, "type"), format!("unknown type {t:?} (use string, number, boolean, date, object, array or binary)"))
        })?,
        Some(_) => return invalid(join(path, "type"), "type must be a string"),
        None => return invalid(join(path, "type"), "type is required"),
    };
    let mut field = Field::new(name, ty);
    field.required = opt_bool(obj, "required", path)?.unwrap_or(false);
    field.hidden = opt_bool(obj, "hidden", path)?;
    field.readonly = opt_bool(obj, "readonly", path)?.unwrap_or(false);
    field.ttl = opt_bool(obj, "ttl", path)?.unwrap_or(false);
    if field.ttl && !matches!(ty, FieldType::Date | FieldType::Number) {
        return invalid(
            join(path, "ttl"),
            "ttl is only allowed on date or number fields",
        );
    }
    if let Some(g) = opt_str(obj, "generate", path)? {
        field.generate = Some(match g {
            "ulid" => Generate::Ulid,
            "uuid" => Generate::Uuid,
            _ => return invalid(join(path, "generate"), "generate must be 'ulid' or 'uuid'"),
        });
        if ty != FieldType::String {
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
    if let Some(schema) = obj.get("schema") {
        let spath = join(path, "schema");
        if ty != FieldType::Object {
            return invalid(spath, "schema is only allowed on object fields");
        }
        field.schema = Some(parse_nested(schema, &spath, ctx, depth + 1)?);
    }
    if let Some(items) = obj.get("items") {
        let ipath = join(path, "items");
        if ty != FieldType::Array {
            return invalid(ipath, "items is only allowed on array fields");
        }
        let iobj = as_obj(items, &ipath)?;
        check_keys(iobj, &ipath, &["type", "schema"])?;
        field.items = Some(Box::new(parse_field("", items, &ipath, ctx, depth + 1)?));
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
    if let Some(v) = obj.get("default") {
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

fn parse_nested(def: &Value, path: &str, ctx: &Ctx, depth: usize) -> Res<Vec<Field>> {
    if depth > MAX_SCHEMA_DEPTH {
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
        fields.push(parse_field(name, fdef, &fpath, ctx, depth)?);
    }
    fields.sort_by(|a, b| a.name.cmp(&b.name));
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
        ok(&format!("{m}, process: {{Fault: {{sync: 'up', show: true, mem: 1, notify: 'x', actions: [], delay: 5}}}}"));
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
            &fault("a: {type: 'array', items: {type: 'string', required: true}}"),
            "models.Fault.a.items.required",
        );
        ok(&fault(
            "a: {type: 'array', items: {type: 'object', schema: {n: {type: 'number'}}}}",
        ));
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
        check(&fault("created: {type: 'date'}"), "models.Fault.created");
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
        assert!(s.params().timestamps);
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
