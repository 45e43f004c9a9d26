//! Target memory: bulk reads with `process_vm_readv`, writes through `/proc/PID/mem`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::{Error, Pid};

/// Read/write access to a process's memory.
pub struct RemoteMemory {
    pid: Pid,
    mem: File,
}

impl RemoteMemory {
    /// Opens `/proc/PID/mem` read-write (needs ptrace permission on the process).
    pub fn open(pid: Pid) -> Result<RemoteMemory, Error> {
        let open = |path: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
        };
        // Refused (ESRCH) when the main thread has exited.
        let (mem, _) = pid.read_proc("mem", open, crate::refused)?;
        Ok(RemoteMemory { pid, mem })
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Reads `buf.len()` bytes at `addr`; fails unless all of them were read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: one local iovec covering exactly `buf`, which we own mutably.
        let n = unsafe { libc::process_vm_readv(self.pid.0, &local, 1, &remote, 1, 0) };
        if n == buf.len() as isize {
            return Ok(());
        }
        // Partial or refused (e.g. a PROT_NONE page): /proc/PID/mem reads with FOLL_FORCE.
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|e| Error::Memory {
                op: "read",
                pid: self.pid,
                addr,
                len: buf.len(),
                err: e,
            })
    }

    /// Reads `len` bytes at `addr` into a new vector.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads several ranges with as few syscalls as possible (one `process_vm_readv`
    /// with an iovec per range, up to the kernel's limit per call). A range that the
    /// batch could not read completely is read on its own; `None` if that fails too.
    pub fn read_ranges(&self, ranges: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = ranges.iter().map(|&(_, l)| vec![0u8; l]).collect();
        let mut into: Vec<(u64, &mut [u8])> = ranges
            .iter()
            .zip(out.iter_mut())
            .map(|(&(addr, _), buf)| (addr, buf.as_mut_slice()))
            .collect();
        let ok = self.read_ranges_into(&mut into);
        out.into_iter()
            .zip(ok)
            .map(|(buf, ok)| ok.then_some(buf))
            .collect()
    }

    /// [`Self::read_ranges`] into the caller's buffers, one per address; true for each
    /// range read completely. (On this VM the first touch of a fresh page costs
    /// microseconds: a buffer touched before a stop keeps that out of it.)
    pub fn read_ranges_into(&self, ranges: &mut [(u64, &mut [u8])]) -> Vec<bool> {
        const IOV_MAX: usize = 1024;
        let mut ok = vec![true; ranges.len()];
        let mut i = 0;
        while i < ranges.len() {
            let end = (i + IOV_MAX).min(ranges.len());
            let mut local = Vec::with_capacity(end - i);
            let mut remote = Vec::with_capacity(end - i);
            for (addr, buf) in ranges[i..end].iter_mut() {
                local.push(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                });
                remote.push(libc::iovec {
                    iov_base: *addr as *mut libc::c_void,
                    iov_len: buf.len(),
                });
            }
            // SAFETY: every local iovec covers exactly one caller's buffer, borrowed
            // mutably here and not touched until the call returns; the counts match the
            // vectors' lengths.
            let n = unsafe {
                libc::process_vm_readv(
                    self.pid.0,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            };
            // The kernel stops at the first range it cannot read: ranges up to there
            // are complete, the rest are read one by one.
            let mut done = n.max(0) as usize;
            for (j, (addr, buf)) in ranges.iter_mut().enumerate().take(end).skip(i) {
                if done >= buf.len() {
                    done -= buf.len();
                    continue;
                }
                done = 0;
                ok[j] = self.read(*addr, buf).is_ok();
            }
            i = end;
        }
        ok
    }

    /// Reads `ranges` and throws the bytes away, and reads one byte of the first through
    /// `/proc/PID/mem`, the path of [`Self::write`]: run just before a stop, it warms the
    /// syscall paths that the stop's reads and writes take (see
    /// `ThreadSet::rehearse`).
    pub fn rehearse(&self, ranges: &[(u64, usize)]) {
        let _ = self.read_ranges(ranges);
        if let Some(&(addr, _)) = ranges.first() {
            let _ = self.mem.read_at(&mut [0u8; 1], addr);
        }
    }

    /// Writes `data` at `addr`, also into read-only or executable pages.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        // process_vm_writev fails with EFAULT on r-x pages; /proc/PID/mem writes with
        // FOLL_FORCE, like a debugger's breakpoint.
        self.mem
            .write_all_at(data, addr)
            .map_err(|e| Error::Memory {
                op: "write",
                pid: self.pid,
                addr,
                len: data.len(),
                err: e,
            })
    }
}
