//! The NBD frontend: block images striped over objects, served over the Network Block Device
//! protocol from the reactors (`carmine serve --nbd ADDR`), and the `carmine image` tool.

pub mod cli;
pub mod frontend;
pub mod image;
pub mod protocol;
