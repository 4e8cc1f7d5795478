//! train (work in progress)
