//! Sequences that share an exact k-mer on either strand: the leak a random split leaves between
//! training and test when a dataset holds repeats, paralogues or overlapping peaks.
//!
//! A shared 31-mer between two 100-bp sequences is almost never chance (4^31 possible k-mers), so
//! it is a cheap stand-in for an alignment-based homology check: it finds copies and near-copies
//! with an identical stretch, not diverged homologues. Microsatellites are the exception: every
//! (GA)n or (CA)n stretch holds the same k-mers, and its edges with a base or two of flank are
//! common too, so k-mers touching a tandem repeat link nothing (as BLAST's DUST filter masks
//! low-complexity sequence). Otherwise a factor that binds GA repeats would see all its GA-rich
//! peaks in one group.

use std::collections::{HashMap, HashSet};

use super::Record;

/// The shortest k-mer the similarity split links by: shorter ones recur by chance.
pub const MIN_KMER: usize = 8;
/// The longest k-mer that packs into a `u64` at two bits a base.
pub const MAX_KMER: usize = 32;

/// The canonical form (the smaller of the k-mer and its reverse complement, 2 bits a base, A < C <
/// G < T so the order is the alphabetical one) of every k-mer of `seq` without an N.
pub fn canonical_kmers(seq: &str, k: usize) -> impl Iterator<Item = u64> + '_ {
    assert!(
        (1..=MAX_KMER).contains(&k),
        "k-mer length {k} outside 1..=32"
    );
    let mask = if k == MAX_KMER {
        u64::MAX
    } else {
        (1u64 << (2 * k)) - 1
    };
    let shift = 2 * (k as u32 - 1);
    let (mut forward, mut reverse, mut valid) = (0u64, 0u64, 0usize);
    seq.bytes().filter_map(move |base| {
        let code = match base {
            b'A' => 0,
            b'C' => 1,
            b'G' => 2,
            b'T' => 3,
            _ => {
                valid = 0;
                return None;
            }
        };
        forward = ((forward << 2) | code) & mask;
        // The complement's code is 3 - code; it enters the reverse k-mer at the front.
        reverse = (reverse >> 2) | ((3 - code) << shift);
        valid += 1;
        (valid >= k).then(|| forward.min(reverse))
    })
}

/// The longest repeat unit of a masked tandem repeat (hexanucleotide).
pub const MAX_TANDEM_PERIOD: usize = 6;

/// The shortest stretch masked as a tandem repeat.
pub const MIN_TANDEM_LENGTH: usize = 12;
/// The fewest repeat units in a masked stretch.
pub const MIN_TANDEM_UNITS: usize = 3;

/// The shortest masked stretch of period `period`: 12 bases and 3 units, so that random sequence
/// holds one about once in 65,000 bases (period 4) or less often (the others).
fn min_tandem_length(period: usize) -> usize {
    MIN_TANDEM_LENGTH.max(MIN_TANDEM_UNITS * period)
}

/// `seq` with every base of a tandem repeat (a stretch of [`min_tandem_length`] bases or more
/// that repeats itself with a period of 1 to [`MAX_TANDEM_PERIOD`]) replaced by N.
pub fn mask_tandem_repeats(seq: &str) -> String {
    let bases = seq.as_bytes();
    let n = bases.len();
    let mut masked = bases.to_vec();
    for period in 1..=MAX_TANDEM_PERIOD {
        // A run of positions j with bases[j] == bases[j + period] over [start, j) covers the
        // stretch [start, j + period).
        let mut start = 0;
        for j in 0..=n.saturating_sub(period) {
            let repeats = j + period < n && bases[j] == bases[j + period] && bases[j] != b'N';
            if !repeats {
                if j + period - start >= min_tandem_length(period) && j > start {
                    masked[start..j + period].fill(b'N');
                }
                start = j + 1;
            }
        }
    }
    String::from_utf8(masked).expect("only ASCII bytes were replaced")
}

/// The k-mers of `seq` that can link it to another sequence: canonical, without N, and clear of
/// tandem repeats.
pub fn linking_kmers(seq: &str, k: usize) -> Vec<u64> {
    canonical_kmers(&mask_tandem_repeats(seq), k).collect()
}

/// The linking k-mers of every record in `records`, for testing others against.
pub fn kmer_set(records: &[Record], k: usize) -> HashSet<u64> {
    records
        .iter()
        .flat_map(|r| linking_kmers(&r.seq, k))
        .collect()
}

/// How many of `records` share at least one linking k-mer (either strand) with `reference`'s set.
pub fn count_sharing(records: &[Record], reference: &HashSet<u64>, k: usize) -> usize {
    records
        .iter()
        .filter(|r| {
            linking_kmers(&r.seq, k)
                .iter()
                .any(|km| reference.contains(km))
        })
        .count()
}

/// How many held-out sequences share a k-mer (either strand) with a training sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SplitOverlap {
    pub kmer: usize,
    pub dev: usize,
    pub dev_sharing: usize,
    pub test: usize,
    pub test_sharing: usize,
}

/// The most training bases [`SplitOverlap::of`] indexes: a set of 20 M k-mers takes a few
/// hundred MB, more than a report printed on the side should cost.
pub const MAX_OVERLAP_BASES: usize = 20_000_000;

impl SplitOverlap {
    /// The overlap of `splits`, or `None` when the training set is over [`MAX_OVERLAP_BASES`].
    pub fn of(splits: &super::Splits, k: usize) -> Option<Self> {
        let bases: usize = splits.train.iter().map(|r| r.seq.len()).sum();
        if bases > MAX_OVERLAP_BASES {
            return None;
        }
        let train = kmer_set(&splits.train, k);
        Some(SplitOverlap {
            kmer: k,
            dev: splits.dev.len(),
            dev_sharing: count_sharing(&splits.dev, &train, k),
            test: splits.test.len(),
            test_sharing: count_sharing(&splits.test, &train, k),
        })
    }
}

