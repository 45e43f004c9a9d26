//! The in-target state: each applied patch's region starts with a header (magic,
//! version, patch id, build-id, hunks with saved original bytes) that later
//! invocations read back from the target's own memory.

use livecare_process::{read_maps, MapEntry, Pid, RemoteMemory};

use crate::Error;

/// Magic at the start of every patch region.
pub const REGION_MAGIC: &[u8; 8] = b"LVCARE\x01\0";
/// Format version of the region header (2: hunks carry retargeted call sites).
pub const REGION_VERSION: u32 = 2;
/// Oldest version we still read: version 1 is version 2 with no call sites (the
/// hunk record's call-site fields were zero).
const OLDEST_READABLE_VERSION: u32 = 1;
/// Size of the fixed part of the header.
pub const FIXED_LEN: usize = 192;
/// Size of one hunk record.
pub const HUNK_LEN: usize = 48;
/// Bytes of saved original code per hunk.
pub const SAVED_LEN: usize = 8;
/// Size of one call-site record: address (u64) and the rel32 it had before (i32).
pub const CALL_SITE_LEN: usize = 12;

/// Field offsets of the fixed header, named once.
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 12;
    pub const TOTAL_LEN: usize = 16;
    pub const SEQ: usize = 24;
    pub const BUILD_ID: usize = 32; // 64 bytes
    pub const PATCH_ID: usize = 96; // 32 bytes
    pub const HASH: usize = 128;
    pub const NHUNKS: usize = 136;
    pub const LEVEL: usize = 140;
    pub const EH_FRAME: usize = 144;
    pub const EH_FRAME_LEN: usize = 152;
    pub const LOAD_BIAS: usize = 160;
    pub const EXEC_LEN: usize = 168;
    pub const STATE: usize = 176;
    pub const NAMES: usize = 180; // u32 offset of the name strings
    pub const TRAMPOLINE_AT: usize = 184; // u32 offset of the return trampoline (0: none)
}

/// A direct `call rel32` in the patched object that the patch made call the new
/// body; unpatch writes `old_rel` back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSite {
    /// Address of the call's opcode byte (0xe8); the rel32 follows it.
    pub addr: u64,
    /// The displacement before the patch: to the original function, or to the new
    /// body of the patch below this one when patches are stacked.
    pub old_rel: i32,
}

fn count_call_sites<S: serde::Serializer>(v: &[CallSite], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.len() as u64)
}

/// One replaced function.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hunk {
    /// Address of the original function.
    pub daddr: u64,
    /// Address of the new body.
    pub saddr: u64,
    /// Size of the original function.
    pub dlen: u32,
    /// Size of the new body.
    pub slen: u32,
    /// The bytes at `daddr` before our jump (original code, or an older patch's jump).
    pub saved: [u8; SAVED_LEN],
    /// Function name.
    pub name: String,
    /// Direct calls retargeted to the new body (shown as their number).
    #[serde(serialize_with = "count_call_sites")]
    pub call_sites: Vec<CallSite>,
}

/// Whether a region's jumps are live: the state word is the journal of the commit.
/// `Committing`/`Removing` is written before the commit's stop and the final value
/// after the threads are released (outside the stop, to keep it short), so a livecare
/// killed anywhere between the two leaves `Committing` or `Removing` behind, which
/// `info` reports and `repair` resolves from the live bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionState {
    /// Body written, jumps not yet (or no longer) in place; nothing jumps here.
    Prepared,
    /// Jumps written: the patch is active.
    Applied,
    /// Jump writes begun, not finished (some hunks may be live, some not).
    Committing,
    /// Restore writes begun, not finished (some hunks may still jump here).
    Removing,
    /// Removed: nothing jumps here any more, but the process may still hold pointers
    /// into it (a thread inside a libc call the patch tail-called with its data, a
    /// callback the patch stored), so it stays mapped until proven unreferenced
    /// (see `reclaim`). A clean state, not an interrupted one.
    Retired,
}

