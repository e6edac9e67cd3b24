//! The catalogue of schema keys, and the warnings for the keys devtables keeps but ignores.
//!
//! Users arrive with schemas written for OneTable (and for the Ioto agent, which adds its own
//! keys), so the parser must accept what OneTable accepts without pretending to honour what it
//! does not. Every key of every place in a schema is classified here once: supported (the parser
//! gives it OneTable's meaning), documentation, kept-and-ignored (loading succeeds and a
//! [`SchemaWarning`] says why it has no effect) or refused (loading fails naming the feature).
//! A key in none of these is a typo and is refused too. docs/schema.md is the same table for
//! people; a test checks that it names every key listed here.

use std::fmt;

use crate::error::SchemaError;

/// A schema key that devtables accepts and keeps but gives no meaning to.
///
/// Loading never fails for these; `devtables schema check` prints them so the author knows
/// which parts of a OneTable or Ioto schema have no effect here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaWarning {
    /// Dotted path of the object holding the key (`models.User.password`, `process.Store`);
    /// empty for a top-level key.
    pub path: String,
    /// The key.
    pub key: String,
    /// Why the key has no effect in devtables.
    pub reason: String,
}

impl SchemaWarning {
    /// `path.key` (the key alone at the top level): where the key sits, as one dotted path.
    pub fn dotted(&self) -> String {
        if self.path.is_empty() {
            self.key.clone()
        } else {
            format!("{}.{}", self.path, self.key)
        }
    }
}

impl fmt::Display for SchemaWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: kept but ignored: {}", self.key, self.reason)
        } else {
            write!(
                f,
                "{}.{}: kept but ignored: {}",
                self.path, self.key, self.reason
            )
        }
    }
}

/// Most warnings one schema keeps; the rest are counted in a last summary warning (a hostile
/// schema could otherwise hold one ignored key per few bytes of its 4 MiB).
pub(crate) const MAX_WARNINGS: usize = 1000;

/// The warnings collected while loading one schema.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    list: Vec<SchemaWarning>,
    omitted: usize,
}

impl Warnings {
    pub(crate) fn push(&mut self, path: &str, key: &str, reason: impl Into<String>) {
        if self.list.len() < MAX_WARNINGS {
            self.list.push(SchemaWarning {
                path: path.to_string(),
                key: key.to_string(),
                reason: reason.into(),
            });
        } else {
            self.omitted += 1;
        }
    }

    pub(crate) fn finish(mut self) -> Vec<SchemaWarning> {
        if self.omitted > 0 {
            self.list.push(SchemaWarning {
                path: String::new(),
                key: "schema".into(),
                reason: format!(
                    "{} more ignored keys are not listed (at most {MAX_WARNINGS} are)",
                    self.omitted
                ),
            });
        }
        self.list
    }
}

/// What devtables does with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Read by the parser with OneTable's meaning (some values may still be refused there).
    Supported,
    /// Documentation for people and tools (a string): accepted silently.
    Doc,
    /// Accepted and kept with no effect; loading records a warning with this reason.
    Ignored(&'static str),
    /// devtables cannot honour it: loading fails with this reason.
    Refused(&'static str),
}

/// Where in a schema a key appears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// The schema object itself.
    Top,
    /// `params`.
    Params,
    /// `indexes.primary`.
    PrimaryIndex,
    /// Any other index.
    Index,
    /// One model's entry in `process` (or `control`).
    Process,
    /// A model's top-level field.
    Field,
    /// A field of a nested `schema`.
    NestedField,
    /// The `items` of an array field.
    Items,
    /// The declaration of a timestamp field that `params.timestamps` maintains.
    Timestamp,
}

impl Place {
    /// Every place, for the documentation check.
    #[cfg(test)]
    pub(crate) const ALL: [Place; 9] = [
        Place::Top,
        Place::Params,
        Place::PrimaryIndex,
        Place::Index,
        Place::Process,
        Place::Field,
        Place::NestedField,
        Place::Items,
        Place::Timestamp,
    ];
}

use Rule::{Doc, Ignored, Refused, Supported};

