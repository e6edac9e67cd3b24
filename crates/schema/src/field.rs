//! Field definitions: types, casting and per-value validation.
//!
//! Every value that enters the database passes through [`Field::cast`] (JSON input → the one
//! stored form of the field's type) and [`Field::check`] (enum and pattern), so that stored
//! items are uniform whatever the caller sent and whichever node wrote them.

use base64::Engine as _;
use regex::Regex;
use serde_json::{Map, Value};

use crate::date;
use crate::error::{Reason, ValidationError};
use crate::template::{render_value, Template};

/// The type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// A UTF-8 string.
    String,
    /// A JSON number (integers stay integers).
    Number,
    /// `true` / `false`.
    Boolean,
    /// A point in time, stored per `params.isoDates`.
    Date,
    /// A JSON object, optionally described by a nested schema.
    Object,
    /// A JSON array, optionally with typed items.
    Array,
    /// Base64-encoded bytes.
    Binary,
}

impl FieldType {
    /// Parse a schema type name (case-insensitive, `String` and `string` alike).
    pub(crate) fn parse(name: &str) -> Option<FieldType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "string" => FieldType::String,
            "number" => FieldType::Number,
            "boolean" => FieldType::Boolean,
            "date" => FieldType::Date,
            "object" => FieldType::Object,
            "array" => FieldType::Array,
            "binary" | "buffer" => FieldType::Binary,
            _ => return None,
        })
    }

    /// The lower-case type name, as a schema writes it.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Date => "date",
            FieldType::Object => "object",
            FieldType::Array => "array",
            FieldType::Binary => "binary",
        }
    }
}

/// How an absent field gets a generated id (`generate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generate {
    /// `ulid`: a 26-character ULID whose time part is the caller's clock.
    Ulid,
    /// `uuid`: a random (v4) UUID.
    Uuid,
    /// `uid` (10 characters) or `uid(N)`: OneTable's short random id of N characters from
    /// Crockford's base 32 alphabet (digits and upper-case letters without I, L, O and U).
    /// Not sortable; 10 characters carry 50 random bits.
    Uid(usize),
}

/// The alphabet of `uid` ids (OneTable's: Crockford's base 32).
pub(crate) const UID_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Longest `uid(N)` accepted (hostile schema bound; OneTable's default is 10).
pub(crate) const MAX_UID_LEN: usize = 128;

impl std::fmt::Display for Generate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Generate::Ulid => f.write_str("ulid"),
            Generate::Uuid => f.write_str("uuid"),
            Generate::Uid(n) => write!(f, "uid({n})"),
        }
    }
}

/// A random `uid` of `len` characters. The random bits come from ULIDs' 80-bit random part
/// (the ulid crate is the crate's source of randomness already; its time part is not used, so
/// no clock is read), five bits per character: uniform over the 32-letter alphabet.
fn random_uid(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let (mut bits, mut have) = (0u128, 0u32);
    while out.len() < len {
        if have < 5 {
            bits = ulid::Ulid::from_datetime(std::time::UNIX_EPOCH).random();
            have = 80;
        }
        out.push(char::from(UID_ALPHABET[(bits & 31) as usize]));
        bits >>= 5;
        have -= 5;
    }
    out
}

/// Where a field's value is stored in OneTable (`map`), kept for reference: devtables stores
/// every field under its own name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedAttribute {
    /// The attribute name (`data` in `map: 'data.city'`).
    pub attribute: String,
    /// The property inside that attribute when several fields are packed into one
    /// (`city` in `map: 'data.city'`).
    pub property: Option<String>,
}

impl std::fmt::Display for MappedAttribute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.property {
            Some(p) => write!(f, "{}.{p}", self.attribute),
            None => f.write_str(&self.attribute),
        }
    }
}

/// A compiled `validate` pattern with its source text (for error messages).
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    pub(crate) source: String,
    pub(crate) regex: Regex,
}

/// Casting options that come from the schema params.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx<'a> {
    pub(crate) model: &'a str,
    pub(crate) iso_dates: bool,
    pub(crate) nulls: bool,
    /// The value comes from a peer on a neighbouring schema version (see
    /// `Model::normalize_from_neighbour`): members this schema does not define and enum values it
    /// does not list are kept as they are, everything else is checked.
    pub(crate) neighbour: bool,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, field: impl Into<String>, reason: Reason) -> ValidationError {
        ValidationError::new(self.model, field, reason)
    }
}