impl RegionState {
    /// The state word stored in the header.
    pub fn word(self) -> u32 {
        match self {
            RegionState::Prepared => 0,
            RegionState::Applied => 1,
            RegionState::Committing => 2,
            RegionState::Removing => 3,
            RegionState::Retired => 4,
        }
    }

    /// Decodes a state word; an unknown value is treated as an interrupted commit,
    /// so `repair` decides from the live bytes instead of trusting it.
    pub fn from_word(w: u32) -> RegionState {
        match w {
            0 => RegionState::Prepared,
            1 => RegionState::Applied,
            3 => RegionState::Removing,
            4 => RegionState::Retired,
            _ => RegionState::Committing,
        }
    }

    /// True when a commit or a removal was interrupted.
    pub fn is_incomplete(self) -> bool {
        matches!(self, RegionState::Committing | RegionState::Removing)
    }
}

/// The header of a patch region.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionHeader {
    /// Region start in the target.
    pub addr: u64,
    /// Region length (for munmap).
    pub total_len: u64,
    /// Application order within the process (higher = later).
    pub seq: u64,
    /// Build-id of the patched object.
    pub build_id: String,
    /// Patch id.
    pub patch_id: String,
    /// Hash of the patch ELF.
    pub hash: u64,
    /// Patch level (storage), 0 otherwise.
    pub level: u32,
    /// Relocated `.eh_frame` of the patch code in the region (0 if none).
    pub eh_frame: u64,
    /// Its length.
    pub eh_frame_len: u64,
    /// Load bias of the patched object.
    pub load_bias: u64,
    /// Length of the read+exec part (header, code, jump table).
    pub exec_len: u64,
    /// Active or not.
    pub state: RegionState,
    /// The hunks.
    pub hunks: Vec<Hunk>,
}

fn put_str(buf: &mut [u8], at: usize, len: usize, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(len - 1);
    buf[at..at + n].copy_from_slice(&b[..n]);
}

fn get_str(buf: &[u8], at: usize, len: usize) -> String {
    let s = &buf[at..at + len];
    let end = s.iter().position(|&c| c == 0).unwrap_or(len);
    // The target's memory is not trusted: whatever it holds is printed by info/repair.
    kpatch_file::printable(&s[..end])
}

fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}

fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

impl RegionHeader {
    /// Bytes needed to encode a header with these hunks (and no call sites; each
    /// call site adds [`CALL_SITE_LEN`], plus at most 4 bytes of alignment in all).
    pub fn encoded_len(nhunks: usize, names_len: usize) -> usize {
        Self::encoded_len_with_sites(nhunks, names_len, 0)
    }

    /// Bytes needed to encode a header with these hunks and call sites.
    pub fn encoded_len_with_sites(nhunks: usize, names_len: usize, nsites: usize) -> usize {
        let sites_at = (FIXED_LEN + nhunks * HUNK_LEN + names_len).div_ceil(4) * 4;
        // The return trampoline (16-byte aligned) ends the header.
        (sites_at + nsites * CALL_SITE_LEN).div_ceil(16) * 16 + crate::trampoline::LEN
    }

