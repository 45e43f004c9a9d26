//! Architecture-specific parts (relocation types, instruction rewrites).

pub mod x86_64;
