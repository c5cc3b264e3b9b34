//! Block images on objects (RBD's layout): an image `NAME` is a header object `NAME.header`
//! holding its size and object size, and data objects `NAME.<index>` of `object_size` bytes,
//! each placed, ordered and stored like any other object. The directory object
//! `carmine.images` lists the image names, one per line: it is what `NBD_OPT_LIST` and
//! `carmine image list` read.
//!
//! A data object that was never written reads as zeros; a short object reads as its bytes then
//! zeros, so an image costs nothing until it is written.

use std::fmt::Write as _;

/// The directory object's id.
pub const DIRECTORY_OID: &[u8] = b"carmine.images";
/// Largest directory, in bytes: a single read returns it (about 1,000 names of 32 bytes).
pub const DIRECTORY_BYTES_MAX: usize = 32 << 10;
/// Longest image name: with ".<index>" (at most 20 digits) an object id stays short.
pub const NAME_BYTES_MAX: usize = 64;
/// Longest object id of an image: name, '.', index or "header".
pub const OID_BYTES_MAX: usize = NAME_BYTES_MAX + 1 + 20;
/// Bytes of the header record.
pub const HEADER_BYTES: usize = 32;
/// Object sizes allowed: powers of two in this range. The lower bound keeps the object count
/// of a large image sane; any power of two at least as big as a request part keeps every part
/// inside one object.
pub const OBJECT_SIZE_MIN_BYTES: u64 = 64 << 10;
pub const OBJECT_SIZE_MAX_BYTES: u64 = 1 << 30;
/// Largest image size: every offset (and offset + length) fits the arithmetic with room.
pub const IMAGE_SIZE_MAX_BYTES: u64 = 1 << 60;

const HEADER_MAGIC: &[u8; 8] = b"CRMNIMG1";

/// An image's geometry, as its header object holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub size: u64,
    pub object_size: u64,
}

impl ImageHeader {
    /// Layout: magic (8), size u64 LE, object size u64 LE, 8 reserved zero bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(HEADER_MAGIC);
        out[8..16].copy_from_slice(&self.size.to_le_bytes());
        out[16..24].copy_from_slice(&self.object_size.to_le_bytes());
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<ImageHeader, String> {
        if bytes.len() < HEADER_BYTES || &bytes[0..8] != HEADER_MAGIC {
            return Err("not an image header (bad magic or short)".into());
        }
        let header = ImageHeader {
            size: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            object_size: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
        };
        header.validate()?;
        Ok(header)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.object_size.is_power_of_two()
            || !(OBJECT_SIZE_MIN_BYTES..=OBJECT_SIZE_MAX_BYTES).contains(&self.object_size)
        {
            return Err(format!(
                "object size {} must be a power of two from 64KiB to 1GiB",
                self.object_size
            ));
        }
        if self.size == 0 || self.size > IMAGE_SIZE_MAX_BYTES {
            return Err(format!("image size {} must be 1..=2^60 bytes", self.size));
        }
        Ok(())
    }

    /// Data objects the image spans.
    pub fn object_count(&self) -> u64 {
        self.size.div_ceil(self.object_size)
    }
}

/// Names are 1..=64 of `[A-Za-z0-9_-]`: no '.', so `NAME.<index>` of one image is never an
/// object of another, and no byte that needs quoting in a URI or a shell.
pub fn check_name(name: &[u8]) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "image name {:?}: use 1 to {NAME_BYTES_MAX} letters, digits, '_' or '-'",
            String::from_utf8_lossy(name)
        ))
    }
}

/// An object id built on the stack (no allocation per op).
#[derive(Clone, Copy)]
pub struct Oid {
    bytes: [u8; OID_BYTES_MAX],
    len: usize,
}

impl Oid {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn with_suffix(name: &[u8], suffix: &[u8]) -> Oid {
        assert!(name.len() <= NAME_BYTES_MAX && suffix.len() <= 20);
        let mut oid = Oid {
            bytes: [0; OID_BYTES_MAX],
            len: 0,
        };
        oid.bytes[..name.len()].copy_from_slice(name);
        oid.bytes[name.len()] = b'.';
        oid.bytes[name.len() + 1..name.len() + 1 + suffix.len()].copy_from_slice(suffix);
        oid.len = name.len() + 1 + suffix.len();
        oid
    }

    /// `NAME.header`.
    pub fn header(name: &[u8]) -> Oid {
        Oid::with_suffix(name, b"header")
    }

    /// `NAME.<index>`, index in decimal.
    pub fn data(name: &[u8], index: u64) -> Oid {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = index;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        Oid::with_suffix(name, &digits[at..])
    }
}

