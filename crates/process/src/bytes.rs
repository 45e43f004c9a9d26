//! Read-only bytes of an object file, shared between jobs: mapped from the file, or
//! held on the heap.
//!
//! Object files are mapped rather than read. On this VM every first touch of a fresh
//! heap page is a costly fault: reading libc (1.9 MB) into a `Vec` and moving it into an
//! `Arc<[u8]>` took 1.8–4.2 ms, and the patch touches only a small part of the file
//! (headers, symbol tables, the CFI of a few functions). A private read-only mapping
//! costs one `mmap`, and its pages are the page cache's.

use std::fs::File;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Shared, immutable bytes (cheap to clone).
#[derive(Clone)]
pub struct Bytes(Arc<Backing>);

enum Backing {
    Heap(Box<[u8]>),
    /// A private read-only mapping of `len` bytes at `ptr`, unmapped on drop.
    Mapped {
        ptr: *const u8,
        len: usize,
    },
}

// SAFETY: the mapping is read-only and private, nothing writes through `ptr`, and it
// lives until the last clone is dropped; sharing `&[u8]` views of it across threads is
// as safe as sharing a `Box<[u8]>`.
unsafe impl Send for Backing {}
// SAFETY: see `Send`: only shared reads.
unsafe impl Sync for Backing {}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Backing::Mapped { ptr, len } = *self {
            // SAFETY: `ptr`/`len` are exactly what `mmap` returned in `Bytes::map`, and no
            // view outlives the last `Bytes` (views borrow from it).
            unsafe {
                libc::munmap(ptr as *mut libc::c_void, len);
            }
        }
    }
}

impl Bytes {
    /// Maps the whole of `file` read-only. Like the target process that maps the same
    /// file, livecare relies on the file not being truncated in place meanwhile
    /// (package managers write a new file and rename it: the old inode stays whole).
    pub fn map(file: &File) -> std::io::Result<Bytes> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("file too large to map"))?;
        if len == 0 {
            return Ok(Bytes::from(Vec::new()));
        }
        // SAFETY: a fresh private read-only mapping of an open file; the kernel picks the
        // address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Bytes(Arc::new(Backing::Mapped {
            ptr: ptr as *const u8,
            len,
        })))
    }

    /// Opens `path` and maps it (see [`Bytes::map`]).
    pub fn map_path(path: impl AsRef<std::path::Path>) -> std::io::Result<Bytes> {
        Bytes::map(&File::open(path)?)
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &*self.0 {
            Backing::Heap(b) => b,
            // SAFETY: the mapping covers `len` readable bytes for as long as `self` lives.
            Backing::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(Arc::new(Backing::Heap(v.into_boxed_slice())))
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes::from(v.to_vec())
    }
}

impl FromIterator<u8> for Bytes {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> Bytes {
        Bytes::from(iter.into_iter().collect::<Vec<u8>>())
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_reads_as_its_contents_and_outlives_its_file_handle() {
        let path = std::env::temp_dir().join(format!("livecare-bytes-{}", std::process::id()));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let b = Bytes::map_path(&path).unwrap();
        let c = b.clone();
        drop(b);
        assert_eq!(&c[..], &data[..]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&c[..], &data[..], "a removed file stays mapped");
        std::fs::write(&path, b"").unwrap();
        assert!(Bytes::map_path(&path).unwrap().is_empty());
        std::fs::remove_file(&path).unwrap();
    }
}
