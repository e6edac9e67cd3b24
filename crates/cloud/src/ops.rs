//! Application operations shared by the HTTP API and the embedding program (the demo, tests):
//! registering, revoking and re-keying a device, creating an API key and writing items through
//! the cloud. Each runs as one job on the store
//! thread, so reading the current item and writing the new one cannot interleave with another
//! write.

use std::sync::Arc;

use devtables_schema::{Item, ValidationError};
use devtables_sync::apply::{CloudOp, CloudWriteError, OWNER_FIELD};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::Change;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::auth::{self, Credentials, NewApiKey};
use crate::broker::Sessions;
use crate::broker_hash;
use crate::store::{KeyScope, StoreError, REVOKED_SECRET_HASH};
use crate::store_thread::{wall_ms, StoreGone, StoreHandle};
use crate::sync_loop::SyncInput;

/// What an application write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Create an item; fails when its key exists.
    Create,
    /// Change the given fields of an existing item.
    Update,
    /// Remove the item the given key properties identify.
    Remove,
}

/// Why an application operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("unknown model {0}")]
    UnknownModel(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("{0} already exists: use an update to change it")]
    Exists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("invalid account name: {0}")]
    BadAccount(String),
    #[error(transparent)]
    Write(#[from] CloudWriteError<StoreError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gone(#[from] StoreGone),
}

/// A fresh device secret and the two hashes it is stored as: the registry's, and Mosquitto's
/// for an external broker's password file.
struct NewSecret {
    secret: String,
    hash: String,
    broker_hash: String,
}

impl NewSecret {
    fn generate() -> NewSecret {
        let secret = auth::generate_secret();
        NewSecret {
            hash: auth::hash_secret(&secret),
            broker_hash: broker_hash::mosquitto_hash(&secret),
            secret,
        }
    }
}

/// Registers a device; returns its secret (stored only as hashes: the registry's, and
/// Mosquitto's for an external broker's password file).
pub async fn register_device(
    store: &StoreHandle,
    credentials: Option<&Arc<Credentials>>,
    id: &DeviceId,
) -> Result<String, OpError> {
    let NewSecret {
        secret,
        hash,
        broker_hash,
    } = NewSecret::generate();
    let (who, stored) = (id.clone(), hash.clone());
    store
        .call(move |c| {
            c.store
                .register_device(&who, &stored, Some(&broker_hash), wall_ms())
        })
        .await??;
    if let Some(creds) = credentials {
        creds.add_device(id.clone(), hash);
    }
    Ok(secret)
}

/// The embedded broker's view of the registry, which revocation and rotation must update: its
/// credentials cache and its live sessions (both `None` with an external broker, whose own
/// configuration then decides).
#[derive(Clone, Default)]
pub struct BrokerControl {
    pub credentials: Option<Arc<Credentials>>,
    pub sessions: Option<Sessions>,
}

impl BrokerControl {
    /// Makes the broker act on a device's new secret hash at once: the cache holds it, and the
    /// device's live session (authenticated with the old secret) is closed. The store was
    /// changed first, so the reconnect meets the new credentials.
    async fn apply(&self, id: &DeviceId, secret_hash: String) {
        if let Some(creds) = &self.credentials {
            creds.add_device(id.clone(), secret_hash);
        }
        if let Some(sessions) = &self.sessions {
            sessions.disconnect(&id.node_name()).await;
        }
    }
}

/// Revokes a device: the store marks it revoked (and, with `delete_items`, deletes its rows and
/// feed in the same transaction), then its live MQTT session is closed and its reconnects are
/// refused. Pushes of it still in flight are refused by the store. `NotFound` when the device is
/// not registered.
pub async fn revoke_device(
    store: &StoreHandle,
    broker: &BrokerControl,
    id: &DeviceId,
    delete_items: bool,
) -> Result<(), OpError> {
    let who = id.clone();
    let found = store
        .call(move |c| c.store.revoke_device(&who, delete_items))
        .await??;
    if !found {
        return Err(OpError::NotFound(format!("device {id}")));
    }
    broker.apply(id, REVOKED_SECRET_HASH.to_string()).await;
    tracing::info!(device = %id, delete_items, "device revoked");
    Ok(())
}

/// Revoked devices read per store call by [`sweep_revoked`].
const SWEEP_PAGE: usize = 1000;

