//! The loaded schema and its schema-wide settings.
//!
//! [`Schema`] is the validated, immutable result of loading a OneTable JSON5 file: the
//! indexes, the schema-wide [`Params`], and the [`Model`]s with their replication [`Process`]
//! settings. Callers share it (typically behind an `Arc`) and do all per-item work through the
//! models.

use std::collections::BTreeMap;

use crate::keys::SchemaWarning;
use crate::model::Model;
use crate::settings::{Index, Params};
use crate::Item;

/// A validated OneTable schema.
#[derive(Clone, Debug)]
pub struct Schema {
    pub(crate) version: String,
    pub(crate) format: String,
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) params: Params,
    pub(crate) primary: Index,
    pub(crate) secondary: Vec<Index>,
    pub(crate) models: BTreeMap<String, Model>,
    /// Keys kept with no effect, in the order met (see [`Schema::warnings`]).
    pub(crate) warnings: Vec<SchemaWarning>,
    /// [`Schema::tag`], computed once.
    pub(crate) tag: std::sync::OnceLock<String>,
}

impl Schema {
    /// The schema `version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `version+fingerprint`: the version tag that travels in every sync message. Two schemas
    /// with one tag mean the same for stored data; the fingerprint part changes with any such
    /// change even when the author forgot to bump `version` (see [`crate::SchemaShape`]).
    pub fn tag(&self) -> &str {
        self.tag
            .get_or_init(|| format!("{}+{}", self.version, self.shape().fingerprint()))
    }

    /// The schema `format` (`onetable:...`).
    pub fn format(&self) -> &str {
        &self.format
    }

    /// The schema `name`, if given (documentation only).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The schema `description`, if given (documentation only).
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The keys devtables accepted and keeps but gives no meaning to (OneTable tool settings,
    /// Ioto agent settings, `map`, ...), each with its dotted path and the reason. Loading
    /// succeeded; `devtables schema check` prints these so the author knows what has no effect.
    pub fn warnings(&self) -> &[SchemaWarning] {
        &self.warnings
    }

    /// Schema-wide parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The index named `primary`.
    pub fn primary_index(&self) -> &Index {
        &self.primary
    }

    /// Every other index, sorted by name.
    pub fn secondary_indexes(&self) -> &[Index] {
        &self.secondary
    }

    /// Any index by name, including `primary`.
    pub fn index(&self, name: &str) -> Option<&Index> {
        if self.primary.name == name {
            return Some(&self.primary);
        }
        self.secondary.iter().find(|i| i.name == name)
    }

    /// A model by name.
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    /// All models, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.models.values()
    }

    /// The model named by the item's type field.
    pub fn model_of(&self, item: &Item) -> Option<&Model> {
        item.get(&self.params.type_field)
            .and_then(|v| v.as_str())
            .and_then(|name| self.model(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Enable, Process, SyncDirection};

    fn process(enable: Enable, sync: SyncDirection) -> Process {
        Process {
            enable,
            sync,
            lossy: false,
            broadcast: false,
        }
    }

    fn check(p: Process, up: bool, down: bool, device: bool, cloud: bool) {
        assert_eq!(
            (p.syncs_up(), p.syncs_down(), p.on_device(), p.in_cloud()),
            (up, down, device, cloud),
            "{p:?}"
        );
    }

    #[test]
    fn process_predicates() {
        check(Process::default(), false, false, true, true);
        check(
            process(Enable::Both, SyncDirection::Up),
            true,
            false,
            true,
            true,
        );
        check(
            process(Enable::Both, SyncDirection::Down),
            false,
            true,
            true,
            true,
        );
        check(
            process(Enable::Both, SyncDirection::Both),
            true,
            true,
            true,
            true,
        );
        check(
            process(Enable::Device, SyncDirection::None),
            false,
            false,
            true,
            false,
        );
        check(
            process(Enable::Cloud, SyncDirection::None),
            false,
            false,
            false,
            true,
        );
    }

    #[test]
    fn schema_is_shareable() {
        fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
        assert_send_sync::<Schema>();
        assert_send_sync::<Model>();
    }

    #[test]
    fn params_defaults() {
        let p = Params::default();
        assert_eq!(
            (
                p.type_field.as_str(),
                p.created_field.as_str(),
                p.updated_field.as_str()
            ),
            ("_type", "created", "updated")
        );
        assert!(p.timestamps == crate::Timestamps::Off && !p.iso_dates && !p.nulls);
        assert!(p.hidden && !p.partial);
    }

    #[test]
    fn index_lookup_and_model_of() {
        let s = Schema::from_json5(
            "{format:'onetable:1.1.0', version:'1', indexes:{primary:{hash:'pk',sort:'sk'}, b:{hash:'b'}, a:{hash:'a'}},
              models:{M:{pk:{type:'string'}, sk:{type:'string'}}}}",
        )
        .unwrap();
        assert_eq!(s.index("primary").map(|i| i.hash.as_str()), Some("pk"));
        assert_eq!(
            s.secondary_indexes()
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert!(s.index("c").is_none());
        let mut item = Item::new();
        item.insert("_type".into(), "M".into());
        assert_eq!(s.model_of(&item).map(|m| m.name()), Some("M"));
        item.insert("_type".into(), "N".into());
        assert!(s.model_of(&item).is_none());
    }
}
