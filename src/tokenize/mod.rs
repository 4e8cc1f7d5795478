//! tokenize (work in progress)