    /// Encodes the header.
    pub fn encode(&self) -> Vec<u8> {
        let names_len: usize = self.hunks.iter().map(|h| h.name.len() + 1).sum();
        let nsites: usize = self.hunks.iter().map(|h| h.call_sites.len()).sum();
        let len = Self::encoded_len_with_sites(self.hunks.len(), names_len, nsites);
        let mut b = vec![0u8; len];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(REGION_MAGIC);
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&REGION_VERSION.to_le_bytes());
        b[off::HEADER_LEN..off::HEADER_LEN + 4].copy_from_slice(&(len as u32).to_le_bytes());
        b[off::TOTAL_LEN..off::TOTAL_LEN + 8].copy_from_slice(&self.total_len.to_le_bytes());
        b[off::SEQ..off::SEQ + 8].copy_from_slice(&self.seq.to_le_bytes());
        put_str(&mut b, off::BUILD_ID, 64, &self.build_id);
        put_str(&mut b, off::PATCH_ID, 32, &self.patch_id);
        b[off::HASH..off::HASH + 8].copy_from_slice(&self.hash.to_le_bytes());
        b[off::NHUNKS..off::NHUNKS + 4].copy_from_slice(&(self.hunks.len() as u32).to_le_bytes());
        b[off::LEVEL..off::LEVEL + 4].copy_from_slice(&self.level.to_le_bytes());
        b[off::EH_FRAME..off::EH_FRAME + 8].copy_from_slice(&self.eh_frame.to_le_bytes());
        b[off::EH_FRAME_LEN..off::EH_FRAME_LEN + 8]
            .copy_from_slice(&self.eh_frame_len.to_le_bytes());
        b[off::LOAD_BIAS..off::LOAD_BIAS + 8].copy_from_slice(&self.load_bias.to_le_bytes());
        b[off::EXEC_LEN..off::EXEC_LEN + 8].copy_from_slice(&self.exec_len.to_le_bytes());
        b[off::STATE..off::STATE + 4].copy_from_slice(&self.state.word().to_le_bytes());
        let tramp = crate::trampoline::code();
        let tramp_at = len - tramp.len();
        b[tramp_at..].copy_from_slice(&tramp);
        b[off::TRAMPOLINE_AT..off::TRAMPOLINE_AT + 4]
            .copy_from_slice(&(tramp_at as u32).to_le_bytes());
        let names_at = FIXED_LEN + self.hunks.len() * HUNK_LEN;
        b[off::NAMES..off::NAMES + 4].copy_from_slice(&(names_at as u32).to_le_bytes());
        let mut name_pos = names_at;
        let mut site_pos = (names_at + names_len).div_ceil(4) * 4;
        for (i, h) in self.hunks.iter().enumerate() {
            let o = FIXED_LEN + i * HUNK_LEN;
            b[o..o + 8].copy_from_slice(&h.daddr.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&h.saddr.to_le_bytes());
            b[o + 16..o + 20].copy_from_slice(&h.dlen.to_le_bytes());
            b[o + 20..o + 24].copy_from_slice(&h.slen.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&h.saved);
            b[o + 32..o + 36].copy_from_slice(&((name_pos - names_at) as u32).to_le_bytes());
            b[name_pos..name_pos + h.name.len()].copy_from_slice(h.name.as_bytes());
            name_pos += h.name.len() + 1;
            b[o + 36..o + 40].copy_from_slice(&(site_pos as u32).to_le_bytes());
            b[o + 40..o + 44].copy_from_slice(&(h.call_sites.len() as u32).to_le_bytes());
            for c in &h.call_sites {
                b[site_pos..site_pos + 8].copy_from_slice(&c.addr.to_le_bytes());
                b[site_pos + 8..site_pos + 12].copy_from_slice(&c.old_rel.to_le_bytes());
                site_pos += CALL_SITE_LEN;
            }
        }
        b
    }

    /// Offset of the state word (rewritten at commit).
    pub const STATE_OFFSET: u64 = off::STATE as u64;
    /// Address of the return trampoline (see [`crate::trampoline`]) of the region at
    /// `base`, when its header has one.
    pub fn trampoline_at(mem: &RemoteMemory, base: u64) -> Option<u64> {
        let fixed = mem.read_vec(base, FIXED_LEN).ok()?;
        let at = rd32(&fixed, off::TRAMPOLINE_AT) as u64;
        let len = rd32(&fixed, off::HEADER_LEN) as u64;
        (&fixed[..8] == REGION_MAGIC
            && at >= FIXED_LEN as u64
            && at + crate::trampoline::LEN as u64 <= len)
            .then_some(base + at)
    }

    /// The range holding the region's code (header and trampoline included); at
    /// least the header for a region whose body was never written.
    pub fn code_range(&self) -> std::ops::Range<u64> {
        self.addr..self.addr + self.exec_len.max(4096)
    }

    /// Reads the header of the region at `addr`, if it carries our magic.
    pub fn read(mem: &RemoteMemory, addr: u64, map_len: u64) -> Option<RegionHeader> {
        let fixed = mem.read_vec(addr, FIXED_LEN).ok()?;
        let version = rd32(&fixed, off::VERSION);
        if &fixed[..8] != REGION_MAGIC
            || !(OLDEST_READABLE_VERSION..=REGION_VERSION).contains(&version)
        {
            return None;
        }
        let len = rd32(&fixed, off::HEADER_LEN) as usize;
        let nh = rd32(&fixed, off::NHUNKS) as usize;
        let names_at = rd32(&fixed, off::NAMES) as usize;
        if len as u64 > map_len || FIXED_LEN + nh * HUNK_LEN > len || names_at > len {
            return None;
        }
        let b = mem.read_vec(addr, len).ok()?;
        let mut hunks = Vec::with_capacity(nh);
        for i in 0..nh {
            let o = FIXED_LEN + i * HUNK_LEN;
            let name_off = names_at + rd32(&b, o + 32) as usize;
            let name = b
                .get(name_off..)
                .map(|s| get_str(s, 0, s.len()))
                .unwrap_or_default();
            // A record whose call-site table does not lie inside the header is
            // damaged: refuse the region rather than restore half of it.
            let (sites_at, nsites) = (rd32(&b, o + 36) as usize, rd32(&b, o + 40) as usize);
            let sites = b.get(sites_at..nsites.checked_mul(CALL_SITE_LEN)? + sites_at)?;
            let call_sites = sites
                .chunks_exact(CALL_SITE_LEN)
                .map(|c| CallSite {
                    addr: rd64(c, 0),
                    old_rel: rd32(c, 8) as i32,
                })
                .collect();
            hunks.push(Hunk {
                daddr: rd64(&b, o),
                saddr: rd64(&b, o + 8),
                dlen: rd32(&b, o + 16),
                slen: rd32(&b, o + 20),
                saved: b[o + 24..o + 32].try_into().unwrap_or_default(),
                name,
                call_sites,
            });
        }
        Some(RegionHeader {
            addr,
            total_len: rd64(&b, off::TOTAL_LEN),
            seq: rd64(&b, off::SEQ),
            build_id: get_str(&b, off::BUILD_ID, 64),
            patch_id: get_str(&b, off::PATCH_ID, 32),
            hash: rd64(&b, off::HASH),
            level: rd32(&b, off::LEVEL),
            eh_frame: rd64(&b, off::EH_FRAME),
            eh_frame_len: rd64(&b, off::EH_FRAME_LEN),
            load_bias: rd64(&b, off::LOAD_BIAS),
            exec_len: rd64(&b, off::EXEC_LEN),
            state: RegionState::from_word(rd32(&b, off::STATE)),
            hunks,
        })
    }
}

