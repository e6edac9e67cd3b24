//! What the store keeps so backends can react to changes: the account-wide change log and the
//! webhooks that deliver it.
//!
//! This module exists because the per-device feeds answer "what must this device receive",
//! coalesced per key, while a backend needs "what changed in this account", every version, in
//! order, from a cursor it keeps across its own restarts. The change log is that: one entry per
//! row write (a device's push or an API write, put or delete), appended in the write's own
//! transaction with a sequence number that only grows, so a reader that saw sequence N has seen
//! every change committed before it. Retention bounds it by age and by count per account; a
//! cursor older than what is kept is answered [`ChangeRead::Expired`], never a silent gap.
//!
//! A webhook is a durable cursor over the same log: the service posts the changes after it to
//! a URL and advances it only after a 2xx answer, so no separate delivery queue exists.

use devtables_schema::Item;
use devtables_sync::hlc::Hlc;
use serde::Serialize;

/// Whether a change stored an item or a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Put,
    Delete,
}

/// The key of a changed item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ChangeKey {
    pub pk: String,
    pub sk: String,
}

/// One entry of the change log: a row write as the cloud stored it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ChangeEvent {
    /// The change's position in the log: it only grows, across accounts (so an account's
    /// sequence numbers have gaps). The cursor a reader keeps, and the SSE event id.
    pub seq: u64,
    pub account: String,
    /// The owning device, or `null` for an account-wide (broadcast) item.
    pub device: Option<String>,
    pub model: String,
    pub key: ChangeKey,
    /// The write's version (HLC) as text, ordered like the version. With `key`, what a
    /// receiver deduplicates by.
    #[serde(serialize_with = "ser_hlc")]
    #[cfg_attr(feature = "service", schema(value_type = String, pattern = "^[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{16}$"))]
    pub version: Hlc,
    pub op: ChangeOp,
    /// The item as stored; absent for a delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "service", schema(value_type = Option<Object>))]
    pub item: Option<Item>,
    /// When the cloud stored the write, in ms since the Unix epoch.
    pub at_ms: u64,
}

fn ser_hlc<S: serde::Serializer>(v: &Hlc, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&devtables_sync::wire::hlc_to_string(*v))
}

/// A read of an account's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeQuery {
    pub account: String,
    /// Changes with a sequence number above this.
    pub after: u64,
    /// Only changes of this model.
    pub model: Option<String>,
    /// Only changes of this device's items (`None`: every device's and the account-wide ones).
    pub device: Option<String>,
    /// Most changes in the page.
    pub limit: usize,
    /// Most log entries of the account examined for the filters: a read with filters that match
    /// little still answers in bounded time, and its `next` moves past what it examined.
    pub scan: usize,
}

/// A page of the change log.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct ChangePage {
    /// The changes after the cursor that match the filters, in sequence order.
    pub changes: Vec<ChangeEvent>,
    /// Where to read on from (`after` of the next read): the last change returned, or further
    /// when the read examined entries the filters left out.
    pub next: u64,
    /// The highest sequence number of the account's log at the read (0 when it has none):
    /// `head - next` entries remain to examine.
    pub head: u64,
}

/// What a change log read found.
#[derive(Clone, Debug, PartialEq)]
pub enum ChangeRead {
    /// The changes after the cursor.
    Page(ChangePage),
    /// Retention removed changes after the cursor: the reader missed them. It must re-read the
    /// items (their current state) and continue from the head.
    Expired {
        /// The highest sequence number retention removed for the account: reading after it
        /// misses nothing more.
        floor: u64,
        /// The account's head at the read.
        head: u64,
    },
}

/// How much of the change log is kept, applied by [`super::CloudStore::purge_changes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeRetention {
    /// Changes older than this are removed, in ms. Default 7 days.
    pub max_age_ms: u64,
    /// Most changes kept per account (the oldest removed first). Default 1 000 000.
    pub max_per_account: u64,
    /// Most entries one call of [`super::CloudStore::purge_changes`] removes, in its one
    /// transaction (see [`super::Retention::batch`]). 0 counts as 1. Default 1000.
    pub batch: u64,
}

impl Default for ChangeRetention {
    fn default() -> ChangeRetention {
        ChangeRetention {
            max_age_ms: 7 * 24 * 3600 * 1000,
            max_per_account: 1_000_000,
            batch: super::Retention::DEFAULT_BATCH,
        }
    }
}

/// What a change log purge did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangePurgeStats {
    /// Entries removed.
    pub removed: u64,
    /// Entries kept, over every account, after the call. `None` when the call stopped at its
    /// batch before it counted them (it removes by age first, and counts the log only when the
    /// old entries are gone): then `more` is true.
    pub kept: Option<u64>,
    /// The call stopped at its [`ChangeRetention::batch`]: more may be left to remove, and the
    /// caller should call again.
    pub more: bool,
}

/// A webhook as the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct WebhookRecord {
    /// 16 random hex characters.
    pub id: String,
    pub account: String,
    /// Where the changes are posted.
    pub url: String,
    /// Only changes of this model (`null`: every model).
    pub model: Option<String>,
    /// The shared signing secret (HMAC-SHA256 key). Stored as it is: the signature needs it.
    #[serde(skip)]
    pub secret: String,
    pub created_ms: u64,
    /// The last change sequence number the receiver acknowledged (a 2xx answer), or the log's
    /// head at creation: delivery goes on after it.
    pub cursor: u64,
    /// The status of the last attempt (`null`: none yet, or no HTTP answer).
    pub last_status: Option<u16>,
    /// Why the last attempt failed (`null` once one succeeds).
    pub last_error: Option<String>,
    pub last_attempt_ms: Option<u64>,
    pub last_success_ms: Option<u64>,
    /// Failed attempts since the last success (the backoff grows with it).
    pub failures: u64,
    /// Failed attempts since creation.
    pub failures_total: u64,
    /// Successful deliveries (posts answered 2xx).
    pub deliveries: u64,
    /// Changes those deliveries carried.
    pub changes_delivered: u64,
    /// Times retention removed changes before they were delivered (each told to the receiver
    /// as a `gap`).
    pub gaps: u64,
}

/// A webhook to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewWebhook {
    pub account: String,
    pub url: String,
    pub model: Option<String>,
    pub secret: String,
    /// Deliver the changes after this sequence number (`None`: from the account's head now,
    /// that is only changes made from now on).
    pub after: Option<u64>,
}

/// The outcome of one delivery attempt, recorded by
/// [`super::CloudStore::record_webhook_attempt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookAttempt {
    /// The receiver answered 2xx: the cursor moves to `cursor`.
    Delivered {
        status: u16,
        cursor: u64,
        changes: u64,
        /// The delivery told of a gap (changes removed by retention before delivery).
        gap: bool,
    },
    /// The receiver did not take it: another status, or no answer (`status: None`).
    Failed { status: Option<u16>, error: String },
    /// Nothing to deliver up to `cursor`: the entries after the old cursor were all left out
    /// by the webhook's model filter. The cursor moves without a post.
    Skipped { cursor: u64 },
}