/// Names listed in a directory object's bytes (invalid lines are skipped).
pub fn directory_names(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| check_name(line).is_ok())
}

/// The directory's bytes for `names`.
pub fn directory_bytes<'a>(names: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        out.extend_from_slice(name);
        out.push(b'\n');
    }
    out
}

/// One piece of a block request: the bytes `[offset, offset + length)` of data object `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: u64,
    pub offset: u64,
    pub length: u64,
}

/// Splits the image range `[offset, offset + length)` at object boundaries and at multiples of
/// `part_bytes` (so that each part's frame fits one receive chunk).
pub fn split(
    object_size: u64,
    part_bytes: u64,
    offset: u64,
    length: u64,
) -> impl Iterator<Item = Part> {
    debug_assert!(part_bytes.is_power_of_two() && object_size % part_bytes == 0);
    let end = offset + length;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next_boundary = (at / part_bytes + 1) * part_bytes;
        let stop = next_boundary.min(end);
        let part = Part {
            index: at / object_size,
            offset: at % object_size,
            length: stop - at,
        };
        at = stop;
        Some(part)
    })
}

/// Parts `split` yields, without iterating.
pub fn part_count(part_bytes: u64, offset: u64, length: u64) -> u64 {
    if length == 0 {
        return 0;
    }
    (offset + length - 1) / part_bytes - offset / part_bytes + 1
}

/// "10GiB", "4MiB", "1234": a size in bytes for humans.
pub fn human_size(bytes: u64) -> String {
    let mut out = String::new();
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            let _ = write!(out, "{}{unit}", bytes >> shift);
            return out;
        }
    }
    let _ = write!(out, "{bytes}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let header = ImageHeader {
            size: 10 << 30,
            object_size: 4 << 20,
        };
        assert_eq!(ImageHeader::parse(&header.encode()).unwrap(), header);
        assert_eq!(header.object_count(), 2560);
        let mut bad = header.encode();
        bad[0] = b'X';
        assert!(ImageHeader::parse(&bad).is_err());
        let odd = ImageHeader {
            size: 1,
            object_size: 3 << 20,
        };
        assert!(ImageHeader::parse(&odd.encode()).is_err());
        assert!(ImageHeader::parse(&header.encode()[..8]).is_err());
    }

    #[test]
    fn names_and_oids() {
        assert!(check_name(b"disk-1_a").is_ok());
        for bad in [&b""[..], b"a.b", b"a/b", b"a b", &[b'x'; 65]] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Oid::data(b"vm", 0).as_bytes(), b"vm.0");
        assert_eq!(Oid::data(b"vm", 2559).as_bytes(), b"vm.2559");
        assert_eq!(
            Oid::data(&[b'z'; 64], u64::MAX).as_bytes().len(),
            OID_BYTES_MAX
        );
        assert_eq!(Oid::header(b"vm").as_bytes(), b"vm.header");
        let dir = directory_bytes([&b"a"[..], b"b-2"].into_iter());
        assert_eq!(dir, b"a\nb-2\n");
        let names: Vec<&[u8]> = directory_names(b"a\n\nbad.name\nb-2\n").collect();
        assert_eq!(names, vec![&b"a"[..], b"b-2"]);
    }

    #[test]
    fn split_covers_the_range_at_boundaries() {
        let object = 256 << 10;
        let part = 64 << 10;
        // Within one part.
        let parts: Vec<Part> = split(object, part, 4096, 4096).collect();
        assert_eq!(
            parts,
            vec![Part {
                index: 0,
                offset: 4096,
                length: 4096
            }]
        );
        // Across an object boundary.
        let parts: Vec<Part> = split(object, part, object - 512, 1024).collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0],
            Part {
                index: 0,
                offset: object - 512,
                length: 512
            }
        );
        assert_eq!(
            parts[1],
            Part {
                index: 1,
                offset: 0,
                length: 512
            }
        );
        // Every byte exactly once, for assorted ranges; part_count agrees.
        for (offset, length) in [
            (0, 1),
            (1, part * 5),
            (part - 1, 2),
            (object * 3 + 17, 3 * object),
        ] {
            let parts: Vec<Part> = split(object, part, offset, length).collect();
            assert_eq!(parts.len() as u64, part_count(part, offset, length));
            let mut at = offset;
            for p in &parts {
                assert_eq!(p.index * object + p.offset, at);
                assert!(p.length <= part && p.offset + p.length <= object);
                at += p.length;
            }
            assert_eq!(at, offset + length);
        }
        assert_eq!(part_count(part, 5, 0), 0);
        assert_eq!(human_size(10 << 30), "10GiB");
        assert_eq!(human_size(1000), "1000");
    }
}
