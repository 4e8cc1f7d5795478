//! Vocabulary-file tokenizers: k-mers (overlapping as in DNABERT, non-overlapping as in the
//! Nucleotide Transformer) and single nucleotides.

use std::path::Path;

use anyhow::{bail, Result};

use super::vocab::{Vocab, VocabKind};
use super::{wrap_ids, wrap_spans, Framing, SpecialTokens, Tokenizer};

/// DNABERT's vocab.txt starts with these, in this order (ids 0..4); dnatune's own vocabularies reuse it.
const BUILT_IN_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The Nucleotide Transformer's vocab.txt starts with these (ids 0..=5), the names transformers'
/// `EsmTokenizer` looks for.
const NT_SPECIALS: [&str; 6] = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"];

/// Base order of DNABERT's published k-mer lists (`itertools.product("ATCG", repeat=k)`), so a
/// built-in vocabulary matches the ids of DNABERT checkpoints.
const DNABERT_BASE_ORDER: [char; 4] = ['A', 'T', 'C', 'G'];

/// Index of a base in the internal k-mer code (A C G T); `None` for N or anything else.
fn base_code(b: u8) -> Option<usize> {
    match b.to_ascii_uppercase() {
        b'A' => Some(0),
        b'C' => Some(1),
        b'G' => Some(2),
        b'T' => Some(3),
        _ => None,
    }
}

/// Base-4 code of a k-mer, `None` when it holds a non-ACGT character.
fn kmer_code(kmer: &[u8]) -> Option<usize> {
    kmer.iter()
        .try_fold(0usize, |acc, &b| Some(acc * 4 + base_code(b)?))
}

/// All 4^k k-mers in DNABERT's order.
fn dnabert_kmers(k: usize) -> Vec<String> {
    (0..k).fold(vec![String::new()], |acc, _| {
        acc.iter()
            .flat_map(|prefix| {
                DNABERT_BASE_ORDER
                    .iter()
                    .map(move |c| format!("{prefix}{c}"))
            })
            .collect()
    })
}

/// Ids of A, C, G, T, N (N, and any base the vocabulary lacks, map to `[UNK]`).
fn single_base_ids(vocab: &Vocab) -> [u32; 5] {
    ["A", "C", "G", "T", "N"].map(|b| vocab.id(b).unwrap_or(vocab.specials().unk))
}

/// Id of one sequence character as a single-base token.
fn single_id(base_ids: &[u32; 5], b: u8) -> u32 {
    match b.to_ascii_uppercase() {
        b'N' => base_ids[4],
        other => base_code(other).map_or(base_ids[4], |c| base_ids[c]),
    }
}

/// k-mer tokenizer over a vocabulary holding all 4^k k-mers.
#[derive(Clone, Debug)]
pub struct KmerTokenizer {
    k: usize,
    overlapping: bool,
    vocab: Vocab,
    /// Vocabulary id of every k-mer, indexed by [`kmer_code`]; decouples encoding from the file's order.
    kmer_ids: Vec<u32>,
    /// Single-base ids for the non-overlapping fallback.
    base_ids: [u32; 5],
    origin: String,
}

impl KmerTokenizer {
    /// DNABERT's overlapping k-mer tokenizer with its published vocabulary (specials, then the 4^k
    /// k-mers), k in 3..=6 as DNABERT released.
    pub fn overlapping(k: usize) -> Result<Self> {
        if !(3..=6).contains(&k) {
            bail!("overlapping k-mer tokenizer: k must be 3..=6 (DNABERT's releases), got {k}");
        }
        let tokens = BUILT_IN_SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(dnabert_kmers(k));
        let vocab = Vocab::from_tokens(tokens.collect(), "built-in k-mer vocabulary")?;
        Ok(Self::from_vocab(vocab, k, true, "built in".into()))
    }

