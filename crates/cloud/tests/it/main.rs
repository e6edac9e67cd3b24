//! The cloud's integration tests: one binary (`cargo test -p devtables-cloud --test it`), real
//! TCP, the real embedded broker (rmqtt), the real SQLite store, and the store-conformance suite.

mod api_keys;
mod changes;
mod conformance;
mod harness;
mod lifecycle;
mod metrics;
mod mtls;
mod node_id;
mod openapi;
mod quotas;
mod row_identity;
mod skipped_rows;
mod sync_service;
