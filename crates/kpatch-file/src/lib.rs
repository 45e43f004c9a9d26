//! The `.kpatch` container: a fixed header (LibCare 688-byte or LibcarePlus 504-byte
//! layout) followed by a relocatable ELF, padded to 16 bytes.
//!
//! You give it bytes; it validates everything before use and never panics.