/// Magic of a [`Mark`].
pub const MARK_MAGIC: &[u8; 16] = b"LVCARE-REGION-MK";

/// A record livecare writes into a padding window of the target's code (where the
/// remote-syscall stub goes, see `rsyscall`) before it maps a region, and clears once
/// the region's header is written: a livecare killed in between leaves a mapping that
/// has no header yet, and the mark names it, so the region is recognisable from the
/// moment it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mark {
    /// Address of the window holding the mark.
    pub at: u64,
    /// The region's address.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Mark {
    /// The mark held by the window `w` at `at`, if it is one.
    pub(crate) fn decode(at: u64, w: &[u8]) -> Option<Mark> {
        (w.len() as u64 == crate::rsyscall::WINDOW
            && w[..16] == MARK_MAGIC[..]
            && w[32..].iter().all(|&b| b == 0))
        .then(|| Mark {
            at,
            base: rd64(w, 16),
            len: rd64(w, 24),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = vec![0u8; crate::rsyscall::WINDOW as usize];
        w[..16].copy_from_slice(MARK_MAGIC);
        w[16..24].copy_from_slice(&self.base.to_le_bytes());
        w[24..32].copy_from_slice(&self.len.to_le_bytes());
        w
    }

    /// Writes a mark for the region `base..base + len` into a free padding window
    /// other than `avoid` (the stub's); `None` when there is none (the region is then
    /// mapped unmarked, as before marks existed).
    pub(crate) fn place(
        mem: &RemoteMemory,
        maps: &[MapEntry],
        avoid: u64,
        base: u64,
        len: u64,
    ) -> Option<Mark> {
        let at = crate::rsyscall::padding_windows(mem, maps, false)
            .ok()?
            .into_iter()
            .find(|w| w.1 == crate::rsyscall::Window::Free && w.0 != avoid)?
            .0;
        let m = Mark { at, base, len };
        mem.write(at, &m.encode()).ok()?;
        Some(m)
    }

    /// Puts the padding back, if the window still holds this mark.
    pub(crate) fn clear(&self, mem: &RemoteMemory) -> Result<(), Error> {
        let w = mem.read_vec(self.at, crate::rsyscall::WINDOW as usize)?;
        if Mark::decode(self.at, &w) == Some(*self) {
            mem.write(self.at, &vec![0u8; w.len()])?;
        }
        Ok(())
    }
}

/// What an interrupted livecare can leave outside any region header; `info` lists
/// them and `repair` removes them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Leftover {
    /// A region's mapping whose header was never written (named by a mark).
    Mapping {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
        /// The mark's window.
        mark: u64,
    },
    /// A mark whose region is gone or has its header.
    Mark {
        /// The mark's window.
        at: u64,
    },
    /// A remote-syscall stub in code padding (left by a killed livecare, or in use by
    /// one running now).
    Stub {
        /// Its window.
        at: u64,
    },
}

