//! TEMPORARY interface stand-in (replaced by the batch module on merge).
pub struct Batch {
    pub indices: Vec<usize>,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}
pub fn collate(indices: &[usize], sequences: &[Vec<u32>], pad_id: u32) -> Batch {
    let seq_len = indices.iter().map(|&i| sequences[i].len()).max().unwrap_or(0);
    let mut input_ids = vec![];
    let mut attention_mask = vec![];
    for &i in indices {
        let s = &sequences[i];
        input_ids.extend(s.iter().copied().chain(std::iter::repeat(pad_id)).take(seq_len));
        attention_mask.extend((0..seq_len).map(|j| (j < s.len()) as u32));
    }
    Batch { indices: indices.to_vec(), input_ids, attention_mask, batch_size: indices.len(), seq_len }
}
pub enum BatchOrder {
    Sequential,
    Shuffled { seed: u64, epoch: u64, bucket_by_length: bool },
}
pub fn plan_batches(lengths: &[usize], batch_size: usize, order: BatchOrder) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    if let BatchOrder::Shuffled { seed, epoch, .. } = order {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ epoch));
    }
    idx.chunks(batch_size).map(|c| c.to_vec()).collect()
}
