//! The devtables cloud service: one store for the items of every device, the sync service that
//! replicates them over MQTT, the embedded broker, and the HTTP API.
//!
//! # Layout
//! - [`store`]: the [`store::CloudStore`] trait and its SQLite implementation (PostgreSQL
//!   follows behind the same trait).
//! - [`broker`]: the embedded MQTT broker (rmqtt) that authenticates every client and confines
//!   each device to its own topics.
//! - [`broker_publish`]: the service's publishes to devices handed to the embedded broker
//!   in-process (no loopback MQTT client).
//! - [`auth`]: device secrets (hashed at rest) and the broker's authenticator.
//! - [`broker_hash`]: the second, Mosquitto-readable hash of each device secret, which
//!   `devtables broker-config mosquitto` exports as Mosquitto's password file.
//! - [`cluster`]: several cloud processes sharing one fleet: partition leases and feed wake-ups
//!   between nodes in PostgreSQL.
//! - [`ca`]: the device CA in the data folder, which issues devices' client certificates.
//! - [`service`]: the running service: start-up order, API server, graceful shutdown;
//!   `retention`: its retention task, which purges in bounded batches.
//! - [`store_thread`]: the thread that owns the store, and the handle to run work on it (a leaf
//!   module: the API, the operations and the sync loop all use it).
//! - `sync_loop`: the driver around the sans-IO `CloudEngine`; `mqtt_link`: the task polling
//!   the service's MQTT connection; `external_brokers`: its addresses when the external broker
//!   is a cluster; `subscription`: keeps the device topics subscribed;
//!   [`status`]: the sync loop's counters (`GET /v1/status`); [`metrics`]: the same numbers and
//!   the store job latency in the Prometheus text format (`GET /metrics`).
//! - [`ops`]: application operations (register a device, write an item) shared by the API and
//!   embedding programs.
//! - `api`: the HTTP API (axum, JSON); [`openapi`]: its OpenAPI document, generated from the
//!   handlers and served at `GET /v1/openapi.json`; [`rate_limit`]: the request rate of each
//!   API key.
//! - [`webhooks`]: delivers the change log ([`store::changes`]) to each webhook's URL, signed,
//!   from its durable cursor; the change log's readers (SSE and long poll) are routes of `api`.
//! - [`config`]: every setting and limit, and the `devtables cloud` file format.
//!
//! Only [`store`] is built without the default `service` feature (the fuzz targets link that).
//!
//! The sync loop makes no protocol decision: `devtables_sync` decides, the loop carries bytes and
//! runs store transactions.

// Without the `service` feature only the store is built (for the fuzz targets).
#[cfg(feature = "service")]
mod api;
#[cfg(feature = "service")]
pub mod auth;
#[cfg(feature = "service")]
pub mod broker;
#[cfg(feature = "service")]
pub mod broker_hash;
#[cfg(feature = "service")]
pub mod broker_publish;
#[cfg(feature = "service")]
mod broker_slots;
#[cfg(feature = "service")]
pub mod ca;
#[cfg(feature = "service")]
pub mod cluster;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
mod external_brokers;
#[cfg(feature = "service")]
mod fanout;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
mod mqtt_link;
#[cfg(feature = "service")]
pub mod openapi;
#[cfg(feature = "service")]
pub mod ops;
#[cfg(feature = "service")]
mod probe;
#[cfg(feature = "service")]
pub mod rate_limit;
#[cfg(feature = "service")]
mod retention;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod status;
pub mod store;
#[cfg(feature = "service")]
pub mod store_thread;
#[cfg(feature = "service")]
mod subscription;
#[cfg(feature = "service")]
mod sync_loop;
#[cfg(feature = "service")]
pub mod tls;
mod warn_limit;
#[cfg(feature = "service")]
pub mod webhooks;

#[cfg(feature = "service")]
pub use config::{
    BrokerMode, ChangesConfig, CloudConfig, CloudFile, ClusterConfig, DatabaseChoice,
    DeviceCertificates, MqttClientConfig, StartupPrompts,
};
#[cfg(feature = "service")]
pub use service::{Cloud, StartError};
