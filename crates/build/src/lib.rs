//! Compiler wrapper stages and patch-build orchestration.
