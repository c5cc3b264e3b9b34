//! The simulation's oracle: what each object may hold, given the server's answers.
//!
//! Every op on an object travels through the same connection, so the server applies them in
//! the order they were sent (one ring hop keeps order, the PG queue and the store's lane keep
//! it). An object's history is that order; each mutation in it is acknowledged (must be
//! applied), refused (applied nothing: the store validates before it applies), or unknown
//! (no answer before the power cut, or an I/O error after it: applied wholly or not at all).
//! The candidate states are every way the unknown ones can have gone; an observation (a read
//! before or after a cut) must be one of them, and then becomes the only one.

use std::collections::BTreeMap;

use carmine_dataplane::wire::{Status, SubOpCode, SubOpSpec};

/// Objects never grow past this, so one read returns them whole.
pub const OBJECT_BYTES_MAX: u64 = 48 << 10;
pub const XATTR_NAMES: [&[u8]; 2] = [b"a", b"b"];
pub const OMAP_KEYS: [&[u8]; 2] = [b"k1", b"k2"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Object {
    pub data: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub omap: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// An object's state: `None` when it does not exist.
pub type State = Option<Object>;

/// A mutation sub-op with its bytes.
#[derive(Clone, Debug)]
pub enum Mutation {
    Write { offset: u64, data: Vec<u8> },
    WriteFull { data: Vec<u8> },
    Zero { offset: u64, length: u64 },
    Truncate { size: u64 },
    Remove,
    SetXattr { name: Vec<u8>, value: Vec<u8> },
    OmapSet { key: Vec<u8>, value: Vec<u8> },
    OmapRemove { key: Vec<u8> },
}

impl Mutation {
    pub fn spec(&self) -> SubOpSpec<'_> {
        let mut spec = SubOpSpec::simple(SubOpCode::Stat);
        match self {
            Mutation::Write { offset, data } => return SubOpSpec::write(*offset, data),
            Mutation::WriteFull { data } => {
                spec.code = SubOpCode::WriteFull;
                spec.data = data;
            }
            Mutation::Zero { offset, length } => {
                spec.code = SubOpCode::Zero;
                spec.offset = *offset;
                spec.length = *length;
            }
            Mutation::Truncate { size } => {
                spec.code = SubOpCode::Truncate;
                spec.offset = *size;
            }
            Mutation::Remove => spec.code = SubOpCode::Remove,
            Mutation::SetXattr { name, value } => {
                spec.code = SubOpCode::SetXattr;
                spec.name = name;
                spec.data = value;
            }
            Mutation::OmapSet { key, value } => {
                spec.code = SubOpCode::OmapSet;
                spec.name = key;
                spec.data = value;
            }
            Mutation::OmapRemove { key } => {
                spec.code = SubOpCode::OmapRemove;
                spec.name = key;
            }
        }
        spec
    }

    fn creates_object(&self) -> bool {
        matches!(
            self,
            Mutation::Write { .. }
                | Mutation::WriteFull { .. }
                | Mutation::Truncate { .. }
                | Mutation::SetXattr { .. }
                | Mutation::OmapSet { .. }
        )
    }
}

/// The state after `ops` applied to `state` as one transaction, or `None` when the store
/// refuses it (a mutation of a missing object that does not create it: NotFound).
pub fn apply(state: &State, ops: &[Mutation]) -> Option<State> {
    let mut state = state.clone();
    for op in ops {
        if state.is_none() {
            if !op.creates_object() {
                return None;
            }
            state = Some(Object::default());
        }
        let object = state.as_mut().expect("exists");
        match op {
            Mutation::Write { offset, data } => {
                if !data.is_empty() {
                    let end = *offset as usize + data.len();
                    if object.data.len() < end {
                        object.data.resize(end, 0);
                    }
                    object.data[*offset as usize..end].copy_from_slice(data);
                }
            }
            Mutation::WriteFull { data } => object.data = data.clone(),
            Mutation::Zero { offset, length } => {
                if *length > 0 {
                    let end = (*offset + *length) as usize;
                    let stop = end.min(object.data.len());
                    if (*offset as usize) < stop {
                        object.data[*offset as usize..stop].fill(0);
                    }
                    if end > object.data.len() {
                        object.data.resize(end, 0);
                    }
                }
            }
            Mutation::Truncate { size } => object.data.resize(*size as usize, 0),
            Mutation::Remove => state = None,
            Mutation::SetXattr { name, value } => {
                object.xattrs.insert(name.clone(), value.clone());
            }
            Mutation::OmapSet { key, value } => {
                object.omap.insert(key.clone(), value.clone());
            }
            Mutation::OmapRemove { key } => {
                object.omap.remove(key);
            }
        }
    }
    Some(state)
}

/// What became of one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Sent, no answer yet.
    Pending,
    Acked,
    /// Refused with this status: nothing applied.
    Refused(Status),
    /// Refused after the power cut: nothing applied, and the refusal says nothing about the
    /// state (it was decided on memory that no longer matches the device: see `run.rs`).
    NotApplied,
    /// Applied wholly or not at all: unanswered at a power cut, or failed after it.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub request_id: u64,
    pub ops: Vec<Mutation>,
    pub fate: Fate,
}

