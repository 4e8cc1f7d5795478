//! ops (work in progress)
