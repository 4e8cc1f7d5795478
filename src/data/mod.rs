//! data (work in progress)
