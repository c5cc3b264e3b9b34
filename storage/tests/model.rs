//! Model-based test of `MemoryStore`: random sequences of operations on a few objects, run
//! against both the store and a deliberately naive model, must agree on every status, every
//! output byte (and every byte the store must not touch), the stats, and the whole visible state.
//!
//! The model gets atomicity differently from the store: it applies sub-ops one by one to a clone
//! of all objects and throws the clone away on the first error, recomputing space from scratch
//! after every mutation. The store validates first and applies in place; agreement between the
//! two is the point.

use std::collections::BTreeMap;

use carmine_storage::{
    MemoryStore, ObjectStat, ObjectStore, OutputBuffer, StoreError, StoreStats, SubOp, SubOpResult,
    Submit, OBJECT_ID_MAX_BYTES, OBJECT_SIZE_MAX_BYTES, OMAP_KEY_MAX_BYTES, OMAP_VALUE_MAX_BYTES,
    READ_IN_PLACE_BLOCK_BYTES, SUB_OPS_MAX, XATTR_NAME_MAX_BYTES, XATTR_VALUE_MAX_BYTES,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Byte the output region is filled with before each op, to catch stray writes.
const OUT_FILL: u8 = 0xa5;

/// Object ids the sequences use: a few valid ones share state; invalid ones must be rejected.
fn oid_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        10 => prop::sample::select(vec![b"o1".to_vec(), b"o2".to_vec(), b"o3".to_vec()]),
        1 => Just(Vec::new()),
        1 => Just(vec![b'o'; OBJECT_ID_MAX_BYTES + 1]),
    ]
}

/// The valid ids, for checking the whole state.
const OIDS: [&[u8]; 3] = [b"o1", b"o2", b"o3"];
const XATTR_NAMES: [&[u8]; 2] = [b"user.a", b"user.b"];
const OMAP_KEYS: [&[u8]; 3] = [b"k1", b"k2", b""];

fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        20 => 0u64..48,
        1 => Just(OBJECT_SIZE_MAX_BYTES - 1),
        1 => Just(OBJECT_SIZE_MAX_BYTES),
        1 => Just(u64::MAX),
    ]
}

fn length_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![20 => 0u64..48, 1 => Just(OBJECT_SIZE_MAX_BYTES), 1 => Just(u64::MAX)]
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

fn xattr_name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => prop::sample::select(XATTR_NAMES.iter().map(|n| n.to_vec()).collect::<Vec<_>>()),
        1 => Just(Vec::new()),
        1 => Just(vec![b'n'; XATTR_NAME_MAX_BYTES + 1]),
    ]
}

fn omap_key_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => prop::sample::select(OMAP_KEYS.iter().map(|k| k.to_vec()).collect::<Vec<_>>()),
        1 => Just(vec![b'k'; OMAP_KEY_MAX_BYTES + 1]),
    ]
}

fn value_strategy(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![30 => vec(any::<u8>(), 0..8), 1 => Just(vec![0; max + 1])]
}

/// An owned `SubOp`, so strategies can generate it.
#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    WriteFull { data: Vec<u8> },
    Read { offset: u64, length: u64 },
    Zero { offset: u64, length: u64 },
    Truncate { size: u64 },
    Remove,
    Stat,
    SetXattr { name: Vec<u8>, value: Vec<u8> },
    GetXattr { name: Vec<u8> },
    OmapSet { key: Vec<u8>, value: Vec<u8> },
    OmapGet { key: Vec<u8> },
    OmapRemove { key: Vec<u8> },
}