    /// Nucleotide-Transformer-style non-overlapping k-mers with a fresh vocabulary laid out as the
    /// released NT vocabularies are: `<unk> <pad> <mask> <cls> <eos> <bos>` (ids 0..=5), the 4^k
    /// k-mers, then A T C G N for the bases no k-mer covers (for k = 6: 4,107 tokens, `<cls>` 3,
    /// `AAAAAA` 6, `A` 4102, as the v2 checkpoints' tokenizer gives); k in 2..=8.
    pub fn non_overlapping(k: usize) -> Result<Self> {
        if !(2..=8).contains(&k) {
            bail!("non-overlapping k-mer tokenizer: k must be 2..=8, got {k}");
        }
        let tokens = NT_SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(dnabert_kmers(k))
            .chain(DNABERT_BASE_ORDER.iter().chain(&['N']).map(char::to_string));
        let vocab = Vocab::from_tokens(tokens.collect(), "built-in k-mer vocabulary")?;
        Ok(Self::from_vocab(vocab, k, false, "built in".into()))
    }

    /// Loads a k-mer `vocab.txt`, overlapping or not depending on its tokens.
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        let vocab = Vocab::read(path)?;
        let origin = path.display().to_string();
        match vocab.detect_kind()? {
            VocabKind::OverlappingKmer { k } => Ok(Self::from_vocab(vocab, k, true, origin)),
            VocabKind::NonOverlappingKmer { k } => Ok(Self::from_vocab(vocab, k, false, origin)),
            VocabKind::SingleNucleotide => {
                bail!("{origin}: holds only single bases, not a k-mer vocabulary")
            }
        }
    }

    /// Wraps a vocabulary already known (by [`Vocab::detect_kind`] or construction) to hold all
    /// 4^k k-mers.
    pub(crate) fn from_vocab(vocab: Vocab, k: usize, overlapping: bool, origin: String) -> Self {
        let mut kmer_ids = vec![vocab.specials().unk; 1 << (2 * k)];
        for (id, token) in vocab.tokens().iter().enumerate() {
            if token.len() == k {
                if let Some(code) = kmer_code(token.as_bytes()) {
                    kmer_ids[code] = id as u32;
                }
            }
        }
        let base_ids = single_base_ids(&vocab);
        Self {
            k,
            overlapping,
            vocab,
            kmer_ids,
            base_ids,
            origin,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn is_overlapping(&self) -> bool {
        self.overlapping
    }

    /// The tokens between `[CLS]` and `[SEP]` as (id, start, end).
    fn pieces(&self, seq: &str) -> Vec<(u32, usize, usize)> {
        let bytes = seq.as_bytes();
        let k = self.k;
        let unk = self.vocab.specials().unk;
        let kmer_id = |start: usize| kmer_code(&bytes[start..start + k]).map(|c| self.kmer_ids[c]);
        if self.overlapping {
            return (0..(bytes.len() + 1).saturating_sub(k))
                .map(|i| (kmer_id(i).unwrap_or(unk), i, i + k))
                .collect();
        }
        // A k-mer wherever the next k bases are all ACGT, else one base: each N-free stretch is
        // cut into k-mers from its own start, its tail and the Ns go base by base (the released
        // tokenizer's longest match from the left; the original NT code splits at each N).
        let mut out = Vec::with_capacity(bytes.len() / k + k);
        let mut pos = 0;
        while pos < bytes.len() {
            match (pos + k <= bytes.len()).then(|| kmer_id(pos)).flatten() {
                Some(id) => {
                    out.push((id, pos, pos + k));
                    pos += k;
                }
                None => {
                    out.push((single_id(&self.base_ids, bytes[pos]), pos, pos + 1));
                    pos += 1;
                }
            }
        }
        out
    }
}

impl KmerTokenizer {
    /// DNABERT's `[CLS] .. [SEP]`; the Nucleotide Transformer's non-overlapping k-mers end
    /// without a token.
    fn framing(&self) -> Framing {
        if self.overlapping {
            Framing::ClsSep
        } else {
            Framing::ClsOnly
        }
    }
}

impl Tokenizer for KmerTokenizer {
    fn encode(&self, seq: &str, max_len: Option<usize>) -> Vec<u32> {
        wrap_ids(
            self.pieces(seq).into_iter().map(|p| p.0),
            self.vocab.specials(),
            max_len,
            self.framing(),
        )
    }

    fn token_spans(&self, seq: &str) -> Vec<Option<(usize, usize)>> {
        wrap_spans(
            self.pieces(seq).into_iter().map(|(_, s, e)| (s, e)),
            self.framing(),
        )
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.vocab.specials()
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.vocab.token(id).map(String::from)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.id(token)
    }

    fn describe(&self) -> String {
        let style = if self.overlapping {
            "overlapping (DNABERT)"
        } else {
            "non-overlapping (Nucleotide Transformer)"
        };
        format!(
            "{style} {}-mer from {}, {} tokens",
            self.k,
            self.origin,
            self.vocab.len()
        )
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.vocab.write(&dir.join("vocab.txt"))
    }
}

/// One token per base.
#[derive(Clone, Debug)]
pub struct SingleNucleotideTokenizer {
    vocab: Vocab,
    base_ids: [u32; 5],
    origin: String,
}

impl SingleNucleotideTokenizer {
    /// Fresh vocabulary: the five specials, then A C G T N.
    pub fn new() -> Self {
        let tokens = BUILT_IN_SPECIALS
            .iter()
            .chain(&["A", "C", "G", "T", "N"])
            .map(|s| s.to_string())
            .collect();
        let vocab = Vocab::from_tokens(tokens, "built-in single-nucleotide vocabulary")
            .expect("the built-in vocabulary has every special token and no duplicates");
        Self::from_vocab(vocab, "built in".into())
    }

    /// Loads a single-nucleotide `vocab.txt`.
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        let vocab = Vocab::read(path)?;
        match vocab.detect_kind()? {
            VocabKind::SingleNucleotide => Ok(Self::from_vocab(vocab, path.display().to_string())),
            other => bail!(
                "{}: is a {other:?} vocabulary, not single nucleotide",
                path.display()
            ),
        }
    }

    pub(crate) fn from_vocab(vocab: Vocab, origin: String) -> Self {
        let base_ids = single_base_ids(&vocab);
        Self {
            vocab,
            base_ids,
            origin,
        }
    }
}

