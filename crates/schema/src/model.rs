//! Models: the per-item operations the schema defines.
//!
//! A [`Model`] is everything the database needs to turn caller input into a stored item and
//! back: create and update preparation (cast, defaults, generated ids, templates, timestamps,
//! validation), import normalization, key computation for every index, projection of hidden
//! fields and TTL. Keeping all of it here means the database and the replication layer never
//! interpret the schema themselves, so device and cloud agree on every item's form and key.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::Value;

use crate::date;
use crate::error::{Reason, ValidationError};
use crate::field::{
    date_ms, describe, merge_partial, store_date, values_equal, Ctx, Field, FieldType,
};
use crate::key_plan::{Given, JoinedKey, KeyBuf, KeyPlan};
use crate::settings::{Index, Params, Process};
use crate::template::{render_value, Rendered};
use crate::Item;

/// The rendering of a given (non-null) value of key dependency `field` after its cast, as the
/// general path sees it: a templated field's string is kept as given, other values are cast.
/// `None` when the value does not cast or has no rendering.
pub(crate) fn rendered_given<'a>(
    field: &Field,
    value: &'a Value,
    ctx: &Ctx,
) -> Option<Cow<'a, str>> {
    match (value, field.ty) {
        // Identity casts: a templated field's string, a string field's string.
        (Value::String(text), _) if field.has_template() => Some(Cow::Borrowed(text)),
        (Value::String(text), FieldType::String) => Some(Cow::Borrowed(text)),
        _ => {
            let cast = field.cast(value, &field.name, ctx).ok()?;
            render_value(&cast).map(Cow::Owned)
        }
    }
}

/// Whether `bytes` holds a NUL: a byte loop, as key values are short and `contains` calls
/// `memchr` (see `Model::check_key_value`).
fn has_nul(bytes: &[u8]) -> bool {
    for &b in bytes {
        if b == 0 {
            return true;
        }
    }
    false
}

/// A TTL field's value as [`Model::expires_at_ms`] reads it, borrowed (for readers that hold
/// the stored value rather than a JSON one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TtlValue<'a> {
    /// A number that fits `i64`: seconds since the epoch.
    Int(i64),
    /// Any other number: seconds since the epoch.
    Float(f64),
    /// A date's text.
    Text(&'a str),
    /// A date already read as its instant (epoch milliseconds): what its canonical text parses
    /// to.
    Ms(i64),
}

/// When a TTL value expires (epoch milliseconds): the rule of [`Model::expires_at_ms`].
pub fn ttl_expiry_ms(value: TtlValue<'_>) -> Option<i64> {
    match value {
        TtlValue::Int(secs) => secs.checked_mul(1000),
        TtlValue::Float(f) => {
            (f.is_finite() && f.abs() < 9.2e15).then(|| (f * 1000.0).round() as i64)
        }
        TtlValue::Text(s) => date::parse_iso_ms(s),
        TtlValue::Ms(ms) => Some(ms),
    }
}

/// A full primary key: hash (`pk`) and sort (`sk`) values.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemKey {
    /// The hash (partition) key value.
    pub pk: String,
    /// The sort key value (`""` when the primary index has no sort key).
    pub sk: String,
}

/// `pk="…" sk="…"`: how messages name a key (quoted, so empty or odd values stay visible).
impl std::fmt::Display for ItemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pk={:?} sk={:?}", self.pk, self.sk)
    }
}

/// A model (entity type) of the schema.
#[derive(Clone, Debug)]
pub struct Model {
    pub(crate) name: String,
    pub(crate) process: Process,
    pub(crate) fields: Vec<Field>,
    /// Indexes into `fields` of templated fields, dependencies first.
    pub(crate) template_order: Vec<usize>,
    /// The part of `template_order` the primary key depends on (computing a key renders these
    /// alone).
    pub(crate) key_templates: Vec<usize>,
    /// Indexes into `fields` of every field the primary key depends on (key attributes and,
    /// transitively, their template variables): the values [`Model::primary_key`] resolves.
    pub(crate) key_fields: Vec<usize>,
    /// Whether the primary key depends on a maintained timestamp (`created`, `updated`).
    pub(crate) key_uses_stamp: bool,
    /// Indexes into `fields` of the fields a create fills when the input lacks them (a
    /// `default` or a `generate`): a create looks only these up, not every field.
    pub(crate) filled_fields: Vec<usize>,
    /// Names of the hidden fields (see [`Model::is_hidden`]).
    pub(crate) hidden_names: Vec<String>,
    /// Bit `n` is set when a hidden name is `n` bytes long (bit 63: 63 bytes or more): every
    /// read asks [`Model::is_hidden`] of each stored field, and most names are ruled out by
    /// their length alone.
    pub(crate) hidden_lengths: u64,
    /// Per field of `fields`: whether it is a key attribute of some index, so that validation
    /// checks its value for NUL while it has it at hand instead of looking it up again.
    pub(crate) index_attr: Vec<bool>,
    /// Whether some index has a key attribute that is not among `fields` (the type field, a
    /// timestamp, or a field of another model): validation then looks those up by name.
    pub(crate) index_attr_elsewhere: bool,
    /// Positions in `fields` of the primary index's hash and sort attributes, when fields.
    pub(crate) primary_at: (Option<usize>, Option<usize>),
    /// The primary key's templates and attributes resolved to slots (see `key_plan`).
    pub(crate) key_plan: KeyPlan,
    pub(crate) params: Params,
    pub(crate) primary: Index,
    /// Every index of the schema, primary first.
    pub(crate) indexes: Vec<Index>,
    pub(crate) ttl: Option<String>,
    /// The timestamp fields `params.timestamps` maintains, as declared (or implied).
    pub(crate) stamps: Stamps,
    /// A model-level `description` (documentation only).
    pub(crate) description: Option<String>,
}

/// The created and updated fields a model maintains: `Some` when `params.timestamps` sets
/// them, with the type and visibility of their declaration (a date field when undeclared).
#[derive(Clone, Debug, Default)]
pub(crate) struct Stamps {
    pub(crate) created: Option<Field>,
    pub(crate) updated: Option<Field>,
}

/// The value of `name` in an item whose entries `entries` yields in key order, when the names
/// asked for ascend: the entries below `name` are passed for good, so asking every field in
/// order walks the item once.
fn value_in_order<'a>(
    entries: &mut std::iter::Peekable<serde_json::map::Iter<'a>>,
    name: &str,
) -> Option<&'a Value> {
    while let Some((key, value)) = entries.peek() {
        match key.as_str().cmp(name) {
            std::cmp::Ordering::Less => {
                entries.next();
            }
            std::cmp::Ordering::Equal => {
                let value = *value;
                entries.next();
                return Some(value);
            }
            std::cmp::Ordering::Greater => return None,
        }
    }
    None
}

/// The bit of [`Model::hidden_lengths`] for a name of `name`'s length.
fn length_bit(name: &str) -> u64 {
    1 << name.len().min(63)
}

impl Model {
    pub(crate) fn new(
        name: &str,
        fields: Vec<Field>,
        template_order: Vec<usize>,
        params: Params,
        primary: Index,
        indexes: Vec<Index>,
        stamps: Stamps,
    ) -> Model {
        let ttl = fields.iter().find(|f| f.ttl).map(|f| f.name.clone());
        let mut model = Model {
            name: name.to_string(),
            process: Process::default(),
            fields,
            template_order,
            key_templates: Vec::new(),
            key_fields: Vec::new(),
            key_uses_stamp: false,
            filled_fields: Vec::new(),
            hidden_names: Vec::new(),
            hidden_lengths: 0,
            index_attr: Vec::new(),
            index_attr_elsewhere: false,
            primary_at: (None, None),
            key_plan: KeyPlan::default(),
            params,
            primary,
            indexes,
            ttl,
            stamps,
            description: None,
        };
        let deps = model.key_dependencies();
        model.key_templates = model
            .template_order
            .iter()
            .copied()
            .filter(|&i| model.fields.get(i).is_some_and(|f| deps.contains(&f.name)))
            .collect();
        model.key_uses_stamp = [&model.stamps.created, &model.stamps.updated]
            .into_iter()
            .flatten()
            .any(|stamp| deps.contains(&stamp.name));
        model.key_fields = (0..model.fields.len())
            .filter(|&i| model.fields.get(i).is_some_and(|f| deps.contains(&f.name)))
            .collect();
        model.hidden_names = model
            .fields
            .iter()
            .chain(model.stamps.created.iter())
            .chain(model.stamps.updated.iter())
            .filter(|f| f.hidden())
            .map(|f| f.name.clone())
            .collect();
        model.filled_fields = (0..model.fields.len())
            .filter(|&i| {
                model
                    .fields
                    .get(i)
                    .is_some_and(|f| f.default.is_some() || f.generate.is_some())
            })
            .collect();
        model.hidden_lengths = model
            .hidden_names
            .iter()
            .fold(0, |mask, name| mask | length_bit(name));
        let attrs: Vec<&str> = model
            .indexes
            .iter()
            .flat_map(|index| std::iter::once(index.hash.as_str()).chain(index.sort.as_deref()))
            .collect();
        model.index_attr = model
            .fields
            .iter()
            .map(|f| attrs.contains(&f.name.as_str()))
            .collect();
        model.index_attr_elsewhere = attrs.iter().any(|a| model.field(a).is_none());
        model.primary_at = (
            model.field_index(&model.primary.hash),
            model
                .primary
                .sort
                .as_deref()
                .and_then(|sort| model.field_index(sort)),
        );
        model.key_plan = KeyPlan::new(&model);
        model
    }

    /// Whether `name` is a hidden field of this model (what [`Model::strip_hidden`] removes);
    /// cheaper than `field(name)` for the few hidden fields a model has.
    pub fn is_hidden(&self, name: &str) -> bool {
        if self.hidden_lengths & length_bit(name) == 0 {
            return false;
        }
        // A byte loop rather than `==`, which calls `memcmp` (~25 instructions a call) for
        // names of a few bytes.
        self.hidden_names.iter().any(|hidden| {
            hidden.len() == name.len() && hidden.bytes().zip(name.bytes()).all(|(a, b)| a == b)
        })
    }

    /// The model name (also the value of the type field).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replication settings.
    pub fn process(&self) -> Process {
        self.process
    }

