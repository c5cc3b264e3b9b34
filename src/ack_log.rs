//! The acknowledged-write log: the oracle of every crash test.
//!
//! `carmine load --ack-log FILE` appends one line per write it sends (`I`, issued) and one per
//! write the server acknowledged (`A`): object, offset, length and the write's counter, which
//! with the object and offset determines the block's whole content (`load::fill_block`).
//! `carmine load --check FILE` reads every block the log names back and judges it:
//!
//! - acknowledged at least once: the content must be that of the last acknowledged write, or
//!   of a write issued after it (in flight when the server died: it may or may not have
//!   landed, and it lands whole or not at all). Anything else is a lost acknowledged write
//!   (older content, zeros, the object gone) or corruption.
//! - never acknowledged: unwritten, or any write issued to it.
//!
//! The log is text (`I obj.3 4096 4096 7`), appended by any number of runs (the lines of one
//! block stay in order because one generator thread owns each block and `--ack-log` keeps one
//! write per block in flight). Each thread buffers its lines and appends them with one write
//! per `FLUSH_BYTES`, and at exit, whatever the exit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use carmine_dataplane::wire::{Opcode, Status, SubOpSpec};

use crate::client;
use crate::load::{check_block, name_hash, BlockCheck};

/// A thread's buffered lines are appended once they pass this size.
const FLUSH_BYTES: usize = 64 * 1024;
/// Largest read the check issues (several blocks per request).
const CHECK_READ_BYTES_MAX: u64 = 1 << 20;

/// The shared log file; each generator thread appends through its own `ThreadLog`.
#[derive(Clone, Debug)]
pub struct AckLog {
    file: Arc<Mutex<File>>,
}

impl AckLog {
    pub fn open(path: &Path) -> Result<AckLog, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("--ack-log {}: {e}", path.display()))?;
        Ok(AckLog {
            file: Arc::new(Mutex::new(file)),
        })
    }

    pub fn thread(&self) -> ThreadLog {
        ThreadLog {
            log: self.clone(),
            buffer: Vec::with_capacity(FLUSH_BYTES * 2),
            failed: false,
        }
    }
}

pub struct ThreadLog {
    log: AckLog,
    buffer: Vec<u8>,
    failed: bool,
}

impl ThreadLog {
    pub fn issued(&mut self, oid: &[u8], offset: u64, length: u64, counter: u32) {
        self.line(b'I', oid, offset, length, counter);
    }

    pub fn acked(&mut self, oid: &[u8], offset: u64, length: u64, counter: u32) {
        self.line(b'A', oid, offset, length, counter);
    }

    fn line(&mut self, kind: u8, oid: &[u8], offset: u64, length: u64, counter: u32) {
        self.buffer.push(kind);
        self.buffer.push(b' ');
        self.buffer.extend_from_slice(oid);
        // Writing into a Vec cannot fail.
        let _ = writeln!(self.buffer, " {offset} {length} {counter}");
        if self.buffer.len() >= FLUSH_BYTES {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buffer.is_empty() || self.failed {
            return;
        }
        let mut file = self.log.file.lock().expect("ack log lock");
        if let Err(e) = file.write_all(&self.buffer) {
            // The log is the test's oracle: a partial one must not pass for a whole one.
            log::error!("ack log: append failed ({e}); the log is incomplete from here");
            self.failed = true;
        }
        self.buffer.clear();
    }
}

impl Drop for ThreadLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What the log says of one block.
#[derive(Debug, Default)]
struct Expect {
    /// Counter of the last acknowledged write; None: never acknowledged.
    acked: Option<u32>,
    /// Counters of the writes issued after it (in flight when the log ended).
    later: Vec<u32>,
    length: u64,
}

impl Expect {
    fn allows(&self, counter: u64) -> bool {
        self.acked.is_some_and(|c| u64::from(c) == counter)
            || self.later.iter().any(|&c| u64::from(c) == counter)
    }
}

#[derive(serde::Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub lines: u64,
    pub blocks: u64,
    /// Blocks with at least one acknowledged write.
    pub acked_blocks: u64,
    /// Blocks holding a write issued after their last acknowledged one (it landed).
    pub later_writes_found: u64,
    /// Acknowledged blocks that read back older content, zeros, or not at all.
    pub lost: u64,
    /// Blocks whose content is no write's (torn, corrupt, wrong block).
    pub corrupt: u64,
    /// Reads the server failed (other than not_found of a never-acknowledged block).
    pub read_errors: u64,
    /// The first few problems, as sentences.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn failures(&self) -> u64 {
        self.lost + self.corrupt + self.read_errors
    }

    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }
}

