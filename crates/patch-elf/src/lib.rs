//! Post-link ELF transforms on the patched binary: the `kpatch_strip` job.
