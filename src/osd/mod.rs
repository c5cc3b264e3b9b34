//! The OSD: placement, placement groups, the per-core op tables and the core that runs them.

pub mod core;
pub mod message;
pub mod op_table;
pub mod pg;
pub mod placement;
pub mod stall;
pub mod stats;
pub mod timer;