/// Reads the log: (object, offset) -> what its content may be.
fn parse(path: &Path) -> Result<(HashMap<(Vec<u8>, u64), Expect>, u64), String> {
    let file = File::open(path).map_err(|e| format!("--check {}: {e}", path.display()))?;
    let mut blocks: HashMap<(Vec<u8>, u64), Expect> = HashMap::new();
    let mut lines = 0;
    for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| format!("--check {}: {e}", path.display()))?;
        let bad = || format!("{}:{}: not an ack-log line", path.display(), index + 1);
        let mut fields = line.split(|b| *b == b' ');
        let (Some(kind), Some(oid), Some(offset), Some(length), Some(counter), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(bad());
        };
        let number = |field: &[u8]| -> Result<u64, String> {
            std::str::from_utf8(field)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(bad)
        };
        let (offset, length) = (number(offset)?, number(length)?);
        let counter = u32::try_from(number(counter)?).map_err(|_| bad())?;
        let expect = blocks.entry((oid.to_vec(), offset)).or_default();
        if expect.length != 0 && expect.length != length {
            return Err(format!(
                "{}:{}: block length changed from {} to {length}: one log per block size",
                path.display(),
                index + 1,
                expect.length
            ));
        }
        expect.length = length;
        match kind {
            b"I" => expect.later.push(counter),
            b"A" => {
                expect.acked = Some(counter);
                expect.later.clear();
            }
            _ => return Err(bad()),
        }
        lines += 1;
    }
    Ok((blocks, lines))
}

/// Reads back every block the log at `path` names from `target` and judges it.
pub fn check(target: &str, path: &Path) -> Result<CheckReport, String> {
    let (blocks, lines) = parse(path)?;
    let mut report = CheckReport {
        lines,
        blocks: blocks.len() as u64,
        ..CheckReport::default()
    };
    // Per object, its blocks in offset order, read in runs of adjacent blocks.
    let mut by_object: HashMap<&[u8], Vec<(u64, &Expect)>> = HashMap::new();
    for ((oid, offset), expect) in &blocks {
        by_object
            .entry(oid.as_slice())
            .or_default()
            .push((*offset, expect));
    }
    let mut stream = client::connect(target)?;
    let mut objects: Vec<_> = by_object.into_iter().collect();
    objects.sort_by(|a, b| a.0.cmp(b.0));
    for (oid, mut list) in objects {
        list.sort_by_key(|(offset, _)| *offset);
        let mut start = 0;
        while start < list.len() {
            let mut end = start + 1;
            while end < list.len()
                && list[end].0 == list[end - 1].0 + list[end - 1].1.length
                && list[end].0 + list[end].1.length - list[start].0 <= CHECK_READ_BYTES_MAX
            {
                end += 1;
            }
            check_run(&mut stream, oid, &list[start..end], &mut report)?;
            start = end;
        }
    }
    Ok(report)
}

