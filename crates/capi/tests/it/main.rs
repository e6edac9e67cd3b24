//! Integration tests of the C library: the committed header is what cbindgen makes of the crate
//! today; the exported functions called as C calls them (NULL pointers, bad UTF-8 and JSON,
//! paging, batches, change callbacks, panicking callbacks); and the C example, compiled by the
//! system C compiler against the library, run against the real cloud service.

mod abi;
mod agent;
mod c_example;
mod header;
mod support;
