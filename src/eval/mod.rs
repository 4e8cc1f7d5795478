//! eval (work in progress)