/// Reads adjacent blocks `run` of `oid` with one request and judges each.
fn check_run(
    stream: &mut std::net::TcpStream,
    oid: &[u8],
    run: &[(u64, &Expect)],
    report: &mut CheckReport,
) -> Result<(), String> {
    let first = run[0].0;
    let (last_offset, last) = run[run.len() - 1];
    let length = last_offset + last.length - first;
    let reply = client::call(
        stream,
        Opcode::OsdOp,
        oid,
        &[SubOpSpec::read(first, length)],
    )?;
    let name = String::from_utf8_lossy(oid);
    let (status, data) = match reply.results.first() {
        Some((status, data)) if reply.status == Status::Ok as u32 => (*status, data.as_slice()),
        _ => (reply.status, &[][..]),
    };
    let hash = name_hash(oid);
    for &(offset, expect) in run {
        report.acked_blocks += u64::from(expect.acked.is_some());
        if status != Status::Ok as u32 {
            if status == Status::NotFound as u32 && expect.acked.is_none() {
                continue;
            }
            let what = client::status_name(status);
            if status == Status::NotFound as u32 {
                report.lost += 1;
                report.problem(format!(
                    "{name} offset {offset}: object gone (acknowledged counter {:?})",
                    expect.acked
                ));
            } else {
                report.read_errors += 1;
                report.problem(format!("{name} offset {offset}: read failed: {what}"));
            }
            continue;
        }
        let at = (offset - first) as usize;
        let block = data
            .get(at..(at + expect.length as usize).min(data.len()))
            .unwrap_or(&[]);
        match check_block(block, expect.length as usize, hash, offset, 0) {
            BlockCheck::Intact { counter } if expect.allows(counter) => {
                report.later_writes_found +=
                    u64::from(expect.acked.map(u64::from) != Some(counter));
            }
            BlockCheck::Unwritten if expect.acked.is_none() => {}
            BlockCheck::Intact { counter } => {
                report.lost += 1;
                report.problem(format!(
                    "{name} offset {offset}: holds write {counter}, but write {:?} was acknowledged (later issued: {:?})",
                    expect.acked, expect.later
                ));
            }
            BlockCheck::Unwritten => {
                report.lost += 1;
                report.problem(format!(
                    "{name} offset {offset}: unwritten, but write {:?} was acknowledged",
                    expect.acked
                ));
            }
            BlockCheck::Mismatch(mismatch) => {
                report.corrupt += 1;
                report.problem(format!(
                    "{name} offset {offset}: {} at byte {} (found counter {}, acknowledged {:?})",
                    mismatch.reason, mismatch.byte, mismatch.got_counter, expect.acked
                ));
            }
        }
    }
    Ok(())
}

pub fn print_human(report: &CheckReport) {
    println!(
        "ack-log check: {} lines, {} blocks ({} acknowledged): {} lost, {} corrupt, {} read errors; {} in-flight writes found applied",
        report.lines,
        report.blocks,
        report.acked_blocks,
        report.lost,
        report.corrupt,
        report.read_errors,
        report.later_writes_found
    );
    for problem in &report.problems {
        println!("  {problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_text(text: &str) -> HashMap<(Vec<u8>, u64), Expect> {
        let path = std::env::temp_dir().join(format!(
            "carmine-ack-{}-{}.log",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let (blocks, _) = parse(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        blocks
    }

    #[test]
    fn the_last_ack_and_later_issues_decide() {
        let blocks = log_text(
            "I o.1 0 4096 1\nA o.1 0 4096 1\nI o.1 0 4096 2\nA o.1 0 4096 2\nI o.1 0 4096 3\nI o.2 4096 4096 1\n",
        );
        let block = &blocks[&(b"o.1".to_vec(), 0)];
        assert_eq!(block.acked, Some(2));
        assert!(block.allows(2) && block.allows(3));
        assert!(
            !block.allows(1),
            "an older acknowledged write is a lost one"
        );
        let never = &blocks[&(b"o.2".to_vec(), 4096)];
        assert_eq!(never.acked, None);
        assert!(never.allows(1) && !never.allows(2));
    }

    #[test]
    fn a_broken_line_is_an_error_with_its_line_number() {
        let path = std::env::temp_dir().join(format!("carmine-ack-bad-{}.log", std::process::id()));
        std::fs::write(&path, "A o.1 0 4096 1\nA o.1 zero 4096 1\n").unwrap();
        let error = parse(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(error.ends_with(":2: not an ack-log line"), "{error}");
    }
}
