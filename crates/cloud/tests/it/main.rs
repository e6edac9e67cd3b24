//! Integration tests of the cloud crate.

mod conformance;
