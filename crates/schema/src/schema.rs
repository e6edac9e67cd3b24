//! The loaded schema and its schema-wide settings.
//!
//! [`Schema`] is the validated, immutable result of loading a OneTable JSON5 file: the
//! indexes, the schema-wide [`Params`], and the [`Model`]s with their replication [`Process`]
//! settings. Callers share it (typically behind an `Arc`) and do all per-item work through the
//! models.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::SchemaError;
use crate::model::Model;
use crate::Item;

/// A table index: the primary index or a secondary (global/local) index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    /// The index name (`primary`, `gs1`, ...).
    pub name: String,
    /// The hash (partition) key attribute.
    pub hash: String,
    /// The sort key attribute, if any.
    pub sort: Option<String>,
}

/// Schema-wide parameters (`params`).
#[derive(Clone, Debug)]
pub struct Params {
    /// Attribute that holds the model name (default `_type`).
    pub type_field: String,
    /// Attribute set at creation when `timestamps` (default `created`).
    pub created_field: String,
    /// Attribute set at every write when `timestamps` (default `updated`).
    pub updated_field: String,
    /// Whether create/update maintain the created/updated attributes.
    pub timestamps: bool,
    /// Dates stored as ISO-8601 UTC strings with millis (true) or epoch milliseconds (false).
    pub iso_dates: bool,
    /// Whether null values are stored (true) or remove the field (false).
    pub nulls: bool,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            type_field: "_type".into(),
            created_field: "created".into(),
            updated_field: "updated".into(),
            timestamps: false,
            iso_dates: false,
            nulls: false,
        }
    }
}

/// Where a model's items may live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enable {
    /// Only on the device.
    Device,
    /// Only in the cloud.
    Cloud,
    /// On both (the default).
    Both,
}

/// Which way a model's items replicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncDirection {
    /// Device → cloud.
    Up,
    /// Cloud → device.
    Down,
    /// Both ways.
    Both,
    /// Not replicated (the default).
    None,
}

/// A model's replication settings (`process`, formerly `control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    /// Where items may live.
    pub enable: Enable,
    /// Replication direction.
    pub sync: SyncDirection,
    /// Whether the oldest unsent items may be dropped under a long outage.
    pub lossy: bool,
    /// Whether cloud items are delivered to every device of the account.
    pub broadcast: bool,
}

impl Default for Process {
    fn default() -> Process {
        Process {
            enable: Enable::Both,
            sync: SyncDirection::None,
            lossy: false,
            broadcast: false,
        }
    }
}

impl Process {
    /// Whether items replicate device → cloud.
    pub fn syncs_up(&self) -> bool {
        matches!(self.sync, SyncDirection::Up | SyncDirection::Both)
    }

    /// Whether items replicate cloud → device.
    pub fn syncs_down(&self) -> bool {
        matches!(self.sync, SyncDirection::Down | SyncDirection::Both)
    }

    /// Whether items may live on the device.
    pub fn on_device(&self) -> bool {
        matches!(self.enable, Enable::Device | Enable::Both)
    }

    /// Whether items may live in the cloud.
    pub fn in_cloud(&self) -> bool {
        matches!(self.enable, Enable::Cloud | Enable::Both)
    }
}

/// A validated OneTable schema.
#[derive(Clone, Debug)]
pub struct Schema {
    pub(crate) version: String,
    pub(crate) format: String,
    pub(crate) params: Params,
    pub(crate) primary: Index,
    pub(crate) secondary: Vec<Index>,
    pub(crate) models: BTreeMap<String, Model>,
}

impl Schema {
    /// Parse and validate a schema from JSON5 text. `blend` is rejected (it needs a file).
    pub fn from_json5(text: &str) -> Result<Schema, SchemaError> {
        crate::parse::from_text(text)
    }

    /// Read, blend and validate a schema file.
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        crate::parse::from_file(path)
    }

    /// The schema `version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The schema `format` (`onetable:...`).
    pub fn format(&self) -> &str {
        &self.format
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
        assert!(!p.timestamps && !p.iso_dates && !p.nulls);
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