/// The leftovers of interrupted livecares in `pid` (see [`Leftover`]).
pub fn leftovers(pid: Pid) -> Result<Vec<Leftover>, Error> {
    Ok(leftovers_in(&RemoteMemory::open(pid)?, &read_maps(pid)?))
}

/// [`leftovers`] with the target's memory open and its maps read.
pub(crate) fn leftovers_in(mem: &RemoteMemory, maps: &[MapEntry]) -> Vec<Leftover> {
    use crate::rsyscall::Window;
    let mut out = Vec::new();
    for (at, kind) in crate::rsyscall::padding_windows(mem, maps, false).unwrap_or_default() {
        match kind {
            Window::Free => {}
            Window::Stub => out.push(Leftover::Stub { at }),
            Window::Mark => {
                let Some(m) = mem
                    .read_vec(at, crate::rsyscall::WINDOW as usize)
                    .ok()
                    .and_then(|w| Mark::decode(at, &w))
                else {
                    continue;
                };
                out.push(match unmarked_mapping(mem, maps, &m) {
                    true => Leftover::Mapping {
                        addr: m.base,
                        len: m.len,
                        mark: at,
                    },
                    false => Leftover::Mark { at },
                });
            }
        }
    }
    out
}

/// True when `m.base..m.base + m.len` is mapped exactly by anonymous mappings of its
/// own (as livecare maps a region) that carry no region header: the mapping the mark
/// was written for, before its header. Anything else there is not touched.
fn unmarked_mapping(mem: &RemoteMemory, maps: &[MapEntry], m: &Mark) -> bool {
    let end = m.base.saturating_add(m.len);
    let over: Vec<&MapEntry> = maps
        .iter()
        .filter(|e| e.start < end && e.end > m.base)
        .collect();
    let mut at = m.base;
    for e in &over {
        if e.start != at || e.end > end || !e.is_anonymous() {
            return false;
        }
        at = e.end;
    }
    at == end
        && !over.is_empty()
        && mem.read_vec(m.base, REGION_MAGIC.len()).ok().as_deref() != Some(&REGION_MAGIC[..])
}

/// Every patch region in `pid`, by scanning anonymous mappings for the magic; in
/// application order.
pub fn find_regions(pid: Pid) -> Result<Vec<RegionHeader>, Error> {
    Ok(find_regions_in(&RemoteMemory::open(pid)?, &read_maps(pid)?))
}