impl Op {
    fn as_sub_op(&self) -> SubOp<'_> {
        match self {
            Op::Write { offset, data } => SubOp::Write {
                offset: *offset,
                data,
            },
            Op::WriteFull { data } => SubOp::WriteFull { data },
            Op::Read { offset, length } => SubOp::Read {
                offset: *offset,
                length: *length,
            },
            Op::Zero { offset, length } => SubOp::Zero {
                offset: *offset,
                length: *length,
            },
            Op::Truncate { size } => SubOp::Truncate { size: *size },
            Op::Remove => SubOp::Remove,
            Op::Stat => SubOp::Stat,
            Op::SetXattr { name, value } => SubOp::SetXattr { name, value },
            Op::GetXattr { name } => SubOp::GetXattr { name },
            Op::OmapSet { key, value } => SubOp::OmapSet { key, value },
            Op::OmapGet { key } => SubOp::OmapGet { key },
            Op::OmapRemove { key } => SubOp::OmapRemove { key },
        }
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offset_strategy(), data_strategy())
            .prop_map(|(offset, data)| Op::Write { offset, data }),
        2 => data_strategy().prop_map(|data| Op::WriteFull { data }),
        5 => (offset_strategy(), length_strategy())
            .prop_map(|(offset, length)| Op::Read { offset, length }),
        2 => (offset_strategy(), length_strategy())
            .prop_map(|(offset, length)| Op::Zero { offset, length }),
        2 => offset_strategy().prop_map(|size| Op::Truncate { size }),
        2 => Just(Op::Remove),
        3 => Just(Op::Stat),
        3 => (xattr_name_strategy(), value_strategy(XATTR_VALUE_MAX_BYTES))
            .prop_map(|(name, value)| Op::SetXattr { name, value }),
        2 => xattr_name_strategy().prop_map(|name| Op::GetXattr { name }),
        3 => (omap_key_strategy(), value_strategy(OMAP_VALUE_MAX_BYTES))
            .prop_map(|(key, value)| Op::OmapSet { key, value }),
        2 => omap_key_strategy().prop_map(|key| Op::OmapGet { key }),
        2 => omap_key_strategy().prop_map(|key| Op::OmapRemove { key }),
    ]
}

/// One generated operation: object, sub-ops, and the room the caller gives for output.
#[derive(Clone, Debug)]
struct Request {
    oid: Vec<u8>,
    ops: Vec<Op>,
    out_capacity: usize,
}

