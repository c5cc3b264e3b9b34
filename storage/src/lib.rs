//! Carmine's storage: the object store interface and its implementations.
//! Knows nothing about networks or wire formats.
//!
//! - `object_store`: the `ObjectStore` trait every store implements, sub-ops, limits, buffers.
//! - `memory`: `MemoryStore`, the in-memory store (CyanStore's role).
//! - `error`: `StoreError`, the one error type, with stable codes.

pub mod error;
pub mod memory;
pub mod object_store;
pub mod segment;

pub use error::{StoreError, STATUS_OK};
pub use memory::MemoryStore;
pub use object_store::{
    check_operation, ObjectStat, ObjectStore, OutputBuffer, StoreStats, SubOp, SubOpResult, Submit,
    OBJECT_ID_MAX_BYTES, OBJECT_SIZE_MAX_BYTES, OMAP_KEY_MAX_BYTES, OMAP_VALUE_MAX_BYTES,
    OUTPUT_BUFFER_SIZE_MAX_BYTES, STAT_OUTPUT_SIZE_BYTES, SUB_OPS_MAX, XATTR_NAME_MAX_BYTES,
    XATTR_VALUE_MAX_BYTES,
};
