//! The NBD frontend: block images striped over objects, served over the Network Block Device
//! protocol from the reactors (`carmine serve --nbd ADDR`), and the `carmine image` tool.

pub mod cli;
pub mod frontend;
pub mod image;

/// The NBD protocol's numbers, layouts and byte-level checks live in the data plane (the fuzz
/// targets use them without a server).
pub use carmine_dataplane::nbd as protocol;
