//! Messages between cores. Each travels one SPSC ring, one hop: from the core that owns a
//! connection to the core that owns the op's PG, and back.

use std::net::TcpStream;

use carmine_dataplane::buffers::Body;
use carmine_dataplane::pool::{Buf, Lease};
use carmine_dataplane::wire::{Header, Status, SubOpsSummary, SUB_OPS_CEILING};

use crate::osd::op_table::OpRef;

/// Per-sub-op (status, output length), carried inline.
#[derive(Clone, Copy, Debug)]
pub struct Results {
    pub count: u8,
    pub items: [(u32, u32); SUB_OPS_CEILING as usize],
}

impl Default for Results {
    fn default() -> Self {
        Results {
            count: 0,
            items: [(0, 0); SUB_OPS_CEILING as usize],
        }
    }
}

impl Results {
    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.items[..usize::from(self.count)]
    }
}

pub enum Message {
    /// A new client connection for the receiving core to own.
    Adopt(TcpStream),
    /// A new NBD client connection for the receiving core's NBD frontend.
    AdoptNbd(TcpStream),
    /// Run an op on one of the receiving core's PGs. `frame` is a read-only lease on the
    /// sender's receive buffer; it comes back with `Done` (only the home core releases it).
    Execute {
        origin: OpRef,
        header: Header,
        frame: Lease,
        /// What the sender's `Frame::validate_sub_ops` found, so the table is walked once.
        summary: SubOpsSummary,
        local_pg: u32,
        object_hash: u32,
    },
    /// The op's outcome, back to the core that owns the connection.
    Done {
        origin: OpRef,
        status: Status,
        results: Results,
        output: Option<Buf>,
        frame: Lease,
    },
    /// A buffer or lease that the receiving core owns, finished with elsewhere.
    Release(Body),
}