fn request_strategy() -> impl Strategy<Value = Request> {
    let ops = prop_oneof![
        30 => vec(op_strategy(), 1..6),
        1 => Just(Vec::new()),
        1 => Just(vec![Op::Stat; SUB_OPS_MAX + 1]),
    ];
    (oid_strategy(), ops, 0usize..96).prop_map(|(oid, ops, out_capacity)| Request {
        oid,
        ops,
        out_capacity,
    })
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ModelObject {
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    omap: BTreeMap<Vec<u8>, Vec<u8>>,
    generation: u64,
}

impl ModelObject {
    fn bytes(&self) -> u64 {
        let meta: usize = self
            .xattrs
            .iter()
            .chain(self.omap.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        (self.data.len() + meta) as u64
    }
}

/// What a completed operation produced.
struct Completion {
    results: Vec<SubOpResult>,
    region: Vec<u8>,
}

struct Model {
    objects: BTreeMap<Vec<u8>, ModelObject>,
    capacity_bytes: u64,
    stats: StoreStats,
}

fn range_too_large(offset: u64, length: u64) -> bool {
    match offset.checked_add(length) {
        Some(end) => end > OBJECT_SIZE_MAX_BYTES,
        None => true,
    }
}

impl Model {
    fn new(capacity_bytes: u64) -> Model {
        Model {
            objects: BTreeMap::new(),
            capacity_bytes,
            stats: StoreStats {
                capacity_bytes,
                ..StoreStats::default()
            },
        }
    }

    fn submit(&mut self, request: &Request) -> Result<Completion, StoreError> {
        let outcome = self.try_submit(request);
        if outcome.is_err() {
            self.stats.errors += 1;
        }
        self.stats.objects = self.objects.len() as u64;
        self.stats.bytes_stored = self.objects.values().map(ModelObject::bytes).sum();
        outcome
    }

    fn try_submit(&mut self, request: &Request) -> Result<Completion, StoreError> {
        // The object id is checked before the sub-op count.
        if request.oid.is_empty() {
            return Err(StoreError::InvalidArgument);
        }
        if request.oid.len() > OBJECT_ID_MAX_BYTES {
            return Err(StoreError::TooLarge);
        }
        if request.ops.is_empty() || request.ops.len() > SUB_OPS_MAX {
            return Err(StoreError::InvalidArgument);
        }
        let mut others = self.objects.clone();
        let mut object = others.remove(&request.oid);
        let others_bytes: u64 = others.values().map(ModelObject::bytes).sum();
        let mut bumped = false;
        let mut region = vec![OUT_FILL; request.out_capacity];
        let mut used = 0usize;
        let mut results = Vec::new();
        let mut mutated = false;
        for op in &request.ops {
            let result = if is_mutation(op) {
                mutated = true;
                model_mutate(&mut object, &mut bumped, op, self.capacity_bytes)?;
                if others_bytes + object.as_ref().map_or(0, ModelObject::bytes)
                    > self.capacity_bytes
                {
                    return Err(StoreError::NoSpace);
                }
                SubOpResult {
                    status: 0,
                    out_offset: used as u32,
                    out_len: 0,
                }
            } else {
                let output = model_read(object.as_ref(), op);
                match output {
                    Ok(bytes) if bytes.len() <= region.len() - used => {
                        region[used..used + bytes.len()].copy_from_slice(&bytes);
                        used += bytes.len();
                        SubOpResult {
                            status: 0,
                            out_offset: (used - bytes.len()) as u32,
                            out_len: bytes.len() as u32,
                        }
                    }
                    Ok(_) => SubOpResult {
                        status: StoreError::Range.code(),
                        out_offset: used as u32,
                        out_len: 0,
                    },
                    Err(e) => SubOpResult {
                        status: e.code(),
                        out_offset: used as u32,
                        out_len: 0,
                    },
                }
            };
            results.push(result);
        }
        if let Some(object) = object {
            others.insert(request.oid.clone(), object);
        }
        self.objects = others;
        self.stats.transactions += u64::from(mutated);
        // Only completed ops count their reads.
        self.stats.reads += request.ops.iter().filter(|op| !is_mutation(op)).count() as u64;
        Ok(Completion { results, region })
    }
}

fn is_mutation(op: &Op) -> bool {
    !matches!(
        op,
        Op::Read { .. } | Op::Stat | Op::GetXattr { .. } | Op::OmapGet { .. }
    )
}

fn check_xattr_name(name: &[u8]) -> Result<(), StoreError> {
    if name.is_empty() {
        Err(StoreError::InvalidArgument)
    } else if name.len() > XATTR_NAME_MAX_BYTES {
        Err(StoreError::TooLarge)
    } else {
        Ok(())
    }
}

fn check_max(bytes: &[u8], max: usize) -> Result<(), StoreError> {
    if bytes.len() > max {
        Err(StoreError::TooLarge)
    } else {
        Ok(())
    }
}

/// Limits first, then existence, as the interface specifies for each sub-op.
fn model_limits(op: &Op) -> Result<(), StoreError> {
    let too_large = match op {
        Op::Write { offset, data } => range_too_large(*offset, data.len() as u64),
        Op::WriteFull { data } => data.len() as u64 > OBJECT_SIZE_MAX_BYTES,
        Op::Zero { offset, length } => range_too_large(*offset, *length),
        Op::Truncate { size } => *size > OBJECT_SIZE_MAX_BYTES,
        Op::SetXattr { name, value } => {
            check_xattr_name(name)?;
            return check_max(value, XATTR_VALUE_MAX_BYTES);
        }
        Op::GetXattr { name } => return check_xattr_name(name),
        Op::OmapSet { key, value } => {
            check_max(key, OMAP_KEY_MAX_BYTES)?;
            return check_max(value, OMAP_VALUE_MAX_BYTES);
        }
        Op::OmapGet { key } | Op::OmapRemove { key } => return check_max(key, OMAP_KEY_MAX_BYTES),
        Op::Read { .. } | Op::Remove | Op::Stat => false,
    };
    if too_large {
        Err(StoreError::TooLarge)
    } else {
        Ok(())
    }
}

fn model_mutate(
    slot: &mut Option<ModelObject>,
    bumped: &mut bool,
    op: &Op,
    capacity_bytes: u64,
) -> Result<(), StoreError> {
    model_limits(op)?;
    let creates = matches!(
        op,
        Op::Write { .. }
            | Op::WriteFull { .. }
            | Op::Truncate { .. }
            | Op::SetXattr { .. }
            | Op::OmapSet { .. }
    );
    if slot.is_none() {
        if !creates {
            return Err(StoreError::NotFound);
        }
        *slot = Some(ModelObject::default());
        *bumped = false;
    }
    let object = slot.as_mut().unwrap();
    // An object larger than the whole capacity cannot fit whatever else happens: refuse before
    // materializing it (a Truncate can ask for a terabyte).
    let size_after = match op {
        Op::Write { offset, data } if !data.is_empty() => offset + data.len() as u64,
        Op::Zero { offset, length } if *length > 0 => offset + length,
        Op::Truncate { size } => *size,
        _ => 0,
    };
    if size_after > capacity_bytes {
        return Err(StoreError::NoSpace);
    }
    match op {
        Op::Write { offset, data } => {
            for (i, byte) in data.iter().enumerate() {
                let at = *offset as usize + i;
                while object.data.len() <= at {
                    object.data.push(0);
                }
                object.data[at] = *byte;
            }
        }
        Op::WriteFull { data } => object.data = data.clone(),
        Op::Zero { offset, length } => {
            for at in *offset as usize..(*offset + *length) as usize {
                while object.data.len() <= at {
                    object.data.push(0);
                }
                object.data[at] = 0;
            }
        }
        Op::Truncate { size } => object.data.resize(*size as usize, 0),
        Op::Remove => {
            *slot = None;
            return Ok(());
        }
        Op::SetXattr { name, value } => drop(object.xattrs.insert(name.clone(), value.clone())),
        Op::OmapSet { key, value } => drop(object.omap.insert(key.clone(), value.clone())),
        Op::OmapRemove { key } => drop(object.omap.remove(key)),
        _ => unreachable!(),
    }
    if !*bumped {
        object.generation += 1;
        *bumped = true;
    }
    Ok(())
}

fn model_read(object: Option<&ModelObject>, op: &Op) -> Result<Vec<u8>, StoreError> {
    model_limits(op)?;
    let object = object.ok_or(StoreError::NotFound)?;
    match op {
        Op::Read { offset, length } => Ok(object
            .data
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i as u64) >= *offset && ((*i as u64) - *offset) < *length)
            .map(|(_, b)| *b)
            .collect()),
        Op::Stat => {
            let mut bytes = (object.data.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&object.generation.to_le_bytes());
            Ok(bytes)
        }
        Op::GetXattr { name } => object.xattrs.get(name).cloned().ok_or(StoreError::NoData),
        Op::OmapGet { key } => object.omap.get(key).cloned().ok_or(StoreError::NoData),
        _ => unreachable!(),
    }
}

