//! Integration tests of the log store (see `../../src/lib.rs` for the contract).

mod basic;
mod bench;
mod crash;
mod damage;
mod faults;
mod model;
