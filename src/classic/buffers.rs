//! Recycled byte buffers for frames and replies. Without it every op mallocs in one thread and
//! frees in another (messenger -> worker -> finisher), and glibc's per-thread arenas answer
//! with heap growth, trimming and page faults: measured at over 10% of a classic server's CPU.
//! A good engineer would pool them (Ceph leans on tcmalloc's thread caches for the same reason),
//! so the baseline does too. Bounded: at most `BUFFERS_KEPT_MAX` idle buffers are kept.

use std::sync::Mutex;

/// Every pooled buffer has this capacity: a 4 KiB block plus any header, sub-op table and id.
pub const BUFFER_BYTES: usize = 8 << 10;
const BUFFERS_KEPT_MAX: usize = 8192;

pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new() -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::with_capacity(BUFFERS_KEPT_MAX)),
        }
    }

    /// An empty buffer that can hold `len` bytes without growing.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len <= BUFFER_BYTES {
            if let Some(buf) = self.free.lock().expect("buffer pool lock").pop() {
                return buf;
            }
            return Vec::with_capacity(BUFFER_BYTES);
        }
        Vec::with_capacity(len)
    }

    /// Gives buffers back (only pool-sized ones are kept).
    pub fn give(&self, buffers: impl IntoIterator<Item = Vec<u8>>) {
        let mut free = self.free.lock().expect("buffer pool lock");
        for mut buf in buffers {
            if buf.capacity() == BUFFER_BYTES && free.len() < BUFFERS_KEPT_MAX {
                buf.clear();
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_large_ones_are_not_kept() {
        let pool = BufferPool::new();
        let mut small = pool.take(100);
        small.extend_from_slice(b"abc");
        let large = pool.take(BUFFER_BYTES + 1);
        assert!(large.capacity() > BUFFER_BYTES);
        pool.give([small, large]);
        let again = pool.take(10);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), BUFFER_BYTES);
        assert_eq!(pool.free.lock().unwrap().len(), 0);
    }
}