fn store_submit(store: &mut MemoryStore, request: &Request) -> Result<Completion, StoreError> {
    let ops: Vec<SubOp<'_>> = request.ops.iter().map(Op::as_sub_op).collect();
    let mut region = vec![OUT_FILL; request.out_capacity];
    // Garbage in results must be overwritten for every sub-op.
    let mut results = vec![
        SubOpResult {
            status: 999,
            out_offset: 999,
            out_len: 999
        };
        ops.len()
    ];
    let mut out = OutputBuffer::from_slice(&mut region);
    let submit = store.submit(1, &request.oid, &ops, &mut out, &mut results)?;
    assert_eq!(submit, Submit::Done);
    Ok(Completion { results, region })
}

/// Everything observable about one object through read-like sub-ops.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    stat: Option<ObjectStat>,
    data: Vec<u8>,
    xattrs: Vec<Option<Vec<u8>>>,
    omap: Vec<Option<Vec<u8>>>,
}

/// Reads every object the sequences can touch; returns the snapshot and the read sub-ops used.
fn snapshot_store(store: &mut MemoryStore) -> (Vec<Snapshot>, u64) {
    let mut snapshots = Vec::new();
    let mut reads = 0;
    for oid in OIDS {
        let mut ops = vec![
            SubOp::Stat,
            SubOp::Read {
                offset: 0,
                length: u64::MAX,
            },
        ];
        ops.extend(XATTR_NAMES.iter().map(|name| SubOp::GetXattr { name }));
        ops.extend(OMAP_KEYS.iter().map(|key| SubOp::OmapGet { key }));
        let mut region = vec![0; 1 << 12];
        let mut results = vec![SubOpResult::default(); ops.len()];
        let submit = store.submit(
            2,
            oid,
            &ops,
            &mut OutputBuffer::from_slice(&mut region),
            &mut results,
        );
        assert_eq!(submit, Ok(Submit::Done));
        reads += ops.len() as u64;
        let output = |i: usize| -> Option<Vec<u8>> {
            let r: SubOpResult = results[i];
            match r.result() {
                Ok(()) => Some(region[r.out_offset as usize..][..r.out_len as usize].to_vec()),
                Err(StoreError::NoData | StoreError::NotFound) => None,
                Err(e) => panic!("unexpected status {e}"),
            }
        };
        snapshots.push(Snapshot {
            stat: output(0).map(|bytes| ObjectStat::from_bytes(&bytes).unwrap()),
            data: output(1).unwrap_or_default(),
            xattrs: (2..2 + XATTR_NAMES.len()).map(output).collect(),
            omap: (2 + XATTR_NAMES.len()..ops.len()).map(output).collect(),
        });
    }
    (snapshots, reads)
}