const TOP: &[(&str, Rule)] = &[
    ("format", Supported),
    ("version", Supported),
    ("indexes", Supported),
    ("models", Supported),
    ("params", Supported),
    ("process", Supported),
    ("control", Supported),
    ("blend", Supported),
    ("name", Doc),
    ("description", Doc),
    (
        "queries",
        Ignored("saved queries for schema tools; devtables plans each query from its find properties"),
    ),
    (
        "items",
        Ignored("sample items for schema tools; devtables does not load them (use `devtables db import`)"),
    ),
    ("extensions", Ignored("custom settings of other tools")),
];

const PARAMS: &[(&str, Rule)] = &[
    ("typeField", Supported),
    ("createdField", Supported),
    ("updatedField", Supported),
    ("timestamps", Supported),
    ("isoDates", Supported),
    ("nulls", Supported),
    ("hidden", Supported),
    ("partial", Supported),
    (
        "separator",
        Ignored("it only tells tools which separator the value templates use; templates are literal text"),
    ),
    ("warn", Ignored("it turns on OneTable's console warnings")),
    (
        "legacyEmpties",
        Ignored("OneTable drops empty strings nested in objects for old DynamoDB limits; devtables stores them"),
    ),
];

const PRIMARY_INDEX: &[(&str, Rule)] = &[
    ("hash", Supported),
    ("sort", Supported),
    ("description", Doc),
];

const INDEX: &[(&str, Rule)] = &[
    ("hash", Supported),
    ("sort", Supported),
    ("type", Supported),
    ("project", Supported),
    ("follow", Supported),
    ("description", Doc),
];

/// The Ioto agent's per-model settings, accepted in `process` and on fields.
const IOTO: &[(&str, Rule)] = &[
    ("show", Ignored("an Ioto device-manager display setting; devtables has no user interface")),
    (
        "mem",
        Ignored("the Ioto agent keeps such a model in memory only; devtables stores every model durably"),
    ),
    (
        "notify",
        Ignored("Ioto cloud change notifications; devtables reports changes through change hooks"),
    ),
    ("actions", Ignored("Ioto cloud automations run on changes; devtables has none")),
    (
        "delay",
        Ignored("the Ioto agent's delay before saving or syncing a change; devtables batches per its agent configuration"),
    ),
    ("pivot", Ignored("Ioto cloud pivot views; devtables has none")),
    ("metrics", Ignored("Ioto cloud metrics computed from fields; devtables has none")),
    ("drop", Ignored("an Ioto agent setting with no devtables equivalent")),
    ("discard", Ignored("an Ioto agent setting with no devtables equivalent")),
];

const PROCESS: &[(&str, Rule)] = &[
    ("enable", Supported),
    ("sync", Supported),
    ("lossy", Supported),
    ("broadcast", Supported),
    (
        "period",
        Ignored("the Ioto agent's former name of `delay`; devtables batches per its agent configuration"),
    ),
];

/// Keys of every field definition, wherever it appears (then refined per place).
const FIELD: &[(&str, Rule)] = &[
    ("type", Supported),
    ("required", Supported),
    ("default", Supported),
    ("enum", Supported),
    ("validate", Supported),
    ("value", Supported),
    ("generate", Supported),
    ("schema", Supported),
    ("items", Supported),
    ("hidden", Supported),
    ("readonly", Supported),
    ("ttl", Supported),
    ("unique", Supported),
    ("scope", Supported),
    ("map", Supported),
    ("partial", Supported),
    ("nulls", Supported),
    ("isoDates", Supported),
    ("crypt", Supported),
    ("description", Doc),
    ("notes", Doc),
    ("note", Doc),
    ("filter", Ignored("OneTable's hint for its text filter; devtables filters on any field")),
    ("reference", Ignored("it documents a reference to another model for tools")),
    ("timestamp", Ignored("a TypeScript type marker in OneTable")),
    // Checked against the model's replication once `process` is read (see `parse`).
    (
        "sync",
        Ignored("Ioto per-field replication; devtables replicates whole items (`sync: 'none'` is refused in a model that replicates)"),
    ),
    (
        "encode",
        Refused("it packs the value into a segment of another attribute (such as the sort key), and devtables stores each field under its own name: declare the field plainly and build the key with a value template"),
    ),
    ("uuid", Refused("OneTable deprecated it: use generate: 'uuid' or 'ulid'")),
];

