//! The devtables cloud service: one store for the items of every device, the sync service that
//! replicates them over MQTT, the embedded broker, and the HTTP API.
//!
//! # Layout
//! - [`store`]: the [`store::CloudStore`] trait and its SQLite implementation (PostgreSQL
//!   follows behind the same trait).
//! - [`broker`]: the embedded MQTT broker (rmqtt) that authenticates every client and confines
//!   each device to its own topics.
//! - [`auth`]: device secrets (hashed at rest) and the broker's authenticator.
//! - [`service`]: the running service: store thread, sync loop around the sans-IO
//!   `CloudEngine`, API server, retention timer, graceful shutdown.
//! - [`ops`]: application operations (register a device, write an item) shared by the API and
//!   embedding programs.
//! - `api`: the HTTP API (axum, JSON).
//! - [`config`]: every setting and limit, and the `devtables cloud` file format.
//!
//! The sync loop makes no protocol decision: `devtables_sync` decides, the loop carries bytes and
//! runs store transactions.

mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod ops;
pub mod service;
pub mod store;

pub use config::{BrokerMode, CloudConfig, CloudFile};
pub use service::{Cloud, StartError};