fn snapshot_model(model: &Model) -> Vec<Snapshot> {
    OIDS.iter()
        .map(|oid| match model.objects.get(*oid) {
            None => Snapshot {
                stat: None,
                data: Vec::new(),
                xattrs: vec![None; XATTR_NAMES.len()],
                omap: vec![None; OMAP_KEYS.len()],
            },
            Some(object) => Snapshot {
                stat: Some(ObjectStat {
                    size: object.data.len() as u64,
                    generation: object.generation,
                }),
                data: object.data.clone(),
                xattrs: XATTR_NAMES
                    .iter()
                    .map(|n| object.xattrs.get(*n).cloned())
                    .collect(),
                omap: OMAP_KEYS
                    .iter()
                    .map(|k| object.omap.get(*k).cloned())
                    .collect(),
            },
        })
        .collect()
}

fn check_sequence(capacity_bytes: u64, requests: &[Request]) -> Result<(), TestCaseError> {
    let mut store = MemoryStore::new(capacity_bytes);
    let mut model = Model::new(capacity_bytes);
    let (mut before, reads) = snapshot_store(&mut store);
    model.stats.reads += reads;
    for (step, request) in requests.iter().enumerate() {
        let got = store_submit(&mut store, request);
        let expected = model.submit(request);
        match (&got, &expected) {
            (Ok(got), Ok(expected)) => {
                prop_assert_eq!(&got.results, &expected.results, "step {}: results", step);
                prop_assert_eq!(
                    &got.region,
                    &expected.region,
                    "step {}: output region",
                    step
                );
            }
            (Err(got), Err(expected)) => prop_assert_eq!(got, expected, "step {}", step),
            _ => prop_assert!(
                false,
                "step {}: store {:?} vs model {:?}",
                step,
                got.as_ref().err(),
                expected.as_ref().err()
            ),
        }
        store.verify();
        let (after, reads) = snapshot_store(&mut store);
        model.stats.reads += reads;
        prop_assert_eq!(&after, &snapshot_model(&model), "step {}: state", step);
        if got.is_err() {
            // Atomicity, checked directly: a failed op changes nothing visible.
            prop_assert_eq!(&after, &before, "step {}: failed op changed state", step);
        }
        prop_assert_eq!(store.stats(), model.stats, "step {}: stats", step);
        before = after;
    }
    Ok(())
}

proptest! {
    // No failure persistence: a failing case is printed, and tests write no files.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn memory_store_matches_model(
        capacity_bytes in prop_oneof![0u64..160, Just(1u64 << 20)],
        requests in vec(request_strategy(), 1..40),
    ) {
        check_sequence(capacity_bytes, &requests)?;
    }
}

/// Deterministic sequences that exercise the interplay the random ones reach only rarely.
#[test]
fn model_agrees_on_remove_and_recreate_within_an_op() {
    let request = |ops: Vec<Op>| Request {
        oid: b"o1".to_vec(),
        ops,
        out_capacity: 64,
    };
    let requests = vec![
        request(vec![
            Op::OmapSet {
                key: b"k1".to_vec(),
                value: b"v".to_vec(),
            },
            Op::Write {
                offset: 3,
                data: b"ab".to_vec(),
            },
        ]),
        request(vec![
            Op::Remove,
            Op::OmapGet {
                key: b"k1".to_vec(),
            },
            Op::OmapSet {
                key: b"k1".to_vec(),
                value: b"vvvv".to_vec(),
            },
            Op::Stat,
            Op::OmapRemove {
                key: b"k1".to_vec(),
            },
            Op::SetXattr {
                name: b"user.a".to_vec(),
                value: b"x".to_vec(),
            },
            Op::Read {
                offset: 0,
                length: 10,
            },
        ]),
        request(vec![
            Op::Zero {
                offset: 10,
                length: 2,
            },
            Op::Stat,
        ]),
    ];
    check_sequence(40, &requests).unwrap();
    check_sequence(6, &requests).unwrap();
}