/// One object's oracle: candidate states before `history`, and the mutations since.
#[derive(Clone, Debug)]
pub struct ObjectModel {
    base: Vec<State>,
    history: Vec<Entry>,
}

impl Default for ObjectModel {
    fn default() -> ObjectModel {
        ObjectModel {
            base: vec![None],
            history: Vec::new(),
        }
    }
}

/// Candidate sets stay tiny (one unknown op per object at a time); this bounds a bug.
const CANDIDATES_MAX: usize = 64;

impl ObjectModel {
    pub fn push(&mut self, request_id: u64, ops: Vec<Mutation>) {
        self.history.push(Entry {
            request_id,
            ops,
            fate: Fate::Pending,
        });
    }

    pub fn in_flight(&self) -> usize {
        self.history
            .iter()
            .filter(|e| e.fate == Fate::Pending)
            .count()
    }

    /// Records the answer to mutation `request_id`.
    pub fn resolve(&mut self, request_id: u64, fate: Fate) {
        let entry = self
            .history
            .iter_mut()
            .find(|e| e.request_id == request_id)
            .expect("answers come for ops sent");
        assert_eq!(entry.fate, Fate::Pending, "op {request_id} answered twice");
        entry.fate = fate;
    }

    /// Every op without an answer at a power cut may or may not have been applied.
    pub fn power_cut(&mut self) {
        for entry in &mut self.history {
            if entry.fate == Fate::Pending {
                entry.fate = Fate::Unknown;
            }
        }
    }

    /// The states the object may be in after the first `upto` entries of its history (all of
    /// them when `None`). Err: the answers fit no state (the server broke a rule).
    pub fn candidates(&self, upto: Option<u64>) -> Result<Vec<State>, String> {
        let mut states = self.base.clone();
        for entry in &self.history {
            if upto.is_some_and(|id| entry.request_id >= id) {
                break;
            }
            let mut next: Vec<State> = Vec::with_capacity(states.len() * 2);
            for state in &states {
                let applied = apply(state, &entry.ops);
                match entry.fate {
                    Fate::Acked => next.extend(applied),
                    Fate::Refused(Status::NotFound) => {
                        if applied.is_none() {
                            next.push(state.clone());
                        }
                    }
                    Fate::Refused(_) | Fate::NotApplied => next.push(state.clone()),
                    Fate::Pending | Fate::Unknown => {
                        next.push(state.clone());
                        next.extend(applied);
                    }
                }
            }
            next.dedup();
            dedup_all(&mut next);
            if next.is_empty() {
                return Err(format!(
                    "op {} was answered {:?}, which no possible state allows",
                    entry.request_id, entry.fate
                ));
            }
            if next.len() > CANDIDATES_MAX {
                return Err(format!("{} candidate states: too many", next.len()));
            }
            states = next;
        }
        Ok(states)
    }

