//! Batch collation: which examples go together (seeded shuffling, length bucketing) and how they are
//! padded into one rectangular block of ids with an attention mask. Plain vectors only; the model
//! turns them into tensors.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Batches per pool when bucketing by length: large enough that sorting a pool groups similar
/// lengths, small enough that the order stays well mixed across the epoch.
const BATCHES_PER_POOL: usize = 50;

/// A padded batch, row-major: row `r` holds the ids of example `indices[r]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Dataset indices of the rows.
    pub indices: Vec<usize>,
    /// `batch_size * seq_len` ids, padding included.
    pub input_ids: Vec<u32>,
    /// Same shape as `input_ids`: 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Number of real (unpadded) tokens.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }
}

/// Pads the examples `indices` of `sequences` to the longest among them (dynamic padding), so a batch
/// of short sequences costs no more than it must.
///
/// # Panics
/// If an index is out of range for `sequences` (a caller bug, not bad input).
pub fn collate(indices: &[usize], sequences: &[Vec<u32>], pad_id: u32) -> Batch {
    let seq_len = indices
        .iter()
        .map(|&i| sequences[i].len())
        .max()
        .unwrap_or(0);
    let mut input_ids = Vec::with_capacity(indices.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(indices.len() * seq_len);
    for &i in indices {
        let ids = &sequences[i];
        let padding = seq_len - ids.len();
        input_ids.extend_from_slice(ids);
        input_ids.extend(std::iter::repeat_n(pad_id, padding));
        attention_mask.extend(std::iter::repeat_n(1, ids.len()));
        attention_mask.extend(std::iter::repeat_n(0, padding));
    }
    Batch {
        indices: indices.to_vec(),
        input_ids,
        attention_mask,
        batch_size: indices.len(),
        seq_len,
    }
}

/// How [`plan_batches`] orders the examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOrder {
    /// Dataset order, for evaluation and prediction.
    Sequential,
    /// A random order that depends only on `(seed, epoch)`. With `bucket_by_length`, examples of
    /// similar length share batches (less padding) while the batch order stays random.
    Shuffled {
        seed: u64,
        epoch: u64,
        bucket_by_length: bool,
    },
}

