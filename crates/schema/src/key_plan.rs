//! A model's primary key resolved once, at schema load, into numbered slots, so that computing
//! a key from a caller's properties (every get, update and remove by key) looks each property
//! up once and renders the key templates through slot numbers instead of field names, into one
//! pre-sized string.
//!
//! It exists because a get spent about 2.8k instructions on its key (issue 17, round 6): a
//! binary search by name per property and again per template variable, a string per rendered
//! template, then the two parts copied again into the database's row key. The general path
//! ([`Model::primary_key_general`]: an item of the cast key properties with the key templates
//! applied) stays the reference: the plan answers only where it gives what that path gives (a
//! property test holds the two equal) and leaves every other case, errors included, to it.

use std::borrow::Cow;

use serde_json::Value;

use crate::field::FieldType;
use crate::model::{rendered_given, ItemKey, Model};
use crate::template::{render_value, Part};
use crate::Item;

/// Most key dependencies a plan renders on the stack; a model whose key depends on more fields
/// takes the general path.
pub(crate) const KEY_SLOTS: usize = 8;

/// A primary key as one string: the hash value, a NUL, the sort value. Neither part may hold
/// a NUL (a key with one is refused), so the split is unambiguous; it is the byte form the
/// device database keys an item by, built with one allocation where an [`ItemKey`] takes two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinedKey {
    text: String,
    /// Where the NUL is.
    split: usize,
}

impl JoinedKey {
    /// The hash (partition) value.
    pub fn pk(&self) -> &str {
        &self.text[..self.split]
    }

    /// The sort value (`""` when the primary index has no sort key).
    pub fn sk(&self) -> &str {
        &self.text[self.split + 1..]
    }

    /// `pk`, NUL, `sk`.
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    /// `pk`, NUL, `sk`, without a copy.
    pub fn into_bytes(self) -> Vec<u8> {
        self.text.into_bytes()
    }

    /// The two parts as an [`ItemKey`].
    pub fn to_item_key(&self) -> ItemKey {
        ItemKey {
            pk: self.pk().to_string(),
            sk: self.sk().to_string(),
        }
    }

    /// `pk` and `sk` joined; the split is unambiguous only when `pk` holds no NUL (true of
    /// every key [`Model::primary_key`] returns).
    pub fn from_parts(pk: &str, sk: &str) -> JoinedKey {
        let mut text = String::with_capacity(pk.len() + 1 + sk.len());
        text.push_str(pk);
        text.push('\0');
        text.push_str(sk);
        JoinedKey {
            text,
            split: pk.len(),
        }
    }
}

/// Longest key (`pk`, NUL, `sk`, in bytes) a [`KeyBuf`] holds without allocating.
pub const KEY_INLINE: usize = 120;

/// A primary key as one byte string (`pk`, NUL, `sk`, as [`JoinedKey`]) held on the stack
/// when it is at most [`KEY_INLINE`] bytes: what a lookup by key needs, without the
/// allocation of a `String` (a get that copies the stored item once allocates nothing else).
/// Neither part holds a NUL, and both are UTF-8 (they are rendered from `&str`s).
#[derive(Clone)]
pub struct KeyBuf {
    store: KeyStore,
    /// Where the NUL is.
    split: usize,
}

#[derive(Clone)]
enum KeyStore {
    Inline { bytes: [u8; KEY_INLINE], len: usize },
    Heap(Vec<u8>),
}

impl KeyBuf {
    /// An empty key with room for `len` bytes: inline when they fit.
    fn with_capacity(len: usize) -> KeyBuf {
        let store = if len <= KEY_INLINE {
            KeyStore::Inline {
                bytes: [0; KEY_INLINE],
                len: 0,
            }
        } else {
            KeyStore::Heap(Vec::with_capacity(len))
        };
        KeyBuf { store, split: 0 }
    }

    /// `pk` and `sk` joined (see [`JoinedKey::from_parts`]).
    pub fn from_parts(pk: &str, sk: &str) -> KeyBuf {
        let mut key = KeyBuf::with_capacity(pk.len() + 1 + sk.len());
        key.put(pk);
        key.put("\0");
        key.put(sk);
        key.split = pk.len();
        key
    }

    /// `pk`, NUL, `sk`.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.store {
            KeyStore::Inline { bytes, len } => bytes.get(..*len).unwrap_or_default(),
            KeyStore::Heap(bytes) => bytes,
        }
    }

    /// The length of `pk` (where the NUL is).
    pub fn pk_len(&self) -> usize {
        self.split
    }

    /// The hash (partition) value's bytes.
    pub fn pk_bytes(&self) -> &[u8] {
        self.as_bytes().get(..self.split).unwrap_or_default()
    }

    /// The sort value's bytes (empty when the primary index has no sort key).
    pub fn sk_bytes(&self) -> &[u8] {
        self.as_bytes().get(self.split + 1..).unwrap_or_default()
    }
}

