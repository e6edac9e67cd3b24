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
        let plan = &self.key_plan;
        if !plan.usable {
            return None;
        }
        let ctx = self.ctx();
        let mut slots: Slots<'_> = Default::default();
        for (key, value) in props {
            if value.is_null() {
                continue;
            }
            let Some(index) = self.field_index(key) else {
                continue;
            };
            let field = self.fields.get(index)?;
            match plan.slot_of_field.get(index).copied().flatten() {
                Some(slot) => *slots.get_mut(slot)? = Some(rendered_given(field, value, &ctx)?),
                // The general path casts every known property, so one that does not cast is
                // its error, even when the key does not depend on it.
                None if field.has_template() && value.is_string() => {}
                None => {
                    field.cast(value, key, &ctx).ok()?;
                }
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
        let pk_len = self.attr_len(plan.hash, &slots)?;
        let sk_len = self.attr_len(plan.sort, &slots)?;
        let mut text = String::with_capacity(pk_len + 1 + sk_len);
        self.attr_into(plan.hash, &slots, &mut text);
        text.push('\0');
        self.attr_into(plan.sort, &slots, &mut text);
        Some(JoinedKey {
            text,
            split: pk_len,
        })
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
    fn render_into(&self, template: &PlannedTemplate, slots: &Slots<'_>, out: &mut String) {
        for part in &template.parts {
            match part {
                PlanPart::Lit(text) => out.push_str(text),
                PlanPart::Slot(slot) => {
                    out.push_str(slots.get(*slot).and_then(|s| s.as_deref()).unwrap_or(""))
                }
                PlanPart::ModelName => out.push_str(&self.name),
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
    fn attr_into(&self, attr: Attr, slots: &Slots<'_>, out: &mut String) {
        let Attr::Slot { slot, template } = attr else {
            return;
        };
        match (slots.get(slot).and_then(Option::as_deref), template) {
            (Some(value), _) => out.push_str(value),
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
        let part = |at: Option<usize>| -> Option<&str> {
            match at.and_then(|i| self.fields.get(i)) {
                None => Some(""),
                Some(field) => props.get(&field.name)?.as_str(),
            }
        };
        let pk = part(self.primary_at.0)?;
        let sk = if self.primary.sort.is_some() {
            part(self.primary_at.1)?
        } else {
            ""
        };
        Some(JoinedKey::from_parts(pk, sk))
    }
}
