//! peft (work in progress)
