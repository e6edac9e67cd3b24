//! Integration tests of the agent that need no broker: the outbox policy and restart state.

mod conformance;
mod outbox;