/// One field of a model (or of a nested object schema).
#[derive(Clone, Debug)]
pub struct Field {
    pub(crate) name: String,
    pub(crate) ty: FieldType,
    pub(crate) required: bool,
    pub(crate) hidden: Option<bool>,
    pub(crate) readonly: bool,
    pub(crate) ttl: bool,
    pub(crate) default: Option<Value>,
    pub(crate) enum_values: Option<Vec<Value>>,
    pub(crate) validate: Option<Pattern>,
    pub(crate) template: Option<Template>,
    pub(crate) generate: Option<Generate>,
    pub(crate) schema: Option<Vec<Field>>,
    pub(crate) items: Option<Box<Field>>,
    /// `description` (or `notes`, `note`): documentation only.
    pub(crate) description: Option<String>,
    /// `unique`: parsed for the database, which enforces it (the schema crate does not).
    pub(crate) unique: bool,
    /// `scope`: the template that narrows `unique` (one value per scope).
    pub(crate) unique_scope: Option<Template>,
    /// `map`: OneTable's stored attribute, kept for reference only.
    pub(crate) map: Option<MappedAttribute>,
    /// Effective `partial` (declared, else inherited from the parent or `params.partial`):
    /// an update merges into the stored object instead of replacing it.
    pub(crate) partial: bool,
    /// `nulls` of this field, overriding `params.nulls`.
    pub(crate) nulls: Option<bool>,
    /// `isoDates` of this field, overriding `params.isoDates`.
    pub(crate) iso_dates: Option<bool>,
    /// Ioto's `sync: 'none'` on the field: its value must never leave the device, which
    /// devtables (replicating whole items) can honour only in a model that does not sync.
    pub(crate) local_only: bool,
}

impl Field {
    /// A plain field of the given type (the parser fills in the rest).
    pub(crate) fn new(name: &str, ty: FieldType) -> Field {
        Field {
            name: name.to_string(),
            ty,
            required: false,
            hidden: None,
            readonly: false,
            ttl: false,
            default: None,
            enum_values: None,
            validate: None,
            template: None,
            generate: None,
            schema: None,
            items: None,
            description: None,
            unique: false,
            unique_scope: None,
            map: None,
            partial: false,
            nulls: None,
            iso_dates: None,
            local_only: false,
        }
    }

    /// The field name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The field type.
    pub fn field_type(&self) -> FieldType {
        self.ty
    }

    /// Whether a value must be present.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Explicit `hidden`, else true for templated fields (the OneTable rule).
    pub fn hidden(&self) -> bool {
        self.hidden.unwrap_or(self.template.is_some())
    }

    /// Whether updates may not change the value.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether this is the model's time-to-live field (stored as epoch seconds).
    pub fn is_ttl(&self) -> bool {
        self.ttl
    }