/// [`find_regions`] with the target's memory open and its `/proc/PID/maps` read.
pub(crate) fn find_regions_in(mem: &RemoteMemory, maps: &[MapEntry]) -> Vec<RegionHeader> {
    // The magic of every candidate in one batched read (a process with many threads
    // has a stack mapping per thread), then the headers that carry it.
    let cands: Vec<&MapEntry> = maps
        .iter()
        .filter(|m| m.is_anonymous() && m.read && m.end - m.start >= FIXED_LEN as u64)
        .collect();
    let ranges: Vec<(u64, usize)> = cands
        .iter()
        .map(|m| (m.start, REGION_MAGIC.len()))
        .collect();
    let mut out = Vec::new();
    for (m, magic) in cands.iter().zip(mem.read_ranges(&ranges)) {
        if magic.as_deref() != Some(&REGION_MAGIC[..]) {
            continue;
        }
        if let Some(h) = RegionHeader::read(mem, m.start, m.end - m.start) {
            out.push(h);
        }
    }
    out.sort_by_key(|h| h.seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_journal_state_round_trips_and_unknown_words_count_as_interrupted() {
        for st in [
            RegionState::Prepared,
            RegionState::Applied,
            RegionState::Committing,
            RegionState::Removing,
            RegionState::Retired,
        ] {
            assert_eq!(RegionState::from_word(st.word()), st);
        }
        assert_eq!(RegionState::from_word(77), RegionState::Committing);
        assert!(RegionState::from_word(77).is_incomplete());
        assert!(!RegionState::Prepared.is_incomplete());
        assert!(!RegionState::Retired.is_incomplete());
    }

    #[test]
    fn header_ends_with_the_return_trampoline_named_by_its_offset() {
        let h = RegionHeader {
            addr: 0,
            total_len: 0x1000,
            seq: 1,
            build_id: String::new(),
            patch_id: String::new(),
            hash: 0,
            level: 0,
            eh_frame: 0,
            eh_frame_len: 0,
            load_bias: 0,
            exec_len: 0,
            state: RegionState::Prepared,
            hunks: Vec::new(),
        };
        let b = h.encode();
        let at = rd32(&b, off::TRAMPOLINE_AT) as usize;
        assert_eq!(at % 16, 0);
        assert_eq!(&b[at..], &crate::trampoline::code()[..]);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = RegionHeader {
            addr: 0,
            total_len: 0x3000,
            seq: 7,
            build_id: "ab".repeat(20),
            patch_id: "0001".into(),
            hash: 42,
            level: 2,
            eh_frame: 0x10,
            eh_frame_len: 0x20,
            load_bias: 0x5555_0000,
            exec_len: 0x2000,
            state: RegionState::Applied,
            hunks: vec![Hunk {
                daddr: 1,
                saddr: 2,
                dlen: 3,
                slen: 4,
                saved: [9; 8],
                name: "report".into(),
                call_sites: vec![
                    CallSite {
                        addr: 0x5555_0000_1234,
                        old_rel: -0x200,
                    },
                    CallSite {
                        addr: 0x5555_0000_2000,
                        old_rel: 0x7000_0000,
                    },
                ],
            }],
        };
        let b = h.encode();
        assert_eq!(b.len() % 16, 0);
        assert_eq!(&b[..8], REGION_MAGIC);
        assert_eq!(rd64(&b, off::SEQ), 7);
        assert_eq!(get_str(&b, off::PATCH_ID, 32), "0001");
        assert_eq!(b.len(), RegionHeader::encoded_len_with_sites(1, 7, 2));
        let sites_at = rd32(&b, FIXED_LEN + 36) as usize;
        assert_eq!(rd32(&b, FIXED_LEN + 40), 2);
        assert_eq!(rd64(&b, sites_at + 12), 0x5555_0000_2000);
        assert_eq!(rd32(&b, sites_at + 20) as i32, 0x7000_0000);
    }
}
