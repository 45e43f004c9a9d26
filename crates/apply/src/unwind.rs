//! CFI stack unwinding of a stopped thread (objects' `.eh_frame`, the vDSO, patch code).
