//! Bounds-checked little-endian reads that report the field and the absolute offset.

use std::fmt::Display;

use crate::error::{Error, Result};

/// A byte region of the file: `data[0]` sits at absolute file offset `base`.
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    pub data: &'a [u8],
    pub base: u64,
}

/// `usize` to `u64` (lossless on every platform Rust supports for this crate).
pub(crate) fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl<'a> Region<'a> {
    pub fn new(data: &'a [u8], base: u64) -> Region<'a> {
        Region { data, base }
    }

    /// Length of the region.
    pub fn len(&self) -> u64 {
        to_u64(self.data.len())
    }

    /// Absolute offset of region offset `off` (saturating; only used in messages).
    pub fn abs(&self, off: u64) -> u64 {
        self.base.saturating_add(off)
    }

    /// `len` bytes at `off`, or a `Truncated` error naming `field`.
    pub fn bytes(&self, field: &dyn Display, off: u64, len: u64) -> Result<&'a [u8]> {
        let truncated = || Error::Truncated {
            field: field.to_string(),
            offset: self.abs(off),
            need: len,
            available: self.len().saturating_sub(off),
        };
        let start = usize::try_from(off).map_err(|_| truncated())?;
        let n = usize::try_from(len).map_err(|_| truncated())?;
        let end = start.checked_add(n).ok_or_else(truncated)?;
        self.data.get(start..end).ok_or_else(truncated)
    }

    /// A fixed-size array at `off`.
    pub fn array<const N: usize>(&self, field: &dyn Display, off: u64) -> Result<[u8; N]> {
        let b = self.bytes(field, off, to_u64(N))?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&self, field: &dyn Display, off: u64) -> Result<u8> {
        Ok(u8::from_le_bytes(self.array(field, off)?))
    }

    pub fn u16(&self, field: &dyn Display, off: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field, off)?))
    }

    pub fn u32(&self, field: &dyn Display, off: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field, off)?))
    }

    pub fn u64(&self, field: &dyn Display, off: u64) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field, off)?))
    }

    pub fn i64(&self, field: &dyn Display, off: u64) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array(field, off)?))
    }
}

/// The bytes before the first NUL of a fixed-size field, or `None` if there is no NUL.
pub(crate) fn until_nul(field: &[u8]) -> Option<&[u8]> {
    let end = field.iter().position(|&b| b == 0)?;
    field.get(..end)
}

/// Escapes bytes for an error message (`KPATCH1\0` style).
pub(crate) fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// Text of a name from the file that is safe to print on a terminal: valid UTF-8 that
/// prints is kept; control characters (C0, DEL, C1: escape sequences), invisible
/// formatting and bidi overrides become `\u{..}`, and bytes that are not UTF-8 become
/// `\xNN`. Names a compiler writes are unchanged, so the result can still be looked up.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let invisible = matches!(
                c,
                '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'..='\u{206f}' | '\u{feff}'
            );
            if c.is_control() || invisible {
                if c.is_ascii() {
                    out.push_str(&format!("\\x{:02x}", u32::from(c)));
                } else {
                    out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `a + b`, or an error naming `field` when it overflows 64 bits.
pub(crate) fn add(field: &dyn Display, offset: u64, a: u64, b: u64) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| Error::Invalid {
        field: field.to_string(),
        offset,
        reason: format!("{a:#x} + {b:#x} overflows"),
    })
}

/// `a * b`, or an error naming `field` when it overflows 64 bits.
pub(crate) fn mul(field: &dyn Display, offset: u64, a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| Error::Invalid {
        field: field.to_string(),
        offset,
        reason: format!("{a} * {b} overflows"),
    })
}

/// Writes `value` at `off` in `out`. Callers size `out` from the same raw struct the
/// offsets come from, so the range always fits; the check only keeps this panic-free.
pub(crate) fn put(out: &mut [u8], off: usize, value: &[u8]) {
    if let Some(end) = off.checked_add(value.len()) {
        if let Some(dst) = out.get_mut(off..end) {
            dst.copy_from_slice(value);
        }
    }
}
