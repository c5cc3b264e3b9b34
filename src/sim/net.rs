//! `SimNet`: an in-memory `Network` for one simulated core. The simulation puts encoded
//! request frames (wire format v1) in as if one of the core's connections had received them,
//! and takes the encoded replies out, exactly the bytes a socket would carry.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::time::Duration;

use carmine_dataplane::buffers::{Body, CorePools};
use carmine_dataplane::tcp::{ConnId, RxFrame, TransportStats, REPLY_HEAD_MAX_BYTES};
use carmine_dataplane::wire::{self, Header, Limits, Status};

use crate::osd::network::Network;

/// The one connection each simulated core has.
pub const SIM_CONN: ConnId = ConnId {
    index: 0,
    generation: 1,
};

pub struct SimNet {
    limits: Limits,
    /// Request frames received and not yet handed to the core, in order.
    inbound: VecDeque<Vec<u8>>,
    /// Replies queued by the core and not yet "written".
    queued: VecDeque<(Vec<u8>, Body)>,
    /// Replies written, whole frames, in order.
    sent: VecDeque<Vec<u8>>,
    foreign: Vec<Body>,
    stats: TransportStats,
}

impl SimNet {
    pub fn new(limits: Limits) -> SimNet {
        SimNet {
            limits,
            inbound: VecDeque::new(),
            queued: VecDeque::new(),
            sent: VecDeque::new(),
            foreign: Vec::new(),
            stats: TransportStats::default(),
        }
    }

    /// A request frame arrives on the connection.
    pub fn deliver(&mut self, frame: Vec<u8>) {
        self.inbound.push_back(frame);
    }

    /// The next reply written to the connection, if any.
    pub fn take_reply(&mut self) -> Option<Vec<u8>> {
        self.sent.pop_front()
    }

    pub fn is_idle(&self) -> bool {
        self.inbound.is_empty() && self.queued.is_empty() && self.foreign.is_empty()
    }
}

impl Network for SimNet {
    fn poll_events(&mut self, _timeout: Duration) -> usize {
        0
    }

    fn poll_accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        None
    }

    fn adopt(&mut self, _stream: TcpStream) {
        unreachable!("the simulation accepts no TCP connections")
    }

    fn poll_rx(
        &mut self,
        pools: &mut CorePools,
        budget: usize,
        on_frame: &mut dyn FnMut(RxFrame),
    ) -> usize {
        let mut delivered = 0;
        while delivered < budget {
            let Some(bytes) = self.inbound.front() else {
                break;
            };
            let header = match wire::parse_header(bytes, &self.limits) {
                Ok(Some(header)) => header,
                other => panic!("the simulation sent a bad frame: {other:?}"),
            };
            assert_eq!(header.frame_len(), bytes.len(), "one frame per delivery");
            // As the TCP transport: the frame lands in a pool buffer; no buffer, no receive.
            let Some(mut buf) = pools.acquire_rx_for(bytes.len()) else {
                self.stats.rx_pool_waits += 1;
                break;
            };
            buf.spare_mut()[..bytes.len()].copy_from_slice(bytes);
            buf.seal(bytes.len());
            let frame = pools.lease(&buf, 0, bytes.len());
            pools.release(buf);
            self.stats.rx_bytes += bytes.len() as u64;
            self.stats.frames_rx += 1;
            self.inbound.pop_front();
            on_frame(RxFrame {
                conn: SIM_CONN,
                header,
                frame,
            });
            delivered += 1;
        }
        delivered
    }

    fn reply(
        &mut self,
        conn: ConnId,
        request: &Header,
        status: Status,
        results: &[(u32, u32)],
        body: Body,
    ) -> Result<(), Body> {
        assert_eq!(
            conn, SIM_CONN,
            "a reply to a connection the simulation never opened"
        );
        let mut head = [0u8; REPLY_HEAD_MAX_BYTES];
        let len = match &body {
            Body::Stored(stored) => wire::encode_reply_with_output_crc(
                &mut head,
                request,
                status,
                results,
                stored.as_slice().len(),
                stored.crc(),
            ),
            body => wire::encode_reply(&mut head, request, status, results, &[body.as_slice()]),
        };
        self.queued.push_back((head[..len].to_vec(), body));
        Ok(())
    }

    fn flush_tx(&mut self, pools: &mut CorePools) -> usize {
        let mut completed = 0;
        while let Some((mut bytes, body)) = self.queued.pop_front() {
            bytes.extend_from_slice(body.as_slice());
            self.stats.tx_bytes += bytes.len() as u64;
            self.stats.replies_tx += 1;
            self.sent.push_back(bytes);
            if let Some(foreign) = pools.release_body(body) {
                self.foreign.push(foreign);
            }
            completed += 1;
        }
        completed
    }

    fn take_foreign(&mut self) -> Option<Body> {
        self.foreign.pop()
    }

    fn has_pending_tx(&self) -> bool {
        !self.queued.is_empty()
    }

    fn close_all(&mut self, pools: &mut CorePools) {
        for (_, body) in self.queued.drain(..) {
            if let Some(foreign) = pools.release_body(body) {
                self.foreign.push(foreign);
            }
        }
    }

    fn take_watched_ready(&mut self) -> bool {
        true
    }
    fn watch_fd(&mut self, _fd: RawFd) -> io::Result<()> {
        Ok(())
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }

    fn evict_stalled_for(&mut self, _pools: &mut CorePools, _want_large: bool) -> bool {
        false // Simulated connections never stall mid-frame: frames arrive whole.
    }

    fn has_stored_bodies(&self) -> bool {
        self.queued
            .iter()
            .any(|(_, body)| matches!(body, Body::Stored(_)))
    }

    fn copy_stored_bodies(&mut self, pools: &mut CorePools) -> bool {
        self.queued
            .iter_mut()
            .all(|(_, body)| body.copy_stored(pools))
    }
}
