//! Any bytes as the ELF file of an object mapped in the target, through everything
//! livecare reads from it: livecare-process' `load_bias`, `kind_of` and
//! `build_id_from_memory` (private; their source is included here by build.rs), the
//! build-id note as `loaded_objects` reads it (`object::File::build_id`), and
//! livecare-apply's unwinder (`CodeModule::from_elf`, then an unwind over a synthetic
//! stack). Nothing may panic.
//!
//! Input: 16 bytes (a mapping start and file offset, which also pick the unwind PC),
//! then the ELF. `build_id_from_memory` reads the ELF from this process's own memory
//! through `RemoteMemory`, as it reads a target's.
//!
//! livecare-apply's `ObjectView::new` (symbols, sections, TLS and GOT slots of the
//! target object) is in a private module and takes a `LoadedObject`; it has no public
//! entry point to fuzz.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use livecare_apply::unwind::{CodeModule, Regs, Unwinder};
// What objects.rs imports from its crate root.
use livecare_process::{read_maps, Error, MapEntry, Pid, RemoteMemory};

#[allow(dead_code, unused_imports, clippy::all)]
mod objects {
    include!(concat!(env!("OUT_DIR"), "/objects.rs"));

    /// The private helpers of `loaded_objects`.
    pub fn fuzz(mem: &RemoteMemory, data: &[u8], image: u64, start: u64, off: u64) {
        let _ = load_bias(data, start, off);
        let _ = kind_of(data, false);
        let _ = build_id_from_memory(mem, image);
    }
}

static MEM: OnceLock<RemoteMemory> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let start = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let off = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    let elf = &data[16..];

    // The ELF as it sits in memory: at least one page, so the 4096-byte header read
    // of `build_id_from_memory` stays inside this buffer.
    let mut image = vec![0u8; elf.len().max(8192)];
    image[..elf.len()].copy_from_slice(elf);
    let mem = MEM.get_or_init(|| {
        RemoteMemory::open(Pid(std::process::id() as i32)).expect("own /proc/self/mem")
    });
    objects::fuzz(mem, elf, image.as_ptr() as u64, start, off);

    if let Ok(f) = object::File::parse(elf) {
        use object::Object;
        let _ = f.build_id();
    }

    let base = 0x5555_0000_0000u64;
    let avma = base..base + 0x10_0000;
    if let Ok(m) = CodeModule::from_elf("fuzz".into(), Arc::from(elf), base, avma.clone()) {
        let _ = (m.name(), m.avma_range(), m.fde_count());
        let mut u = Unwinder::new(vec![m]);
        let regs = Regs {
            rip: avma.start + off % 0x10_0000,
            rsp: 0x7ffd_0000_0000 + (start & 0xfff8),
            rbp: 0x7ffd_0000_1000,
        };
        // A synthetic stack: every word is a mix of its address and the input, so
        // return addresses sometimes land back in the module.
        let mut read = |a: u64| -> Option<u64> {
            Some(match a % 3 {
                0 => avma.start + (a ^ start) % 0x10_0000,
                1 => a + 64,
                _ => a ^ off,
            })
        };
        let _ = u.unwind(regs, &mut read);
    }
});