impl std::fmt::Debug for KeyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBuf")
            .field("pk", &String::from_utf8_lossy(self.pk_bytes()))
            .field("sk", &String::from_utf8_lossy(self.sk_bytes()))
            .finish()
    }
}

impl PartialEq for KeyBuf {
    fn eq(&self, other: &Self) -> bool {
        self.split == other.split && self.as_bytes() == other.as_bytes()
    }
}

impl Eq for KeyBuf {}

/// Where a key is rendered: a `String` ([`JoinedKey`]) or a [`KeyBuf`].
pub(crate) trait KeyOut {
    fn put(&mut self, s: &str);
}

impl KeyOut for String {
    fn put(&mut self, s: &str) {
        self.push_str(s);
    }
}

impl KeyOut for KeyBuf {
    fn put(&mut self, s: &str) {
        match &mut self.store {
            KeyStore::Inline { bytes, len } => {
                let end = *len + s.len();
                match bytes.get_mut(*len..end) {
                    Some(to) => {
                        to.copy_from_slice(s.as_bytes());
                        *len = end;
                    }
                    // Longer than sized for (never, the length is computed first): move to the
                    // heap rather than lose bytes.
                    None => {
                        let mut heap = Vec::with_capacity(end);
                        heap.extend_from_slice(bytes.get(..*len).unwrap_or_default());
                        heap.extend_from_slice(s.as_bytes());
                        self.store = KeyStore::Heap(heap);
                    }
                }
            }
            KeyStore::Heap(bytes) => bytes.extend_from_slice(s.as_bytes()),
        }
    }
}

/// A key property's value as the caller gave it: a JSON value of an [`Item`], or a string of
/// a key given as `(name, text)` pairs (read as the JSON string `text`).
#[derive(Clone, Copy)]
pub(crate) enum Given<'a> {
    Json(&'a Value),
    Str(&'a str),
}

impl Given<'_> {
    fn is_string(self) -> bool {
        matches!(self, Given::Str(_) | Given::Json(Value::String(_)))
    }
}

/// One piece of a key template, its variable resolved.
#[derive(Clone, Debug)]
enum PlanPart {
    Lit(String),
    /// The value of the key dependency in this slot.
    Slot(usize),
    /// The type field: the model's name.
    ModelName,
    /// A variable that names no field: the template never renders in full.
    Unresolvable,
}

/// A key template with its variables as slots.
#[derive(Clone, Debug)]
struct PlannedTemplate {
    /// The slot its field fills.
    slot: usize,
    /// Its field's position in `Model::fields`.
    field: usize,
    parts: Vec<PlanPart>,
    /// Rendered straight into the key at the end instead of into a string of its own: a string
    /// field that is a key attribute and no other key template's variable.
    direct: bool,
}

/// Where a key attribute's value comes from.
#[derive(Clone, Copy, Debug, Default)]
enum Attr {
    /// The model has no field for it (or the index has no sort key): `""`.
    #[default]
    Empty,
    /// The key dependency in `slot`; `template` is the index (in `KeyPlan::templates`) of its
    /// template when that one is rendered straight into the key.
    Slot {
        slot: usize,
        template: Option<usize>,
    },
}

/// How a model's primary key is rendered from key properties (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyPlan {
    /// Whether the plan applies (at most [`KEY_SLOTS`] key dependencies).
    usable: bool,
    /// Per field of `Model::fields`: its slot, when the key depends on it.
    slot_of_field: Vec<Option<usize>>,
    /// The key's templates, dependencies first.
    templates: Vec<PlannedTemplate>,
    hash: Attr,
    sort: Attr,
}