    /// The fields, sorted by name.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// A field by name.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.fields.get(i))
    }

    /// The position of field `name` in [`Model::fields`].
    pub(crate) fn field_index(&self, name: &str) -> Option<usize> {
        self.fields
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
    }

    /// The TTL field name, if the model has one.
    pub fn ttl_field(&self) -> Option<&str> {
        self.ttl.as_deref()
    }

    /// The model's `description` (documentation only).
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The field that records the creation time, when `params.timestamps` is `true` or
    /// `'create'`: a date field unless the model declares it as a number (epoch milliseconds)
    /// or a string (ISO 8601). Not among [`Model::fields`]: callers cannot set it.
    pub fn created_field(&self) -> Option<&Field> {
        self.stamps.created.as_ref()
    }

    /// The field that records the last write time, when `params.timestamps` is `true` or
    /// `'update'`; see [`Model::created_field`].
    pub fn updated_field(&self) -> Option<&Field> {
        self.stamps.updated.as_ref()
    }

    pub(crate) fn ctx(&self) -> Ctx<'_> {
        Ctx {
            model: &self.name,
            iso_dates: self.params.iso_dates,
            nulls: self.params.nulls,
            neighbour: false,
        }
    }

    pub(crate) fn err(&self, field: impl Into<String>, reason: Reason) -> ValidationError {
        ValidationError::new(&self.name, field, reason)
    }

    /// The maintained timestamp field named `key`, if any.
    pub(crate) fn stamp(&self, key: &str) -> Option<&Field> {
        [&self.stamps.created, &self.stamps.updated]
            .into_iter()
            .flatten()
            .find(|f| f.name == key)
    }

    /// The stored form of time `ms` in timestamp field `stamp`: a date per its `isoDates`
    /// (else `params.isoDates`), epoch milliseconds for a number field, ISO 8601 for a string.
    pub(crate) fn stamp_value(&self, stamp: &Field, ms: i64) -> Option<Value> {
        store_date(ms, self.stamp_is_iso(stamp))
    }

    /// Whether a maintained timestamp is stored as an ISO string (else epoch milliseconds).
    fn stamp_is_iso(&self, stamp: &Field) -> bool {
        match stamp.ty {
            FieldType::Number => false,
            FieldType::String => true,
            _ => stamp.iso_dates.unwrap_or(self.params.iso_dates),
        }
    }

    /// Whether a null given for `field` is stored (per field `nulls`, else `params.nulls`).
    fn keeps_null(&self, field: &Field) -> bool {
        field.keeps_null(self.params.nulls)
    }

    /// Rendered value of a template variable in `item` (the type field is the model name),
    /// borrowed from `item` (or the model) when it is a string: rendering a template copies it
    /// once, into the result.
    pub(crate) fn variable<'a>(&'a self, item: &'a Item, var: &str) -> Option<Cow<'a, str>> {
        if var == self.params.type_field {
            return Some(Cow::Borrowed(&self.name));
        }
        match item.get(var)? {
            Value::String(text) => Some(Cow::Borrowed(text)),
            other => render_value(other).map(Cow::Owned),
        }
    }

    /// Evaluate every template in dependency order. `keep_given`: a templated field already
    /// present keeps its value (used when resolving keys from caller properties).
    pub(crate) fn apply_templates(
        &self,
        item: &mut Item,
        keep_given: bool,
    ) -> Result<(), ValidationError> {
        self.apply_templates_of(&self.template_order, item, keep_given)
    }

    /// [`Model::apply_templates`] for the templated fields `order` lists (in that order).
    fn apply_templates_of(
        &self,
        order: &[usize],
        item: &mut Item,
        keep_given: bool,
    ) -> Result<(), ValidationError> {
        let ctx = self.ctx();
        for &i in order {
            let Some(field) = self.fields.get(i) else {
                continue;
            };
            let Some(template) = field.template() else {
                continue;
            };
            if keep_given && item.get(&field.name).is_some_and(|v| !v.is_null()) {
                continue;
            }
            match template.render(|var| self.variable(item, var)) {
                Rendered::Full(text) => {
                    let value = match field.ty {
                        // A string field's cast of a string is the string itself.
                        FieldType::String => Value::String(text),
                        _ => field.cast(&Value::String(text), &field.name, &ctx)?,
                    };
                    item.insert(field.name.clone(), value);
                }
                Rendered::Partial { .. } => {
                    item.remove(&field.name);
                }
            }
        }
        Ok(())
    }

    /// The innermost unresolved variable behind a templated field (or the field itself).
    fn missing_variable(&self, item: &Item, name: &str) -> String {
        let mut current = name.to_string();
        // Bounded by the number of fields: templates are acyclic.
        for _ in 0..=self.fields.len() {
            let Some(template) = self.field(&current).and_then(Field::template) else {
                break;
            };
            match template.render(|var| self.variable(item, var)) {
                Rendered::Partial { missing, .. } => current = missing,
                Rendered::Full(_) => break,
            }
        }
        current
    }

    /// One key attribute of `item`: "" when the model has no such field.
    fn key_part(&self, item: &Item, attr: &str) -> Result<String, ValidationError> {
        if self.field(attr).is_none() {
            return Ok(String::new());
        }
        match item.get(attr).and_then(render_value) {
            Some(value) => Ok(value),
            None => Err(self.err(
                attr,
                Reason::KeyUnresolved {
                    variable: self.missing_variable(item, attr),
                },
            )),
        }
    }

    fn key_of(&self, item: &Item) -> Result<ItemKey, ValidationError> {
        let pk = self.key_part(item, &self.primary.hash)?;
        let sk = match &self.primary.sort {
            Some(sort) => self.key_part(item, sort)?,
            None => String::new(),
        };
        Ok(ItemKey { pk, sk })
    }

    /// Cast the known, non-null properties (unknown ones are ignored).
    fn cast_props(&self, props: &Item) -> Result<Item, ValidationError> {
        let ctx = self.ctx();
        let mut view = Item::new();
        for (key, value) in props {
            if value.is_null() {
                continue;
            }
            if let Some(field) = self.field(key) {
                if field.has_template() && value.is_string() {
                    view.insert(key.clone(), value.clone());
                } else {
                    view.insert(key.clone(), field.cast(value, key, &ctx)?);
                }
            }
        }
        Ok(view)
    }

    /// Full primary key of an item from user properties; see the crate docs.
    pub fn primary_key(&self, props: &Item) -> Result<ItemKey, ValidationError> {
        self.primary_key_joined(props).map(|key| key.to_item_key())
    }

    /// [`Model::primary_key`] as one string (`pk`, NUL, `sk`; see [`JoinedKey`]): one
    /// allocation, and the form a database lookup by key wants.
    pub fn primary_key_joined(&self, props: &Item) -> Result<JoinedKey, ValidationError> {
        // Fast path (stored items, and callers that pass the keys): both key attributes are
        // given directly as strings, so there is nothing to cast or render.
        let key = match self
            .direct_joined(props)
            .or_else(|| self.planned_key(props))
        {
            Some(key) => key,
            // Unresolved, a value that does not cast, or an unusual model: the general path
            // gives the answer, and its exact error.
            None => {
                let key = self.primary_key_general(props)?;
                return Ok(JoinedKey::from_parts(&key.pk, &key.sk));
            }
        };
        self.check_key_value(&self.primary.hash, key.pk())?;
        self.check_key_value(self.primary.sort.as_deref().unwrap_or_default(), key.sk())?;
        Ok(key)
    }

    /// [`Model::primary_key_joined`] into a [`KeyBuf`]: on the stack for a key of at most
    /// [`crate::KEY_INLINE`] bytes, so a lookup by key allocates nothing for it (the same
    /// key, or the same error, as `primary_key_joined`).
    pub fn primary_key_buf(&self, props: &Item) -> Result<KeyBuf, ValidationError> {
        let key = match self.direct_parts(|name| props.get(name)?.as_str()) {
            Some((pk, sk)) => KeyBuf::from_parts(pk, sk),
            None => match self
                .planned_key_buf(props.iter().map(|(k, v)| (k.as_str(), Given::Json(v))))
            {
                Some(key) => key,
                None => {
                    let key = self.primary_key_general(props)?;
                    return Ok(KeyBuf::from_parts(&key.pk, &key.sk));
                }
            },
        };
        self.check_key_bytes(&key)?;
        Ok(key)
    }

    /// The key whose properties are given as `(name, text)` pairs, each read as the property
    /// `name` holding the JSON string `text` (a later pair of the same name wins): the key, or
    /// the error, [`Model::primary_key_joined`] gives for that item, without building it.
    /// For callers that hold the key's values as text (an id, a device name) and would
    /// otherwise build a `serde_json::Map` per lookup.
    pub fn primary_key_buf_of(&self, props: &[(&str, &str)]) -> Result<KeyBuf, ValidationError> {
        let given = |name: &str| {
            props
                .iter()
                .rev()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        };
        let key = match self.direct_parts(given) {
            Some((pk, sk)) => KeyBuf::from_parts(pk, sk),
            None => match self.planned_key_buf(props.iter().map(|&(k, v)| (k, Given::Str(v)))) {
                Some(key) => key,
                None => {
                    // The general path, on the item those pairs make (allocates; its answer
                    // and its exact error).
                    let item: Item = props
                        .iter()
                        .map(|&(k, v)| (k.to_string(), Value::String(v.to_string())))
                        .collect();
                    let key = self.primary_key_general(&item)?;
                    return Ok(KeyBuf::from_parts(&key.pk, &key.sk));
                }
            },
        };
        self.check_key_bytes(&key)?;
        Ok(key)
    }

    /// The NUL test of [`Model::primary_key_joined`] on a rendered key.
    fn check_key_bytes(&self, key: &KeyBuf) -> Result<(), ValidationError> {
        if has_nul(key.pk_bytes()) {
            return Err(self.err(&self.primary.hash, Reason::InvalidKeyValue));
        }
        if has_nul(key.sk_bytes()) {
            let sort = self.primary.sort.as_deref().unwrap_or_default();
            return Err(self.err(sort, Reason::InvalidKeyValue));
        }
        Ok(())
    }

    /// [`Model::primary_key`] through an item of the cast key properties with the key
    /// templates applied: the reference behaviour, and the path for every case the rendered
    /// path leaves (errors included).
    fn primary_key_general(&self, props: &Item) -> Result<ItemKey, ValidationError> {
        let mut view = self.cast_props(props)?;
        // Only the templates the key attributes depend on: the others cannot change the key.
        self.apply_templates_of(&self.key_templates, &mut view, true)?;
        let key = self.key_of(&view)?;
        self.check_key_value(&self.primary.hash, &key.pk)?;
        if let Some(sort) = &self.primary.sort {
            self.check_key_value(sort, &key.sk)?;
        }
        Ok(key)
    }

    /// Whether this model can produce `key`: each key attribute's value template (when it has
    /// one) could render the key's value. Used to refuse a delete under one model of a key only
    /// another model produces (for example `Fault` deleting `status#1`).
    pub fn key_fits(&self, key: &ItemKey) -> bool {
        let fits = |attr: &str, value: &str| match self.field(attr).and_then(|f| f.template()) {
            Some(template) => template.could_render(value),
            // A key attribute without a template takes any value; one the model lacks is empty.
            None => self.field(attr).is_some() || value.is_empty(),
        };
        let sort = self.primary.sort.as_deref().unwrap_or_default();
        fits(&self.primary.hash, &key.pk) && fits(sort, &key.sk)
    }

    /// The key when every key attribute the model has is present in `props` as a string (the
    /// reference for `direct_joined`).
    #[cfg(test)]
    fn direct_key(&self, props: &Item) -> Option<ItemKey> {
        let part = |attr: &str| -> Option<String> {
            if self.field(attr).is_none() {
                return Some(String::new());
            }
            props.get(attr)?.as_str().map(str::to_string)
        };
        let pk = part(&self.primary.hash)?;
        let sk = match &self.primary.sort {
            Some(sort) => part(sort)?,
            None => String::new(),
        };
        Some(ItemKey { pk, sk })
    }

    fn check_key_value(&self, attr: &str, value: &str) -> Result<(), ValidationError> {
        // A byte loop: key values are short, and `contains` calls `memchr` (~100 instructions
        // per call here).
        if value.bytes().any(|b| b == 0) {
            return Err(self.err(attr, Reason::InvalidKeyValue));
        }
        Ok(())
    }

    /// Set the timestamp field `stamp` (if maintained) to `now_ms`.
    fn set_stamp(
        &self,
        item: &mut Item,
        stamp: Option<&Field>,
        now_ms: i64,
    ) -> Result<(), ValidationError> {
        let Some(stamp) = stamp else {
            return Ok(());
        };
        let value = self.stamp_value(stamp, now_ms).ok_or_else(|| {
            self.err(
                &stamp.name,
                Reason::Invalid(format!("clock value {now_ms} ms is out of range")),
            )
        })?;
        item.insert(stamp.name.clone(), value);
        Ok(())
    }

    /// A create's two timestamps: one instant, spelled once when both are stored alike (the
    /// usual case), the second a copy of the first.
    fn set_create_stamps(&self, item: &mut Item, now_ms: i64) -> Result<(), ValidationError> {
        let (Some(created), Some(updated)) = (&self.stamps.created, &self.stamps.updated) else {
            self.set_stamp(item, self.stamps.created.as_ref(), now_ms)?;
            return self.set_stamp(item, self.stamps.updated.as_ref(), now_ms);
        };
        if self.stamp_is_iso(created) != self.stamp_is_iso(updated) {
            self.set_stamp(item, Some(created), now_ms)?;
            return self.set_stamp(item, Some(updated), now_ms);
        }
        let value = self.stamp_value(created, now_ms).ok_or_else(|| {
            self.err(
                &created.name,
                Reason::Invalid(format!("clock value {now_ms} ms is out of range")),
            )
        })?;
        item.insert(updated.name.clone(), value.clone());
        item.insert(created.name.clone(), value);
        Ok(())
    }

    /// Final checks shared by create, update and import. Values equal to the ones in
    /// `unchanged_from` (the stored item an update starts from) are not checked again: a value
    /// written under a neighbouring schema version (see [`Model::normalize_from_neighbour`])
    /// stays as it is until it is changed, and does not block updates of other fields.
    fn validate(
        &self,
        item: &Item,
        ctx: &Ctx,
        unchanged_from: Option<&Item>,
    ) -> Result<(), ValidationError> {
        // Gathered in the one pass over the fields: whether an index attribute's string holds
        // a NUL, and the primary key attributes' values.
        let mut nul = false;
        let (mut hash_value, mut sort_value) = (None, None);
        // The fields are sorted by name and the item's entries iterate in key order (the same
        // byte order), so one walk over the entries finds every field's value: a lookup per
        // field searched the map's nodes again for each.
        let mut entries = item.iter().peekable();
        for (i, field) in self.fields.iter().enumerate() {
            let found = value_in_order(&mut entries, &field.name);
            if self.index_attr.get(i).copied().unwrap_or(true) {
                nul |= matches!(found, Some(Value::String(text)) if text.contains('\0'));
            }
            if self.primary_at.0 == Some(i) {
                hash_value = found;
            }
            if self.primary_at.1 == Some(i) {
                sort_value = found;
            }
            let present = found.is_some_and(|v| self.keeps_null(field) || !v.is_null());
            if field.required && !present {
                if field.has_template() {
                    let variable = self.missing_variable(item, &field.name);
                    return Err(self.err(&field.name, Reason::KeyUnresolved { variable }));
                }
                return Err(self.err(&field.name, Reason::Required));
            }
            if let Some(value) = found {
                let unchanged = unchanged_from
                    .and_then(|old| old.get(&field.name))
                    .is_some_and(|old| values_equal(old, value));
                if !unchanged {
                    field.check(value, &field.name, ctx)?;
                }
            }
        }
        // Both checks without rendering (allocating) the key values: a key attribute resolves
        // when its value renders (string, number, boolean), and only a string can hold a NUL.
        // A key attribute the model has no field for is "" (resolves).
        let renders = |value: Option<&Value>| {
            matches!(
                value,
                Some(Value::String(_) | Value::Number(_) | Value::Bool(_))
            )
        };
        let hash_resolves = self.primary_at.0.is_none() || renders(hash_value);
        let sort_resolves = self.primary_at.1.is_none() || renders(sort_value);
        if !hash_resolves || !sort_resolves {
            self.key_of(item)?;
        }
        // The error, in index order, only when the pass above saw a NUL or could not look.
        if !nul && !self.index_attr_elsewhere {
            return Ok(());
        }
        for index in &self.indexes {
            for attr in std::iter::once(&index.hash).chain(index.sort.iter()) {
                if let Some(Value::String(text)) = item.get(attr) {
                    self.check_key_value(attr, text)?;
                }
            }
        }
        Ok(())
    }

    fn check_type_field(&self, value: &Value) -> Result<(), ValidationError> {
        if value.as_str() == Some(self.name.as_str()) {
            return Ok(());
        }
        let found = match value {
            Value::String(s) => s.clone(),
            Value::Null => "none".into(),
            other => describe(other),
        };
        Err(self.err(
            &self.params.type_field,
            Reason::WrongModel {
                expected: self.name.clone(),
                found,
            },
        ))
    }

    /// Compute the stored item for a create; see the crate docs.
    pub fn prepare_create(&self, input: &Item, now_ms: i64) -> Result<Item, ValidationError> {
        let ctx = self.ctx();
        let mut item = Item::new();
        for (key, value) in input {
            match self.field(key) {
                Some(field) if field.has_template() => {}
                Some(field) if value.is_null() => {
                    if self.keeps_null(field) {
                        item.insert(key.clone(), Value::Null);
                    }
                }
                Some(field) => {
                    item.insert(key.clone(), field.cast_checked(value, key, &ctx)?);
                }
                None if *key == self.params.type_field => {
                    if !value.is_null() {
                        self.check_type_field(value)?;
                    }
                }
                // Timestamps are the database's to set: a given value is ignored.
                None if self.stamp(key).is_some() => {}
                None => return Err(self.err(key, Reason::UnknownField)),
            }
        }
        self.finish_create(item, now_ms, &ctx)
    }

    /// [`Model::prepare_create`] of an input the caller gives away: the stored item is the
    /// input's own map, its keys and values kept where they are (cast in place when they are
    /// not in their stored form yet) instead of copied into a new one. The same item and the
    /// same errors (a property test holds the two equal).
    pub fn prepare_create_owned(&self, input: Item, now_ms: i64) -> Result<Item, ValidationError> {
        let ctx = self.ctx();
        let mut item = input;
        // `retain` cannot stop early: after the first error (in key order, as the copying
        // form returns it) the remaining entries are kept unread.
        let mut error = None;
        item.retain(|key, value| {
            if error.is_some() {
                return true;
            }
            match self.field(key) {
                Some(field) if field.has_template() => false,
                Some(field) if value.is_null() => self.keeps_null(field),
                Some(field) => {
                    if let Err(e) = field.cast_checked_in_place(value, key, &ctx) {
                        error = Some(e);
                    }
                    true
                }
                None if *key == self.params.type_field => {
                    if !value.is_null() {
                        error = self.check_type_field(value).err();
                    }
                    false
                }
                // Timestamps are the database's to set: a given value is ignored.
                None if self.stamp(key).is_some() => false,
                None => {
                    error = Some(self.err(key, Reason::UnknownField));
                    true
                }
            }
        });
        if let Some(error) = error {
            return Err(error);
        }
        self.finish_create(item, now_ms, &ctx)
    }

    /// What a create adds to the given fields: defaults, generated ids, the type, the
    /// timestamps, the templates; then the whole item is validated.
    fn finish_create(
        &self,
        mut item: Item,
        now_ms: i64,
        ctx: &Ctx,
    ) -> Result<Item, ValidationError> {
        for field in self
            .filled_fields
            .iter()
            .filter_map(|&i| self.fields.get(i))
        {
            if item.contains_key(&field.name) {
                continue;
            }
            if let Some(default) = &field.default {
                item.insert(field.name.clone(), default.clone());
            } else if let Some(id) = field.generate_value(now_ms) {
                item.insert(field.name.clone(), id);
            }
        }
        item.insert(
            self.params.type_field.clone(),
            Value::String(self.name.clone()),
        );
        self.set_create_stamps(&mut item, now_ms)?;
        self.apply_templates(&mut item, false)?;
        self.validate(&item, ctx, None)?;
        Ok(item)
    }

    /// Field names the primary key depends on (key attributes and, transitively, their variables).
    fn key_dependencies(&self) -> BTreeSet<String> {
        let mut deps = BTreeSet::new();
        let mut todo: Vec<String> = std::iter::once(self.primary.hash.clone())
            .chain(self.primary.sort.clone())
            .collect();
        while let Some(name) = todo.pop() {
            if !deps.insert(name.clone()) {
                continue;
            }
            if let Some(template) = self.field(&name).and_then(Field::template) {
                todo.extend(template.variables().map(str::to_string));
            }
        }
        deps
    }

    /// Partial update; see the crate docs.
    pub fn prepare_update(
        &self,
        existing: &Item,
        input: &Item,
        now_ms: i64,
    ) -> Result<Item, ValidationError> {
        let mut item = self.update_input(existing, input)?;
        // Generated ids, the type and the update time are set before the templates render, so
        // they render once. The general path renders before and after setting them (its key
        // check sees a changed generated id, and a key built from a timestamp); it still
        // answers those two cases, which no ordinary update meets.
        let generated_changed = self
            .fields
            .iter()
            .filter(|f| f.generate.is_some())
            .any(|f| {
                existing
                    .get(&f.name)
                    .is_some_and(|v| item.get(&f.name) != Some(v))
            });
        if generated_changed || self.key_uses_stamp {
            return self.finish_update_general(existing, input, item, now_ms);
        }
        item.insert(
            self.params.type_field.clone(),
            Value::String(self.name.clone()),
        );
        self.set_stamp(&mut item, self.stamps.updated.as_ref(), now_ms)?;
        self.apply_templates(&mut item, false)?;
        if !self.same_key(existing, &item) {
            return Err(self.key_change(existing, input, &item));
        }
        self.validate(&item, &self.ctx(), Some(existing))?;
        Ok(item)
    }

    /// [`Model::prepare_update`] as first written, for the comparison test.
    #[cfg(test)]
    fn prepare_update_general(
        &self,
        existing: &Item,
        input: &Item,
        now_ms: i64,
    ) -> Result<Item, ValidationError> {
        let item = self.update_input(existing, input)?;
        self.finish_update_general(existing, input, item, now_ms)
    }

    /// `existing` with the fields of `input` cast, checked and applied (templated fields are
    /// left to the templates).
    fn update_input(&self, existing: &Item, input: &Item) -> Result<Item, ValidationError> {
        let ctx = self.ctx();
        if let Some(t) = existing.get(&self.params.type_field) {
            self.check_type_field(t)?;
        }
        let mut item = existing.clone();
        for (key, value) in input {
            let Some(field) = self.field(key) else {
                if *key == self.params.type_field {
                    if !value.is_null() {
                        self.check_type_field(value)?;
                    }
                    continue;
                }
                if self.stamp(key).is_some() {
                    continue;
                }
                return Err(self.err(key, Reason::UnknownField));
            };
            let new = if value.is_null() {
                if field.required && !self.keeps_null(field) {
                    return Err(self.err(key, Reason::Required));
                }
                self.keeps_null(field).then_some(Value::Null)
            } else if let (true, Value::Object(add), Some(Value::Object(stored))) =
                (field.merges(), value, existing.get(key))
            {
                let inner = field.schema.as_deref().unwrap_or_default();
                let merged = merge_partial(inner, stored, add, self.params.nulls);
                Some(field.cast_checked(&Value::Object(merged), key, &ctx)?)
            } else {
                Some(field.cast_checked(value, key, &ctx)?)
            };
            let same = match (&new, existing.get(key)) {
                (Some(a), Some(b)) => values_equal(a, b),
                (None, None) => true,
                _ => false,
            };
            if field.has_template() {
                // Recomputed below; a different value for a key attribute is a key change.
                let is_key =
                    *key == self.primary.hash || self.primary.sort.as_deref() == Some(key.as_str());
                if is_key && !same && new.is_some() {
                    return Err(self.err(key, Reason::KeyChange));
                }
                continue;
            }
            if field.readonly && !same {
                return Err(self.err(key, Reason::ReadOnly));
            }
            match new {
                Some(v) => item.insert(key.clone(), v),
                None => item.remove(key),
            };
        }
        Ok(item)
    }

    /// Whether `a` and `b` have the same primary key, when both keys resolve (an item whose key
    /// does not resolve has no key to change). [`Model::key_of`] without its allocations.
    fn same_key(&self, a: &Item, b: &Item) -> bool {
        let sort = self.primary.sort.as_deref();
        let key = |item| {
            let pk = self.key_part_ref(item, &self.primary.hash)?;
            let sk = match sort {
                Some(sort) => self.key_part_ref(item, sort)?,
                None => Cow::Borrowed(""),
            };
            Some((pk, sk))
        };
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
    }

    /// [`Model::key_part`] borrowed from `item` when it is a string; `None` when unresolved.
    fn key_part_ref<'a>(&self, item: &'a Item, attr: &str) -> Option<Cow<'a, str>> {
        if self.field(attr).is_none() {
            return Some(Cow::Borrowed(""));
        }
        match item.get(attr)? {
            Value::String(text) => Some(Cow::Borrowed(text)),
            other => render_value(other).map(Cow::Owned),
        }
    }

    /// The error of an update that changes the key: named after the first given key
    /// dependency whose value changed.
    fn key_change(&self, existing: &Item, input: &Item, item: &Item) -> ValidationError {
        let deps = self.key_dependencies();
        let culprit = input
            .keys()
            .find(|k| deps.contains(*k) && item.get(*k) != existing.get(*k))
            .cloned()
            .unwrap_or_else(|| self.primary.hash.clone());
        self.err(culprit, Reason::KeyChange)
    }

    /// The rest of [`Model::prepare_update`] as first written (templates rendered before and
    /// after restoring generated ids and setting the update time), for an `item` with `input`
    /// applied.
    fn finish_update_general(
        &self,
        existing: &Item,
        input: &Item,
        mut item: Item,
        now_ms: i64,
    ) -> Result<Item, ValidationError> {
        let ctx = self.ctx();
        let old_key = self.key_of(existing).ok();
        self.apply_templates(&mut item, false)?;
        if let Some(old) = &old_key {
            if let Ok(new) = self.key_of(&item) {
                if &new != old {
                    return Err(self.key_change(existing, input, &item));
                }
            }
        }
        // Generated ids, the type and the creation time are kept.
        for field in self.fields.iter().filter(|f| f.generate.is_some()) {
            if let Some(v) = existing.get(&field.name) {
                item.insert(field.name.clone(), v.clone());
            }
        }
        item.insert(
            self.params.type_field.clone(),
            Value::String(self.name.clone()),
        );
        self.set_stamp(&mut item, self.stamps.updated.as_ref(), now_ms)?;
        self.apply_templates(&mut item, false)?;
        self.validate(&item, &ctx, Some(existing))?;
        Ok(item)
    }

    /// Validate and normalize a complete item from elsewhere; see the crate docs.
    pub fn normalize_stored(&self, item: Item) -> Result<Item, ValidationError> {
        self.normalize(item, &self.ctx())
    }

    /// [`Model::normalize_stored`] for an item written by a peer that may run a neighbouring
    /// version of the schema (a cloud or a device upgraded before or after this one): fields
    /// this model does not define and enum values it does not list are kept as they are, so
    /// an item of a compatible newer schema (added optional fields, widened enums) is stored
    /// whole and reaches this side's peers unchanged. Types, keys, templates, required fields
    /// and patterns are checked as always. Returns the item and, when the strict check would
    /// have refused it, that refusal (what was kept), for the caller to count.
    pub fn normalize_from_neighbour(
        &self,
        item: Item,
    ) -> Result<(Item, Option<ValidationError>), ValidationError> {
        match self.normalize(item.clone(), &self.ctx()) {
            Ok(item) => Ok((item, None)),
            Err(strict) => {
                let ctx = Ctx {
                    neighbour: true,
                    ..self.ctx()
                };
                let item = self.normalize(item, &ctx)?;
                Ok((item, Some(strict)))
            }
        }
    }

    fn normalize(&self, item: Item, ctx: &Ctx) -> Result<Item, ValidationError> {
        self.check_type_field(item.get(&self.params.type_field).unwrap_or(&Value::Null))?;
        let mut out = Item::new();
        for (key, value) in item {
            if key == self.params.type_field {
                out.insert(key, value);
                continue;
            }
            if value.is_null() {
                let keep = match (self.field(&key), self.stamp(&key)) {
                    (Some(field), _) => self.keeps_null(field),
                    (None, Some(_)) => self.params.nulls,
                    (None, None) if ctx.neighbour => true,
                    (None, None) => return Err(self.err(&key, Reason::UnknownField)),
                };
                if keep {
                    out.insert(key, Value::Null);
                }
                continue;
            }
            if let Some(stamp) = self.stamp(&key) {
                let stored = date_ms(&value)
                    .and_then(|ms| self.stamp_value(stamp, ms))
                    .ok_or_else(|| {
                        self.err(
                            &key,
                            Reason::WrongType {
                                expected: stamp.ty.name().into(),
                                found: describe(&value),
                            },
                        )
                    })?;
                out.insert(key, stored);
                continue;
            }
            let Some(field) = self.field(&key) else {
                if ctx.neighbour {
                    out.insert(key, value);
                    continue;
                }
                return Err(self.err(&key, Reason::UnknownField));
            };
            let cast = field.cast_checked(&value, &key, ctx)?;
            out.insert(key, cast);
        }
        for &i in &self.template_order {
            let Some(field) = self.fields.get(i) else {
                continue;
            };
            let Some(template) = field.template() else {
                continue;
            };
            let held = out
                .get(&field.name)
                .filter(|v| !v.is_null())
                .and_then(render_value);
            match (template.render(|var| self.variable(&out, var)), held) {
                (Rendered::Full(text), None) => {
                    let value = field.cast(&Value::String(text), &field.name, ctx)?;
                    out.insert(field.name.clone(), value);
                }
                (Rendered::Full(text), Some(found)) if text == found => {}
                (Rendered::Full(text), Some(found)) => {
                    return Err(self.err(
                        &field.name,
                        Reason::TemplateMismatch {
                            expected: text,
                            found,
                        },
                    ));
                }
                (Rendered::Partial { .. }, None) => {}
                (Rendered::Partial { missing, .. }, Some(found)) => {
                    let expected = format!("nothing (`{missing}` is missing)");
                    return Err(self.err(&field.name, Reason::TemplateMismatch { expected, found }));
                }
            }
        }
        self.validate(&out, ctx, None)?;
        Ok(out)
    }

    /// Copy of the item without hidden fields unless `include_hidden`.
    /// Removes the hidden fields from an owned item, in place (cheaper than [`Model::project`]
    /// when the caller owns the item anyway).
    pub fn strip_hidden(&self, item: &mut Item) {
        for name in &self.hidden_names {
            item.remove(name);
        }
    }

    pub fn project(&self, item: &Item, include_hidden: bool) -> Item {
        if include_hidden {
            return item.clone();
        }
        item.iter()
            .filter(|(k, _)| !self.is_hidden(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// (hash, sort) values of `index` for a stored item, or None when the item is not in
    /// that (sparse) index. Numbers render as in templates (`3`, `2.5`): lexical order of the
    /// rendered keys is not numeric order. The sort value is `""` for an index without sort;
    /// for the primary index a model without a field for a key attribute gets `""`.
    pub fn index_key(&self, item: &Item, index: &Index) -> Option<(String, String)> {
        self.index_key_ref(item, index)
            .map(|(hash, sort)| (hash.into_owned(), sort.into_owned()))
    }

    /// [`Model::index_key`] borrowed from `item` where the values are strings (the usual
    /// case: templated key attributes), for callers that only encode or compare them.
    pub fn index_key_ref<'a>(
        &self,
        item: &'a Item,
        index: &Index,
    ) -> Option<(Cow<'a, str>, Cow<'a, str>)> {
        let primary = index.name == self.primary.name;
        let part = |attr: &str| match item.get(attr) {
            Some(Value::String(text)) => Some(Cow::Borrowed(text.as_str())),
            Some(other) => match render_value(other) {
                Some(text) => Some(Cow::Owned(text)),
                None if primary && self.field(attr).is_none() => Some(Cow::Borrowed("")),
                None => None,
            },
            None if primary && self.field(attr).is_none() => Some(Cow::Borrowed("")),
            None => None,
        };
        let hash = part(&index.hash)?;
        let sort = match &index.sort {
            Some(sort) => part(sort)?,
            None => Cow::Borrowed(""),
        };
        Some((hash, sort))
    }

    /// Expiry in epoch milliseconds from the TTL field (stored as epoch seconds), if present.
    pub fn expires_at_ms(&self, item: &Item) -> Option<i64> {
        let value = item.get(self.ttl.as_deref()?)?;
        ttl_expiry_ms(match value {
            Value::Number(n) => match n.as_i64() {
                Some(secs) => TtlValue::Int(secs),
                None => TtlValue::Float(n.as_f64()?),
            },
            Value::String(s) => TtlValue::Text(s),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FieldType, Schema};
    use serde_json::json;

    const SCHEMA: &str = r#"{
      format: 'onetable:1.1.0', version: '1',
      indexes: {primary: {hash: 'pk', sort: 'sk'}, gs1: {hash: 'gs1pk', sort: 'gs1sk'}, ls1: {type: 'local', sort: 'n'}},
      params: {PARAMS},
      models: {
        Thing: {
          pk: {type: 'string', value: 'thing#${owner}'},
          sk: {type: 'string', value: 'thing#${kind}#${id}'},
          id: {type: 'string', generate: 'uuid'},
          owner: {type: 'string', required: true},
          kind: {type: 'string', enum: ['a', 'b'], default: 'a'},
          n: {type: 'number'},
          flag: {type: 'boolean'},
          when: {type: 'date'},
          args: {type: 'object', schema: {x: {type: 'number', required: true}, y: {type: 'string'}}},
          tags: {type: 'array', items: {type: 'string'}},
          blob: {type: 'binary'},
          code: {type: 'string', validate: '/^[A-Z]{3}$/', readonly: true},
          gs1pk: {type: 'string', value: 'kind#${kind}'},
          gs1sk: {type: 'string', value: '${sk}#${n}'},
          secret: {type: 'string', hidden: true},
          shown: {type: 'string', value: 'x${owner}', hidden: false},
          expires: {type: 'number', ttl: true},
        },
        Raw: {pk: {type: 'string'}, sk: {type: 'string'}, v: {type: 'number'}},
        NoHash: {sk: {type: 'string', value: 'nohash#${name}'}, name: {type: 'string'}},
      }
    }"#;

    const NOW: i64 = 1_795_629_600_000;
    const LATER: i64 = 1_795_629_601_000;

    fn schema(params: &str) -> Schema {
        Schema::from_json5(&SCHEMA.replace("PARAMS", params)).unwrap()
    }

    fn item(v: Value) -> Item {
        v.as_object().cloned().unwrap_or_default()
    }

    /// Run `f` against model `name` of the schema with `params` and compare with `expected`.
    fn check<T: PartialEq + std::fmt::Debug>(
        params: &str,
        name: &str,
        f: impl Fn(&Model) -> T,
        expected: T,
    ) {
        let s = schema(params);
        let model = s.model(name).unwrap();
        assert_eq!(f(model), expected);
    }

    fn create(params: &str, input: Value) -> Result<Item, ValidationError> {
        let s = schema(params);
        let model = s.model("Thing").unwrap();
        model.prepare_create(&item(input), NOW)
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T, ValidationError>) -> (String, Reason) {
        let e = r.unwrap_err();
        (e.field, e.reason)
    }

    const TS: &str = "timestamps: true";

    #[test]
    fn create_computes_templates_defaults_and_timestamps() {
        let got = create(TS, json!({"owner": "o1", "id": "i1"})).unwrap();
        assert_eq!(
            Value::Object(got),
            json!({"_type": "Thing", "pk": "thing#o1", "sk": "thing#a#i1", "id": "i1", "owner": "o1", "kind": "a",
                   "gs1pk": "kind#a", "shown": "xo1", "created": NOW, "updated": NOW})
        );
    }

    #[test]
    fn create_template_over_templated_field() {
        let got = create(TS, json!({"owner": "o1", "id": "i1", "n": 5})).unwrap();
        assert_eq!(got["gs1sk"], json!("thing#a#i1#5"));
    }

    #[test]
    fn create_generates_uuid() {
        let got = create("", json!({"owner": "o1"})).unwrap();
        let id = got["id"].as_str().unwrap_or_default().to_string();
        assert_eq!(id.len(), 36);
        assert_eq!(got["sk"], json!(format!("thing#a#{id}")));
        assert!(
            !got.contains_key("created"),
            "no timestamps unless params.timestamps"
        );
    }

    #[test]
    fn create_ignores_given_template_values() {
        let got = create(
            "",
            json!({"owner": "o1", "id": "i1", "pk": "evil", "sk": "evil"}),
        )
        .unwrap();
        assert_eq!(
            (got["pk"].clone(), got["sk"].clone()),
            (json!("thing#o1"), json!("thing#a#i1"))
        );
    }

    #[test]
    fn create_casts_every_type() {
        let got = create(
            "",
            json!({"owner": 7, "id": "i", "n": "2.5", "flag": "true", "when": "2026-11-25T18:00:00Z",
                   "args": {"x": "1"}, "tags": [1, true], "blob": "aGk=", "code": "ABC"}),
        )
        .unwrap();
        assert_eq!(got["owner"], json!("7"));
        assert_eq!(got["n"], json!(2.5));
        assert_eq!(got["flag"], json!(true));
        assert_eq!(got["when"], json!(NOW));
        assert_eq!(got["args"], json!({"x": 1}));
        assert_eq!(got["tags"], json!(["1", "true"]));
        assert_eq!(got["blob"], json!("aGk="));
    }

    #[test]
    fn create_iso_dates() {
        let got = create(
            "isoDates: true, timestamps: true",
            json!({"owner": "o", "id": "i", "when": NOW}),
        )
        .unwrap();
        assert_eq!(got["when"], json!("2026-11-25T18:00:00.000Z"));
        assert_eq!(got["created"], json!("2026-11-25T18:00:00.000Z"));
        assert_eq!(got["updated"], json!("2026-11-25T18:00:00.000Z"));
    }

    #[test]
    fn create_errors() {
        let cases = [
            (json!({"id": "i"}), "owner", Reason::Required),
            (
                json!({"owner": "o", "bogus": 1}),
                "bogus",
                Reason::UnknownField,
            ),
            (
                json!({"owner": "o", "n": "x"}),
                "n",
                Reason::WrongType {
                    expected: "number".into(),
                    found: "string \"x\"".into(),
                },
            ),
            (
                json!({"owner": "o", "args": {"y": "q"}}),
                "args.x",
                Reason::Required,
            ),
            (
                json!({"owner": "o", "args": {"x": 1, "z": 2}}),
                "args.z",
                Reason::UnknownField,
            ),
            (
                json!({"owner": "o", "code": "abc"}),
                "code",
                Reason::Pattern {
                    pattern: "/^[A-Z]{3}$/".into(),
                },
            ),
            (json!({"owner": "a\u{0}b"}), "pk", Reason::InvalidKeyValue),
            (
                json!({"owner": "o", "_type": "Other"}),
                "_type",
                Reason::WrongModel {
                    expected: "Thing".into(),
                    found: "Other".into(),
                },
            ),
            (
                json!({"owner": "o", "when": "someday"}),
                "when",
                Reason::WrongType {
                    expected: "date".into(),
                    found: "string \"someday\"".into(),
                },
            ),
            (
                json!({"owner": "o", "blob": "%%%"}),
                "blob",
                Reason::Invalid("binary values must be base64 strings".into()),
            ),
        ];
        for (input, field, reason) in cases {
            assert_eq!(
                err_of(create("", input.clone())),
                (field.to_string(), reason),
                "{input}"
            );
        }
        let (field, reason) = err_of(create("", json!({"owner": "o", "kind": "c"})));
        assert_eq!(field, "kind");
        assert!(matches!(reason, Reason::NotInEnum { .. }));
    }

    #[test]
    fn create_timestamps_in_input_are_ignored() {
        let got = create(
            TS,
            json!({"owner": "o", "id": "i", "created": 5, "_type": "Thing"}),
        )
        .unwrap();
        assert_eq!(got["created"], json!(NOW));
        let (field, _) = err_of(create("", json!({"owner": "o", "created": 5})));
        assert_eq!(field, "created", "created is unknown without timestamps");
    }

    #[test]
    fn nulls_dropped_by_default() {
        let got = create(
            "",
            json!({"owner": "o", "id": "i", "n": null, "kind": null}),
        )
        .unwrap();
        assert!(!got.contains_key("n"));
        assert_eq!(got["kind"], json!("a"), "a dropped null gets the default");
        assert_eq!(
            err_of(create("", json!({"owner": null}))),
            ("owner".to_string(), Reason::Required)
        );
    }

    #[test]
    fn nulls_stored_when_enabled() {
        let got = create(
            "nulls: true",
            json!({"owner": "o", "id": "i", "n": null, "args": {"x": 1, "y": null}}),
        )
        .unwrap();
        assert_eq!(got["n"], Value::Null);
        assert_eq!(got["args"], json!({"x": 1, "y": null}));
    }

    #[test]
    fn ttl_stored_as_epoch_seconds() {
        let s = schema("isoDates: true");
        let m = s.model("Thing").unwrap();
        let got = m
            .prepare_create(
                &item(json!({"owner": "o", "id": "i", "expires": "2026-11-25T18:00:00.000Z"})),
                NOW,
            )
            .unwrap();
        assert_eq!(got["expires"], json!(NOW / 1000));
        assert_eq!(m.expires_at_ms(&got), Some(NOW));
        assert_eq!(m.ttl_field(), Some("expires"));
        assert_eq!(m.expires_at_ms(&item(json!({"expires": 10}))), Some(10_000));
        assert_eq!(m.expires_at_ms(&item(json!({}))), None);
    }

    #[test]
    fn primary_key_from_props() {
        let key = |k: &str, v: &str| ItemKey {
            pk: k.into(),
            sk: v.into(),
        };
        check(
            "",
            "Thing",
            |m| m.primary_key(&item(json!({"owner": "o", "kind": "b", "id": "i"}))),
            Ok(key("thing#o", "thing#b#i")),
        );
        check(
            "",
            "Thing",
            |m| m.primary_key(&item(json!({"pk": "P", "sk": "S"}))),
            Ok(key("P", "S")),
        );
        check(
            "",
            "Raw",
            |m| m.primary_key(&item(json!({"pk": "a", "sk": "b"}))),
            Ok(key("a", "b")),
        );
        check(
            "",
            "NoHash",
            |m| m.primary_key(&item(json!({"name": "n"}))),
            Ok(key("", "nohash#n")),
        );
    }

    /// A schema whose keys depend on non-string, templated, chained and type-field values,
    /// for the comparison of the two key paths below.
    const KEYS_SCHEMA: &str = r#"{
      format: 'onetable:1.1.0', version: '1',
      indexes: {primary: {hash: 'pk', sort: 'sk'}},
      models: {
        Num: {
          pk: {type: 'string', value: '${_type}#${n}#${flag}'},
          sk: {type: 'string', value: '${mid}#${when}'},
          mid: {type: 'string', value: 'm${name}'},
          n: {type: 'number'}, flag: {type: 'boolean'}, when: {type: 'date'},
          name: {type: 'string'}, other: {type: 'number'}, obj: {type: 'object'},
        },
        Typed: {
          pk: {type: 'number', value: '${n}'},
          sk: {type: 'string', value: '${pk}-${name}'},
          n: {type: 'number'}, name: {type: 'string'},
        },
        Same: {pk: {type: 'string', value: 'x${a}'}, sk: {type: 'string', value: 'y${a}'}, a: {type: 'string'}},
        Chain: {pk: {type: 'string', value: 'c#${name}'}, sk: {type: 'string', value: '${pk}#${n}'}, name: {type: 'string'}, n: {type: 'number'}},
        Loose: {pk: {type: 'string', value: 'l#${_type}'}, sk: {type: 'string'}},
      }
    }"#;

    /// Property values of every JSON kind, with strings that do and do not cast to numbers,
    /// booleans and dates.
    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        // Weighted to strings and numbers, so that most cases resolve a key.
        prop_oneof![
            1 => Just(Value::Null),
            2 => any::<bool>().prop_map(Value::Bool),
            3 => any::<i32>().prop_map(|n| json!(n)),
            1 => (-1e6f64..1e6).prop_map(|f| json!(f)),
            1 => Just(json!(3.0)),
            8 => prop::sample::select(vec![
                "", "a", "b", "7", "-2.5", "true", "false", "x\u{0}y", "2026-11-25T18:00:00.000Z",
                "thing#o", "m", "P",
            ])
            .prop_map(|s| json!(s)),
            1 => Just(json!({"k": 1})),
            1 => Just(json!([1])),
            // Past a `KeyBuf`'s inline room.
            1 => Just(json!("l".repeat(crate::KEY_INLINE))),
        ]
    }

    /// The item of those `names` whose `present` flag is set, with their `values` (a property
    /// test's random item).
    fn present_of(names: &[&str], values: &[Value], present: &[bool]) -> Item {
        names
            .iter()
            .zip(values.iter().zip(present))
            .filter(|(_, (_, p))| **p)
            .map(|(n, (v, _))| (n.to_string(), v.clone()))
            .collect()
    }

    /// The test schemas, each with the models the property tests run over.
    fn test_schemas() -> [(Schema, &'static [&'static str]); 2] {
        [
            (
                Schema::from_json5(&SCHEMA.replace("PARAMS", "")).unwrap(),
                &["Thing", "Raw", "NoHash"],
            ),
            (
                Schema::from_json5(KEYS_SCHEMA).unwrap(),
                &["Num", "Typed", "Same", "Chain", "Loose"],
            ),
        ]
    }

    proptest::proptest! {
        /// `primary_key` renders the key straight from the properties; the general path (an
        /// item of the cast key properties, templates applied) is the reference: same key or
        /// same error for any properties.
        #[test]
        fn rendered_key_matches_the_general_path(
            values in proptest::collection::vec(any_value(), 12),
            present in proptest::collection::vec(proptest::bool::weighted(0.8), 12),
        ) {
            let names = ["pk", "sk", "owner", "kind", "id", "n", "flag", "when", "name", "mid", "other", "a"];
            let props = present_of(&names, &values, &present);
            for (s, models) in test_schemas() {
                for name in models {
                    let m = s.model(name).unwrap();
                    // The reference: `primary_key` before the rendered path (direct keys,
                    // checked for NUL, first, then the general path).
                    let reference = match m.direct_key(&props) {
                        Some(k) => m
                            .check_key_value(&m.primary.hash, &k.pk)
                            .and_then(|()| {
                                let sort = m.primary.sort.as_deref().unwrap_or_default();
                                m.check_key_value(sort, &k.sk)
                            })
                            .map(|()| k),
                        None => m.primary_key_general(&props),
                    };
                    proptest::prop_assert_eq!(
                        m.primary_key(&props),
                        reference.clone(),
                        "model {} props {:?}", name, props
                    );
                    // The joined form holds the same parts, NUL between them.
                    let joined = reference.map(|k| {
                        let mut bytes = k.pk.into_bytes();
                        bytes.push(0);
                        bytes.extend_from_slice(k.sk.as_bytes());
                        bytes
                    });
                    proptest::prop_assert_eq!(
                        m.primary_key_joined(&props).map(JoinedKey::into_bytes),
                        joined,
                        "model {} props {:?}", name, props
                    );
                    // The stack form holds the same parts.
                    let parts = |k: KeyBuf| (k.pk_bytes().to_vec(), k.sk_bytes().to_vec());
                    let joined_parts = |k: JoinedKey| (k.pk().as_bytes().to_vec(), k.sk().as_bytes().to_vec());
                    proptest::prop_assert_eq!(
                        m.primary_key_buf(&props).map(parts),
                        m.primary_key_joined(&props).map(joined_parts),
                        "model {} props {:?}", name, props
                    );
                    // The properties that are strings, given as (name, text) pairs: the key
                    // (or error) of the item they make; a repeated name, the later wins.
                    let mut pairs: Vec<(&str, &str)> = props
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                        .collect();
                    for _ in 0..2 {
                        let as_item: Item = pairs
                            .iter()
                            .map(|&(k, v)| (k.to_string(), json!(v)))
                            .collect();
                        proptest::prop_assert_eq!(
                            m.primary_key_buf_of(&pairs).map(parts),
                            m.primary_key_joined(&as_item).map(joined_parts),
                            "model {} pairs {:?}", name, pairs
                        );
                        let Some(&(first, _)) = pairs.first() else { break };
                        pairs.push((first, "7"));
                    }
                }
            }
        }
    }

    proptest::proptest! {
        // More cases than the default: most random inputs end in an error of both paths.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// `prepare_update` renders the templates once, after setting the generated ids, the
        /// type and the update time; the update as first written (render, key check, set them,
        /// render again) is the reference: same item or same error for any input.
        #[test]
        fn update_matches_the_general_path(
            values in proptest::collection::vec(any_value(), 12),
            present in proptest::collection::vec(proptest::bool::weighted(0.3), 12),
            same_id in proptest::prelude::any::<bool>(),
        ) {
            let names = ["owner", "kind", "id", "n", "flag", "when", "code", "name", "v", "sk", "gs1pk", "updated"];
            let input = present_of(&names, &values, &present);
            let s = schema(TS);
            for (name, create) in [
                ("Thing", json!({"owner": "o", "kind": "b", "n": 7, "code": "ABC", "when": NOW})),
                ("Raw", json!({"pk": "a", "sk": "b", "v": 1})),
                ("NoHash", json!({"name": "z"})),
            ] {
                let m = s.model(name).unwrap();
                let existing = m.prepare_create(&item(create), NOW).unwrap();
                // This model's fields (an unknown one is an early error of both paths).
                let mut input: Item = input
                    .iter()
                    .filter(|(k, _)| m.field(k).is_some() || *k == "updated")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if same_id {
                    if let Some(id) = existing.get("id") {
                        input.insert("id".into(), id.clone());
                    }
                }
                proptest::prop_assert_eq!(
                    m.prepare_update(&existing, &input, LATER),
                    m.prepare_update_general(&existing, &input, LATER),
                    "model {} input {:?}", name, input
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// `prepare_create_owned` keeps the input's own map and casts in place: the same item
        /// or the same error as the copying `prepare_create`, for any input of every model
        /// (unknown fields, the type field and timestamps included).
        #[test]
        fn create_by_value_matches_the_copying_create(
            values in proptest::collection::vec(any_value(), 14),
            present in proptest::collection::vec(proptest::bool::weighted(0.6), 14),
            with_id in proptest::prelude::any::<bool>(),
            unknown in proptest::bool::weighted(0.1),
        ) {
            let names = ["owner", "kind", "id", "n", "flag", "when", "code", "name", "v", "sk", "gs1pk", "created", "_type", "pk"];
            let all = present_of(&names, &values, &present);
            for params in ["", TS, "nulls: true, isoDates: true"] {
                let s = schema(params);
                for name in ["Thing", "Raw", "NoHash"] {
                    let m = s.model(name).unwrap();
                    // This model's fields, the type and a timestamp; rarely an unknown one
                    // (an early error of both forms).
                    let mut input: Item = all
                        .iter()
                        .filter(|(k, _)| m.field(k).is_some() || *k == "_type" || *k == "created")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    if unknown {
                        input.insert("zzz".into(), json!(1));
                    }
                    if with_id {
                        // A generated id is random: given, so that both forms see the same one.
                        input.insert("id".into(), json!("the-id"));
                    }
                    let copied = m.prepare_create(&input, NOW);
                    if m.field("id").is_some_and(|f| f.generate().is_some()) && !with_id {
                        // Both fail the same way or both succeed (with different random ids).
                        let owned = m.prepare_create_owned(input.clone(), NOW);
                        proptest::prop_assert_eq!(copied.is_ok(), owned.is_ok());
                        if let (Err(a), Err(b)) = (copied, owned) {
                            proptest::prop_assert_eq!(a, b);
                        }
                        continue;
                    }
                    proptest::prop_assert_eq!(
                        m.prepare_create_owned(input.clone(), NOW),
                        copied,
                        "model {} params {:?} input {:?}", name, params, input
                    );
                }
            }
        }
    }

    /// [`Model::index_key`] as first written (every value rendered into a new string): the
    /// reference for [`Model::index_key_ref`].
    fn index_key_general(m: &Model, item: &Item, index: &Index) -> Option<(String, String)> {
        let primary = index.name == m.primary.name;
        let part = |attr: &str| match item.get(attr).and_then(render_value) {
            Some(text) => Some(text),
            None if primary && m.field(attr).is_none() => Some(String::new()),
            None => None,
        };
        let hash = part(&index.hash)?;
        let sort = match &index.sort {
            Some(sort) => part(sort)?,
            None => String::new(),
        };
        Some((hash, sort))
    }

    /// [`Model::validate`] as first written (each check looks its values up by name): the
    /// reference for the one-pass form.
    fn validate_general(m: &Model, item: &Item) -> Result<(), ValidationError> {
        let ctx = m.ctx();
        for field in &m.fields {
            let present = item
                .get(&field.name)
                .is_some_and(|v| m.keeps_null(field) || !v.is_null());
            if field.required && !present {
                if field.has_template() {
                    let variable = m.missing_variable(item, &field.name);
                    return Err(m.err(&field.name, Reason::KeyUnresolved { variable }));
                }
                return Err(m.err(&field.name, Reason::Required));
            }
            if let Some(value) = item.get(&field.name) {
                field.check(value, &field.name, &ctx)?;
            }
        }
        let resolves = |attr: &str| {
            m.field(attr).is_none()
                || matches!(
                    item.get(attr),
                    Some(Value::String(_) | Value::Number(_) | Value::Bool(_))
                )
        };
        if !resolves(&m.primary.hash) || !m.primary.sort.as_deref().is_none_or(resolves) {
            m.key_of(item)?;
        }
        for index in &m.indexes {
            for attr in std::iter::once(&index.hash).chain(index.sort.iter()) {
                if let Some(Value::String(text)) = item.get(attr) {
                    m.check_key_value(attr, text)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn items_iterate_in_key_order() {
        // `validate` walks an item's entries in order beside the sorted fields: that needs
        // serde_json's map to be ordered by key (its `preserve_order` feature would make it
        // keep insertion order, and this test fail).
        let mut item = Item::new();
        for key in ["b", "a", "ab", "B", "_type"] {
            item.insert(key.into(), json!(1));
        }
        let keys: Vec<&str> = item.keys().map(String::as_str).collect();
        assert_eq!(keys, ["B", "_type", "a", "ab", "b"]);
    }

    proptest::proptest! {
        /// `validate` checks every field in one pass: the same answer (the same first error)
        /// as looking each value up for each check, for any item of every model.
        #[test]
        fn one_pass_validation_matches_the_lookups(
            values in proptest::collection::vec(any_value(), 12),
            present in proptest::collection::vec(proptest::bool::weighted(0.7), 12),
        ) {
            let names = ["pk", "sk", "gs1pk", "gs1sk", "owner", "kind", "id", "n", "name", "code", "_type", "created"];
            let stored = present_of(&names, &values, &present);
            for (s, models) in test_schemas() {
                for name in models {
                    let m = s.model(name).unwrap();
                    proptest::prop_assert_eq!(
                        m.validate(&stored, &m.ctx(), None),
                        validate_general(m, &stored),
                        "model {} item {:?}", name, stored
                    );
                }
            }
        }
    }

    proptest::proptest! {
        /// `index_key_ref` borrows string values instead of rendering them: the same values
        /// (or the same absence) as the rendering path, for any item and every index.
        #[test]
        fn borrowed_index_key_matches_the_rendered_one(
            values in proptest::collection::vec(any_value(), 7),
            present in proptest::collection::vec(proptest::bool::weighted(0.7), 7),
        ) {
            let names = ["pk", "sk", "gs1pk", "gs1sk", "n", "owner", "name"];
            let stored = present_of(&names, &values, &present);
            let s = Schema::from_json5(&SCHEMA.replace("PARAMS", "")).unwrap();
            for name in ["Thing", "Raw", "NoHash"] {
                let m = s.model(name).unwrap();
                for index in ["primary", "gs1", "ls1"] {
                    let index = s.index(index).unwrap();
                    let got = m
                        .index_key_ref(&stored, index)
                        .map(|(h, k)| (h.into_owned(), k.into_owned()));
                    proptest::prop_assert_eq!(
                        got,
                        index_key_general(m, &stored, index),
                        "model {} index {} item {:?}", name, index.name, stored
                    );
                }
            }
        }
    }

    #[test]
    fn planned_key_covers_non_string_and_chained_keys() {
        let s = Schema::from_json5(KEYS_SCHEMA).unwrap();
        let m = s.model("Num").unwrap();
        let props =
            item(json!({"n": "7", "flag": true, "when": 1_795_629_600_000i64, "name": "z"}));
        // Rendered by the plan (not the general path), and equal to it.
        let fast = m
            .planned_key(&props)
            .expect("rendered without the general path");
        assert_eq!(Ok(fast.to_item_key()), m.primary_key_general(&props));
        assert_eq!(fast.pk(), "Num#7#true");
        assert!(fast.sk().starts_with("mz#"), "{}", fast.sk());
        assert_eq!(fast.as_bytes().len(), fast.pk().len() + 1 + fast.sk().len());
        let t = s.model("Typed").unwrap();
        let key = t
            .planned_key(&item(json!({"n": 3.0, "name": "q"})))
            .unwrap();
        assert_eq!((key.pk(), key.sk()), ("3", "3-q"));
        // A key attribute that is another key template's variable is rendered on its own.
        let same = s.model("Same").unwrap();
        let key = same.planned_key(&item(json!({"a": "v"}))).unwrap();
        assert_eq!((key.pk(), key.sk()), ("xv", "yv"));
    }

    #[test]
    fn primary_key_names_missing_variable() {
        let unresolved = |field: &str, var: &str| {
            Err(ValidationError::new(
                "Thing",
                field,
                Reason::KeyUnresolved {
                    variable: var.into(),
                },
            ))
        };
        check(
            "",
            "Thing",
            |m| m.primary_key(&item(json!({"owner": "o", "kind": "a"}))),
            unresolved("sk", "id"),
        );
        check(
            "",
            "Thing",
            |m| m.primary_key(&item(json!({"id": "i"}))),
            unresolved("pk", "owner"),
        );
        let raw = Err(ValidationError::new(
            "Raw",
            "sk",
            Reason::KeyUnresolved {
                variable: "sk".into(),
            },
        ));
        check("", "Raw", |m| m.primary_key(&item(json!({"pk": "a"}))), raw);
    }

    fn created(params: &str) -> (Schema, Item) {
        let s = schema(params);
        let base = item(json!({"owner": "o", "id": "i", "n": 1, "code": "ABC"}));
        let it = s
            .model("Thing")
            .unwrap()
            .prepare_create(&base, NOW)
            .unwrap();
        (s, it)
    }

    fn update(params: &str, input: Value) -> Result<Item, ValidationError> {
        let (s, existing) = created(params);
        s.model("Thing")
            .unwrap()
            .prepare_update(&existing, &item(input), LATER)
    }

    #[test]
    fn update_merges_and_recomputes() {
        let got = update(TS, json!({"n": 2, "flag": true})).unwrap();
        assert_eq!(got["n"], json!(2));
        assert_eq!(got["flag"], json!(true));
        assert_eq!(got["code"], json!("ABC"));
        assert_eq!(got["gs1sk"], json!("thing#a#i#2"));
        assert_eq!(
            (got["created"].clone(), got["updated"].clone()),
            (json!(NOW), json!(LATER))
        );
    }

    #[test]
    fn update_null_removes() {
        let got = update("", json!({"n": null})).unwrap();
        assert!(!got.contains_key("n") && !got.contains_key("gs1sk"));
        assert_eq!(
            err_of(update("", json!({"owner": null}))),
            ("owner".into(), Reason::Required)
        );
        let got = update("nulls: true", json!({"n": null})).unwrap();
        assert_eq!(got["n"], Value::Null);
    }

    #[test]
    fn update_errors() {
        assert_eq!(
            err_of(update("", json!({"code": "XYZ"}))),
            ("code".into(), Reason::ReadOnly)
        );
        assert_eq!(
            err_of(update("", json!({"code": null}))),
            ("code".into(), Reason::ReadOnly)
        );
        assert_eq!(
            err_of(update("", json!({"owner": "p"}))),
            ("owner".into(), Reason::KeyChange)
        );
        assert_eq!(
            err_of(update("", json!({"kind": "b"}))),
            ("kind".into(), Reason::KeyChange)
        );
        assert_eq!(
            err_of(update("", json!({"id": "j"}))),
            ("id".into(), Reason::KeyChange)
        );
        assert_eq!(
            err_of(update("", json!({"pk": "thing#p"}))),
            ("pk".into(), Reason::KeyChange)
        );
        assert_eq!(
            err_of(update("", json!({"bogus": 1}))),
            ("bogus".into(), Reason::UnknownField)
        );
        assert!(matches!(
            err_of(update("", json!({"kind": "zz"}))).1,
            Reason::NotInEnum { .. }
        ));
    }

    #[test]
    fn update_of_direct_key_fields() {
        let s = schema("");
        let raw = s.model("Raw").unwrap();
        let existing = raw
            .prepare_create(&item(json!({"pk": "a", "sk": "b", "v": 1})), NOW)
            .unwrap();
        let got = raw
            .prepare_update(&existing, &item(json!({"pk": "a", "v": "2"})), LATER)
            .unwrap();
        assert_eq!(got["v"], json!(2));
        let err = raw
            .prepare_update(&existing, &item(json!({"sk": "c"})), LATER)
            .unwrap_err();
        assert_eq!((err.field.as_str(), err.reason), ("sk", Reason::KeyChange));
    }

    #[test]
    fn update_accepts_unchanged_keys_and_readonly() {
        let (s, existing) = created(TS);
        let got = s
            .model("Thing")
            .unwrap()
            .prepare_update(&existing, &existing, LATER)
            .unwrap();
        let mut expected = existing.clone();
        expected.insert("updated".into(), json!(LATER));
        assert_eq!(got, expected);
    }

    #[test]
    fn update_keeps_generated_type_and_created() {
        let (s, existing) = created(TS);
        let m = s.model("Thing").unwrap();
        let got = m
            .prepare_update(
                &existing,
                &item(json!({"_type": "Thing", "created": 1, "n": 3})),
                LATER,
            )
            .unwrap();
        assert_eq!(
            (
                got["_type"].clone(),
                got["created"].clone(),
                got["id"].clone()
            ),
            (json!("Thing"), json!(NOW), json!("i"))
        );
        assert!(m
            .prepare_update(&existing, &item(json!({"_type": "Raw"})), LATER)
            .is_err());
    }

    #[test]
    fn normalize_accepts_created_item() {
        for params in ["", TS, "isoDates: true, timestamps: true", "nulls: true"] {
            let (s, it) = created(params);
            assert_eq!(
                s.model("Thing").unwrap().normalize_stored(it.clone()),
                Ok(it),
                "{params}"
            );
        }
    }

    #[test]
    fn normalize_casts_and_fills_templates() {
        let (s, mut it) = created(TS);
        it.insert("n".into(), json!("1"));
        it.remove("gs1pk");
        let got = s.model("Thing").unwrap().normalize_stored(it).unwrap();
        assert_eq!(
            (got["n"].clone(), got["gs1pk"].clone()),
            (json!(1), json!("kind#a"))
        );
    }

    #[test]
    fn normalize_rejects() {
        let (s, it) = created(TS);
        let m = s.model("Thing").unwrap();
        let with = |k: &str, v: Value| {
            let mut x = it.clone();
            x.insert(k.into(), v);
            x
        };
        let wrong = Reason::WrongModel {
            expected: "Thing".into(),
            found: "Raw".into(),
        };
        assert_eq!(
            err_of(m.normalize_stored(with("_type", json!("Raw")))),
            ("_type".into(), wrong)
        );
        let mut untyped = it.clone();
        untyped.remove("_type");
        assert!(matches!(
            err_of(m.normalize_stored(untyped)).1,
            Reason::WrongModel { .. }
        ));
        assert_eq!(
            err_of(m.normalize_stored(with("bogus", json!(1)))),
            ("bogus".into(), Reason::UnknownField)
        );
        let mismatch = Reason::TemplateMismatch {
            expected: "thing#o".into(),
            found: "thing#x".into(),
        };
        assert_eq!(
            err_of(m.normalize_stored(with("pk", json!("thing#x")))),
            ("pk".into(), mismatch)
        );
        let mut no_n = it.clone();
        no_n.remove("n");
        assert!(
            matches!(err_of(m.normalize_stored(no_n)), (f, Reason::TemplateMismatch { .. }) if f == "gs1sk")
        );
        assert!(matches!(
            err_of(m.normalize_stored(with("created", json!("x")))).1,
            Reason::WrongType { .. }
        ));
        assert!(matches!(
            err_of(m.normalize_stored(with("kind", json!("q")))).1,
            Reason::NotInEnum { .. }
        ));
    }

    /// A model whose hidden names have lengths 1, 5, 63 and 70 (the last two share the length
    /// mask's top bit; the templated keys besides), beside visible names of the same length
    /// bits (`v`, `value`, a 64-byte name).
    const HIDDEN_SCHEMA: &str = r#"{
      version: '1', format: 'onetable:1.1.0',
      indexes: {primary: {hash: 'pk', sort: 'sk'}},
      models: {
        H: {
          pk: {type: 'string', value: 'h#${id}'}, sk: {type: 'string', value: 'h'},
          id: {type: 'string'}, h: {type: 'string', hidden: true}, v: {type: 'string'},
          gs1pk: {type: 'string', hidden: true}, value: {type: 'string'},
          LONG63: {type: 'string', hidden: true}, LONG70: {type: 'string', hidden: true},
          LONG64: {type: 'string'},
        },
      }
    }"#;

    proptest::proptest! {
        /// `is_hidden` (a length mask, then a byte loop) answers as a plain search of the
        /// hidden names does, for the names themselves, names one byte or one length away, and
        /// any other text.
        #[test]
        fn hidden_test_matches_the_name_search(
            pick in 0usize..16,
            cut in 0usize..80,
            flip in 0usize..80,
            other in "[a-z0-9_]{0,70}",
        ) {
            let text = HIDDEN_SCHEMA
                .replace("LONG63", &"a".repeat(63))
                .replace("LONG70", &"b".repeat(70))
                .replace("LONG64", &"c".repeat(64));
            let schema = Schema::from_json5(&text).unwrap();
            let m = schema.model("H").unwrap();
            let mut names: Vec<String> = m.fields().iter().map(|f| f.name.clone()).collect();
            names.extend(["_type", "created", "updated", ""].map(String::from));
            let base = names[pick % names.len()].clone();
            let mut near = base.clone().into_bytes();
            if !near.is_empty() {
                let at = flip % near.len();
                near[at] = near[at].wrapping_add(1) & 0x7f;
            }
            let near = String::from_utf8(near).unwrap();
            let shorter = base[..cut.min(base.len())].to_string();
            let longer = format!("{base}{}", &other[..cut.min(other.len())]);
            for name in [&base, &near, &shorter, &longer, &other] {
                let searched = m.hidden_names.iter().any(|h| h == name);
                proptest::prop_assert_eq!(m.is_hidden(name), searched, "{:?}", name);
            }
            proptest::prop_assert!(m.is_hidden(&"a".repeat(63)) && m.is_hidden(&"b".repeat(70)));
            proptest::prop_assert!(!m.is_hidden(&"c".repeat(64)) && !m.is_hidden("value"));
        }
    }

    #[test]
    fn project_hides_templated_and_hidden_fields() {
        let (s, mut it) = created("");
        it.insert("secret".into(), json!("s"));
        let m = s.model("Thing").unwrap();
        let shown = m.project(&it, false);
        for hidden in ["pk", "sk", "gs1pk", "gs1sk", "secret"] {
            assert!(!shown.contains_key(hidden), "{hidden}");
        }
        for visible in ["shown", "owner", "_type", "id"] {
            assert!(shown.contains_key(visible), "{visible}");
        }
        assert_eq!(m.project(&it, true), it);
    }

    #[test]
    fn field_accessors() {
        let s = schema("");
        let m = s.model("Thing").unwrap();
        let f = |n: &str| m.field(n).unwrap();
        assert!(
            f("pk").hidden()
                && f("pk").has_template()
                && !f("shown").hidden()
                && f("secret").hidden()
        );
        assert!(f("owner").required() && f("code").readonly() && f("expires").is_ttl());
        assert_eq!(f("when").field_type(), FieldType::Date);
        assert_eq!(f("owner").name(), "owner");
        let names: Vec<&str> = m.fields().iter().map(Field::name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(m.field("nope").is_none());
    }

    /// A model with the OneTable features beyond the base set: per-field nulls and isoDates,
    /// partial updates, typed array items, uid ids and declared timestamps (`STAMPS`).
    const ONETABLE: &str = r#"{
      format: 'onetable:1.1.0', version: '1',
      indexes: {primary: {hash: 'pk', sort: 'sk'}},
      params: {PARAMS},
      models: {
        Doc: {
          pk: {type: 'string', value: 'doc#${owner}'},
          sk: {type: 'string', value: 'doc#${id}'},
          id: {type: 'string', generate: 'uid(12)'},
          owner: {type: 'string', required: true},
          note: {type: 'string', nulls: true},
          settings: {type: 'object', partial: true, schema: {
            volume: {type: 'number', required: true},
            mode: {type: 'string', default: 'auto'},
            limits: {type: 'object', schema: {low: {type: 'number'}, high: {type: 'number'}}},
          }},
          plain: {type: 'object', schema: {a: {type: 'number'}, b: {type: 'number'}}},
          tags: {type: 'array', items: {type: 'string', enum: ['red', 'blue']}},
          at: {type: 'date', isoDates: true},
          STAMPS
        },
      }
    }"#;

    fn doc_schema(params: &str, stamps: &str) -> Schema {
        Schema::from_json5(&ONETABLE.replace("PARAMS", params).replace("STAMPS", stamps)).unwrap()
    }

    fn doc_create(s: &Schema, input: Value) -> Result<Item, ValidationError> {
        s.model("Doc").unwrap().prepare_create(&item(input), NOW)
    }

    #[test]
    fn timestamps_create_sets_only_created() {
        let s = doc_schema("timestamps: 'create'", "");
        let m = s.model("Doc").unwrap();
        let got = doc_create(&s, json!({"owner": "o"})).unwrap();
        assert_eq!(got.get("created"), Some(&json!(NOW)));
        assert!(!got.contains_key("updated"), "{got:?}");
        let later = m
            .prepare_update(&got, &item(json!({"note": "n"})), LATER)
            .unwrap();
        assert_eq!(
            (later.get("created"), later.contains_key("updated")),
            (Some(&json!(NOW)), false)
        );
        // `updated` is not maintained, so not known either (the model does not declare it).
        assert_eq!(
            err_of(m.prepare_update(&got, &item(json!({"updated": LATER})), LATER)),
            ("updated".into(), Reason::UnknownField)
        );
        assert!(m
            .prepare_create(&item(json!({"owner": "o", "created": 5})), NOW)
            .is_ok());
    }

    #[test]
    fn timestamps_update_sets_only_updated() {
        let s = doc_schema("timestamps: 'update'", "");
        let m = s.model("Doc").unwrap();
        let got = doc_create(&s, json!({"owner": "o"})).unwrap();
        assert_eq!(
            (got.get("updated"), got.contains_key("created")),
            (Some(&json!(NOW)), false)
        );
        let later = m.prepare_update(&got, &item(json!({})), LATER).unwrap();
        assert_eq!(later.get("updated"), Some(&json!(LATER)));
        assert_eq!(
            err_of(doc_create(&s, json!({"owner": "o", "created": 1}))),
            ("created".into(), Reason::UnknownField)
        );
    }

    #[test]
    fn create_spells_both_timestamps_alike_and_names_created_when_out_of_range() {
        for (params, fields, created, updated) in [
            (
                "timestamps: true, isoDates: true",
                "",
                json!("2026-11-25T18:00:00.000Z"),
                json!("2026-11-25T18:00:00.000Z"),
            ),
            (
                "timestamps: true, isoDates: false",
                "",
                json!(NOW),
                json!(NOW),
            ),
            (
                "timestamps: true, isoDates: true",
                "created: {type: 'number'}",
                json!(NOW),
                json!("2026-11-25T18:00:00.000Z"),
            ),
        ] {
            let s = doc_schema(params, fields);
            let m = s.model("Doc").unwrap();
            let got = doc_create(&s, json!({"owner": "o"})).unwrap();
            assert_eq!(
                (got.get("created"), got.get("updated")),
                (Some(&created), Some(&updated)),
                "{params} {fields}"
            );
            let out_of_range = m.prepare_create(&item(json!({"owner": "o"})), i64::MAX);
            assert_eq!(err_of(out_of_range).0, "created", "{params} {fields}");
        }
    }

    #[test]
    fn declared_timestamps_keep_their_type() {
        let s = doc_schema(
            "timestamps: true, isoDates: true",
            "created: {type: 'number', readonly: true}, updated: {type: 'string', hidden: true}",
        );
        let m = s.model("Doc").unwrap();
        let got = doc_create(&s, json!({"owner": "o", "created": "ignored"})).unwrap();
        assert_eq!(
            got.get("created"),
            Some(&json!(NOW)),
            "epoch ms for a number"
        );
        assert_eq!(got.get("updated"), Some(&json!("2026-11-25T18:00:00.000Z")));
        assert!(!m.project(&got, false).contains_key("updated"));
        assert!(m.project(&got, false).contains_key("created"));
        let mut imported = got.clone();
        imported.insert("created".into(), json!("2026-11-25T18:00:00.000Z"));
        imported.insert("updated".into(), json!(NOW));
        let normal = m.normalize_stored(imported).unwrap();
        assert_eq!(
            (normal.get("created"), normal.get("updated")),
            (Some(&json!(NOW)), Some(&json!("2026-11-25T18:00:00.000Z")))
        );
        let mut bad = got.clone();
        bad.insert("created".into(), json!(true));
        assert_eq!(
            err_of(m.normalize_stored(bad)).1,
            Reason::WrongType {
                expected: "number".into(),
                found: "boolean true".into()
            }
        );
        let q = m
            .query(
                &item(json!({"owner": "o", "created": {">": "2026-11-25T18:00:00Z"}})),
                None,
            )
            .unwrap();
        assert_eq!(
            q.filters[0].value,
            json!(NOW),
            "operands take the stored form"
        );
    }

    #[test]
    fn field_nulls_and_iso_dates() {
        let s = doc_schema("", "");
        let m = s.model("Doc").unwrap();
        let got = doc_create(&s, json!({"owner": "o", "note": null, "at": NOW})).unwrap();
        assert_eq!(got.get("note"), Some(&Value::Null), "note keeps nulls");
        assert_eq!(got.get("at"), Some(&json!("2026-11-25T18:00:00.000Z")));
        let updated = m
            .prepare_update(&got, &item(json!({"note": null, "plain": null})), LATER)
            .unwrap();
        assert_eq!(updated.get("note"), Some(&Value::Null));
        assert!(m.normalize_stored(got).is_ok());
    }

    #[test]
    fn partial_update_merges_nested_objects() {
        let s = doc_schema("", "");
        let m = s.model("Doc").unwrap();
        let got = doc_create(
            &s,
            json!({"owner": "o", "settings": {"volume": 3, "limits": {"low": 1, "high": 9}},
                   "plain": {"a": 1, "b": 2}}),
        )
        .unwrap();
        assert_eq!(
            got.get("settings"),
            Some(&json!({"volume": 3, "mode": "auto", "limits": {"low": 1, "high": 9}}))
        );
        let next = m
            .prepare_update(
                &got,
                &item(json!({"settings": {"mode": "eco", "limits": {"high": 5}},
                             "plain": {"a": 7}})),
                LATER,
            )
            .unwrap();
        assert_eq!(
            next.get("settings"),
            Some(&json!({"volume": 3, "mode": "eco", "limits": {"low": 1, "high": 5}})),
            "partial: merged, and limits inherits partial"
        );
        assert_eq!(
            next.get("plain"),
            Some(&json!({"a": 7})),
            "not partial: replaced"
        );
        // The merged object is still checked whole: removing a required member fails.
        let err = m
            .prepare_update(&got, &item(json!({"settings": {"volume": null}})), LATER)
            .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason),
            ("settings.volume", Reason::Required)
        );
        let err = m
            .prepare_update(&got, &item(json!({"settings": {"volume": "loud"}})), LATER)
            .unwrap_err();
        assert_eq!(err.field, "settings.volume");
    }

    #[test]
    fn array_items_are_enforced() {
        let s = doc_schema("", "");
        let got = doc_create(&s, json!({"owner": "o", "tags": ["red", "blue"]})).unwrap();
        assert_eq!(got.get("tags"), Some(&json!(["red", "blue"])));
        let err = doc_create(&s, json!({"owner": "o", "tags": ["red", "green"]})).unwrap_err();
        assert_eq!(err.field, "tags[1]");
        assert!(matches!(err.reason, Reason::NotInEnum { .. }));
        let err = doc_create(&s, json!({"owner": "o", "tags": ["red", {"x": 1}]})).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason),
            (
                "tags[1]",
                Reason::WrongType {
                    expected: "string".into(),
                    found: "an object".into()
                }
            )
        );
    }

    #[test]
    fn uid_ids_key_the_item() {
        let s = doc_schema("", "");
        let a = doc_create(&s, json!({"owner": "o"})).unwrap();
        let b = doc_create(&s, json!({"owner": "o"})).unwrap();
        let id = |i: &Item| {
            i.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!((id(&a).len(), id(&b).len()), (12, 12));
        assert_ne!(id(&a), id(&b));
        assert_eq!(a.get("sk"), Some(&json!(format!("doc#{}", id(&a)))));
        let kept = s
            .model("Doc")
            .unwrap()
            .prepare_update(&a, &item(json!({"note": "x"})), LATER)
            .unwrap();
        assert_eq!(id(&kept), id(&a), "an update keeps the generated id");
    }

    #[test]
    fn index_keys() {
        let (s, it) = created("");
        let m = s.model("Thing").unwrap();
        let idx = |n: &str| s.index(n).unwrap().clone();
        assert_eq!(
            m.index_key(&it, &idx("primary")),
            Some(("thing#o".into(), "thing#a#i".into()))
        );
        assert_eq!(
            m.index_key(&it, &idx("gs1")),
            Some(("kind#a".into(), "thing#a#i#1".into()))
        );
        assert_eq!(
            m.index_key(&it, &idx("ls1")),
            Some(("thing#o".into(), "1".into()))
        );
        let mut sparse = it.clone();
        sparse.remove("n");
        assert_eq!(m.index_key(&sparse, &idx("ls1")), None);
        let nohash = s.model("NoHash").unwrap();
        let it = nohash
            .prepare_create(&item(json!({"name": "x"})), NOW)
            .unwrap();
        assert_eq!(
            nohash.index_key(&it, &idx("primary")),
            Some((String::new(), "nohash#x".into()))
        );
        assert_eq!(nohash.index_key(&it, &idx("gs1")), None);
    }

    #[test]
    fn an_item_of_a_neighbouring_schema_keeps_new_fields_and_enum_values_and_nothing_else() {
        let s = schema("");
        let m = s.model("Thing").unwrap();
        let plain = m
            .prepare_create(&item(json!({"owner": "o", "n": 1})), NOW)
            .unwrap();
        let mut newer = plain.clone();
        // What a newer schema adds: an optional field (top level and nested) and an enum value.
        newer.insert("color".into(), json!("red"));
        newer.insert("args".into(), json!({"x": 1, "z": true}));
        let (kept, forgiven) = m.normalize_from_neighbour(newer.clone()).unwrap();
        assert_eq!(kept.get("color"), Some(&json!("red")));
        assert_eq!(kept.get("args"), Some(&json!({"x": 1, "z": true})));
        let forgiven = forgiven.expect("the strict check refuses it");
        // The first refusal in field order names what was kept.
        assert_eq!(forgiven.field, "args.z");
        assert_eq!(forgiven.reason, Reason::UnknownField);
        // The strict path still refuses it.
        assert_eq!(
            m.normalize_stored(newer.clone()).unwrap_err().reason,
            Reason::UnknownField
        );
        // An item the strict check accepts is not reported.
        let (_, none) = m.normalize_from_neighbour(plain).unwrap();
        assert!(none.is_none());
        // Types, required fields and patterns are checked as always.
        let mut wrong = newer.clone();
        wrong.insert("n".into(), json!("not a number"));
        assert!(m.normalize_from_neighbour(wrong).is_err());
        let mut pattern = newer.clone();
        pattern.insert("code".into(), json!("lowercase"));
        assert_eq!(
            m.normalize_from_neighbour(pattern).unwrap_err().reason,
            Reason::Pattern {
                pattern: "/^[A-Z]{3}$/".into()
            }
        );
    }

    #[test]
    fn a_kept_enum_value_does_not_block_updates_of_other_fields_until_it_changes() {
        let s = schema("");
        let m = s.model("Thing").unwrap();
        let created = m
            .prepare_create(&item(json!({"owner": "o", "kind": "b"})), NOW)
            .unwrap();
        // A newer schema widened `kind` with `c`; templates follow it.
        let mut widened = created.clone();
        widened.insert("kind".into(), json!("c"));
        widened.remove("sk");
        widened.remove("gs1pk");
        widened.remove("gs1sk");
        let (stored, forgiven) = m.normalize_from_neighbour(widened).unwrap();
        assert!(matches!(
            forgiven.map(|e| e.reason),
            Some(Reason::NotInEnum { .. })
        ));
        assert_eq!(stored.get("kind"), Some(&json!("c")));
        let updated = m
            .prepare_update(&stored, &item(json!({"n": 5})), LATER)
            .unwrap();
        assert_eq!(updated.get("kind"), Some(&json!("c")));
        assert_eq!(updated.get("n"), Some(&json!(5)));
        // Setting a value this schema does not list is still refused.
        let err = m
            .prepare_update(&stored, &item(json!({"kind": "d"})), LATER)
            .unwrap_err();
        assert!(matches!(err.reason, Reason::NotInEnum { .. }), "{err}");
    }
}
