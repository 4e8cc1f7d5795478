//! `explain`: in-silico mutagenesis against predictions of the mutants made by hand, the
//! files the command writes, and the --max-length checks of whole-sequence scoring.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use dnatune::data::{read_records, reverse_complement, LabelPolicy, ReadOptions};
use dnatune::explain::{Explainer, BASES};
use dnatune::model::config::{Architecture, ModelConfig};
use dnatune::model::params::ParamBuilder;
use dnatune::model::params::Trainable;
use dnatune::model::{self, LoadOptions, Pooling, SequenceClassifier};
use dnatune::ops::ForwardCtx;
use dnatune::tokenize::{load_tokenizer, Tokenizer};
use dnatune::train::{predict, Predictor, Scores};
use tempfile::TempDir;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn dnatune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("failed to start the dnatune binary")
}

/// Every effect the explainer reports equals the change in log-odds computed from `predict`'s
/// probabilities of the mutant sequence written out by hand: positions and bases land in the
/// right cells, the base already there has no effect, an N is replaced by all four bases, and
/// importance is the mean drop.
#[test]
fn effects_equal_predictions_of_each_mutant_made_by_hand() {
    let dir = repo("models/dnatune-dnabert2-small");
    let device = Device::Cpu;
    let opts = LoadOptions {
        trainable: Trainable::Nothing,
        ..LoadOptions::default()
    };
    let loaded = model::load_classifier(&dir, None, &opts, &device).unwrap();
    let tokenizer = load_tokenizer(&dir).unwrap();
    let explainer = Explainer {
        predictor: Predictor {
            model: &loaded.model,
            tokenizer: tokenizer.as_ref(),
            max_len: 128,
            batch_size: 16,
            device: &device,
        },
        motif_width: 6,
    };
    let seq = "TCCTCCCGGACGGCAAGGATGTGAGNCAGGCGAGCCGGACGCC";
    let pad = tokenizer.special_tokens().pad;
    let probs = |seqs: &[String]| {
        let ids: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| tokenizer.encode(s, Some(128)))
            .collect();
        predict(
            &loaded.model,
            &ids,
            pad,
            16,
            &device,
            None,
            Scores::Probabilities,
        )
        .unwrap()
    };
    let reference = probs(&[seq.to_string()]);
    let predicted = if reference[1] > reference[0] { 1 } else { 0 };
    for class in [0usize, 1] {
        let e = explainer.mutagenesis(seq, Some(class)).unwrap();
        assert_eq!(e.class, class);
        assert_eq!(e.effects.as_ref().unwrap().len(), seq.len());
        let log_odds = |p: &[f32]| ((p[class] as f64) / (1.0 - p[class] as f64)).ln();
        assert!((e.log_odds as f64 - log_odds(&reference)).abs() < 1e-4);
        let mut largest = 0f64;
        for pos in [0, 1, 12, 25, seq.len() - 1] {
            let here = seq.as_bytes()[pos];
            let mutants: Vec<String> = BASES
                .iter()
                .map(|&b| {
                    let mut m = seq.as_bytes().to_vec();
                    m[pos] = b;
                    String::from_utf8(m).unwrap()
                })
                .collect();
            let p = probs(&mutants);
            let mut drops = Vec::new();
            for (slot, &b) in BASES.iter().enumerate() {
                let got = e.effects.as_ref().unwrap()[pos][slot] as f64;
                if b == here {
                    assert_eq!(got, 0.0, "the base already at {pos} has no effect");
                    continue;
                }
                let want = log_odds(&p[2 * slot..2 * slot + 2]) - log_odds(&reference);
                assert!(
                    (got - want).abs() < 1e-4,
                    "class {class}, position {pos}, base {}: {got} vs {want}",
                    b as char
                );
                largest = largest.max(want.abs());
                drops.push(-want);
            }
            // The N at 25 is replaced by all four bases.
            assert_eq!(drops.len(), if here == b'N' { 4 } else { 3 });
            let mean = drops.iter().sum::<f64>() / drops.len() as f64;
            assert!((e.importance[pos] as f64 - mean).abs() < 1e-4);
        }
        // Effects too small to tell a misplaced cell from a right one would prove nothing.
        assert!(largest > 1e-3, "largest effect {largest}");
    }
    let by_default = explainer.mutagenesis(seq, None).unwrap();
    assert_eq!(by_default.class, predicted, "default: the predicted class");
    assert!(
        explainer.mutagenesis(seq, Some(2)).is_err(),
        "two classes only"
    );
}