/// The group of each record: records sharing a linking k-mer (either strand) are in one group, and so,
/// transitively, are the records linked through them. Groups are numbered by their first record.
pub fn similarity_groups(records: &[Record], k: usize) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..records.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_with: HashMap<u64, usize> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        for km in linking_kmers(&record.seq, k) {
            let j = *first_with.entry(km).or_insert(i);
            let (a, b) = (root(&mut parent, i), root(&mut parent, j));
            // The smaller index is the root, so a group is named by its first record.
            parent[a.max(b)] = a.min(b);
        }
    }
    (0..records.len()).map(|i| root(&mut parent, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::reverse_complement;

    fn rec(seq: &str) -> Record {
        Record {
            id: seq.to_string(),
            seq: seq.to_string(),
            label: Some(0),
            chrom: None,
        }
    }

    fn decode(mut code: u64, k: usize) -> String {
        let mut bases = vec![b'A'; k];
        for slot in bases.iter_mut().rev() {
            *slot = b"ACGT"[(code & 3) as usize];
            code >>= 2;
        }
        String::from_utf8(bases).unwrap()
    }

    /// The canonical k-mers by strings: every window without N, the alphabetically smaller of it
    /// and its reverse complement.
    fn naive(seq: &str, k: usize) -> Vec<String> {
        (0..=seq.len().saturating_sub(k))
            .filter(|&i| i + k <= seq.len())
            .map(|i| &seq[i..i + k])
            .filter(|w| !w.contains('N'))
            .map(|w| w.to_string().min(reverse_complement(w)))
            .collect()
    }

    #[test]
    fn canonical_kmers_match_a_string_recomputation() {
        let mut state = 7u64;
        for len in [1usize, 5, 31, 32, 33, 90] {
            let seq: String = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    b"ACGTACGTACGTN"[(state >> 33) as usize % 13] as char
                })
                .collect();
            for k in [1, 4, 11, 31, 32] {
                let got: Vec<String> = canonical_kmers(&seq, k).map(|c| decode(c, k)).collect();
                assert_eq!(got, naive(&seq, k), "{seq} k {k}");
            }
        }
    }

    /// Whether base `j` of `seq` lies in a stretch without N that repeats itself with a period p
    /// of 1 to 6 over at least 12 bases and 3 p, by trying every stretch.
    fn in_tandem_repeat(seq: &[u8], j: usize) -> bool {
        (1..=MAX_TANDEM_PERIOD).any(|p| {
            (0..=j).any(|a| {
                (j + 1..=seq.len()).any(|b| {
                    b - a >= 12.max(3 * p)
                        && !seq[a..b].contains(&b'N')
                        && (a..b - p).all(|x| seq[x] == seq[x + p])
                })
            })
        })
    }

    #[test]
    fn tandem_repeats_are_masked_as_a_brute_force_search_finds_them() {
        let mut state = 3u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for _ in 0..200 {
            // Random pieces and repeats of random units, so stretches near 12 bases are common.
            let mut seq = String::new();
            while seq.len() < 60 {
                let unit: String = (0..1 + next() % 7)
                    .map(|_| b"ACGTN"[next() % 5] as char)
                    .collect();
                let copies = if next() % 2 == 0 { 1 } else { 1 + next() % 8 };
                seq.push_str(&unit.repeat(copies));
            }
            let masked = mask_tandem_repeats(&seq);
            for (j, (&was, &now)) in seq.as_bytes().iter().zip(masked.as_bytes()).enumerate() {
                let expected = if in_tandem_repeat(seq.as_bytes(), j) {
                    b'N'
                } else {
                    was
                };
                assert_eq!(now, expected, "{seq} at {j}: {masked}");
            }
        }
        // Two peaks sharing a (GA)20 microsatellite and a base or two of flank are not linked.
        let records = [
            rec(&format!("ACCTGAATCG{}ATGCA", "GA".repeat(20))),
            rec(&format!("TTGGCATCAA{}ATGAT", "GA".repeat(20))),
        ];
        assert_eq!(similarity_groups(&records, 31), [0, 1]);
        assert_eq!(
            count_sharing(&records[1..], &kmer_set(&records[..1], 31), 31),
            0
        );
    }

    #[test]
    fn a_sequence_and_its_reverse_complement_share_every_kmer() {
        let seq = "ACGGTTCAGGATTACCAGTNNACGGATTTACGCA";
        let mut a: Vec<u64> = canonical_kmers(seq, 8).collect();
        let mut b: Vec<u64> = canonical_kmers(&reverse_complement(seq), 8).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }

    #[test]
    fn groups_link_shared_kmers_transitively_and_across_strands() {
        let x = "ACGTTGCAAGGCTTAC";
        let y = "TTGGCCAATGCATGCA";
        let records = [
            rec(&format!("{x}GGGG")),                        // 0
            rec(&format!("CCCC{y}")),                        // 1: alone
            rec(&format!("{}AT{y}", reverse_complement(x))), // 2: x on the other strand, and y
            rec("ACACACACACACACACAC"),                       // 3: alone
            rec(&format!("N{}", &y[..12])),                  // 4: 12 bases of y only, below k
        ];
        let groups = similarity_groups(&records, 14);
        // 0 and 2 share x; 2 and 1 share y: one group named by record 0.
        assert_eq!(groups, [0, 0, 0, 3, 4]);
        let train = kmer_set(&records[..1], 14);
        assert_eq!(count_sharing(&records[1..], &train, 14), 1);
    }
}