impl KeyPlan {
    /// The plan of `model`, whose `key_fields` and `key_templates` are set.
    pub(crate) fn new(model: &Model) -> KeyPlan {
        let deps = &model.key_fields;
        if deps.len() > KEY_SLOTS {
            return KeyPlan::default();
        }
        let slot_of_field: Vec<Option<usize>> = (0..model.fields.len())
            .map(|i| deps.iter().position(|&d| d == i))
            .collect();
        let slot_of = |name: &str| model.field_index(name).and_then(|i| slot_of_field[i]);
        let mut templates = Vec::with_capacity(model.key_templates.len());
        for &index in &model.key_templates {
            let (Some(field), Some(slot)) = (model.fields.get(index), slot_of_field[index]) else {
                return KeyPlan::default();
            };
            let Some(template) = field.template() else {
                return KeyPlan::default();
            };
            let parts = template
                .parts()
                .iter()
                .map(|part| match part {
                    Part::Lit(text) => PlanPart::Lit(text.clone()),
                    Part::Var(var) if *var == model.params.type_field => PlanPart::ModelName,
                    Part::Var(var) => slot_of(var).map_or(PlanPart::Unresolvable, PlanPart::Slot),
                })
                .collect();
            templates.push(PlannedTemplate {
                slot,
                field: index,
                parts,
                direct: false,
            });
        }
        let attr = |name: Option<&str>| match name.and_then(|n| model.field_index(n)) {
            None => Attr::Empty,
            Some(i) => match slot_of_field[i] {
                Some(slot) => Attr::Slot {
                    slot,
                    template: None,
                },
                // Unreachable: a key attribute is its own dependency.
                None => Attr::Empty,
            },
        };
        let mut plan = KeyPlan {
            usable: true,
            hash: attr(Some(&model.primary.hash)),
            sort: attr(model.primary.sort.as_deref()),
            slot_of_field,
            templates,
        };
        for t in 0..plan.templates.len() {
            let slot = plan.templates[t].slot;
            let is_string = model
                .fields
                .get(plan.templates[t].field)
                .is_some_and(|f| f.ty == FieldType::String);
            let used_by_others = plan.templates.iter().any(|other| {
                other
                    .parts
                    .iter()
                    .any(|p| matches!(p, PlanPart::Slot(s) if *s == slot))
            });
            let mut is_attr = false;
            for attr in [&mut plan.hash, &mut plan.sort] {
                if let Attr::Slot { slot: s, template } = attr {
                    if *s == slot && is_string && !used_by_others {
                        *template = Some(t);
                        is_attr = true;
                    }
                }
            }
            plan.templates[t].direct = is_attr;
        }
        plan
    }
}

/// The value of each key dependency, by slot.
type Slots<'a> = [Option<Cow<'a, str>>; KEY_SLOTS];

impl Model {
    /// The key rendered through the plan, or `None` whenever the general path
    /// ([`Model::primary_key_general`]) must answer: a property that does not cast, a key
    /// attribute that does not resolve, a value with no rendering, more key dependencies than
    /// [`KEY_SLOTS`]. NUL is not checked here.
    pub(crate) fn planned_key(&self, props: &Item) -> Option<JoinedKey> {
        let given = props.iter().map(|(k, v)| (k.as_str(), Given::Json(v)));
        let slots = self.planned_slots(given)?;
        let (text, split) = self.planned_render(&slots, String::with_capacity)?;
        Some(JoinedKey { text, split })
    }