    /// Whether the value is computed from a `${field}` template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    pub(crate) fn template(&self) -> Option<&Template> {
        self.template.as_ref()
    }

    /// The `value` template as written (`device#${deviceId}`), if the field has one.
    pub fn value_template(&self) -> Option<&str> {
        self.template.as_ref().map(Template::source)
    }

    /// The `default` value, in its stored form.
    pub fn default_value(&self) -> Option<&Value> {
        self.default.as_ref()
    }

    /// The `enum` values, in their stored form.
    pub fn enum_values(&self) -> Option<&[Value]> {
        self.enum_values.as_deref()
    }

    /// The `validate` pattern as written (`/^[a-z]+$/i`).
    pub fn validate_pattern(&self) -> Option<&str> {
        self.validate.as_ref().map(|p| p.source.as_str())
    }

    /// How an absent value is generated at creation (`generate`).
    pub fn generate(&self) -> Option<Generate> {
        self.generate
    }

    /// The fields of a nested object `schema`, sorted by name.
    pub fn nested_fields(&self) -> Option<&[Field]> {
        self.schema.as_deref()
    }

    /// The element definition of an array field (`items`).
    pub fn items(&self) -> Option<&Field> {
        self.items.as_deref()
    }

    /// The documentation (`description`, else `notes` or `note`).
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Whether values must be unique (`unique`). The schema crate only parses this: keeping
    /// values unique is the database's work (per model, narrowed by [`Field::unique_scope`]).
    pub fn unique(&self) -> bool {
        self.unique
    }

    /// The `scope` template of a unique field, as written: values must be unique among items
    /// whose scope renders the same.
    pub fn unique_scope(&self) -> Option<&str> {
        self.unique_scope.as_ref().map(Template::source)
    }

    /// OneTable's stored attribute (`map`). Kept for reference and ignored: devtables stores
    /// every field under its own name.
    pub fn map(&self) -> Option<&MappedAttribute> {
        self.map.as_ref()
    }

    /// Whether an update merges a given object into the stored one (`partial`, declared or
    /// inherited) instead of replacing it; only object fields with a nested schema merge.
    pub fn partial(&self) -> bool {
        self.partial
    }

    /// Whether an update merges this field (partial, and an object with a nested schema).
    pub(crate) fn merges(&self) -> bool {
        self.partial && self.ty == FieldType::Object && self.schema.is_some()
    }

    /// Whether a null value is stored (true) or removes the field, given the schema's
    /// `params.nulls` as the default.
    pub fn keeps_null(&self, schema_nulls: bool) -> bool {
        self.nulls.unwrap_or(schema_nulls)
    }

    pub(crate) fn generate_value(&self, now_ms: i64) -> Option<Value> {
        match self.generate? {
            Generate::Ulid => {
                let ms = u64::try_from(now_ms).unwrap_or(0);
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                Some(Value::String(ulid::Ulid::from_datetime(at).to_string()))
            }
            Generate::Uuid => Some(Value::String(uuid::Uuid::new_v4().to_string())),
            Generate::Uid(len) => Some(Value::String(random_uid(len))),
        }
    }

    /// Cast a non-null input value to the stored form; `path` names the field in errors.
    pub(crate) fn cast(
        &self,
        value: &Value,
        path: &str,
        ctx: &Ctx,
    ) -> Result<Value, ValidationError> {
        let wrong = || {
            ctx.err(
                path,
                Reason::WrongType {
                    expected: self.ty.name().to_string(),
                    found: describe(value),
                },
            )
        };
        match self.ty {
            FieldType::String => match value {
                Value::String(_) => Ok(value.clone()),
                Value::Number(_) | Value::Bool(_) => {
                    render_value(value).map(Value::String).ok_or_else(wrong)
                }
                _ => Err(wrong()),
            },
            FieldType::Number if self.ttl => cast_ttl(value).ok_or_else(wrong),
            FieldType::Number => match value {
                Value::Number(_) => Ok(value.clone()),
                Value::String(s) => parse_number(s).ok_or_else(wrong),
                _ => Err(wrong()),
            },
            FieldType::Boolean => match value {
                Value::Bool(_) => Ok(value.clone()),
                Value::String(s) if s == "true" => Ok(Value::Bool(true)),
                Value::String(s) if s == "false" => Ok(Value::Bool(false)),
                Value::Number(n) if n.as_f64() == Some(0.0) => Ok(Value::Bool(false)),
                Value::Number(n) if n.as_f64() == Some(1.0) => Ok(Value::Bool(true)),
                _ => Err(wrong()),
            },
            FieldType::Date if self.ttl => cast_ttl(value).ok_or_else(wrong),
            FieldType::Date => {
                let ms = date_ms(value).ok_or_else(wrong)?;
                store_date(ms, self.iso_dates.unwrap_or(ctx.iso_dates)).ok_or_else(|| {
                    ctx.err(
                        path,
                        Reason::Invalid(format!("date {ms} ms is out of the supported range")),
                    )
                })
            }
            FieldType::Object => match (value, &self.schema) {
                (Value::Object(map), Some(fields)) => {
                    cast_object(fields, map, path, ctx).map(Value::Object)
                }
                (Value::Object(_), None) => Ok(value.clone()),
                _ => Err(wrong()),
            },
            FieldType::Array => match (value, &self.items) {
                (Value::Array(list), Some(item)) => {
                    let mut out = Vec::with_capacity(list.len());
                    for (i, v) in list.iter().enumerate() {
                        let p = format!("{path}[{i}]");
                        out.push(item.cast_checked(v, &p, ctx)?);
                    }
                    Ok(Value::Array(out))
                }
                (Value::Array(_), None) => Ok(value.clone()),
                _ => Err(wrong()),
            },
            FieldType::Binary => match value {
                Value::String(s) => {
                    let engine = base64::engine::general_purpose::STANDARD;
                    let no_pad = base64::engine::general_purpose::STANDARD_NO_PAD;
                    if engine.decode(s).is_ok() || no_pad.decode(s).is_ok() {
                        Ok(value.clone())
                    } else {
                        Err(ctx.err(
                            path,
                            Reason::Invalid("binary values must be base64 strings".into()),
                        ))
                    }
                }
                _ => Err(wrong()),
            },
        }
    }

    /// [`Field::cast`] followed by [`Field::check`].
    pub(crate) fn cast_checked(
        &self,
        value: &Value,
        path: &str,
        ctx: &Ctx,
    ) -> Result<Value, ValidationError> {
        let cast = self.cast(value, path, ctx)?;
        self.check(&cast, path, ctx)?;
        Ok(cast)
    }

    /// [`Field::cast_checked`] of a value the caller owns, in place: a value that is already
    /// its stored form (a string for a string field, a number for a number field...) stays
    /// where it is instead of being copied. The same result and the same errors.
    pub(crate) fn cast_checked_in_place(
        &self,
        value: &mut Value,
        path: &str,
        ctx: &Ctx,
    ) -> Result<(), ValidationError> {
        let identity = match (self.ty, &*value) {
            (FieldType::String, Value::String(_)) => true,
            (FieldType::Number, Value::Number(_)) => !self.ttl,
            (FieldType::Boolean, Value::Bool(_)) => true,
            (FieldType::Object, Value::Object(_)) => self.schema.is_none(),
            (FieldType::Array, Value::Array(_)) => self.items.is_none(),
            _ => false,
        };
        if !identity {
            *value = self.cast(value, path, ctx)?;
        }
        self.check(value, path, ctx)
    }

    /// Check a stored (cast) value against `enum` and `validate`.
    pub(crate) fn check(
        &self,
        value: &Value,
        path: &str,
        ctx: &Ctx,
    ) -> Result<(), ValidationError> {
        if value.is_null() {
            return Ok(());
        }
        if let Some(allowed) = self.enum_values.as_ref().filter(|_| !ctx.neighbour) {
            if !allowed.iter().any(|a| values_equal(a, value)) {
                return Err(ctx.err(
                    path,
                    Reason::NotInEnum {
                        value: value.to_string(),
                        allowed: allowed
                            .iter()
                            .map(|a| render_value(a).unwrap_or_else(|| a.to_string()))
                            .collect(),
                    },
                ));
            }
        }
        if let Some(pattern) = &self.validate {
            if let Some(text) = render_value(value) {
                if !pattern.regex.is_match(&text) {
                    return Err(ctx.err(
                        path,
                        Reason::Pattern {
                            pattern: pattern.source.clone(),
                        },
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Cast the members of a nested object against its field definitions: unknown keys are
/// errors, nulls follow `params.nulls`, defaults apply, required members must be present.
pub(crate) fn cast_object(
    fields: &[Field],
    map: &Map<String, Value>,
    path: &str,
    ctx: &Ctx,
) -> Result<Map<String, Value>, ValidationError> {
    let mut out = Map::new();
    for (key, value) in map {
        let p = format!("{path}.{key}");
        let Some(field) = fields.iter().find(|f| f.name == *key) else {
            if ctx.neighbour {
                out.insert(key.clone(), value.clone());
                continue;
            }
            return Err(ctx.err(&p, Reason::UnknownField));
        };
        if value.is_null() {
            if field.keeps_null(ctx.nulls) {
                out.insert(key.clone(), Value::Null);
            }
            continue;
        }
        out.insert(key.clone(), field.cast_checked(value, &p, ctx)?);
    }
    for field in fields {
        if !out.contains_key(&field.name) {
            if let Some(default) = &field.default {
                out.insert(field.name.clone(), default.clone());
            }
        }
        if field.required && !out.contains_key(&field.name) {
            return Err(ctx.err(format!("{path}.{}", field.name), Reason::Required));
        }
    }
    Ok(out)
}

/// Merge a partial update `new` into the stored object `old` (OneTable's `partial`): given
/// members replace stored ones, nulls remove them (or are kept as null when the member keeps
/// nulls), and members that merge themselves merge recursively. The result is raw: the caller
/// casts and checks it as a whole, so required members and defaults still apply.
pub(crate) fn merge_partial(
    fields: &[Field],
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    nulls: bool,
) -> Map<String, Value> {
    let mut out = old.clone();
    for (key, value) in new {
        let field = fields.iter().find(|f| f.name == *key);
        match (field, value, old.get(key)) {
            (Some(f), Value::Null, _) if f.keeps_null(nulls) => {
                out.insert(key.clone(), Value::Null);
            }
            (_, Value::Null, _) => {
                out.remove(key);
            }
            (Some(f), Value::Object(add), Some(Value::Object(stored))) if f.merges() => {
                let inner = f.schema.as_deref().unwrap_or_default();
                out.insert(
                    key.clone(),
                    Value::Object(merge_partial(inner, stored, add, nulls)),
                );
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

/// Stored form of a date given in epoch milliseconds.
pub(crate) fn store_date(ms: i64, iso_dates: bool) -> Option<Value> {
    if iso_dates {
        date::format_iso_ms(ms).map(Value::String)
    } else {
        date::format_iso_ms(ms)?; // range check only
        Some(Value::from(ms))
    }
}

/// Epoch milliseconds of a date input (ISO string, numeric string or epoch-ms number).
pub(crate) fn date_ms(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => date::parse_iso_ms(s).or_else(|| match parse_number(s)? {
            Value::Number(n) => number_to_i64(&n),
            _ => None,
        }),
        Value::Number(n) => number_to_i64(n),
        _ => None,
    }
}

/// TTL values are stored as integral epoch seconds; input is an ISO date or epoch seconds.
fn cast_ttl(value: &Value) -> Option<Value> {
    match value {
        Value::String(s) => match date::parse_iso_ms(s) {
            Some(ms) => Some(Value::from(ms.div_euclid(1000))),
            None => match parse_number(s)? {
                Value::Number(n) => number_to_i64(&n).map(Value::from),
                _ => None,
            },
        },
        Value::Number(n) => number_to_i64(n).map(Value::from),
        _ => None,
    }
}

fn number_to_i64(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    if f.is_finite() && f.abs() < 9.2e18 {
        Some(f.round() as i64)
    } else {
        None
    }
}

/// Parse a numeric string; integers stay integers.
fn parse_number(text: &str) -> Option<Value> {
    let text = text.trim();
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::from(i));
    }
    if let Ok(u) = text.parse::<u64>() {
        return Some(Value::from(u));
    }
    let f = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
    serde_json::Number::from_f64(f).map(Value::Number)
}

/// JSON equality with numbers compared numerically (3 == 3.0).
pub(crate) fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// A short description of a JSON value for error messages.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("string {:?}...", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CTX: Ctx = Ctx {
        model: "M",
        iso_dates: false,
        nulls: false,
        neighbour: false,
    };
    const ISO: Ctx = Ctx {
        model: "M",
        iso_dates: true,
        nulls: false,
        neighbour: false,
    };

    fn field(ty: FieldType) -> Field {
        Field::new("f", ty)
    }

    fn check(f: &Field, ctx: &Ctx, input: Value, expected: Result<Value, ()>) {
        let got = f.cast(&input, "f", ctx).map_err(|_| ());
        assert_eq!(got, expected, "{:?} {input}", f.ty);
    }

    #[test]
    fn type_names_parse_case_insensitively() {
        assert_eq!(FieldType::parse("String"), Some(FieldType::String));
        assert_eq!(FieldType::parse("DATE"), Some(FieldType::Date));
        assert_eq!(FieldType::parse("set"), None);
    }

    #[test]
    fn string_cast() {
        let f = field(FieldType::String);
        check(&f, &CTX, json!("a"), Ok(json!("a")));
        check(&f, &CTX, json!(12), Ok(json!("12")));
        check(&f, &CTX, json!(1.5), Ok(json!("1.5")));
        check(&f, &CTX, json!(true), Ok(json!("true")));
        check(&f, &CTX, json!({}), Err(()));
        check(&f, &CTX, json!([]), Err(()));
    }

    #[test]
    fn number_cast() {
        let f = field(FieldType::Number);
        check(&f, &CTX, json!(3), Ok(json!(3)));
        check(&f, &CTX, json!(2.5), Ok(json!(2.5)));
        check(&f, &CTX, json!("42"), Ok(json!(42)));
        check(&f, &CTX, json!(" -1.25 "), Ok(json!(-1.25)));
        check(&f, &CTX, json!("inf"), Err(()));
        check(&f, &CTX, json!("NaN"), Err(()));
        check(&f, &CTX, json!("x"), Err(()));
        check(&f, &CTX, json!(true), Err(()));
    }

    #[test]
    fn boolean_cast() {
        let f = field(FieldType::Boolean);
        check(&f, &CTX, json!(true), Ok(json!(true)));
        check(&f, &CTX, json!("false"), Ok(json!(false)));
        check(&f, &CTX, json!(1), Ok(json!(true)));
        check(&f, &CTX, json!(0), Ok(json!(false)));
        check(&f, &CTX, json!(2), Err(()));
        check(&f, &CTX, json!("yes"), Err(()));
    }

    #[test]
    fn date_cast_epoch_mode() {
        let f = field(FieldType::Date);
        check(
            &f,
            &CTX,
            json!("2026-11-25T18:00:00.000Z"),
            Ok(json!(1_795_629_600_000i64)),
        );
        check(
            &f,
            &CTX,
            json!(1_795_629_600_000i64),
            Ok(json!(1_795_629_600_000i64)),
        );
        check(
            &f,
            &CTX,
            json!("1795629600000"),
            Ok(json!(1_795_629_600_000i64)),
        );
        check(&f, &CTX, json!("soon"), Err(()));
        check(&f, &CTX, json!(true), Err(()));
    }

    #[test]
    fn date_cast_iso_mode() {
        let f = field(FieldType::Date);
        check(
            &f,
            &ISO,
            json!("2026-11-25T19:00:00+01:00"),
            Ok(json!("2026-11-25T18:00:00.000Z")),
        );
        check(
            &f,
            &ISO,
            json!(1_795_629_600_000i64),
            Ok(json!("2026-11-25T18:00:00.000Z")),
        );
        check(
            &f,
            &ISO,
            json!("2026-11-25T18:00:00.000Z"),
            Ok(json!("2026-11-25T18:00:00.000Z")),
        );
        check(&f, &ISO, json!(i64::MAX), Err(()));
    }

    #[test]
    fn ttl_cast_is_epoch_seconds() {
        let mut f = field(FieldType::Date);
        f.ttl = true;
        check(
            &f,
            &ISO,
            json!("2026-11-25T18:00:00.000Z"),
            Ok(json!(1_795_629_600i64)),
        );
        check(
            &f,
            &ISO,
            json!(1_795_629_600i64),
            Ok(json!(1_795_629_600i64)),
        );
        check(&f, &CTX, json!("1795629600"), Ok(json!(1_795_629_600i64)));
        check(&f, &CTX, json!("never"), Err(()));
    }

    #[test]
    fn binary_cast() {
        let f = field(FieldType::Binary);
        check(&f, &CTX, json!("aGVsbG8="), Ok(json!("aGVsbG8=")));
        check(&f, &CTX, json!("aGVsbG8"), Ok(json!("aGVsbG8")));
        check(&f, &CTX, json!("not base64!"), Err(()));
        check(&f, &CTX, json!(1), Err(()));
    }

    #[test]
    fn array_cast_with_items() {
        let mut f = field(FieldType::Array);
        check(&f, &CTX, json!([1, "a"]), Ok(json!([1, "a"])));
        f.items = Some(Box::new(Field::new("", FieldType::Number)));
        check(&f, &CTX, json!(["1", 2]), Ok(json!([1, 2])));
        let err = f.cast(&json!([1, "x"]), "f", &CTX).unwrap_err();
        assert_eq!(err.field, "f[1]");
        check(&f, &CTX, json!("x"), Err(()));
    }

    #[test]
    fn nested_object_schema() {
        let mut f = field(FieldType::Object);
        let mut inner = Field::new("n", FieldType::Number);
        inner.required = true;
        let mut d = Field::new("d", FieldType::String);
        d.default = Some(json!("z"));
        f.schema = Some(vec![d, inner]);
        check(&f, &CTX, json!({"n": "2"}), Ok(json!({"n": 2, "d": "z"})));
        let err = f.cast(&json!({"n": 1, "x": 1}), "args", &CTX).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason),
            ("args.x", Reason::UnknownField)
        );
        let err = f.cast(&json!({}), "args", &CTX).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason),
            ("args.n", Reason::Required)
        );
        let err = f.cast(&json!({"n": "q"}), "args", &CTX).unwrap_err();
        assert_eq!(err.field, "args.n");
    }

    #[test]
    fn uid_uses_every_letter_of_its_alphabet() {
        // 2000 characters: each of the 32 letters is missed with probability (31/32)^2000.
        let text = random_uid(2000);
        for letter in UID_ALPHABET {
            assert!(text.as_bytes().contains(letter), "{}", char::from(*letter));
        }
        assert!(!text.contains(['I', 'L', 'O', 'U']));
    }

    #[test]
    fn field_iso_dates_overrides_the_schema() {
        let mut f = field(FieldType::Date);
        f.iso_dates = Some(true);
        check(
            &f,
            &CTX,
            json!(1_795_629_600_000i64),
            Ok(json!("2026-11-25T18:00:00.000Z")),
        );
        f.iso_dates = Some(false);
        check(
            &f,
            &ISO,
            json!("2026-11-25T18:00:00.000Z"),
            Ok(json!(1_795_629_600_000i64)),
        );
    }

    #[test]
    fn partial_merge() {
        let mut inner = Field::new("inner", FieldType::Object);
        inner.partial = true;
        inner.schema = Some(vec![
            Field::new("a", FieldType::Number),
            Field::new("b", FieldType::Number),
        ]);
        let mut keep = Field::new("keep", FieldType::String);
        keep.nulls = Some(true);
        let fields = vec![
            Field::new("x", FieldType::Number),
            Field::new("y", FieldType::Number),
            inner,
            keep,
        ];
        let old = json!({"x": 1, "y": 2, "inner": {"a": 1, "b": 2}, "keep": "k"});
        let new = json!({"x": 9, "y": null, "inner": {"b": 3}, "keep": null});
        let got = merge_partial(
            &fields,
            old.as_object().unwrap(),
            new.as_object().unwrap(),
            false,
        );
        assert_eq!(
            Value::Object(got),
            json!({"x": 9, "inner": {"a": 1, "b": 3}, "keep": null})
        );
    }

    #[test]
    fn enum_and_pattern_check() {
        let mut f = field(FieldType::String);
        f.enum_values = Some(vec![json!("a"), json!("b")]);
        assert!(f.check(&json!("a"), "f", &CTX).is_ok());
        let err = f.check(&json!("c"), "f", &CTX).unwrap_err();
        assert_eq!(err.to_string(), "M.f: value \"c\" is not one of [a, b]");
        f.enum_values = None;
        f.validate = Some(Pattern {
            source: "/^a+$/".into(),
            regex: Regex::new("^a+$").unwrap(),
        });
        assert!(f.check(&json!("aaa"), "f", &CTX).is_ok());
        assert!(matches!(
            f.check(&json!("ab"), "f", &CTX).unwrap_err().reason,
            Reason::Pattern { .. }
        ));
    }

    #[test]
    fn numeric_enum_compares_numerically() {
        let mut f = field(FieldType::Number);
        f.enum_values = Some(vec![json!(1), json!(2)]);
        assert!(f.check(&json!(2.0), "f", &CTX).is_ok());
        assert!(f.check(&json!(3), "f", &CTX).is_err());
    }

    #[test]
    fn generated_ids() {
        let mut f = field(FieldType::String);
        f.generate = Some(Generate::Ulid);
        let id = f.generate_value(1_795_629_600_000).unwrap();
        assert_eq!(id.as_str().map(str::len), Some(26));
        f.generate = Some(Generate::Uuid);
        let id = f.generate_value(0).unwrap();
        assert_eq!(id.as_str().map(str::len), Some(36));
        for len in [1, 10, 16, 17, 40] {
            f.generate = Some(Generate::Uid(len));
            let ids: Vec<String> = (0..50)
                .filter_map(|_| f.generate_value(0))
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            assert!(ids.iter().all(|id| id.len() == len), "uid({len}): {ids:?}");
            assert!(
                ids.iter()
                    .all(|id| id.bytes().all(|b| UID_ALPHABET.contains(&b))),
                "uid({len}) alphabet: {ids:?}"
            );
            if len >= 10 {
                let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
                assert_eq!(distinct.len(), ids.len(), "uid({len}) ids repeat: {ids:?}");
            }
        }
        assert_eq!(Generate::Uid(12).to_string(), "uid(12)");
        f.generate = None;
        assert_eq!(f.generate_value(0), None);
    }
}
