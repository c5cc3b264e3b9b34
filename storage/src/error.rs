//! The one error type of every object store.
//!
//! Errors are values for conditions a correct program meets at run time (a missing object, a full
//! store, a request past a limit, a failing device). Bugs are not errors: they are asserts.
//!
//! Each error has a stable numeric code (`StoreError::code`) because codes leave the store in
//! `SubOpResult::status` and are mapped by the layers above; the numbers are fixed forever, and
//! 0 is reserved for success (`STATUS_OK`).

use core::fmt;

/// Status code of a successful sub-op; never the code of an error.
pub const STATUS_OK: u16 = 0;

/// Why an operation or a sub-op failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreError {
    /// The object does not exist (ENOENT).
    NotFound,
    /// The object exists but the xattr or omap key does not (ENODATA).
    NoData,
    /// The transaction would take the store past its capacity (ENOSPC).
    NoSpace,
    /// An offset + length past `OBJECT_SIZE_MAX_BYTES`, or an object id, name or value past its
    /// limit (EFBIG).
    TooLarge,
    /// A malformed request: empty object id, no sub-ops or too many, empty xattr name (EINVAL).
    InvalidArgument,
    /// A read-like sub-op's output did not fit in the caller's output buffer (ERANGE).
    Range,
    /// The device failed (EIO).
    Io,
    /// Stored data failed verification (checksum mismatch, impossible metadata).
    Corrupt,
}

impl StoreError {
    /// Every error, in code order (codes 1..=8).
    pub const ALL: [StoreError; 8] = [
        StoreError::NotFound,
        StoreError::NoData,
        StoreError::NoSpace,
        StoreError::TooLarge,
        StoreError::InvalidArgument,
        StoreError::Range,
        StoreError::Io,
        StoreError::Corrupt,
    ];

    /// The stable code of this error. Fixed forever: codes are stored in results and mapped by
    /// other layers, so renumbering would silently change meanings. 0 means success.
    pub const fn code(&self) -> u16 {
        match self {
            StoreError::NotFound => 1,
            StoreError::NoData => 2,
            StoreError::NoSpace => 3,
            StoreError::TooLarge => 4,
            StoreError::InvalidArgument => 5,
            StoreError::Range => 6,
            StoreError::Io => 7,
            StoreError::Corrupt => 8,
        }
    }

    /// The error with this code; `None` for `STATUS_OK` and for unknown codes.
    pub const fn from_code(code: u16) -> Option<StoreError> {
        match code {
            1 => Some(StoreError::NotFound),
            2 => Some(StoreError::NoData),
            3 => Some(StoreError::NoSpace),
            4 => Some(StoreError::TooLarge),
            5 => Some(StoreError::InvalidArgument),
            6 => Some(StoreError::Range),
            7 => Some(StoreError::Io),
            8 => Some(StoreError::Corrupt),
            _ => None,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self {
            StoreError::NotFound => "object not found",
            StoreError::NoData => "no such xattr or omap key",
            StoreError::NoSpace => "store capacity exceeded",
            StoreError::TooLarge => "object, name or value too large",
            StoreError::InvalidArgument => "invalid argument",
            StoreError::Range => "output does not fit the output buffer",
            StoreError::Io => "I/O error",
            StoreError::Corrupt => "stored data is corrupt",
        };
        f.write_str(message)
    }
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_fixed_and_round_trip() {
        // The exact numbers are part of the interface: pin them.
        let expected: [u16; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        for (error, code) in StoreError::ALL.iter().zip(expected) {
            assert_eq!(error.code(), code);
            assert_eq!(StoreError::from_code(code), Some(*error));
        }
        assert_eq!(StoreError::from_code(STATUS_OK), None);
        assert_eq!(StoreError::from_code(9), None);
    }

    #[test]
    fn display_is_distinct_per_error() {
        let mut messages: Vec<String> = StoreError::ALL.iter().map(|e| e.to_string()).collect();
        messages.sort();
        messages.dedup();
        assert_eq!(messages.len(), StoreError::ALL.len());
        let boxed: Box<dyn std::error::Error> = Box::new(StoreError::NoSpace);
        assert_eq!(boxed.to_string(), "store capacity exceeded");
    }
}
