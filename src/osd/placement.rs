//! Placement: object id -> placement group -> owning core.
//!
//! The hash is crc32c (Castagnoli) of the object id bytes, `pg = hash % pg_count`,
//! `core = pg % cores`. It is part of the on-disk and operational contract: fixed across
//! versions, so the same object lands in the same PG after an upgrade. crc32c is computed in
//! hardware (SSE4.2) and spreads short sequential names (`obj.0`, `obj.1`, ...) evenly.
//!
//! Flexible placement (`--placement flex`, as in the Crimson prototype) skips PGs: the object
//! goes straight to `hash % cores`, and each core orders its ops as one unit with no PG log.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementMode {
    Pg { pg_count: u32 },
    Flex,
}

/// Where an op runs: the owning core and the PG (an index into that core's PG table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub core: usize,
    /// Index of the PG among the PGs that core owns (flex mode: 0, the core's one queue).
    pub local_pg: u32,
    pub hash: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub mode: PlacementMode,
    pub cores: usize,
}

pub fn object_hash(oid: &[u8]) -> u32 {
    carmine_crc::crc32c(oid)
}

impl Placement {
    pub fn new(mode: PlacementMode, cores: usize) -> Placement {
        assert!(cores > 0);
        if let PlacementMode::Pg { pg_count } = mode {
            assert!(
                pg_count as usize >= cores,
                "every core owns at least one PG"
            );
        }
        Placement { mode, cores }
    }

    pub fn locate(&self, oid: &[u8]) -> Target {
        let hash = object_hash(oid);
        match self.mode {
            PlacementMode::Pg { pg_count } => {
                let pg = hash % pg_count;
                Target {
                    core: pg as usize % self.cores,
                    local_pg: pg / self.cores as u32,
                    hash,
                }
            }
            PlacementMode::Flex => Target {
                core: hash as usize % self.cores,
                local_pg: 0,
                hash,
            },
        }
    }

    /// How many PG queues `core` owns.
    pub fn local_pg_count(&self, core: usize) -> u32 {
        match self.mode {
            PlacementMode::Pg { pg_count } => {
                let cores = self.cores as u32;
                pg_count / cores + u32::from((core as u32) < pg_count % cores)
            }
            PlacementMode::Flex => 1,
        }
    }

    /// The global PG id of a core's local PG index.
    pub fn pg_id(&self, core: usize, local_pg: u32) -> u32 {
        match self.mode {
            PlacementMode::Pg { .. } => local_pg * self.cores as u32 + core as u32,
            PlacementMode::Flex => core as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_fixed_forever() {
        // Changing these values moves every stored object: it needs a format migration.
        assert_eq!(object_hash(b"obj.0"), carmine_crc::crc32c(b"obj.0"));
        assert_eq!(object_hash(b""), 0);
        assert_eq!(object_hash(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn every_pg_has_exactly_one_core_and_local_index() {
        for cores in 1..=5 {
            let placement = Placement::new(PlacementMode::Pg { pg_count: 128 }, cores);
            let total: u32 = (0..cores).map(|c| placement.local_pg_count(c)).sum();
            assert_eq!(total, 128);
            for pg in 0..128u32 {
                let core = pg as usize % cores;
                let local = pg / cores as u32;
                assert!(local < placement.local_pg_count(core));
                assert_eq!(placement.pg_id(core, local), pg);
            }
        }
    }

    #[test]
    fn objects_spread_over_pgs_and_cores() {
        let placement = Placement::new(PlacementMode::Pg { pg_count: 128 }, 2);
        let mut per_core = [0u32; 2];
        let mut pgs = std::collections::HashSet::new();
        for index in 0..4096 {
            let oid = format!("obj.{index}");
            let target = placement.locate(oid.as_bytes());
            assert_eq!(target, placement.locate(oid.as_bytes()), "stable");
            per_core[target.core] += 1;
            pgs.insert((target.core, target.local_pg));
        }
        assert_eq!(pgs.len(), 128, "every PG used");
        assert!(per_core.iter().all(|&n| n > 1800), "balanced: {per_core:?}");
        let flex = Placement::new(PlacementMode::Flex, 3);
        assert!(flex.locate(b"x").core < 3);
        assert_eq!(flex.local_pg_count(2), 1);
    }
}