    /// [`Model::planned_key`] into a [`KeyBuf`], from an item or from `(name, text)` pairs.
    pub(crate) fn planned_key_buf<'a>(
        &self,
        props: impl IntoIterator<Item = (&'a str, Given<'a>)>,
    ) -> Option<KeyBuf> {
        let slots = self.planned_slots(props)?;
        let (mut key, split) = self.planned_render(&slots, KeyBuf::with_capacity)?;
        key.split = split;
        Some(key)
    }

    /// The value of every key dependency the properties give or the key templates render;
    /// `None` as for [`Model::planned_key`].
    fn planned_slots<'a>(
        &self,
        props: impl IntoIterator<Item = (&'a str, Given<'a>)>,
    ) -> Option<Slots<'a>> {
        let plan = &self.key_plan;
        if !plan.usable {
            return None;
        }
        let ctx = self.ctx();
        let mut slots: Slots<'_> = Default::default();
        for (key, value) in props {
            if matches!(value, Given::Json(Value::Null)) {
                continue;
            }
            let Some(index) = self.field_index(key) else {
                continue;
            };
            let field = self.fields.get(index)?;
            match plan.slot_of_field.get(index).copied().flatten() {
                Some(slot) => {
                    let rendered = match value {
                        Given::Json(value) => rendered_given(field, value, &ctx)?,
                        // As the JSON string: kept as given where that is the identity cast.
                        Given::Str(text)
                            if field.has_template() || field.ty == FieldType::String =>
                        {
                            Cow::Borrowed(text)
                        }
                        Given::Str(text) => {
                            let cast = field.cast(&Value::String(text.to_string()), key, &ctx);
                            Cow::Owned(render_value(&cast.ok()?)?)
                        }
                    };
                    *slots.get_mut(slot)? = Some(rendered);
                }
                // The general path casts every known property, so one that does not cast is
                // its error, even when the key does not depend on it.
                None if field.has_template() && value.is_string() => {}
                None => match value {
                    Given::Json(value) => {
                        field.cast(value, key, &ctx).ok()?;
                    }
                    Given::Str(text) => {
                        field
                            .cast(&Value::String(text.to_string()), key, &ctx)
                            .ok()?;
                    }
                },
            }
        }
        // The key's templates in dependency order; a given value is kept (as the general
        // path's `keep_given`), and a partial rendering leaves the slot unset.
        for template in &plan.templates {
            if template.direct || slots.get(template.slot)?.is_some() {
                continue;
            }
            let Some(len) = self.rendered_len(template, &slots) else {
                continue;
            };
            let mut text = String::with_capacity(len);
            self.render_into(template, &slots, &mut text);
            let field = self.fields.get(template.field)?;
            let value = match field.ty {
                // A string field's cast of a string is the string itself.
                FieldType::String => Cow::Owned(text),
                _ => {
                    let cast = field.cast(&Value::String(text), &field.name, &ctx).ok()?;
                    Cow::Owned(render_value(&cast)?)
                }
            };
            *slots.get_mut(template.slot)? = Some(value);
        }
        Some(slots)
    }

    /// The key attributes rendered from `slots` into what `make` gives for the key's length;
    /// with where the NUL is.
    fn planned_render<O: KeyOut>(
        &self,
        slots: &Slots<'_>,
        make: impl FnOnce(usize) -> O,
    ) -> Option<(O, usize)> {
        let plan = &self.key_plan;
        let pk_len = self.attr_len(plan.hash, slots)?;
        let sk_len = self.attr_len(plan.sort, slots)?;
        let mut out = make(pk_len + 1 + sk_len);
        self.attr_into(plan.hash, slots, &mut out);
        out.put("\0");
        self.attr_into(plan.sort, slots, &mut out);
        Some((out, pk_len))
    }

    /// The length of `template` rendered from `slots`; `None` when a variable has no value.
    fn rendered_len(&self, template: &PlannedTemplate, slots: &Slots<'_>) -> Option<usize> {
        template.parts.iter().try_fold(0usize, |len, part| {
            let add = match part {
                PlanPart::Lit(text) => text.len(),
                PlanPart::Slot(slot) => slots.get(*slot)?.as_deref()?.len(),
                PlanPart::ModelName => self.name.len(),
                PlanPart::Unresolvable => return None,
            };
            Some(len + add)
        })
    }

    /// Appends `template` rendered from `slots` (every variable has a value: see
    /// [`Model::rendered_len`]).
    fn render_into(&self, template: &PlannedTemplate, slots: &Slots<'_>, out: &mut impl KeyOut) {
        for part in &template.parts {
            match part {
                PlanPart::Lit(text) => out.put(text),
                PlanPart::Slot(slot) => {
                    out.put(slots.get(*slot).and_then(|s| s.as_deref()).unwrap_or(""))
                }
                PlanPart::ModelName => out.put(&self.name),
                PlanPart::Unresolvable => {}
            }
        }
    }

    /// The length of a key attribute's value; `None` when it does not resolve.
    fn attr_len(&self, attr: Attr, slots: &Slots<'_>) -> Option<usize> {
        match attr {
            Attr::Empty => Some(0),
            Attr::Slot { slot, template } => match (slots.get(slot)?, template) {
                (Some(value), _) => Some(value.len()),
                (None, Some(t)) => self.rendered_len(self.key_plan.templates.get(t)?, slots),
                (None, None) => None,
            },
        }
    }

    /// Appends a key attribute's value (it resolves: see [`Model::attr_len`]).
    fn attr_into(&self, attr: Attr, slots: &Slots<'_>, out: &mut impl KeyOut) {
        let Attr::Slot { slot, template } = attr else {
            return;
        };
        match (slots.get(slot).and_then(Option::as_deref), template) {
            (Some(value), _) => out.put(value),
            (None, Some(t)) => {
                if let Some(template) = self.key_plan.templates.get(t) {
                    self.render_into(template, slots, out);
                }
            }
            (None, None) => {}
        }
    }

    /// The key when every key attribute the model has is given in `props` as a string, joined.
    pub(crate) fn direct_joined(&self, props: &Item) -> Option<JoinedKey> {
        let (pk, sk) = self.direct_parts(|name| props.get(name)?.as_str())?;
        Some(JoinedKey::from_parts(pk, sk))
    }

    /// The key attributes' values when `given` has every one the model has (`""` for one it
    /// has not).
    pub(crate) fn direct_parts<'a>(
        &self,
        given: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<(&'a str, &'a str)> {
        let part = |at: Option<usize>| -> Option<&'a str> {
            match at.and_then(|i| self.fields.get(i)) {
                None => Some(""),
                Some(field) => given(&field.name),
            }
        };
        let pk = part(self.primary_at.0)?;
        let sk = if self.primary.sort.is_some() {
            part(self.primary_at.1)?
        } else {
            ""
        };
        Some((pk, sk))
    }
}
