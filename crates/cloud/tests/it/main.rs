//! The cloud's integration tests: one binary (`cargo test -p devtables-cloud --test it`), real
//! TCP, the real embedded broker (rmqtt), the real SQLite store, the real PostgreSQL store (with
//! `DEVTABLES_SERVICES` set: `pg`), and the store-conformance suite on both.

mod api_keys;
mod broker_clients;
mod changes;
mod conformance;
mod harness;
mod lifecycle;
mod metrics;
#[path = "../../../agent/tests/it/mqtt_packet.rs"]
mod mqtt_packet;
mod mtls;
mod node_id;
mod openapi;
mod path_probe;
mod pg;
mod postgres;
mod quotas;
mod row_identity;
#[path = "../../../cli/tests/it/services_gate.rs"]
mod services_gate;
mod skipped_rows;
mod store_contract;
mod subscription_failover;
mod sync_service;
