//! model (work in progress)

pub mod checkpoint;
