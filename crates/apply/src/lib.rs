//! The doctor: apply, unpatch and inspect live patches in a running process.

pub mod unwind;