/// Closes the sessions of revoked devices that are still connected: those revoked by another
/// process on the same store (`devtables devices revoke`), which this process learns of only by
/// reading the store. The service runs it every `credentials_ttl`. Returns how many sessions it
/// closed (each is logged at warn).
pub async fn sweep_revoked(store: &StoreHandle, broker: &BrokerControl) -> Result<u64, OpError> {
    let Some(sessions) = &broker.sessions else {
        return Ok(0);
    };
    let mut closed = 0;
    let mut after: Option<DeviceId> = None;
    loop {
        let from = after.clone();
        let page = store
            .call(move |c| c.store.revoked_devices(from.as_ref(), SWEEP_PAGE))
            .await??;
        for id in &page {
            if sessions.exists(&id.node_name()).await {
                tracing::warn!(device = %id, "closing the session of a device revoked elsewhere");
                broker.apply(id, REVOKED_SECRET_HASH.to_string()).await;
                if let Some(creds) = &broker.credentials {
                    creds.count_swept();
                }
                closed += 1;
            }
        }
        if page.len() < SWEEP_PAGE {
            return Ok(closed);
        }
        after = page.last().cloned();
    }
}

/// Gives a device a new secret and returns it (stored only as a hash). The old secret stops
/// working and the session that used it is closed; the device keeps its rows, feed and cursor.
/// A revoked device becomes usable again with the new secret. `NotFound` when the device is not
/// registered.
pub async fn rotate_secret(
    store: &StoreHandle,
    broker: &BrokerControl,
    id: &DeviceId,
) -> Result<String, OpError> {
    let NewSecret {
        secret,
        hash,
        broker_hash,
    } = NewSecret::generate();
    let (who, stored) = (id.clone(), hash.clone());
    let found = store
        .call(move |c| c.store.set_device_secret(&who, &stored, Some(&broker_hash)))
        .await??;
    if !found {
        return Err(OpError::NotFound(format!("device {id}")));
    }
    broker.apply(id, hash).await;
    tracing::info!(device = %id, "device secret rotated");
    Ok(secret)
}

/// Creates an API key of `account` with `scope`; the answer holds the full key, which is stored
/// only as a hash.
pub async fn create_api_key(
    store: &StoreHandle,
    account: &str,
    scope: KeyScope,
) -> Result<NewApiKey, OpError> {
    // The same rule as every account name of the API (a placeholder device for the check).
    DeviceId::new(account, "x").map_err(|e| OpError::BadAccount(e.to_string()))?;
    let account = account.to_string();
    Ok(store
        .call(move |c| auth::create_api_key(c.store.as_mut(), &account, scope, wall_ms()))
        .await??)
}

/// Writes an item through the cloud: validated and versioned here, replicated down to the
/// device(s) per the schema. Returns the change as stored.
pub async fn write_item(
    store: &StoreHandle,
    sync: &mpsc::Sender<SyncInput>,
    max_message_bytes: usize,
    owner: Owner,
    model: &str,
    mut input: Item,
    kind: WriteKind,
) -> Result<Change, OpError> {
    let m = model.to_string();
    let (change, advanced) = store
        .call(move |c| -> Result<_, OpError> {
            let schema = c.schema.clone();
            let model = schema
                .model(&m)
                .ok_or_else(|| OpError::UnknownModel(m.clone()))?;
            // A device's item names its device: fill it in rather than make every caller repeat it.
            if let Owner::Device(d) = &owner {
                if model.field(OWNER_FIELD).is_some() && !input.contains_key(OWNER_FIELD) {
                    input.insert(OWNER_FIELD.into(), Value::String(d.device.clone()));
                }
            }
            let now = wall_ms();
            let op = match kind {
                WriteKind::Create => {
                    let item = model.prepare_create(&input, now as i64)?;
                    let key = model.primary_key(&item)?;
                    let existing = c.store.get_item(&owner, &m, &key)?;
                    if existing.is_some_and(|e| e.item.is_some()) {
                        return Err(OpError::Exists(format!("{m} item {key:?}")));
                    }
                    CloudOp::Put(item)
                }
                WriteKind::Update | WriteKind::Remove => {
                    let key = model.primary_key(&input)?;
                    let existing = c.store.get_item(&owner, &m, &key)?.and_then(|e| e.item);
                    let Some(existing) = existing else {
                        return Err(OpError::NotFound(format!("{m} item {key:?}")));
                    };
                    if kind == WriteKind::Update {
                        CloudOp::Put(model.prepare_update(&existing, &input, now as i64)?)
                    } else {
                        CloudOp::Delete(key)
                    }
                }
            };
            Ok(c.store.write(
                &schema,
                &mut c.clock,
                now,
                max_message_bytes,
                &owner,
                &m,
                op,
            )?)
        })
        .await??;
    if !advanced.is_empty() {
        let _ = sync.send(SyncInput::FeedAdvanced(advanced)).await;
    }
    Ok(change)
}
