//! Integration tests of the agent: the outbox policy and restart state need no broker; status,
//! commands, the bounded input queue, publish drops and the version collection run the real
//! agent against the real cloud service (SQLite, embedded broker) over loopback MQTT.

mod commands;
mod inputs;
mod outbox;
mod status;
mod support;
mod versions;
