//! Carmine's data plane: per-core reactors, cross-core SPSC rings, buffer pools, transports and
//! the wire formats (Carmine's own, and the Network Block Device protocol's). Knows nothing
//! about objects or stores: those live in `carmine-storage`, and the OSD logic that joins the
//! two lives in the `carmine` package.

pub mod buffers;
pub mod coalesce;
pub mod dgram;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod listener_audit;
pub mod nbd;
pub mod pool;
pub mod reactor;
pub mod ring;
pub mod tcp;
pub mod udp;
pub mod wire;