    /// The object was observed in `state` with nothing in flight (after a remount): that is
    /// now its only state.
    pub fn settle(&mut self, state: State) {
        self.base = vec![state];
        self.history.clear();
    }

    /// Folds answered entries at the front of the history into the base, while that keeps
    /// one base state (bounds the work of `candidates`).
    pub fn compact(&mut self) {
        while self.base.len() == 1
            && self
                .history
                .first()
                .is_some_and(|e| e.fate != Fate::Pending && e.fate != Fate::Unknown)
        {
            let entry = self.history.remove(0);
            let state = &self.base[0];
            let next = match entry.fate {
                Fate::Acked => apply(state, &entry.ops),
                _ => Some(state.clone()),
            };
            match next {
                Some(state) => self.base = vec![state],
                None => {
                    // Inconsistent; keep it for `candidates` to report.
                    self.history.insert(0, entry);
                    return;
                }
            }
        }
    }
}

impl ObjectModel {
    /// The base states and the history, one line each (for failure messages).
    pub fn describe_history(&self) -> String {
        let mut text = format!(
            "base: {}",
            self.base
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join(" or ")
        );
        for entry in &self.history {
            let ops: Vec<String> = entry.ops.iter().map(describe_mutation).collect();
            text.push_str(&format!(
                "\n  op {} {:?}: {}",
                entry.request_id,
                entry.fate,
                ops.join(", ")
            ));
        }
        text
    }
}

fn describe_mutation(m: &Mutation) -> String {
    match m {
        Mutation::Write { offset, data } => format!("write {offset}+{}", data.len()),
        Mutation::WriteFull { data } => format!("write_full {}", data.len()),
        Mutation::Zero { offset, length } => format!("zero {offset}+{length}"),
        Mutation::Truncate { size } => format!("truncate {size}"),
        Mutation::Remove => "remove".to_string(),
        Mutation::SetXattr { name, value } => {
            format!("setxattr {} {}", String::from_utf8_lossy(name), value.len())
        }
        Mutation::OmapSet { key, value } => {
            format!("omap_set {} {}", String::from_utf8_lossy(key), value.len())
        }
        Mutation::OmapRemove { key } => format!("omap_rm {}", String::from_utf8_lossy(key)),
    }
}

fn dedup_all(states: &mut Vec<State>) {
    let mut unique: Vec<State> = Vec::with_capacity(states.len());
    for state in states.drain(..) {
        if !unique.contains(&state) {
            unique.push(state);
        }
    }
    *states = unique;
}

