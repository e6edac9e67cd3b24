//! The devtables cloud service: one store for the items of every device, the sync service that
//! replicates them over MQTT, the embedded broker, and the HTTP API.
//!
//! # Layout
//! - [`store`]: the [`store::CloudStore`] trait and its SQLite implementation (PostgreSQL
//!   follows behind the same trait).
//! - [`broker`]: the embedded MQTT broker (rmqtt) that authenticates every client and confines
//!   each device to its own topics.
//! - [`auth`]: device secrets (hashed at rest) and the broker's authenticator.
//! - [`service`]: the running service: start-up order, API server, retention timer, graceful
//!   shutdown.
//! - [`store_thread`]: the thread that owns the store, and the handle to run work on it (a leaf
//!   module: the API, the operations and the sync loop all use it).
//! - `sync_loop`: the driver around the sans-IO `CloudEngine`; `mqtt_link`: the task polling
//!   the service's MQTT connection; `subscription`: keeps the device topics subscribed;
//!   [`status`]: the sync loop's counters (`GET /v1/status`).
//! - [`ops`]: application operations (register a device, write an item) shared by the API and
//!   embedding programs.
//! - `api`: the HTTP API (axum, JSON); [`openapi`]: its OpenAPI document, generated from the
//!   handlers and served at `GET /v1/openapi.json`.
//! - [`config`]: every setting and limit, and the `devtables cloud` file format.
//!
//! The sync loop makes no protocol decision: `devtables_sync` decides, the loop carries bytes and
//! runs store transactions.

mod api;
pub mod auth;
pub mod broker;
pub mod config;
mod mqtt_link;
pub mod openapi;
pub mod ops;
pub mod service;
pub mod status;
pub mod store;
pub mod store_thread;
mod subscription;
mod sync_loop;
pub mod tls;

pub use config::{BrokerMode, CloudConfig, CloudFile, MqttClientConfig, StartupPrompts};
pub use service::{Cloud, StartError};
