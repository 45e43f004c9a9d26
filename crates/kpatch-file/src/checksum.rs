//! `header.csum`: CRC-32 of the ELF part (`kpatch_offset..total_size`).
//!
//! LibCare and LibcarePlus leave `csum` at 0 and never check it, so without it a bit
//! flip in code bytes, addends or symbol values is undetectable. livecare writes a
//! CRC-32 there and verifies it whenever it is non-zero; 0 means "no checksum", so the
//! peers' files are still accepted.

/// CRC-32 (IEEE 802.3, as zlib's `crc32`) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        let idx = usize::from((crc as u8) ^ b);
        crc = TABLE.get(idx).copied().unwrap_or(0) ^ (crc >> 8);
    }
    !crc
}

// Evaluated at compile time: an out-of-range index would fail the build, not panic.
#[allow(clippy::indexing_slicing)]
const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(super::crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(super::crc32(b""), 0);
    }
}