/// Splits the examples (whose token counts are `lengths`) into batches of `batch_size` indices. Every
/// index appears exactly once and only the last batch may be short. A `batch_size` of 0 is treated
/// as 1.
pub fn plan_batches(lengths: &[usize], batch_size: usize, order: BatchOrder) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut indices: Vec<usize> = (0..lengths.len()).collect();
    let BatchOrder::Shuffled {
        seed,
        epoch,
        bucket_by_length,
    } = order
    else {
        return indices.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    // Seed and epoch fill separate halves of the seed, so no two (seed, epoch) pairs collide.
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    let mut rng = StdRng::from_seed(key);
    indices.shuffle(&mut rng);
    if !bucket_by_length {
        return indices.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(indices.len().div_ceil(batch_size));
    for pool in indices.chunks_mut(batch_size * BATCHES_PER_POOL) {
        // Stable sort: equal lengths keep their shuffled order.
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    // Pools are whole multiples of the batch size, so at most one batch is short; keep it last.
    if let Some(short) = batches.iter().position(|b| b.len() < batch_size) {
        let last = batches.len() - 1;
        batches.swap(short, last);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::{BpeTokenizer, Tokenizer};
    use std::path::Path;

    #[test]
    fn collate_pads_to_the_longest_with_masks() {
        let seqs = vec![vec![1, 5, 2], vec![1, 6, 7, 8, 2], vec![1, 2]];
        let b = collate(&[2, 0, 1], &seqs, 9);
        assert_eq!((b.batch_size, b.seq_len), (3, 5));
        assert_eq!(b.indices, vec![2, 0, 1]);
        #[rustfmt::skip]
        let expected_ids = vec![
            1, 2, 9, 9, 9,
            1, 5, 2, 9, 9,
            1, 6, 7, 8, 2,
        ];
        #[rustfmt::skip]
        let expected_mask = vec![
            1, 1, 0, 0, 0,
            1, 1, 1, 0, 0,
            1, 1, 1, 1, 1,
        ];
        assert_eq!(b.input_ids, expected_ids);
        assert_eq!(b.attention_mask, expected_mask);
        assert_eq!(b.real_tokens(), 10);

        let only_short = collate(&[2], &seqs, 9);
        assert_eq!((only_short.seq_len, only_short.input_ids), (2, vec![1, 2]));
        let empty = collate(&[], &seqs, 9);
        assert_eq!(
            (empty.batch_size, empty.seq_len, empty.input_ids.len()),
            (0, 0, 0)
        );
    }

    /// Asserts the plan holds each of `n` indices once, in full batches except possibly the last.
    fn assert_partition(plan: &[Vec<usize>], n: usize, batch_size: usize) {
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        for (i, b) in plan.iter().enumerate() {
            assert!(!b.is_empty() && b.len() <= batch_size);
            if i + 1 < plan.len() {
                assert_eq!(b.len(), batch_size, "only the last batch may be short");
            }
        }
    }

    #[test]
    fn sequential_keeps_dataset_order() {
        let plan = plan_batches(&[3; 7], 3, BatchOrder::Sequential);
        assert_eq!(plan, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(
            plan_batches(&[3; 2], 0, BatchOrder::Sequential),
            vec![vec![0], vec![1]]
        );
        assert!(plan_batches(&[], 4, BatchOrder::Sequential).is_empty());
    }

    #[test]
    fn shuffled_is_a_deterministic_partition_that_changes_with_epoch() {
        let lengths: Vec<usize> = (0..1003).map(|i| 10 + (i * 37) % 90).collect();
        for bucket_by_length in [false, true] {
            let order = |seed, epoch| BatchOrder::Shuffled {
                seed,
                epoch,
                bucket_by_length,
            };
            let a = plan_batches(&lengths, 8, order(7, 0));
            assert_partition(&a, lengths.len(), 8);
            assert_eq!(a, plan_batches(&lengths, 8, order(7, 0)));
            assert_ne!(a, plan_batches(&lengths, 8, order(7, 1)));
            assert_ne!(a, plan_batches(&lengths, 8, order(8, 0)));
            assert_ne!(a, plan_batches(&lengths, 8, BatchOrder::Sequential));
        }
    }

    /// Padding slots a plan wastes.
    fn padding(plan: &[Vec<usize>], lengths: &[usize]) -> usize {
        plan.iter()
            .map(|b| {
                let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                b.iter().map(|&i| max - lengths[i]).sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn bucketing_reduces_padding_on_real_dev_lengths() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let tok =
            BpeTokenizer::from_file(&root.join("assets/tokenizers/dna-bpe-4096/tokenizer.json"))
                .unwrap();
        let text = std::fs::read_to_string(root.join("data/gue-tf0/dev.csv")).unwrap();
        let lengths: Vec<usize> = text
            .lines()
            .skip(1)
            .map(|l| tok.encode(l.split(',').next().unwrap(), None).len())
            .collect();
        assert!(
            lengths.iter().min() < lengths.iter().max(),
            "lengths must vary"
        );
        for seed in 0..5 {
            let shuffled = |bucket_by_length| {
                let order = BatchOrder::Shuffled {
                    seed,
                    epoch: 0,
                    bucket_by_length,
                };
                plan_batches(&lengths, 16, order)
            };
            let (plain, bucketed) = (shuffled(false), shuffled(true));
            assert_partition(&bucketed, lengths.len(), 16);
            let (p, b) = (padding(&plain, &lengths), padding(&bucketed, &lengths));
            assert!(b * 2 < p, "seed {seed}: bucketed padding {b} vs plain {p}");
        }
    }
}
