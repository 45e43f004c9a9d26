//! A traced process: thread set, memory I/O, remote syscalls, maps and loaded objects.