/// Gradient times input against finite differences: scaling one token's embedding by 1 + eps
/// changes the log-odds by eps times that token's score, to first order, and a token's score is
/// the importance summed over its bases (BPE tokens do not overlap). The sequences are explained
/// in one padded batch and differenced one at a time, unpadded, so padding must not leak.
#[test]
fn gradient_times_input_equals_a_finite_difference_per_token() {
    // An f64 model, so that differences of log-odds are exact enough to divide by eps; weights
    // drawn wide enough that tokens matter.
    let device = Device::Cpu;
    let tokenizer = load_tokenizer(&repo("models/dnatune-dnabert2-small")).unwrap();
    let mut cfg =
        ModelConfig::new(Architecture::Dnabert2, tokenizer.vocab_size(), 2, 16, 2, 32).unwrap();
    cfg.initializer_range = 0.3;
    let mut b = ParamBuilder::fresh(5, &device).with_dtype(DType::F64);
    let model = SequenceClassifier::build(&mut b, &cfg, 2, Pooling::Cls).unwrap();
    b.finish().unwrap();
    let explainer = Explainer {
        predictor: Predictor {
            model: &model,
            tokenizer: tokenizer.as_ref(),
            max_len: 128,
            batch_size: 16,
            device: &device,
        },
        motif_width: 6,
    };
    let seqs = [
        "TCCTCCCGGACGGCAAGGATGTGAGGCAGGCGAGCCGGACGCCGCTCGCAGCACC",
        "GGCATTACGATTTACGGAC",
    ];
    let class = 1;
    let explained = explainer.gradient_times_input(&seqs, Some(class)).unwrap();
    let table = model.word_embeddings();
    let mut largest = 0f64;
    for (seq, e) in seqs.iter().zip(&explained) {
        assert_eq!(e.importance.len(), seq.len());
        assert!(e.effects.is_none());
        let ids = tokenizer.encode(seq, Some(128));
        let n = ids.len();
        let ids_t = Tensor::new(ids.as_slice(), &device).unwrap();
        let embedded = table.index_select(&ids_t, 0).unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &device).unwrap();
        let log_odds_with = |token: usize, eps: f64| {
            let rows: Vec<Tensor> = (0..n)
                .map(|j| {
                    let row = embedded.get(j).unwrap();
                    let scale = if j == token { eps } else { 0.0 };
                    (row * scale).unwrap()
                })
                .collect();
            let probe = Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap();
            let ctx = ForwardCtx::eval_with_embedding_probe(probe);
            let logits = model
                .forward(&ids_t.unsqueeze(0).unwrap(), &mask, &ctx)
                .unwrap();
            let row: Vec<f64> = logits.get(0).unwrap().to_vec1().unwrap();
            // log(p / (1 - p)) of two classes, in f64.
            row[class] - row[1 - class]
        };
        assert!((log_odds_with(0, 0.0) - e.log_odds as f64).abs() < 1e-4);
        let spans = tokenizer.token_spans(seq);
        let eps = 1e-4;
        for (token, span) in spans.iter().enumerate() {
            let Some((start, end)) = *span else { continue };
            let fd = (log_odds_with(token, eps) - log_odds_with(token, -eps)) / (2.0 * eps);
            let score: f64 = e.importance[start..end].iter().map(|&v| v as f64).sum();
            assert!(
                (fd - score).abs() < 1e-6 + 1e-4 * fd.abs(),
                "token {token} ({start}..{end}): finite difference {fd} vs {score}"
            );
            largest = largest.max(fd.abs());
        }
    }
    assert!(largest > 1e-3, "largest token score {largest}");
}

fn column<'a>(header: &str, row: &'a [String], name: &str) -> &'a str {
    let i = header.split(',').position(|c| c == name).unwrap();
    &row[i]
}

/// Splits a CSV line, honouring one quoted field (the ids here).
fn fields(line: &str) -> Vec<String> {
    match line.strip_prefix('"') {
        Some(rest) => {
            let (quoted, tail) = rest.split_once("\",").unwrap();
            let mut out = vec![quoted.replace("\"\"", "\"")];
            out.extend(tail.split(',').map(str::to_string));
            out
        }
        None => line.split(',').map(str::to_string).collect(),
    }
}