/// A short description of a state for failure messages (digests, not kilobytes).
pub fn describe(state: &State) -> String {
    match state {
        None => "absent".to_string(),
        Some(object) => format!(
            "{{size {}, crc {:08x}, xattrs {:?}, omap {:?}}}",
            object.data.len(),
            carmine_crc::crc32c(&object.data),
            object
                .xattrs
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.len()))
                .collect::<Vec<_>>(),
            object
                .omap
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.len()))
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carmine_storage::{MemoryStore, ObjectStore, OutputBuffer, SubOp, SubOpResult, Submit};

    fn store_op(m: &Mutation) -> SubOp<'_> {
        match m {
            Mutation::Write { offset, data } => SubOp::Write {
                offset: *offset,
                data,
            },
            Mutation::WriteFull { data } => SubOp::WriteFull { data },
            Mutation::Zero { offset, length } => SubOp::Zero {
                offset: *offset,
                length: *length,
            },
            Mutation::Truncate { size } => SubOp::Truncate { size: *size },
            Mutation::Remove => SubOp::Remove,
            Mutation::SetXattr { name, value } => SubOp::SetXattr { name, value },
            Mutation::OmapSet { key, value } => SubOp::OmapSet { key, value },
            Mutation::OmapRemove { key } => SubOp::OmapRemove { key },
        }
    }

    fn read_back(store: &mut MemoryStore) -> State {
        let mut ops = vec![
            SubOp::Read {
                offset: 0,
                length: OBJECT_BYTES_MAX,
            },
            SubOp::GetXattr { name: b"a" },
            SubOp::GetXattr { name: b"b" },
            SubOp::OmapGet { key: b"k1" },
            SubOp::OmapGet { key: b"k2" },
        ];
        ops.insert(0, SubOp::Stat);
        let mut out = vec![0u8; 1 << 20];
        let mut results = [SubOpResult::default(); 6];
        let mut buffer = OutputBuffer::from_slice(&mut out);
        let done = store.submit(0, b"o", &ops, &mut buffer, &mut results);
        assert!(matches!(done, Ok(Submit::Done)));
        if results[0].status != 0 {
            return None;
        }
        let slice = |r: &SubOpResult| out[r.out_offset as usize..][..r.out_len as usize].to_vec();
        let mut object = Object {
            data: slice(&results[1]),
            ..Object::default()
        };
        for (i, name) in [b"a".as_slice(), b"b"].iter().enumerate() {
            if results[2 + i].status == 0 {
                object.xattrs.insert(name.to_vec(), slice(&results[2 + i]));
            }
        }
        for (i, key) in [b"k1".as_slice(), b"k2"].iter().enumerate() {
            if results[4 + i].status == 0 {
                object.omap.insert(key.to_vec(), slice(&results[4 + i]));
            }
        }
        Some(object)
    }

    /// The oracle must mean what the stores mean: random transactions applied to the model
    /// and to the memory store (the reference the segment store is tested against) agree,
    /// refusals included.
    #[test]
    fn the_model_agrees_with_the_memory_store() {
        let mut store = MemoryStore::new(1 << 30);
        let mut state: State = None;
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..3000 {
            let ops: Vec<Mutation> = (0..1 + next(3))
                .map(|_| {
                    let len = next(9000);
                    match next(8) {
                        0 => Mutation::Write {
                            offset: next(OBJECT_BYTES_MAX - len),
                            data: vec![1 + next(250) as u8; len as usize],
                        },
                        1 => Mutation::WriteFull {
                            data: vec![7; len as usize],
                        },
                        2 => Mutation::Zero {
                            offset: next(OBJECT_BYTES_MAX - len),
                            length: len,
                        },
                        3 => Mutation::Truncate {
                            size: next(OBJECT_BYTES_MAX),
                        },
                        4 => Mutation::Remove,
                        5 => Mutation::SetXattr {
                            name: XATTR_NAMES[next(2) as usize].to_vec(),
                            value: vec![3; next(9) as usize],
                        },
                        6 => Mutation::OmapSet {
                            key: OMAP_KEYS[next(2) as usize].to_vec(),
                            value: vec![4; next(9) as usize],
                        },
                        _ => Mutation::OmapRemove {
                            key: OMAP_KEYS[next(2) as usize].to_vec(),
                        },
                    }
                })
                .collect();
            let sub_ops: Vec<SubOp<'_>> = ops.iter().map(store_op).collect();
            let mut results = [SubOpResult::default(); 4];
            let outcome = store.submit(
                0,
                b"o",
                &sub_ops,
                &mut OutputBuffer::empty(),
                &mut results[..sub_ops.len()],
            );
            match apply(&state, &ops) {
                Some(next_state) => {
                    assert!(
                        outcome.is_ok(),
                        "round {round}: {ops:?} refused: {outcome:?}"
                    );
                    state = next_state;
                }
                None => assert!(outcome.is_err(), "round {round}: {ops:?} accepted"),
            }
            assert_eq!(read_back(&mut store), state, "round {round}: after {ops:?}");
        }
    }
}
