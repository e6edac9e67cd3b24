//! Integration tests of the agent that need no broker: the outbox policy, limits, restart state
//! and the device store's conformance.

mod conformance;
mod limits;
mod outbox;