const TOP_LEVEL_ONLY: &str = "only a model's top-level fields may have it";

/// Keys a nested-schema field or an array element cannot have.
const NESTED_REFUSED: &[&str] = &["value", "generate", "ttl", "unique", "scope"];

const TIMESTAMP_REFUSED: &str = "the field is set by params.timestamps: remove the key, or turn \
     timestamps off (or to the other field only) to manage the field yourself";

/// Keys a timestamp declaration may have beyond documentation and ignored keys.
const TIMESTAMP_SUPPORTED: &[&str] = &["type", "hidden", "readonly", "required", "isoDates"];

const ELEMENT_DEFAULT: &str = "an array element has no default: missing elements are not filled";
const ELEMENT_FLAG: &str = "an array element is never hidden or readonly on its own";
const NESTED_FLAG: &str =
    "only a model's top-level fields are hidden or readonly; a nested member follows its object";

fn find(list: &[(&'static str, Rule)], key: &str) -> Option<Rule> {
    list.iter().find(|(k, _)| *k == key).map(|(_, r)| *r)
}

/// How devtables treats `key` at `place`; None: an unknown key (a typo).
pub(crate) fn rule(place: Place, key: &str) -> Option<Rule> {
    match place {
        Place::Top => find(TOP, key),
        Place::Params => find(PARAMS, key),
        Place::PrimaryIndex => find(PRIMARY_INDEX, key),
        Place::Index => find(INDEX, key),
        Place::Process => find(PROCESS, key).or_else(|| find(IOTO, key)),
        Place::Field => find(FIELD, key).or_else(|| find(IOTO, key)),
        Place::NestedField => match key {
            k if NESTED_REFUSED.contains(&k) => Some(Refused(TOP_LEVEL_ONLY)),
            "hidden" | "readonly" => Some(Ignored(NESTED_FLAG)),
            _ => rule(Place::Field, key),
        },
        Place::Items => match key {
            k if NESTED_REFUSED.contains(&k) => Some(Refused(TOP_LEVEL_ONLY)),
            "default" => Some(Ignored(ELEMENT_DEFAULT)),
            "hidden" | "readonly" => Some(Ignored(ELEMENT_FLAG)),
            _ => rule(Place::Field, key),
        },
        Place::Timestamp => match rule(Place::Field, key)? {
            Supported if TIMESTAMP_SUPPORTED.contains(&key) => Some(Supported),
            Supported | Refused(_) => Some(Refused(TIMESTAMP_REFUSED)),
            other => Some(other),
        },
    }
}

/// The keys `place` accepts (supported and documentation), for "unknown key" messages.
fn accepted(place: Place) -> Vec<&'static str> {
    let lists: &[&[(&'static str, Rule)]] = match place {
        Place::Top => &[TOP],
        Place::Params => &[PARAMS],
        Place::PrimaryIndex => &[PRIMARY_INDEX],
        Place::Index => &[INDEX],
        Place::Process => &[PROCESS],
        Place::Field | Place::NestedField | Place::Items | Place::Timestamp => &[FIELD],
    };
    lists
        .iter()
        .flat_map(|l| l.iter())
        .filter(|(k, _)| matches!(rule(place, k), Some(Supported | Doc)))
        .map(|(k, _)| *k)
        .collect()
}

/// Every key the catalogue names at `place` (for the documentation check).
#[cfg(test)]
pub(crate) fn all_keys(place: Place) -> Vec<&'static str> {
    let lists: &[&[(&'static str, Rule)]] = match place {
        Place::Top => &[TOP],
        Place::Params => &[PARAMS],
        Place::PrimaryIndex => &[PRIMARY_INDEX],
        Place::Index => &[INDEX],
        Place::Process => &[PROCESS, IOTO],
        Place::Field | Place::NestedField | Place::Items | Place::Timestamp => &[FIELD, IOTO],
    };
    lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|(k, _)| *k)
        .collect()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Check every key of the object at `path` against the catalogue: unknown and refused keys are
/// errors naming the dotted path, documentation keys must be strings, ignored keys are recorded
/// in `warnings`. The caller then reads the supported keys.
pub(crate) fn check_keys(
    obj: &serde_json::Map<String, serde_json::Value>,
    path: &str,
    place: Place,
    warnings: &mut Warnings,
) -> Result<(), SchemaError> {
    for (key, value) in obj {
        match rule(place, key) {
            Some(Supported) => {}
            Some(Doc) if value.is_string() => {}
            Some(Doc) => {
                return Err(SchemaError::invalid(
                    join(path, key),
                    format!("`{key}` is documentation and must be a string"),
                ))
            }
            Some(Ignored(reason)) => warnings.push(path, key, reason),
            Some(Refused(reason)) => {
                return Err(SchemaError::invalid(
                    join(path, key),
                    format!("`{key}` is not supported by devtables: {reason}"),
                ))
            }
            None => {
                return Err(SchemaError::invalid(
                    join(path, key),
                    format!(
                        "unknown key `{key}` (allowed: {}; docs/schema.md lists every key)",
                        accepted(place).join(", ")
                    ),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn rules_per_place() {
        assert_eq!(rule(Place::Field, "value"), Some(Supported));
        assert_eq!(
            rule(Place::NestedField, "value"),
            Some(Refused(TOP_LEVEL_ONLY))
        );
        assert_eq!(
            rule(Place::Items, "default"),
            Some(Ignored(ELEMENT_DEFAULT))
        );
        assert_eq!(rule(Place::Timestamp, "type"), Some(Supported));
        assert_eq!(
            rule(Place::Timestamp, "default"),
            Some(Refused(TIMESTAMP_REFUSED))
        );
        assert!(matches!(rule(Place::Timestamp, "show"), Some(Ignored(_))));
        assert!(matches!(rule(Place::Process, "mem"), Some(Ignored(_))));
        assert!(matches!(rule(Place::Field, "encode"), Some(Refused(_))));
        assert_eq!(rule(Place::Field, "colour"), None);
        assert_eq!(rule(Place::PrimaryIndex, "project"), None);
    }

    #[test]
    fn check_keys_classifies() {
        let mut w = Warnings::default();
        let ok = obj(json!({"type": "string", "notes": "n", "show": true}));
        assert!(check_keys(&ok, "models.M.f", Place::Field, &mut w).is_ok());
        let got = w.finish();
        assert_eq!(
            got.iter()
                .map(|w| (w.path.as_str(), w.key.as_str()))
                .collect::<Vec<_>>(),
            vec![("models.M.f", "show")]
        );
        assert!(got[0]
            .to_string()
            .starts_with("models.M.f.show: kept but ignored: "));

        let path = |v: serde_json::Value| match check_keys(
            &obj(v),
            "models.M.f",
            Place::Field,
            &mut Warnings::default(),
        ) {
            Err(SchemaError::Invalid { path, reason }) => format!("{path}: {reason}"),
            other => format!("{other:?}"),
        };
        let err = path(json!({"encode": ["sk", "#", 1]}));
        assert!(
            err.starts_with("models.M.f.encode: `encode` is not supported"),
            "{err}"
        );
        let err = path(json!({"colour": "red"}));
        assert!(
            err.starts_with("models.M.f.colour: unknown key `colour` (allowed: type, "),
            "{err}"
        );
        let err = path(json!({"notes": 3}));
        assert!(err.contains("documentation and must be a string"), "{err}");
    }

    #[test]
    fn warnings_are_bounded() {
        let mut w = Warnings::default();
        for i in 0..MAX_WARNINGS + 5 {
            w.push("p", &format!("k{i}"), "r");
        }
        let list = w.finish();
        assert_eq!(list.len(), MAX_WARNINGS + 1);
        assert!(list[MAX_WARNINGS].reason.starts_with("5 more"), "{list:?}");
    }

    #[test]
    fn docs_name_every_key() {
        let docs = include_str!("../../../docs/schema.md");
        for place in Place::ALL {
            for key in all_keys(place) {
                assert!(
                    docs.contains(&format!("`{key}`")),
                    "docs/schema.md does not mention `{key}` ({place:?})"
                );
            }
        }
    }

    #[test]
    fn top_level_warning_display_has_no_leading_dot() {
        let w = SchemaWarning {
            path: String::new(),
            key: "queries".into(),
            reason: "r".into(),
        };
        assert_eq!(w.to_string(), "queries: kept but ignored: r");
    }
}