#[test]
fn explain_writes_a_row_per_base_and_the_strongest_window_per_sequence() {
    let tmp = TempDir::new().unwrap();
    let model = repo("models/dnatune-dnabert2-small");
    let seqs = [
        ("first", "ACGTTGCAAGGCTTACGATCGA"),
        ("with, comma", "GGCATN"),
    ];
    let mut csv = String::from("id,sequence\n");
    for (id, seq) in seqs {
        let id = if id.contains(',') {
            format!("\"{id}\"")
        } else {
            id.to_string()
        };
        csv.push_str(&format!("{id},{seq}\n"));
    }
    let input = tmp.path().join("in.csv");
    fs::write(&input, csv).unwrap();
    let out = tmp.path().join("explained");
    let run = |extra: &[&str]| {
        let mut args = vec!["explain", "--model", model.to_str().unwrap()];
        args.extend_from_slice(&["--input", input.to_str().unwrap()]);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        dnatune(&args)
    };
    // Runs successfully and returns effects.csv.
    let effects_of = |extra: &[&str]| {
        let result = run(extra);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{err}");
        fs::read_to_string(out.join("effects.csv")).unwrap()
    };
    let effects = effects_of(&["--motif-width", "8"]);
    let mut lines = effects.lines();
    let header = lines.next().unwrap();
    assert_eq!(
        header,
        "id,position,base,delta_A,delta_C,delta_G,delta_T,importance"
    );
    let rows: Vec<Vec<String>> = lines.map(fields).collect();
    assert_eq!(rows.len(), seqs.iter().map(|(_, s)| s.len()).sum::<usize>());
    let mut at = 0;
    for (id, seq) in seqs {
        for (pos, base) in seq.chars().enumerate() {
            let row = &rows[at];
            at += 1;
            assert_eq!(column(header, row, "id"), id);
            assert_eq!(column(header, row, "position"), (pos + 1).to_string());
            assert_eq!(column(header, row, "base"), base.to_string());
            if "ACGT".contains(base) {
                let own = column(header, row, &format!("delta_{base}"));
                assert_eq!(own.parse::<f64>().unwrap(), 0.0, "{row:?}");
            }
        }
    }

    let motifs = fs::read_to_string(out.join("motifs.csv")).unwrap();
    let mut lines = motifs.lines();
    let header = lines.next().unwrap();
    let rows: Vec<Vec<String>> = lines.map(fields).collect();
    assert_eq!(rows.len(), seqs.len());
    for (row, (id, seq)) in rows.iter().zip(seqs) {
        assert_eq!(column(header, row, "id"), id);
        let start: usize = column(header, row, "motif_start").parse().unwrap();
        let end: usize = column(header, row, "motif_end").parse().unwrap();
        // The window is 8 bases, or the whole sequence when shorter.
        assert_eq!(end + 1 - start, 8.min(seq.len()));
        assert_eq!(column(header, row, "motif"), &seq[start - 1..end]);
    }

    let kmers = fs::read_to_string(out.join("kmers.csv")).unwrap();
    assert!(kmers.starts_with("kmer,windows,in_windows,in_sequences,enrichment\n"));

    // Gradient times input: one importance column, a row per base all the same.
    let effects = effects_of(&["--method", "gradient"]);
    let mut lines = effects.lines();
    assert_eq!(lines.next().unwrap(), "id,position,base,importance");
    let total: usize = seqs.iter().map(|(_, s)| s.len()).sum();
    assert_eq!(lines.count(), total);

    let bad = run(&["--class", "7"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("class 7 does not exist") && err.contains("`first`"),
        "{err}"
    );
    // A sequence longer than --max-length tokens is refused by both methods, not explained
    // with a tail of zero importance.
    for method in ["mutagenesis", "gradient"] {
        let bad = run(&["--max-length", "4", "--method", method]);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            bad.status.code() == Some(1) && err.contains("more than --max-length 4 tokens"),
            "{err}"
        );
    }
}