impl Default for SingleNucleotideTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer for SingleNucleotideTokenizer {
    fn encode(&self, seq: &str, max_len: Option<usize>) -> Vec<u32> {
        let body = seq.bytes().map(|b| single_id(&self.base_ids, b));
        wrap_ids(body, self.vocab.specials(), max_len, Framing::ClsSep)
    }

    fn token_spans(&self, seq: &str) -> Vec<Option<(usize, usize)>> {
        wrap_spans((0..seq.len()).map(|i| (i, i + 1)), Framing::ClsSep)
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.vocab.specials()
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.vocab.token(id).map(String::from)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.id(token)
    }

    fn describe(&self) -> String {
        format!(
            "single nucleotide from {}, {} tokens",
            self.origin,
            self.vocab.len()
        )
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.vocab.write(&dir.join("vocab.txt"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DNABERT's bert-config-3/vocab.txt after the specials, as published (ids 5..=68).
    const DNABERT_3MERS: &str = "AAA AAT AAC AAG ATA ATT ATC ATG ACA ACT ACC ACG AGA AGT AGC AGG \
        TAA TAT TAC TAG TTA TTT TTC TTG TCA TCT TCC TCG TGA TGT TGC TGG \
        CAA CAT CAC CAG CTA CTT CTC CTG CCA CCT CCC CCG CGA CGT CGC CGG \
        GAA GAT GAC GAG GTA GTT GTC GTG GCA GCT GCC GCG GGA GGT GGC GGG";

    #[test]
    fn built_in_3mer_vocabulary_matches_dnabert() {
        let tok = KmerTokenizer::overlapping(3).unwrap();
        let published: Vec<&str> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .into_iter()
            .chain(DNABERT_3MERS.split_whitespace())
            .collect();
        assert_eq!(tok.vocab_size(), published.len());
        for (id, token) in published.iter().enumerate() {
            assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(*token));
        }
        let six = KmerTokenizer::overlapping(6).unwrap();
        assert_eq!(six.vocab_size(), 5 + 4096);
        // First and last lines of DNABERT's bert-config-6/vocab.txt.
        let head: Vec<String> = (5..10).map(|i| six.id_to_token(i).unwrap()).collect();
        assert_eq!(head, ["AAAAAA", "AAAAAT", "AAAAAC", "AAAAAG", "AAAATA"]);
        assert_eq!(six.id_to_token(4100).as_deref(), Some("GGGGGG"));
    }

    #[test]
    fn overlapping_3mer_ids_by_hand() {
        let tok = KmerTokenizer::overlapping(3).unwrap();
        // Ids read off the published list above (5 + position): ACG 16, CGT 50, GTA 57, TAC 23.
        assert_eq!(tok.encode("ACGTAC", None), vec![2, 16, 50, 57, 23, 3]);
        // CGN, GNT, NTA contain N -> [UNK] = 1; TAC 23.
        assert_eq!(tok.encode("CGNTAC", None), vec![2, 1, 1, 1, 23, 3]);
        // Truncation keeps [CLS] and [SEP] and drops k-mers at the end.
        assert_eq!(tok.encode("ACGTAC", Some(4)), vec![2, 16, 50, 3]);
        assert_eq!(tok.encode("ACGTAC", Some(2)), vec![2, 3]);
        // Shorter than k: no k-mers.
        assert_eq!(tok.encode("AC", None), vec![2, 3]);
        assert_eq!(
            tok.token_spans("ACGTAC"),
            vec![
                None,
                Some((0, 3)),
                Some((1, 4)),
                Some((2, 5)),
                Some((3, 6)),
                None
            ]
        );
    }

    #[test]
    fn overlapping_6mer_ids_by_hand() {
        let tok = KmerTokenizer::overlapping(6).unwrap();
        // DNABERT order is base-4 with A=0 T=1 C=2 G=3, so id = 5 + code:
        // AAAAAA 5, AAAAAT 6, AAAATC 5+4+2 = 11; GGGGGG 5+4095 = 4100.
        assert_eq!(tok.encode("AAAAAATC", None), vec![2, 5, 6, 11, 3]);
        // ACGTAC: 0*1024 + 2*256 + 3*64 + 1*16 + 0*4 + 2 = 722 -> 727.
        // CGTACG: 2*1024 + 3*256 + 1*64 + 0*16 + 2*4 + 3 = 2891 -> 2896.
        assert_eq!(tok.encode("ACGTACG", None), vec![2, 727, 2896, 3]);
        assert_eq!(tok.id_to_token(727).as_deref(), Some("ACGTAC"));
        assert_eq!(tok.encode("GGGGGGN", None), vec![2, 4100, 1, 3]);
        assert_eq!(tok.encode("GGGGGGN", Some(3)), vec![2, 4100, 3]);
    }

    #[test]
    fn non_overlapping_with_tail_and_n() {
        let tok = KmerTokenizer::non_overlapping(3).unwrap();
        // 6 specials, 64 3-mers in A T C G order (ids 6..=69), then A 70, T 71, C 72, G 73, N 74.
        assert_eq!(tok.vocab_size(), 75);
        assert_eq!(tok.token_to_id("A"), Some(70));
        assert_eq!(tok.token_to_id("N"), Some(74));
        // ACG = 6 + 0*16 + 2*4 + 3 = 17 | TAC = 6 + 16 + 0 + 2 = 24 | tail G T -> 73 71.
        // <cls> and the tokens: no end token, as the Nucleotide Transformer encodes.
        assert_eq!(tok.encode("ACGTACGT", None), vec![3, 17, 24, 73, 71]);
        assert_eq!(
            tok.token_spans("ACGTACGT"),
            vec![None, Some((0, 3)), Some((3, 6)), Some((6, 7)), Some((7, 8)),]
        );
        // ACN holds N -> A C N base by base; GGG = 6 + 63 = 69; tail A.
        assert_eq!(tok.encode("ACNGGGA", None), vec![3, 70, 72, 74, 69, 70]);
        assert_eq!(tok.encode("ACNGGGA", Some(5)), vec![3, 70, 72, 74, 69]);
        // After an N the k-mers restart: ACG | T (tail before N) | N | AAA = 6 | C.
        assert_eq!(tok.encode("ACGTNAAAC", None), vec![3, 17, 71, 74, 6, 72]);
        assert_eq!(
            tok.token_spans("ANAAA"),
            vec![None, Some((0, 1)), Some((1, 2)), Some((2, 5))]
        );
        let specials = tok.special_tokens();
        assert_eq!((specials.unk, specials.pad, specials.mask), (0, 1, 2));
    }

    /// The ids the released 6-mer NT v2 tokenizer gives (<cls> 3, <pad> 1, AAAAAA 6, A..N
    /// 4102..=4106, 4,107 tokens).
    #[test]
    fn built_in_six_mer_vocabulary_has_the_released_ids() {
        let tok = KmerTokenizer::non_overlapping(6).unwrap();
        assert_eq!(tok.vocab_size(), 4107);
        assert_eq!(tok.encode("AAAAAAT", None), vec![3, 6, 4103]);
        assert_eq!(
            tok.encode("ATCGN", None),
            vec![3, 4102, 4103, 4104, 4105, 4106]
        );
        assert_eq!(tok.special_tokens().pad, 1);
    }

    #[test]
    fn single_nucleotide_ids() {
        let tok = SingleNucleotideTokenizer::new();
        // [PAD]0 [UNK]1 [CLS]2 [SEP]3 [MASK]4 A5 C6 G7 T8 N9
        assert_eq!(
            tok.encode("GATTACAN", None),
            vec![2, 7, 5, 8, 8, 5, 6, 5, 9, 3]
        );
        assert_eq!(tok.encode("GATTACAN", Some(4)), vec![2, 7, 5, 3]);
        assert_eq!(
            tok.token_spans("GA"),
            vec![None, Some((0, 1)), Some((1, 2)), None]
        );
        assert_eq!(tok.vocab_size(), 10);
    }

    #[test]
    fn constructors_reject_unsupported_k() {
        assert!(KmerTokenizer::overlapping(2).is_err());
        assert!(KmerTokenizer::overlapping(7).is_err());
        assert!(KmerTokenizer::non_overlapping(1).is_err());
    }

    #[test]
    fn vocab_file_in_another_order_still_encodes_by_token() {
        // A vocab.txt whose k-mers are in ACGT order: ids must follow the file, not DNABERT's order.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        let mut text = String::from("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n");
        for a in "ACGT".chars() {
            for b in "ACGT".chars() {
                text.push_str(&format!("{a}{b}\n"));
            }
        }
        std::fs::write(&path, text).unwrap();
        let tok = KmerTokenizer::from_vocab_file(&path).unwrap();
        assert!(tok.is_overlapping() && tok.k() == 2);
        // AC = 5 + 1, CG = 5 + 6, GT = 5 + 11.
        assert_eq!(tok.encode("ACGT", None), vec![2, 6, 11, 16, 3]);
        assert!(SingleNucleotideTokenizer::from_vocab_file(&path).is_err());
    }
}
