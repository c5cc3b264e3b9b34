//! Carmine's storage: the object store interface and its implementations.
//! Knows nothing about networks or wire formats.
//!
//! - `object_store`: the `ObjectStore` trait every store implements, sub-ops, limits, buffers.
//! - `memory`: `MemoryStore`, the in-memory store (CyanStore's role).
//! - `error`: `StoreError`, the one error type, with stable codes.
//! - `queue_pair`: the block `QueuePair` interface (submit/poll, never blocking) and its
//!   backends: `mem` (RAM, with fault injection) and `uring` (io_uring, O_DIRECT).

pub mod error;
pub mod memory;
pub mod object_store;
pub mod queue_pair;
pub mod segment;

pub use error::{StoreError, STATUS_OK};
pub use memory::MemoryStore;
pub use object_store::{
    check_operation, InPlaceRead, ObjectStat, ObjectStore, OutputBuffer, StoreStats, SubOp,
    SubOpResult, Submit, OBJECT_ID_MAX_BYTES, OBJECT_SIZE_MAX_BYTES, OMAP_KEY_MAX_BYTES,
    OMAP_VALUE_MAX_BYTES, OUTPUT_BUFFER_SIZE_MAX_BYTES, READ_IN_PLACE_BLOCK_BYTES,
    STAT_OUTPUT_SIZE_BYTES, SUB_OPS_MAX, XATTR_NAME_MAX_BYTES, XATTR_VALUE_MAX_BYTES,
};
pub use queue_pair::{
    AlignedBuf, IoError, IoVec, MemFaults, MemQueuePair, QueuePair, SubmitError, Tear,
    TearGranularity, UringQueuePair, BLOCK_SIZE_BYTES, DEPTH_MAX, IOVECS_PER_REQUEST_MAX,
    REQUEST_SIZE_MAX_BYTES, SECTOR_SIZE_BYTES,
};
