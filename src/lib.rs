//! dnatune: fine-tune genomic foundation models (DNABERT-2, k-mer DNABERT) on labelled DNA sequences.
//!
//! The modules mirror the pipeline: `data` (files to records and splits) -> `tokenize` (records to
//! token ids) -> `batch` (ids to padded batches) -> `model` + `peft` (encoder, heads, adapters) ->
//! `train` (loop, optimiser, schedule, checkpoints) -> `eval` (metrics, report) -> `explain` (which
//! bases drive a call), `scan` (where along a long sequence the calls are) and `variants` (how much
//! a sequence change moves a call).

pub mod batch;
pub mod cli;
pub mod data;
pub mod device;
pub mod ensemble;
pub mod eval;
pub mod explain;
pub mod fsutil;
pub mod model;
pub mod ops;
pub mod peft;
pub mod pretrain;
pub mod scan;
pub mod tokenize;
pub mod train;
pub mod variants;
