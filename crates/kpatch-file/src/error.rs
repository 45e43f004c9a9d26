//! Errors of the container parser and writer. Every variant that comes from the bytes
//! names the field (as on disk, e.g. `header.kpatch_offset`, `section[19].sh_link`) and
//! the absolute offset of that field in the file.

/// What went wrong while reading or writing a `.kpatch` container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The field does not fit in the bytes that are left.
    #[error("{field} at {offset:#x}: truncated: needs {need} bytes, only {available} left")]
    Truncated {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// Bytes the field needs.
        need: u64,
        /// Bytes available from `offset` to the end of the data.
        available: u64,
    },
    /// A magic number is wrong.
    #[error("{field} at {offset:#x}: bad magic {found}, expected {expected}")]
    BadMagic {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// The bytes found, escaped.
        found: String,
        /// The magic that was expected, escaped.
        expected: &'static str,
    },
    /// An offset or size points past the end of the region it must lie in.
    #[error("{field} at {offset:#x}: {value} is past end of {region} ({limit} bytes)")]
    PastEnd {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// The offending value (an offset, or offset + size).
        value: u64,
        /// What it must lie within (`file`, `ELF`, `section 23`, ...).
        region: String,
        /// Size of that region.
        limit: u64,
    },
    /// An index into a table is out of range.
    #[error("{field} at {offset:#x}: index {value} is out of range ({count} {what})")]
    BadIndex {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// The index found.
        value: u64,
        /// Number of entries in the table.
        count: u64,
        /// What the table holds (`sections`, `symbols`, `bytes in .strtab`, ...).
        what: String,
    },
    /// A string has no terminating NUL within its field or table.
    #[error("{field} at {offset:#x}: string is not NUL-terminated within {max} bytes")]
    Unterminated {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the string.
        offset: u64,
        /// Bytes searched for the NUL.
        max: u64,
    },
    /// A valid but unsupported value (ELF class, machine, ...).
    #[error("{field} at {offset:#x}: {value:#x} is not supported: {reason}")]
    Unsupported {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// The value found.
        value: u64,
        /// What is supported instead.
        reason: String,
    },
    /// Any other inconsistency, described by `reason`.
    #[error("{field} at {offset:#x}: {reason}")]
    Invalid {
        /// On-disk field name.
        field: String,
        /// Absolute file offset of the field.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Neither header layout fits the bytes.
    #[error("header at 0x0: cannot tell the LibCare from the LibcarePlus layout: {reason}")]
    UnknownLayout {
        /// What was seen.
        reason: String,
    },
    /// A build-id given as text is malformed.
    #[error("build-id {input:?}: {reason}")]
    BadBuildId {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A patch id given as text is malformed.
    #[error("patch id {input:?}: {reason}")]
    BadPatchId {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value cannot be written in the chosen layout.
    #[error("cannot write {what}: {reason}")]
    Unwritable {
        /// The value that cannot be stored.
        what: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// A short stable name of the error kind (`truncated`, `past-end`, ...), for tests and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Truncated { .. } => "truncated",
            Error::BadMagic { .. } => "bad-magic",
            Error::PastEnd { .. } => "past-end",
            Error::BadIndex { .. } => "bad-index",
            Error::Unterminated { .. } => "unterminated",
            Error::Unsupported { .. } => "unsupported",
            Error::Invalid { .. } => "invalid",
            Error::UnknownLayout { .. } => "unknown-layout",
            Error::BadBuildId { .. } => "bad-build-id",
            Error::BadPatchId { .. } => "bad-patch-id",
            Error::Unwritable { .. } => "unwritable",
        }
    }

    /// The on-disk field the error is about, when it comes from the bytes.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Truncated { field, .. }
            | Error::BadMagic { field, .. }
            | Error::PastEnd { field, .. }
            | Error::BadIndex { field, .. }
            | Error::Unterminated { field, .. }
            | Error::Unsupported { field, .. }
            | Error::Invalid { field, .. } => Some(field),
            Error::UnknownLayout { .. } => Some("header"),
            Error::BadBuildId { .. } | Error::BadPatchId { .. } | Error::Unwritable { .. } => None,
        }
    }

    /// The absolute file offset the error is about, when it comes from the bytes.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Truncated { offset, .. }
            | Error::BadMagic { offset, .. }
            | Error::PastEnd { offset, .. }
            | Error::BadIndex { offset, .. }
            | Error::Unterminated { offset, .. }
            | Error::Unsupported { offset, .. }
            | Error::Invalid { offset, .. } => Some(*offset),
            Error::UnknownLayout { .. } => Some(0),
            Error::BadBuildId { .. } | Error::BadPatchId { .. } | Error::Unwritable { .. } => None,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