/// The shipped model, its tokenizer, and the sequences of the bundled GUE test split: real BPE
/// splits, where a strand or a single substitution can change the token count.
fn shipped_model_and_test_sequences() -> (model::LoadedModel, Box<dyn Tokenizer>, Vec<String>) {
    let dir = repo("models/dnatune-dnabert2-small");
    let opts = LoadOptions {
        trainable: Trainable::Nothing,
        ..LoadOptions::default()
    };
    let loaded = model::load_classifier(&dir, None, &opts, &Device::Cpu).unwrap();
    let tokenizer = load_tokenizer(&dir).unwrap();
    let read = ReadOptions {
        labels: LabelPolicy::Optional,
        ..ReadOptions::default()
    };
    let ds = read_records(&repo("data/gue-tf0/test.csv"), &read).unwrap();
    let seqs = ds.records.into_iter().map(|r| r.seq).collect();
    (loaded, tokenizer, seqs)
}

/// Whole-sequence scoring (scan, variants) checks both strands against --max-length: a sequence
/// whose reverse complement BPE splits into one more token is refused at the forward strand's
/// length on both strands, and scored on one strand or with one more token allowed.
#[test]
fn whole_sequence_scoring_refuses_a_reverse_strand_over_max_length() {
    let (loaded, tokenizer, seqs) = shipped_model_and_test_sequences();
    let tokens = |s: &str| tokenizer.encode(s, None).len();
    let seq = seqs
        .iter()
        .find(|s| tokens(&reverse_complement(s)) > tokens(s))
        .expect("a test sequence whose reverse complement has more tokens");
    let (forward_len, reverse_len) = (tokens(seq), tokens(&reverse_complement(seq)));
    let device = Device::Cpu;
    let predictor = |max_len: usize| Predictor {
        model: &loaded.model,
        tokenizer: tokenizer.as_ref(),
        max_len,
        batch_size: 8,
        device: &device,
    };
    let named = |i: usize| anyhow::anyhow!("sequence {i} is too long");
    let score = |max_len: usize, both: bool| {
        predictor(max_len).whole_sequence_probabilities(&[seq.as_str()], both, None, named)
    };
    let err = score(forward_len, true).unwrap_err();
    assert_eq!(err.to_string(), "sequence 0 is too long");
    assert!(score(forward_len, false).is_ok());
    assert!(score(forward_len - 1, false).is_err());
    let both = score(reverse_len, true).unwrap();
    let one = score(reverse_len, false).unwrap();
    assert_eq!(both.len(), 2);
    assert!(
        (both[1] - one[1]).abs() > 1e-6,
        "the reverse strand is scored"
    );
}

/// Mutagenesis refuses a sequence one of whose substitutions BPE splits into more than
/// --max-length tokens, naming the substitution, instead of scoring that mutant cut short.
#[test]
fn mutagenesis_refuses_a_substitution_that_tokenizes_over_max_length() {
    let (loaded, tokenizer, seqs) = shipped_model_and_test_sequences();
    let tokens = |s: &[u8]| {
        tokenizer
            .encode(std::str::from_utf8(s).unwrap(), None)
            .len()
    };
    // The first sequence with a substitution that adds a token, and all such substitutions.
    let (seq, longer) = seqs
        .iter()
        .map(|seq| {
            let own = tokens(seq.as_bytes());
            let mut longer = Vec::new();
            for pos in 0..seq.len() {
                for &b in BASES.iter().filter(|&&b| b != seq.as_bytes()[pos]) {
                    let mut m = seq.as_bytes().to_vec();
                    m[pos] = b;
                    if tokens(&m) > own {
                        longer.push(format!("with {} at position {} ", b as char, pos + 1));
                    }
                }
            }
            (seq, longer)
        })
        .find(|(_, longer)| !longer.is_empty())
        .expect("a substitution that BPE splits into more tokens");
    let own = tokens(seq.as_bytes());
    let device = Device::Cpu;
    let explainer = |max_len: usize| Explainer {
        predictor: Predictor {
            model: &loaded.model,
            tokenizer: tokenizer.as_ref(),
            max_len,
            batch_size: 64,
            device: &device,
        },
        motif_width: 6,
    };
    let err = explainer(own)
        .mutagenesis(seq, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("more than --max-length {own} tokens"))
            && longer.iter().any(|l| err.contains(l.as_str())),
        "{err}; longer mutants: {longer:?}"
    );
    assert!(explainer(own + 8).mutagenesis(seq, None).is_ok());
}
