//! Schema-wide settings shared by the schema and its models: indexes, `params` and the
//! replication `process` of a model.
//!
//! This module exists so that `model` and `schema` (and `parse`, which builds both) depend on one
//! leaf for these plain types instead of on each other.

/// A table index: the primary index or a secondary (global/local) index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    /// The index name (`primary`, `gs1`, ...).
    pub name: String,
    /// The hash (partition) key attribute.
    pub hash: String,
    /// The sort key attribute, if any.
    pub sort: Option<String>,
    /// The index `description` (documentation only).
    pub description: Option<String>,
}

/// Which timestamps create and update maintain (`params.timestamps`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timestamps {
    /// `false` (the default): none; fields named like the timestamps are ordinary fields.
    #[default]
    Off,
    /// `'create'`: only the created field, set at creation.
    Create,
    /// `'update'`: only the updated field, set at creation and at every update.
    Update,
    /// `true`: both.
    Both,
}

impl Timestamps {
    /// Whether the created field is maintained.
    pub fn sets_created(self) -> bool {
        matches!(self, Timestamps::Create | Timestamps::Both)
    }

    /// Whether the updated field is maintained.
    pub fn sets_updated(self) -> bool {
        matches!(self, Timestamps::Update | Timestamps::Both)
    }
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
    /// Which of the created/updated attributes create and update maintain.
    pub timestamps: Timestamps,
    /// Dates stored as ISO-8601 UTC strings with millis (true) or epoch milliseconds (false).
    pub iso_dates: bool,
    /// Whether null values are stored (true) or remove the field (false); a field's own
    /// `nulls` overrides it.
    pub nulls: bool,
    /// Whether templated fields are hidden unless they say otherwise (`params.hidden`,
    /// default true).
    pub hidden: bool,
    /// Whether updates merge into nested-schema objects by default (`params.partial`, default
    /// false, as in OneTable); a field's own `partial` overrides it.
    pub partial: bool,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            type_field: "_type".into(),
            created_field: "created".into(),
            updated_field: "updated".into(),
            timestamps: Timestamps::Off,
            iso_dates: false,
            nulls: false,
            hidden: true,
            partial: false,
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