/// A change to one object, for the in-place read model: offsets and sizes around three
/// 4 KiB blocks, so that changes land inside, across and past block edges.
#[derive(Clone, Debug)]
enum BlockChange {
    Write { offset: u64, len: usize, byte: u8 },
    Zero { offset: u64, length: u64 },
    Truncate { size: u64 },
    WriteFull { len: usize, byte: u8 },
}

fn block_change_strategy() -> impl Strategy<Value = BlockChange> {
    let offset = 0u64..3 * 4096 + 100;
    prop_oneof![
        6 => (offset.clone(), 1usize..5000, any::<u8>())
            .prop_map(|(offset, len, byte)| BlockChange::Write { offset, len, byte }),
        2 => (offset.clone(), 0u64..5000)
            .prop_map(|(offset, length)| BlockChange::Zero { offset, length }),
        2 => offset.prop_map(|size| BlockChange::Truncate { size }),
        1 => (0usize..3 * 4096 + 100, any::<u8>())
            .prop_map(|(len, byte)| BlockChange::WriteFull { len, byte }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// `read_in_place` after any sequence of changes: served exactly when the range is whole
    /// blocks within the object, with the object's bytes and their crc (a kept crc the
    /// changes should have forgotten would differ from the bytes' crc).
    #[test]
    fn read_in_place_matches_a_byte_model(
        steps in vec((block_change_strategy(), 0u64..4, 1u64..4), 1..30),
    ) {
        const BLOCK: u64 = READ_IN_PLACE_BLOCK_BYTES;
        let mut store = MemoryStore::new(1 << 20);
        let mut model: Option<Vec<u8>> = None;
        for (change, first_block, blocks) in steps {
            let payload;
            let op = match change {
                BlockChange::Write { offset, len, byte } => {
                    payload = vec![byte; len];
                    let data = model.get_or_insert_with(Vec::new);
                    let end = offset as usize + len;
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[offset as usize..end].fill(byte);
                    SubOp::Write { offset, data: &payload }
                }
                BlockChange::Zero { offset, length } => {
                    let Some(data) = model.as_mut() else { continue };
                    let end = (offset + length) as usize;
                    if length > 0 {
                        if data.len() < end {
                            data.resize(end, 0);
                        }
                        data[offset as usize..end].fill(0);
                    }
                    SubOp::Zero { offset, length }
                }
                BlockChange::Truncate { size } => {
                    model.get_or_insert_with(Vec::new).resize(size as usize, 0);
                    SubOp::Truncate { size }
                }
                BlockChange::WriteFull { len, byte } => {
                    payload = vec![byte; len];
                    model = Some(payload.clone());
                    SubOp::WriteFull { data: &payload }
                }
            };
            let mut results = [SubOpResult::default()];
            let submit = store.submit(1, b"o", &[op], &mut OutputBuffer::empty(), &mut results);
            prop_assert_eq!(submit, Ok(Submit::Done));
            let (offset, length) = (first_block * BLOCK, blocks * BLOCK);
            let data = model.as_deref().unwrap_or(&[]);
            let whole = model.is_some() && offset + length <= data.len() as u64;
            match store.read_in_place(b"o", offset, length) {
                Some(read) => {
                    prop_assert!(whole, "served a range past the object's end");
                    // SAFETY: no mutation of the store before this copy.
                    let bytes = unsafe { std::slice::from_raw_parts(read.ptr, read.len) };
                    let want = &data[offset as usize..(offset + length) as usize];
                    prop_assert!(bytes == want, "bytes differ at {}+{}", offset, length);
                    prop_assert_eq!(read.crc, carmine_crc::crc32c(want));
                }
                None => prop_assert!(!whole, "refused whole blocks {}+{}", offset, length),
            }
        }
    }
}
