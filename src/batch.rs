//! batch (work in progress)
