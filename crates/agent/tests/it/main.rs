//! Integration tests of the agent: the outbox policy, limits and restart state need no broker;
//! status, commands, the bounded input queue, publish drops and the version collection run the
//! real agent against the real cloud service (SQLite, embedded broker) over loopback MQTT; the
//! device store's conformance runs the shared store suite; the device-only `devtables-agent` binary
//! runs as its own process against the real cloud.

mod acks;
mod binary;
mod commands;
mod conformance;
mod connection;
mod inputs;
mod limits;
mod mqtt_packet;
mod mtls;
mod outbox;
mod retransmit;
mod status;
mod support;
mod tls;
mod transactions;
mod versions;
