//! Validated identifiers stored in the header: the target's build-id and the patch id.

use std::fmt;

use crate::error::{Error, Result};

/// Shortest build-id we accept, in hex digits (4 bytes).
pub const BUILD_ID_MIN_HEX: usize = 8;
/// Longest build-id we accept, in hex digits (20 bytes, a SHA-1 GNU build-id).
pub const BUILD_ID_MAX_HEX: usize = 40;
/// Longest patch id, in bytes; the on-disk field is 8 bytes including the NUL.
pub const PATCH_ID_MAX: usize = 7;

/// A GNU build-id as lowercase hex, with an even number of digits, 8 to 40 of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct BuildId(String);

impl BuildId {
    /// Parses hex text (upper case is accepted and folded to lower case).
    pub fn parse(text: &str) -> Result<BuildId> {
        let bad = |reason| Error::BadBuildId {
            input: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("is not hexadecimal"));
        }
        if !text.len().is_multiple_of(2) {
            return Err(bad("has an odd number of hex digits"));
        }
        if text.len() < BUILD_ID_MIN_HEX {
            return Err(bad("is shorter than 8 hex digits"));
        }
        if text.len() > BUILD_ID_MAX_HEX {
            return Err(bad("is longer than 40 hex digits"));
        }
        Ok(BuildId(text.to_ascii_lowercase()))
    }

    /// The build-id of raw note bytes (as found in `.note.gnu.build-id`).
    ///
    /// Any length is hex-encoded; callers wanting the 8..=40 digit rule use [`BuildId::parse`].
    pub fn from_bytes(bytes: &[u8]) -> BuildId {
        use fmt::Write;
        let mut s = String::with_capacity(bytes.len().saturating_mul(2));
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        BuildId(s)
    }

    /// The lowercase hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BuildId {
    type Err = Error;
    fn from_str(s: &str) -> Result<BuildId> {
        BuildId::parse(s)
    }
}

/// A patch id (LibcarePlus `-i`): 1 to 7 printable, non-space ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct PatchId(String);

impl PatchId {
    /// Parses a patch id.
    pub fn parse(text: &str) -> Result<PatchId> {
        let bad = |reason| Error::BadPatchId {
            input: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if text.len() > PATCH_ID_MAX {
            return Err(bad(
                "is longer than 7 characters (the field is 8 bytes with its NUL)",
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("has characters other than printable non-space ASCII"));
        }
        Ok(PatchId(text.to_string()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for PatchId {
    type Err = Error;
    fn from_str(s: &str) -> Result<PatchId> {
        PatchId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_accepts_sha1_and_folds_case() {
        let id = BuildId::parse("7788A89BCDBAC583D60693ECE924593D0D07E6A9").unwrap();
        assert_eq!(id.as_str(), "7788a89bcdbac583d60693ece924593d0d07e6a9");
    }

    #[test]
    fn build_id_rejects_bad_text() {
        for bad in [
            "",
            "xyz12345",
            "1234567",
            "123456",
            &"ab".repeat(21),
            "12 45678",
        ] {
            assert!(BuildId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(BuildId::parse("deadbeef").is_ok());
    }

    #[test]
    fn build_id_from_bytes_is_hex() {
        assert_eq!(BuildId::from_bytes(&[0x77, 0x0a]).as_str(), "770a");
    }

    #[test]
    fn patch_id_limits() {
        assert!(PatchId::parse("0001").is_ok());
        assert!(PatchId::parse("1234567").is_ok());
        assert!(PatchId::parse("12345678").is_err());
        assert!(PatchId::parse("").is_err());
        assert!(PatchId::parse("a b").is_err());
        assert!(PatchId::parse("é").is_err());
    }
}
