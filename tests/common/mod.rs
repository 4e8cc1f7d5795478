//! Helpers shared by the integration tests that compare training runs.

use std::path::Path;

/// Losses logged at each optimiser step of a short run.
pub fn step_losses(run: &Path) -> Vec<f64> {
    dnatune::eval::read_log(&run.join("log.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dnatune::eval::LogEntry::Train { loss, .. } => Some(loss),
            _ => None,
        })
        .collect()
}
