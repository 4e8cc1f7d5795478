//! The `dnatune` command line: parses, calls the library, prints. Errors end the program with a
//! message naming what went wrong and exit status 1 (2 for usage errors, from clap).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::data::{self, LabelPolicy, ReadOptions};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::params::{is_head, Trainable};
use crate::model::{self, LoadOptions, Pooling};
use crate::peft::adapter;
use crate::peft::bf16::Precision;
use crate::peft::quant::QuantKind;
use crate::tokenize::{self, Tokenizer};
use crate::train::config::{ClassWeights, Method, Scheduler, SplitKind, TrainConfig};
use crate::train::{self, bench};

#[derive(Parser)]
#[command(
    name = "dnatune",
    version,
    about = "Fine-tune genomic foundation models on labelled DNA sequences"
)]
struct Cli {
    /// CPU threads for every computation (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where to compute: cpu (default), cuda or cuda:N (a build with `--features cuda`).
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a small model on the bundled TF-binding data and print its test metrics.
    Quickstart(QuickstartArgs),
    /// Write a randomly initialised model directory.
    InitModel(InitModelArgs),
    /// Cut labelled sequences for BED regions from a genome FASTA into a CSV for `train`.
    PrepareBed(PrepareBedArgs),
    /// Fine-tune a model on labelled sequences.
    Train(Box<TrainArgs>),
    /// Predict classes for sequences in a CSV/TSV/FASTA file.
    Predict(PredictCmdArgs),
    /// Evaluate a model on a labelled file.
    Eval(EvalArgs),
    /// Compare two models' predictions of the same labelled sequences: each metric, the
    /// difference B - A with its paired-bootstrap interval, and a two-sided p-value.
    ///
    /// A and B are predictions CSVs with id, label and prob_* columns (a run's
    /// test_predictions.csv, a cross-validation's cv_predictions.csv) or run directories.
    Compare(CompareArgs),
    /// Explain predictions: each base's effect on the call (in-silico mutagenesis) and the
    /// window of bases that drives it.
    ///
    /// Every base is replaced by each of the other three and the mutant scored, 3 x length
    /// forward passes per sequence. `--out` is a directory: effects.csv (a row per base: the
    /// change in the class's log-odds per substitution and their mean drop, the importance) and
    /// motifs.csv (a row per sequence: its strongest `--motif-width` window) and kmers.csv (the
    /// k-mers, k up to 6, both strands as one, that those windows share, most enriched first).
    Explain(ExplainArgs),
    /// Scan long sequences (FASTA/CSV, or BED regions of a genome) window by window: where along
    /// them the model calls the class.
    ///
    /// Windows of `--window` bases (the training sequences' length) every `--stride` bases, the
    /// last aligned to the end; windows all N (assembly gaps) are not scored and leave a gap in
    /// the tracks. `--out` is a directory: windows.tsv (each window's class
    /// probabilities), scores.bedgraph (per base, the mean probability of `--class` over the
    /// windows covering it) and hits.bed (the stretches where that reaches `--threshold`; BED
    /// score 1000 x their highest). 0-based half-open coordinates: on the chromosome for BED
    /// regions, within each sequence (named by its id) otherwise.
    Scan(ScanArgs),
    /// Score VCF variants: the class's probability with the reference and with the alternate
    /// allele in the genome window around each, and the change in its log-odds.
    ///
    /// `--out` is a TSV file, a row per alternate allele: chrom, pos, id, ref, alt, window_start
    /// (0-based), ref_prob, alt_prob, prob_change, log_odds_change. Indels keep the window's width
    /// (the right flank grows or shrinks).
    Variants(VariantsArgs),
    /// Measure training throughput.
    Bench(BenchArgs),
    /// Pre-train a model with masked language modelling on a DNA corpus.
    Pretrain(Box<PretrainArgs>),
    /// Fold a LoRA adapter into its full-precision base and write a plain model directory.
    Merge(MergeArgs),
    /// Show a model's architecture, modules, tokenizer, and parameters and memory per method.
    Inspect(InspectArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a BPE vocabulary on DNA sequences (DNABERT-2 special tokens and ids).
    Train {
        /// FASTA or one-sequence-per-line text, optionally gzipped.
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Directory for tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct PretrainArgs {
    /// TOML configuration; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the pre-training run in this directory.
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Model directory to start from (e.g. made by `init-model`).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    corpus: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Stop after this many minutes with a resumable checkpoint.
    #[arg(long)]
    time_limit_minutes: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    mask_prob: Option<f64>,
    #[arg(long)]
    valid_fraction: Option<f64>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct QuickstartArgs {
    /// Run directory.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Training sequences drawn from the bundled training set.
    #[arg(long, default_value_t = 8000)]
    train_samples: usize,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ArchArg {
    Dnabert2,
    Bert,
    /// ESM in the Nucleotide Transformer v2 layout: rotary positions, SwiGLU feed-forward.
    Nt,
}

#[derive(Args)]
struct InitModelArgs {
    #[arg(long, value_enum, default_value = "dnabert2")]
    arch: ArchArg,
    /// Copy config and tokenizer from this model directory (random weights).
    #[arg(long, conflicts_with_all = ["arch", "kmer", "tokenizer"])]
    like: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 1024)]
    intermediate: usize,
    /// A BPE `tokenizer.json` (DNABERT-2 style models).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// k for a k-mer vocabulary, written as vocab.txt: overlapping for `--arch bert` (classic
    /// DNABERT), non-overlapping for `--arch nt` (Nucleotide Transformer, which uses 6).
    #[arg(long)]
    kmer: Option<usize>,
    #[arg(long, default_value_t = 512)]
    max_positions: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PrepareBedArgs {
    /// Genome FASTA (optionally gzipped) the regions refer to.
    #[arg(long)]
    genome: PathBuf,
    /// A BED file and the label of its regions, as PATH=LABEL (e.g. peaks.bed=1
    /// background.bed=0); repeat for each file.
    #[arg(long = "bed", required = true, value_parser = parse_bed_label)]
    beds: Vec<(PathBuf, usize)>,
    /// Output CSV (`id,chrom,sequence,label`).
    #[arg(long)]
    out: PathBuf,
    /// Skip regions whose sequence has letters other than ACGTN instead of failing.
    #[arg(long)]
    skip_invalid: bool,
    /// Read IUPAC ambiguity codes (R, Y, S, W, K, M, B, D, H, V) as N instead of failing.
    #[arg(long)]
    ambiguous_as_n: bool,
}

fn parse_bed_label(text: &str) -> std::result::Result<(PathBuf, usize), String> {
    let (path, label) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("expected PATH=LABEL, got `{text}`"))?;
    let label = label
        .parse()
        .map_err(|_| format!("label `{label}` in `{text}` is not a non-negative integer"))?;
    Ok((PathBuf::from(path), label))
}

#[derive(Args)]
struct TrainArgs {
    /// TOML configuration; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the interrupted run in this directory (its config.toml is used).
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// GUE directory (train/dev/test .csv|.tsv) or one CSV/TSV/FASTA file to split.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from this adapter directory (PEFT layout).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// bf16: the base's linear products in bfloat16 (AMX or AVX-512 BF16 kernel where the CPU
    /// has it, bf16 matmul on CUDA): LoRA holds the frozen base in bf16, full fine-tuning keeps
    /// f32 master weights. Not with QLoRA.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    eval_batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up: a fraction of all steps when below 1, else a step count.
    #[arg(long)]
    warmup: Option<f64>,
    #[arg(long, value_enum)]
    scheduler: Option<Scheduler>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run once per seed (comma-separated; each in OUT/seed-N) and report mean +- sd.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// k-fold cross-validation of one input file: a run per fold (OUT/fold-K), each tested on
    /// its fold, split by --split (whole chromosomes with `chromosome`); reports mean +- sd and
    /// the metrics of all folds' predictions pooled (OUT/cv_predictions.csv).
    #[arg(long, conflicts_with_all = ["seeds", "resume"])]
    folds: Option<usize>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    log_every: Option<usize>,
    /// Metric for best checkpoint and early stopping (mcc, f1, accuracy, auroc, auprc, loss, ...).
    #[arg(long)]
    metric: Option<String>,
    #[arg(long)]
    patience: Option<usize>,
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// Hidden-layer dropout probability.
    #[arg(long)]
    dropout: Option<f64>,
    #[arg(long)]
    attention_dropout: Option<f64>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated module-name patterns to adapt.
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Add the reverse complement of every training sequence.
    #[arg(long)]
    reverse_complement: bool,
    /// Score dev and test sequences on both strands and average the class probabilities.
    #[arg(long)]
    average_strands: bool,
    /// Weigh the loss by class: `balanced` (inverse class frequency on the training split) or
    /// one weight per class, e.g. `1,4`.
    #[arg(long)]
    class_weights: Option<ClassWeights>,
    #[arg(long)]
    skip_invalid: bool,
    /// Read IUPAC ambiguity codes (R, Y, S, W, K, M, B, D, H, V) as N instead of failing.
    #[arg(long)]
    ambiguous_as_n: bool,
    #[arg(long)]
    sequence_column: Option<String>,
    #[arg(long)]
    label_column: Option<String>,
    #[arg(long, value_enum)]
    split: Option<SplitKind>,
    /// The k-mer length linking sequences for `--split similarity` and the overlap report
    /// (default 31).
    #[arg(long)]
    split_kmer: Option<usize>,
    #[arg(long)]
    dev_fraction: Option<f64>,
    #[arg(long)]
    test_fraction: Option<f64>,
    #[arg(long)]
    max_train_samples: Option<usize>,
}

#[derive(Args)]
struct ModelArgs {
    #[arg(long)]
    model: PathBuf,
    /// An adapter directory (PEFT layout) applied on the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Tokens per sequence, [CLS] and [SEP] included. dnatune's own checkpoints record the
    /// length they were trained at (`dnatune.json`); others default to 128.
    #[arg(long)]
    max_length: Option<usize>,
    /// How the head summarises a sequence. dnatune's own models record the pooling they were
    /// trained with (`dnatune.json`) and are scored with it; others default to cls.
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    #[arg(long, default_value = "sequence")]
    sequence_column: String,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long)]
    skip_invalid: bool,
    /// Read IUPAC ambiguity codes (R, Y, S, W, K, M, B, D, H, V) as N instead of failing.
    #[arg(long)]
    ambiguous_as_n: bool,
    /// Run the base quantized. A QLoRA adapter of dnatune's records its quantization and is
    /// scored on it without being told.
    #[arg(long, value_enum)]
    quantize: Option<QuantKind>,
    /// bf16: hold the base's linear weights in bfloat16 (AVX-512 BF16 kernel where the CPU has
    /// it, bf16 matmul on CUDA); heads and adapters stay f32. Given explicitly, it overrides the
    /// base precision or quantization a checkpoint records (f32 if none).
    #[arg(long, value_enum, conflicts_with = "quantize")]
    precision: Option<Precision>,
}

impl ModelArgs {
    /// The settings given on the command line, the rest left to the checkpoint's record.
    fn requested(&self) -> model::record::Requested {
        model::record::Requested {
            pooling: self.pooling,
            max_length: self.max_length,
            quantize: self.quantize,
            precision: self.precision,
        }
    }
}

#[derive(Args)]
struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory (PEFT layout).
    #[arg(long)]
    adapter: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    /// Model directory.
    model: PathBuf,
    /// An adapter directory whose LoRA settings to use (default r 8, alpha 16).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Show only this method in the parameter and memory table.
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences: CSV/TSV (a `sequence` column) or FASTA.
    #[arg(long)]
    input: PathBuf,
    /// Where results go: a CSV file (predict) or a directory (explain).
    #[arg(long)]
    out: PathBuf,
}

/// `predict`'s own arguments.
#[derive(Args)]
struct PredictCmdArgs {
    #[command(flatten)]
    io: PredictArgs,
    /// Score each sequence and its reverse complement and average their class probabilities
    /// (twice the work; a call then does not depend on the strand a sequence is written on).
    #[arg(long)]
    average_strands: bool,
    #[command(flatten)]
    ensemble: EnsembleArgs,
}

/// Several fine-tuned models scored as one.
#[derive(Args)]
struct EnsembleArgs {
    /// Average the class probabilities of several fine-tunes of --model: checkpoint directories
    /// (adapters on --model, or full models of its shape), or `train --seeds`/`--folds` run
    /// directories, each standing for the best checkpoint of every one of its runs.
    #[arg(long = "ensemble", num_args = 1.., value_name = "DIR", conflicts_with = "adapter")]
    dirs: Vec<PathBuf>,
}

/// `predict`'s input and output, with `--out` a directory, and the explanation's own.
#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    io: PredictArgs,
    /// The class whose log-odds are explained (default: the class predicted for each sequence).
    #[arg(long)]
    class: Option<usize>,
    /// Width in bases of the window reported as each sequence's motif.
    #[arg(long, default_value_t = 12)]
    motif_width: usize,
    #[arg(long, value_enum, default_value = "mutagenesis")]
    method: ExplainMethod,
}

/// How `explain` measures each base's importance.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExplainMethod {
    /// Every base replaced by each of the other three: 3 x length forward passes per sequence.
    Mutagenesis,
    /// The log-odds' gradient times each token's embedding, shared among the token's bases: one
    /// forward and one backward pass per batch.
    Gradient,
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences to scan: FASTA or CSV/TSV (a `sequence` column).
    #[arg(long, required_unless_present = "bed", conflicts_with = "bed")]
    input: Option<PathBuf>,
    /// Regions to scan (`chrom start end ...`), cut from `--genome`; scanned on the plus strand
    /// whatever their strand column says (`--average-strands` scores both).
    #[arg(long, requires = "genome")]
    bed: Option<PathBuf>,
    /// Genome FASTA (optionally gzipped) the `--bed` regions are cut from.
    #[arg(long, requires = "bed")]
    genome: Option<PathBuf>,
    /// Window width in bases: the length of the sequences the model was trained on.
    #[arg(long)]
    window: usize,
    /// Bases between window starts.
    #[arg(long, default_value_t = 10)]
    stride: usize,
    /// The class whose probability is tracked.
    #[arg(long, default_value_t = 1)]
    class: usize,
    /// Per-base score from which a stretch is a hit.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Score each window and its reverse complement and average their class probabilities.
    #[arg(long)]
    average_strands: bool,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct VariantsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Variants (VCF, optionally gzipped; CHROM POS ID REF ALT are read).
    #[arg(long)]
    vcf: PathBuf,
    /// Genome FASTA the VCF's coordinates refer to (optionally gzipped).
    #[arg(long)]
    genome: PathBuf,
    /// Window width in bases: the length of the sequences the model was trained on.
    #[arg(long)]
    window: usize,
    /// The class whose probability is compared.
    #[arg(long, default_value_t = 1)]
    class: usize,
    /// Score each window and its reverse complement and average their class probabilities.
    #[arg(long)]
    average_strands: bool,
    /// Output TSV file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: PathBuf,
    /// Score each sequence and its reverse complement and average their class probabilities.
    #[arg(long)]
    average_strands: bool,
    #[command(flatten)]
    ensemble: EnsembleArgs,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
    /// Also write each sequence's label and class probabilities, as a run's
    /// test_predictions.csv (for `compare`).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct CompareArgs {
    /// The baseline: a predictions CSV or a run directory.
    a: PathBuf,
    /// The challenger, on the same sequences (matched by id).
    b: PathBuf,
    /// Bootstrap resamples of the sequences.
    #[arg(long, default_value_t = 2000)]
    resamples: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    #[arg(long, value_enum, default_value = "lora")]
    method: Method,
    /// bf16: the base's linear products in bfloat16 (full, lora, or --infer).
    #[arg(
        long,
        value_enum,
        default_value = "f32",
        conflicts_with = "all_methods"
    )]
    precision: Precision,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long)]
    json: bool,
    /// Report bytes of weights, gradients and optimizer state and the peak resident memory of
    /// a training step instead of throughput.
    #[arg(long)]
    memory: bool,
    /// With --memory: run every method (full, lora, qlora-int8, qlora-nf4), each in a fresh
    /// process, and print their ratios.
    #[arg(long, requires = "memory")]
    all_methods: bool,
    /// Measure inference (forward passes as `predict` runs them, --steps batches) instead of
    /// training.
    #[arg(long, conflicts_with = "memory")]
    infer: bool,
    /// Measure the model's tokenizer on the sequences of this CSV/FASTA (--steps rounds).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["memory", "infer"])]
    tokenize: Option<PathBuf>,
}

/// Runs the command line and returns the exit status.
pub fn main() -> i32 {
    keep_freed_memory();
    shorten_candle_spin_wait();
    let cli = Cli::parse();
    if let Err(e) = set_threads(cli.threads) {
        eprintln!("error: {e:#}");
        return 1;
    }
    let device = cli.device.as_deref();
    let result = match cli.command {
        Command::Quickstart(a) => quickstart(a, device),
        Command::InitModel(a) => init_model(a),
        Command::PrepareBed(a) => prepare_bed(a),
        Command::Train(a) => train_cmd(*a, device),
        Command::Predict(a) => predict(a, device),
        Command::Eval(a) => eval_cmd(a, device),
        Command::Compare(a) => compare_cmd(a),
        Command::Explain(a) => explain_cmd(a, device),
        Command::Scan(a) => scan_cmd(a, device),
        Command::Variants(a) => variants_cmd(a, device),
        Command::Bench(a) => bench_cmd(a, device),
        Command::Pretrain(a) => pretrain_cmd(*a, device),
        Command::Merge(a) => merge_cmd(a),
        Command::Inspect(a) => inspect_cmd(a),
        Command::Tokenizer(TokenizerCommand::Train {
            input,
            vocab_size,
            out,
        }) => tokenizer_train(&input, vocab_size, &out),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Training allocates and frees the same large activation buffers every step. glibc's defaults
/// return them to the kernel (mmap for blocks over 128 KiB, trimming the heap top), so each
/// step pays for fresh zeroed pages: 10-20 % of a step, measured. Keeping freed memory in the
/// process avoids that: blocks up to 256 MiB come from the heap, and the heap is never trimmed
/// (a 117M-parameter step frees gigabytes at once, so any finite trim threshold is crossed).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// After each element-wise op, the worker threads of candle's own thread pool spin up to 25,000
/// times (`CANDLE_BARRIER_POOL_SPIN_LIMIT`) before they sleep, holding a core the next op's rayon
/// jobs (GEMM, our fused kernels) need; on two cores a spinning worker was a quarter of a small
/// model's step. 100 spins keeps the hand-over quick without that: small-shape LoRA steps
/// +10-15 %, full +5 %, inference +3 % at 2 threads, the 117M shape unchanged (measured with
/// `dnatune bench`). A value the user sets is kept. Called before any thread starts.
fn shorten_candle_spin_wait() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
}

/// Builds rayon's global pool, with `threads` threads or one per core, the main thread one of
/// them. candle's CPU kernels read rayon's thread count, so it is set before the first tensor op.
///
/// With the main thread in the pool, each parallel op of a step (a GEMM, a fused kernel) is split
/// by the main thread itself, which takes its share, instead of being handed to the pool's threads
/// and the main thread put to sleep until they finish: a futex wake-up and sleep per op, hundreds
/// of ops per step (small-shape training +10-20 % at 2 threads).
fn set_threads(threads: Option<usize>) -> Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new().use_current_thread();
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        pool = pool.num_threads(n);
    }
    pool.build_global()
        .context("could not start the worker threads")?;
    Ok(())
}

/// Finds a file shipped with the repository, whether run from the checkout or elsewhere.
fn bundled(relative: &str) -> Result<PathBuf> {
    let here = PathBuf::from(relative);
    if here.exists() {
        return Ok(here);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if built.exists() {
        return Ok(built);
    }
    bail!("bundled file {relative} not found (run from the dnatune checkout)")
}

/// The device `--device` names (the CPU when it is not given).
fn chosen_device(device: Option<&str>) -> Result<candle_core::Device> {
    crate::device::parse_device(device.unwrap_or("cpu"))
}

fn quickstart(a: QuickstartArgs, device: Option<&str>) -> Result<()> {
    let data = bundled("data/gue-tf0")?;
    let model = bundled("models/dnatune-dnabert2-small")?;
    println!(
        "dnatune quickstart: LoRA fine-tuning of the shipped pre-trained DNABERT-2 ({}) on human TF \
         binding (GUE tf/0), on CPU\n",
        model.display()
    );
    let cfg = TrainConfig {
        model,
        data,
        out: a.out,
        method: Method::Lora,
        seed: a.seed,
        epochs: a.epochs,
        lr: Some(1e-3),
        max_train_samples: Some(a.train_samples),
        max_length: 64,
        device: device.unwrap_or("cpu").into(),
        ..TrainConfig::default()
    };
    let summary = train::run(&cfg, false)?;
    println!(
        "\nquickstart test MCC {:.3} (accuracy {:.3}, AUROC {}) on {} held-out sequences",
        summary.test.mcc,
        summary.test.accuracy,
        summary.test.auroc.map_or("-".into(), |v| format!("{v:.3}")),
        summary.test.n
    );
    Ok(())
}

fn init_model(a: InitModelArgs) -> Result<()> {
    let (config, tokenizer): (ModelConfig, Box<dyn Tokenizer>) = match &a.like {
        Some(dir) => {
            let (mut cfg, _) = ModelConfig::from_dir(dir, [])?;
            cfg.num_labels = None;
            (cfg, tokenize::load_tokenizer(dir)?)
        }
        None => {
            let tokenizer: Box<dyn Tokenizer> = match (a.arch, &a.tokenizer, a.kmer) {
                (_, Some(path), None) => Box::new(tokenize::BpeTokenizer::from_file(path)?),
                (ArchArg::Nt, None, Some(k)) => {
                    Box::new(tokenize::KmerTokenizer::non_overlapping(k)?)
                }
                (_, None, Some(k)) => Box::new(tokenize::KmerTokenizer::overlapping(k)?),
                (_, Some(_), Some(_)) => bail!("give either --tokenizer or --kmer, not both"),
                (ArchArg::Dnabert2, None, None) => {
                    bail!("--arch dnabert2 needs --tokenizer PATH/tokenizer.json")
                }
                (ArchArg::Bert | ArchArg::Nt, None, None) => {
                    bail!("--arch bert and --arch nt need --kmer K (or --tokenizer)")
                }
            };
            let arch = match a.arch {
                ArchArg::Dnabert2 => Architecture::Dnabert2,
                ArchArg::Bert => Architecture::Bert,
                ArchArg::Nt => Architecture::Esm,
            };
            let mut cfg = ModelConfig::new(
                arch,
                tokenizer.vocab_size(),
                a.layers,
                a.hidden,
                a.heads,
                a.intermediate,
            )?;
            cfg.max_position_embeddings = a.max_positions;
            if arch == Architecture::Esm {
                let special = tokenizer.special_tokens();
                cfg.raw.insert("pad_token_id".into(), special.pad.into());
                cfg.raw.insert("mask_token_id".into(), special.mask.into());
            }
            (cfg, tokenizer)
        }
    };
    let params = model::init_params(&config, 2, a.seed)?;
    // A base model carries no classification head: fine-tuning creates one for its classes.
    let mut encoder = params;
    encoder.entries.retain(|name, _| !is_head(name));
    model::save_model_dir(
        &a.out,
        &config,
        &encoder,
        tokenizer.as_ref(),
        candle_core::DType::F32,
    )?;
    println!(
        "wrote {}: {} ({} layers, hidden {}, {} heads, intermediate {}), {} parameters, tokenizer {}",
        a.out.display(),
        config.architecture,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        encoder.num_params(),
        tokenizer.describe()
    );
    Ok(())
}

fn prepare_bed(a: PrepareBedArgs) -> Result<()> {
    let opts = ReadOptions {
        skip_invalid: a.skip_invalid,
        ambiguous_as_n: a.ambiguous_as_n,
        ..ReadOptions::default()
    };
    let mut records = Vec::new();
    for (bed, label) in &a.beds {
        let ds = data::read_bed_regions(bed, &a.genome, Some(*label), &opts)?;
        report_skipped(&ds, bed);
        println!(
            "{}: {} regions, label {label}",
            bed.display(),
            ds.records.len()
        );
        records.extend(ds.records);
    }
    data::write_records_csv(&a.out, &records)?;
    println!(
        "wrote {} sequences to {}; train on it with `dnatune train --data {} --split chromosome`",
        records.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

fn train_cmd(a: TrainArgs, device: Option<&str>) -> Result<()> {
    if let Some(run_dir) = &a.resume {
        let cfg = train::resume_config(run_dir)?;
        let cfg = TrainConfig {
            out: run_dir.clone(),
            device: device.map_or(cfg.device, str::to_string),
            ..cfg
        };
        train::run(&cfg, true)?;
        return Ok(());
    }
    let mut cfg = match &a.config {
        Some(path) => TrainConfig::from_toml_file(path)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = a.$field.clone() { cfg.$field = v; } )* };
    }
    set!(
        model,
        data,
        out,
        method,
        epochs,
        max_steps,
        batch_size,
        eval_batch_size,
        grad_accum
    );
    set!(
        scheduler,
        weight_decay,
        max_grad_norm,
        seed,
        max_length,
        eval_every,
        log_every,
        metric
    );
    set!(patience, pooling, sequence_column, label_column, precision);
    if a.adapter.is_some() {
        cfg.adapter = a.adapter.clone();
    }
    if a.lr.is_some() {
        cfg.lr = a.lr;
    }
    if let Some(w) = a.warmup {
        if w < 1.0 {
            cfg.warmup_ratio = w;
            cfg.warmup_steps = None;
        } else {
            cfg.warmup_steps = Some(w as usize);
        }
    }
    if a.dropout.is_some() {
        cfg.hidden_dropout = a.dropout;
    }
    if a.attention_dropout.is_some() {
        cfg.attention_dropout = a.attention_dropout;
    }
    if let Some(r) = a.lora_r {
        cfg.lora.r = r;
    }
    if let Some(alpha) = a.lora_alpha {
        cfg.lora.alpha = alpha;
    }
    if let Some(p) = a.lora_dropout {
        cfg.lora.dropout = p;
    }
    if let Some(t) = a.lora_targets.clone() {
        cfg.lora.target_modules = t;
    }
    if let Some(s) = a.split {
        cfg.split.strategy = s;
    }
    if let Some(k) = a.split_kmer {
        cfg.split.kmer = k;
    }
    if let Some(f) = a.dev_fraction {
        cfg.split.dev_fraction = f;
    }
    if let Some(f) = a.test_fraction {
        cfg.split.test_fraction = f;
    }
    if a.max_train_samples.is_some() {
        cfg.max_train_samples = a.max_train_samples;
    }
    if let Some(d) = device {
        cfg.device = d.to_string();
    }
    cfg.reverse_complement |= a.reverse_complement;
    cfg.average_strands |= a.average_strands;
    if a.class_weights.is_some() {
        cfg.class_weights = a.class_weights.clone();
    }
    cfg.skip_invalid |= a.skip_invalid;
    cfg.ambiguous_as_n |= a.ambiguous_as_n;
    if let Some(k) = a.folds {
        cfg.split.folds = k;
    }
    match &a.seeds {
        Some(seeds) => {
            train::run_seeds(&cfg, seeds)?;
        }
        None if cfg.split.folds > 0 && cfg.split.fold == 0 => {
            train::run_folds(&cfg)?;
        }
        None => {
            train::run(&cfg, false)?;
        }
    }
    Ok(())
}

/// A fine-tuned model ready for inference: weights, tokenizer, and the settings it is scored with.
struct Checkpoint {
    loaded: model::LoadedModel,
    tokenizer: Box<dyn Tokenizer>,
    settings: model::record::InferenceSettings,
}

/// The model of `a` (plus its adapter) ready for inference.
fn load_for_inference(a: &ModelArgs, device: &candle_core::Device) -> Result<Checkpoint> {
    check_inference_args(a)?;
    load_checkpoint(
        a,
        &a.model,
        a.adapter.as_deref(),
        device,
        &mut HashSet::new(),
    )
}

fn check_inference_args(a: &ModelArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_length.is_some_and(|n| n < 3) {
        bail!("--max-length must be at least 3 ([CLS], one token, [SEP])");
    }
    Ok(())
}

/// [`load_for_inference`] of the model in `model_dir` with the adapter in `adapter_dir`, the
/// settings given in `a` or else recorded with the checkpoint. Notes already in `shown` (from an
/// earlier ensemble member) are not printed again.
fn load_checkpoint(
    a: &ModelArgs,
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    device: &candle_core::Device,
    shown: &mut HashSet<String>,
) -> Result<Checkpoint> {
    let settings = model::record::inference_settings(model_dir, adapter_dir, a.requested())?;
    let (tensors, lora) = match adapter_dir {
        Some(dir) => {
            let ad = adapter::load_adapter(dir, device)?;
            (Some(ad.tensors), Some(ad.config))
        }
        None => (None, None),
    };
    let opts = LoadOptions {
        trainable: Trainable::Nothing,
        lora,
        pooling: settings.pooling,
        quantize: settings.quantize,
        precision: settings.precision,
        ..LoadOptions::default()
    };
    let loaded = model::load_classifier(model_dir, tensors, &opts, device)?;
    let recorded = settings.describe_recorded();
    for note in loaded.notes.iter().chain(&recorded) {
        if shown.insert(note.clone()) {
            eprintln!("model: {note}");
        }
    }
    let tokenizer = tokenize::load_tokenizer(model_dir)?;
    Ok(Checkpoint {
        loaded,
        tokenizer,
        settings,
    })
}

/// Says on stderr when a checkpoint's run averaged both strands but this command scores one.
fn note_single_strand(settings: &model::record::InferenceSettings, average_strands: bool) {
    if settings.trained_on_both_strands() && !average_strands {
        eprintln!(
            "note: the run behind {} scored dev and test averaged over both strands; \
             add --average-strands to score the same way",
            settings
                .record
                .as_ref()
                .map_or(Path::new(""), |(p, _)| p)
                .display()
        );
    }
}

/// Class probabilities (row-major N x C) of `records` and the class count C: from the model of
/// `a` (with its adapter), or, with `ensemble` members, their mean. Each member is loaded,
/// tokenizes with its own tokenizer and is dropped before the next.
fn score_records(
    a: &ModelArgs,
    ensemble: &[PathBuf],
    records: &[data::Record],
    average_strands: bool,
    device: &candle_core::Device,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(Vec<f32>, usize)> {
    use crate::ensemble::{Member, ProbabilityMean};
    let members = if ensemble.is_empty() {
        vec![None]
    } else {
        let members = crate::ensemble::resolve_members(ensemble)?;
        eprintln!("ensemble of {} members", members.len());
        members.into_iter().map(Some).collect()
    };
    let strands = if average_strands { 2 } else { 1 };
    if let Some(bar) = progress {
        bar.set_length((members.len() * strands * records.len()) as u64);
    }
    let mut mean = ProbabilityMean::new();
    let mut shown = HashSet::new();
    let mut warned_lengths = Vec::new();
    for member in &members {
        let checkpoint = match member {
            None => load_checkpoint(a, &a.model, a.adapter.as_deref(), device, &mut shown)?,
            Some(Member::Adapter(dir)) => {
                load_checkpoint(a, &a.model, Some(dir), device, &mut shown)?
            }
            Some(Member::Model(dir)) => {
                crate::ensemble::check_member_shape(&a.model, dir)?;
                load_checkpoint(a, dir, None, device, &mut shown)?
            }
        };
        let Checkpoint {
            loaded,
            tokenizer,
            settings,
        } = checkpoint;
        note_single_strand(&settings, average_strands);
        let max_len = settings.max_length;
        let encoded = train::encode_strands(records, tokenizer.as_ref(), max_len, average_strands);
        // Members of one base share its tokenizer: one warning per token limit says it for all.
        if !warned_lengths.contains(&max_len) {
            warned_lengths.push(max_len);
            train::warn_about_encoding(records, &encoded, max_len, "input");
        }
        let probs = train::predict_strands(
            &loaded.model,
            &encoded.forward,
            encoded.reverse.as_deref(),
            tokenizer.special_tokens().pad,
            a.batch_size,
            device,
            progress,
        )?;
        let name = member.as_ref().map_or(a.model.as_path(), Member::dir);
        mean.add(&probs, loaded.model.num_labels, name)?;
    }
    let classes = mean.classes();
    Ok((mean.finish(), classes))
}

/// A checkpoint with the batching its arguments ask for.
fn predictor<'a>(
    checkpoint: &'a Checkpoint,
    a: &ModelArgs,
    device: &'a candle_core::Device,
) -> train::Predictor<'a> {
    train::Predictor {
        model: &checkpoint.loaded.model,
        tokenizer: checkpoint.tokenizer.as_ref(),
        max_len: checkpoint.settings.max_length,
        batch_size: a.batch_size,
        device,
    }
}

fn read_opts(a: &ModelArgs, labels: LabelPolicy) -> ReadOptions {
    ReadOptions {
        sequence_column: a.sequence_column.clone(),
        label_column: a.label_column.clone(),
        skip_invalid: a.skip_invalid,
        ambiguous_as_n: a.ambiguous_as_n,
        labels,
    }
}

fn report_skipped(ds: &data::Dataset, path: &Path) {
    if ds.skipped > 0 {
        eprintln!(
            "skipped {} sequences with letters other than ACGTN in {}",
            ds.skipped,
            path.display()
        );
    }
}

fn predict(cmd: PredictCmdArgs, device: Option<&str>) -> Result<()> {
    let a = &cmd.io;
    let device = chosen_device(device)?;
    check_inference_args(&a.model)?;
    let ds = data::read_records(&a.input, &read_opts(&a.model, LabelPolicy::Optional))?;
    report_skipped(&ds, &a.input);
    let bar = indicatif::ProgressBar::new(0);
    let (probs, classes) = score_records(
        &a.model,
        &cmd.ensemble.dirs,
        &ds.records,
        cmd.average_strands,
        &device,
        Some(&bar),
    )?;
    bar.finish_and_clear();
    train::write_predictions(&a.out, &ds.records, &probs, classes, false)?;
    println!(
        "wrote {} predictions to {}",
        ds.records.len(),
        a.out.display()
    );
    Ok(())
}

fn explain_cmd(a: ExplainArgs, device: Option<&str>) -> Result<()> {
    if a.motif_width == 0 {
        bail!("--motif-width must be at least 1");
    }
    let PredictArgs { model, input, out } = &a.io;
    let device = chosen_device(device)?;
    let checkpoint = load_for_inference(model, &device)?;
    let ds = data::read_records(input, &read_opts(model, LabelPolicy::Optional))?;
    report_skipped(&ds, input);
    let explainer = crate::explain::Explainer {
        predictor: predictor(&checkpoint, model, &device),
        motif_width: a.motif_width,
    };
    let bar = indicatif::ProgressBar::new(ds.records.len() as u64);
    let mut explained = Vec::with_capacity(ds.records.len());
    match a.method {
        ExplainMethod::Mutagenesis => {
            for record in &ds.records {
                let e = explainer
                    .mutagenesis(&record.seq, a.class)
                    .with_context(|| format!("explaining `{}`", record.id))?;
                explained.push((record, e));
                bar.inc(1);
            }
        }
        ExplainMethod::Gradient => {
            for chunk in ds.records.chunks(model.batch_size) {
                let seqs: Vec<&str> = chunk.iter().map(|r| r.seq.as_str()).collect();
                let explanations = explainer
                    .gradient_times_input(&seqs, a.class)
                    .with_context(|| format!("explaining `{}` and its batch", chunk[0].id))?;
                explained.extend(chunk.iter().zip(explanations));
                bar.inc(chunk.len() as u64);
            }
        }
    }
    bar.finish_and_clear();
    crate::explain::write_explanations(out, &explained)?;
    // What the windows share: k-mers (k up to 6) in at least 2 % of them (and at least 3).
    let windows: Vec<&str> = explained
        .iter()
        .map(|(r, e)| e.motif.bases(&r.seq))
        .collect();
    let sequences: Vec<&str> = explained.iter().map(|(r, _)| r.seq.as_str()).collect();
    let k = a.motif_width.min(6);
    let min_windows = explained.len().div_ceil(50).max(3);
    let kmers = crate::explain::enriched_kmers(&windows, &sequences, k, min_windows);
    crate::explain::write_kmers(out, &kmers)?;
    println!(
        "explained {} sequences: per-base effects in {}, strongest {}-bp windows in {}, \
         their enriched {k}-mers in {}",
        explained.len(),
        out.join("effects.csv").display(),
        a.motif_width,
        out.join("motifs.csv").display(),
        out.join("kmers.csv").display()
    );
    if kmers.is_empty() {
        println!("  no {k}-mer is in {min_windows} or more of the windows");
    }
    for km in kmers.iter().take(5) {
        println!(
            "  {} (or its reverse complement): in {} windows, {:.1}x enriched",
            km.kmer, km.windows, km.enrichment
        );
    }
    Ok(())
}

fn scan_cmd(a: ScanArgs, device: Option<&str>) -> Result<()> {
    if a.window == 0 || a.stride == 0 {
        bail!("--window and --stride must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold must be a probability, found {}", a.threshold);
    }
    let device = chosen_device(device)?;
    let checkpoint = load_for_inference(&a.model, &device)?;
    note_single_strand(&checkpoint.settings, a.average_strands);
    let num_labels = checkpoint.loaded.model.num_labels;
    check_class(a.class, num_labels)?;
    let opts = read_opts(&a.model, LabelPolicy::Optional);
    let regions: Vec<crate::scan::ScanRegion> = match (&a.input, &a.bed, &a.genome) {
        (Some(input), _, _) => {
            let ds = data::read_records(input, &opts)?;
            report_skipped(&ds, input);
            ds.records.into_iter().map(Into::into).collect()
        }
        (None, Some(bed), Some(genome)) => {
            let (regions, skipped) = data::read_genome_regions(bed, genome, &opts)?;
            if skipped > 0 {
                eprintln!(
                    "skipped {skipped} regions with letters other than ACGTN in {}",
                    bed.display()
                );
            }
            warn_overlaps(&regions);
            regions.into_iter().map(Into::into).collect()
        }
        _ => bail!("give --input, or --bed with --genome"),
    };
    let scanner = crate::scan::Scanner {
        predictor: predictor(&checkpoint, &a.model, &device),
        width: a.window,
        stride: a.stride,
        both_strands: a.average_strands,
    };
    let strands = if a.average_strands { 2 } else { 1 };
    let total: usize = regions
        .iter()
        .map(|r| crate::scan::windows(r.seq.len(), a.window, a.stride).len())
        .sum();
    let bar = indicatif::ProgressBar::new((strands * total) as u64);
    let mut scanned = Vec::with_capacity(regions.len());
    for region in regions {
        let result = scanner.scan(&region, Some(&bar))?;
        scanned.push((region, result));
    }
    bar.finish_and_clear();
    let hits = crate::scan::write_scan(&a.out, &scanned, num_labels, a.class, a.threshold)?;
    let scored: usize = scanned.iter().map(|(_, s)| s.windows.len()).sum();
    if scored < total {
        println!(
            "{} windows all N (assembly gaps) not scored",
            total - scored
        );
    }
    println!(
        "scanned {} sequences in {scored} windows: {} (window probabilities), {} (per-base \
         mean of class {}), {} ({hits} stretches at or above {})",
        scanned.len(),
        a.out.join("windows.tsv").display(),
        a.out.join("scores.bedgraph").display(),
        a.class,
        a.out.join("hits.bed").display(),
        a.threshold
    );
    Ok(())
}

fn variants_cmd(a: VariantsArgs, device: Option<&str>) -> Result<()> {
    if a.window == 0 {
        bail!("--window must be at least 1");
    }
    let device = chosen_device(device)?;
    let checkpoint = load_for_inference(&a.model, &device)?;
    note_single_strand(&checkpoint.settings, a.average_strands);
    check_class(a.class, checkpoint.loaded.model.num_labels)?;
    let opts = read_opts(&a.model, LabelPolicy::Optional);
    let (variants, skipped) = data::read_variant_windows(&a.vcf, &a.genome, a.window, &opts)?;
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} variants that could not be scored in {}",
            a.vcf.display()
        );
    }
    let predictor = predictor(&checkpoint, &a.model, &device);
    let strands = if a.average_strands { 2 } else { 1 };
    let bar = indicatif::ProgressBar::new((2 * strands * variants.len()) as u64);
    let effects = crate::variants::score_variants(
        &predictor,
        &variants,
        a.class,
        a.average_strands,
        Some(&bar),
    )?;
    bar.finish_and_clear();
    crate::variants::write_effects(&a.out, &variants, &effects)?;
    println!(
        "scored {} variants: {} (class {} probability with each allele)",
        variants.len(),
        a.out.display(),
        a.class
    );
    let mut strongest: Vec<usize> = (0..variants.len()).collect();
    strongest.sort_by(|&i, &j| {
        let size = |k: usize| effects[k].log_odds_change().abs();
        size(j).total_cmp(&size(i))
    });
    for &i in strongest.iter().take(5) {
        let (v, e) = (&variants[i], &effects[i]);
        println!(
            "  {}:{} {}>{} ({}): {:.3} -> {:.3}, log-odds {:+.2}",
            v.chrom,
            v.pos,
            v.reference,
            v.alternate,
            v.id,
            e.ref_prob,
            e.alt_prob,
            e.log_odds_change()
        );
    }
    Ok(())
}

/// Warns about the first pair of overlapping regions: their tracks would overlap too, which
/// genome browsers draw but `bedGraphToBigWig` refuses.
fn warn_overlaps(regions: &[data::GenomeRegion]) {
    let mut sorted: Vec<&data::GenomeRegion> = regions.iter().collect();
    sorted.sort_by(|a, b| (&a.chrom, a.start).cmp(&(&b.chrom, b.start)));
    if let Some(pair) = sorted
        .windows(2)
        .find(|p| p[0].chrom == p[1].chrom && p[1].start < p[0].end)
    {
        eprintln!(
            "warning: regions {}:{}-{} and {}:{}-{} overlap, and so will their windows and \
             bedGraph lines (merge the BED first, e.g. `bedtools merge`, for a bigWig)",
            pair[0].chrom, pair[0].start, pair[0].end, pair[1].chrom, pair[1].start, pair[1].end
        );
    }
}

/// Rejects a `--class` the model does not have.
fn check_class(class: usize, num_labels: usize) -> Result<()> {
    if class >= num_labels {
        bail!(
            "--class {class} is not a class of this model (classes 0 to {})",
            num_labels - 1
        );
    }
    Ok(())
}

fn eval_cmd(a: EvalArgs, device: Option<&str>) -> Result<()> {
    let device = chosen_device(device)?;
    check_inference_args(&a.model)?;
    let ds = data::read_records(&a.data, &read_opts(&a.model, LabelPolicy::Required))?;
    report_skipped(&ds, &a.data);
    let labels: Vec<usize> = ds
        .records
        .iter()
        .map(|r| r.label.context("record without a label"))
        .collect::<Result<_>>()?;
    let (probs, classes) = score_records(
        &a.model,
        &a.ensemble.dirs,
        &ds.records,
        a.average_strands,
        &device,
        None,
    )?;
    if let Some((r, l)) = ds.records.iter().zip(&labels).find(|(_, &l)| l >= classes) {
        bail!(
            "{}: record `{}` has label {l} but the model has {classes} classes (0..={})",
            a.data.display(),
            r.id,
            classes - 1
        );
    }
    let metrics = train::scored_metrics(&labels, &probs, classes);
    let intervals = crate::eval::test_intervals(&labels, &probs, classes)?;
    if let Some(out) = &a.out {
        train::write_predictions(out, &ds.records, &probs, classes, true)?;
        eprintln!(
            "wrote {} labelled predictions to {}",
            ds.records.len(),
            out.display()
        );
    }
    if a.json {
        let mut json = serde_json::to_value(&metrics)?;
        json["intervals"] = serde_json::to_value(&intervals)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{} sequences from {}", metrics.n, a.data.display());
        println!(
            "{:<10} {:>8}  {:.0} % CI ({} bootstrap resamples of the sequences)",
            "metric",
            "value",
            100.0 * intervals.level,
            intervals.resamples
        );
        for name in crate::eval::Metrics::NAMES {
            if let Some(v) = metrics.get(name) {
                let interval = intervals
                    .get(name)
                    .map_or(String::new(), |[low, high]| format!("{low:.4}-{high:.4}"));
                println!("{name:<10} {v:>8.4}  {interval}");
            }
        }
        println!("confusion  {:?}", metrics.confusion);
    }
    Ok(())
}

fn compare_cmd(a: CompareArgs) -> Result<()> {
    if a.resamples < 100 {
        bail!("--resamples must be at least 100, got {}", a.resamples);
    }
    let read =
        |path: &Path| crate::eval::read_labelled_predictions(&crate::eval::predictions_file(path)?);
    let (first, second) = (read(&a.a)?, read(&a.b)?);
    let differences = crate::eval::paired_bootstrap(&first, &second, 0.95, a.resamples, a.seed)?;
    if a.json {
        let json = serde_json::json!({
            "a": first.path,
            "b": second.path,
            "n": first.labels.len(),
            "resamples": a.resamples,
            "level": 0.95,
            "metrics": differences,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("A: {}", first.path.display());
    println!("B: {}", second.path.display());
    println!(
        "paired bootstrap over the {} sequences, {} resamples: B - A with its 95 % interval\n",
        first.labels.len(),
        a.resamples
    );
    println!(
        "{:<10} {:>8} {:>8} {:>8}  {:<19}  p",
        "metric", "A", "B", "B - A", "95 % CI"
    );
    let floor = 1.0 / a.resamples as f64;
    for d in &differences {
        let p = if d.p_value < floor {
            format!("< {floor}")
        } else {
            format!("{:.3}", d.p_value)
        };
        println!(
            "{:<10} {:>8.4} {:>8.4} {:>+8.4}  [{:+.4}, {:+.4}]  {p}",
            d.metric, d.a, d.b, d.difference, d.low, d.high
        );
    }
    Ok(())
}

fn bench_cmd(a: BenchArgs, device: Option<&str>) -> Result<()> {
    if a.batch_size == 0 || a.seq_len < 3 || a.steps == 0 {
        bail!("bench needs --batch-size >= 1, --seq-len >= 3 and --steps >= 1");
    }
    if let Some(path) = &a.tokenize {
        return bench_tokenize_cmd(&a, path);
    }
    let device = chosen_device(device)?;
    let spec = bench::BenchSpec {
        model_dir: &a.model,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        device: &device,
        precision: a.precision,
    };
    if a.memory {
        return bench_memory_cmd(&a, &spec);
    }
    if a.infer {
        let r = bench::bench_inference(&spec, a.warmup, a.steps)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "inference ({}), batch {} x {} tokens, {} threads: {:.3} s/batch, {:.1} sequences/s",
                r.precision,
                r.batch_size,
                r.seq_len,
                r.threads,
                r.seconds_per_batch,
                r.infer_seq_per_s
            );
        }
        return Ok(());
    }
    let r = bench::bench(&spec, a.method, a.warmup, a.steps)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:?} training ({}), batch {} x {} tokens, {} threads: {:.3} s/step (forward {:.3}, backward {:.3}, optimizer {:.3}), {:.1} sequences/s, {:.0} tokens/s ({} of {} parameters trainable)",
            r.method, r.precision, r.batch_size, r.seq_len, r.threads, r.seconds_per_step, r.forward_s, r.backward_s, r.optimizer_s, r.train_seq_per_s,
            r.train_tokens_per_s, r.params_trainable, r.params_total
        );
    }
    Ok(())
}

fn pretrain_cmd(a: PretrainArgs, device: Option<&str>) -> Result<()> {
    use crate::pretrain::{self, PretrainConfig};
    if let Some(dir) = &a.resume {
        let path = dir.join("pretrain.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a pre-training run directory", dir.display()))?;
        let mut cfg: PretrainConfig =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        cfg.out = dir.clone();
        if let Some(m) = a.time_limit_minutes {
            cfg.time_limit_minutes = m;
        }
        if let Some(d) = device {
            cfg.device = d.to_string();
        }
        pretrain::run(&cfg, true)?;
        return Ok(());
    }
    let mut cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?
        }
        None => PretrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = a.$field.clone() { cfg.$field = v; } )* };
    }
    set!(
        model,
        corpus,
        out,
        max_steps,
        time_limit_minutes,
        batch_size,
        seq_len,
        lr,
        warmup_ratio
    );
    set!(
        mask_prob,
        valid_fraction,
        eval_every,
        checkpoint_every,
        seed
    );
    if let Some(d) = device {
        cfg.device = d.to_string();
    }
    if cfg.model.as_os_str().is_empty() || cfg.corpus.as_os_str().is_empty() {
        bail!("pretrain needs --model DIR and --corpus FILE");
    }
    pretrain::run(&cfg, false)?;
    Ok(())
}

fn tokenizer_train(input: &Path, vocab_size: usize, out: &Path) -> Result<()> {
    let stretches = crate::pretrain::corpus::read_corpus(input)?;
    let bases: usize = stretches.iter().map(String::len).sum();
    let tokenizer = tokenize::train_bpe(stretches.into_iter(), vocab_size)?;
    tokenizer.save(out)?;
    println!(
        "trained {} on {bases} bases of {}; wrote {}",
        tokenizer.describe(),
        input.display(),
        out.join("tokenizer.json").display()
    );
    Ok(())
}

fn merge_cmd(a: MergeArgs) -> Result<()> {
    let summary = crate::peft::merge::merge_adapter(&a.model, &a.adapter, &a.out)?;
    println!(
        "merged {} LoRA modules of {} into {} ({} classes); wrote {}",
        summary.merged_modules.len(),
        a.adapter.display(),
        a.model.display(),
        summary.num_labels,
        a.out.display()
    );
    println!(
        "check: merged vs adapter logits differ by at most {:.2e} on 4 random sequences",
        summary.max_logit_diff
    );
    Ok(())
}

fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let sample = bundled("data/gue-tf0/dev.csv").ok();
    let ins = crate::model::inspect::inspect(&a.model, a.adapter.as_deref(), sample.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
    } else {
        print!("{}", crate::model::inspect::render(&ins, a.method));
    }
    Ok(())
}

/// `bench --tokenize FILE`: the model's tokenizer over the sequences of a CSV/FASTA.
fn bench_tokenize_cmd(a: &BenchArgs, path: &Path) -> Result<()> {
    let opts = ReadOptions {
        labels: LabelPolicy::Optional,
        ..ReadOptions::default()
    };
    let ds = data::read_records(path, &opts)?;
    if ds.records.is_empty() {
        bail!("{}: no sequences to tokenize", path.display());
    }
    let r = bench::bench_tokenize(&a.model, &ds.records, a.steps)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "tokenization of {} sequences ({:.1} tokens each), {} threads: {:.0} sequences/s",
            r.sequences, r.tokens_per_sequence, r.threads, r.tokenize_seq_per_s
        );
    }
    Ok(())
}

/// `bench --memory`: one method in this process, or (`--all-methods`) each method in a child
/// process of this same binary, so that one method's peak cannot hide in another's.
fn bench_memory_cmd(a: &BenchArgs, spec: &bench::BenchSpec) -> Result<()> {
    let results = if a.all_methods {
        let exe = std::env::current_exe().context("cannot locate the dnatune executable")?;
        let mut out = Vec::new();
        for m in Method::ALL {
            let mut cmd = std::process::Command::new(&exe);
            if let Ok(n) = std::env::var("RAYON_NUM_THREADS") {
                cmd.args(["--threads", &n]);
            }
            let model = a.model.to_string_lossy().to_string();
            let (b, s, n) = (
                a.batch_size.to_string(),
                a.seq_len.to_string(),
                a.steps.to_string(),
            );
            cmd.args([
                "bench",
                "--memory",
                "--json",
                "--model",
                &model,
                "--method",
                m.name(),
            ]);
            cmd.args(["--batch-size", &b, "--seq-len", &s, "--steps", &n]);
            let res = cmd
                .output()
                .with_context(|| format!("cannot run {}", exe.display()))?;
            if !res.status.success() {
                bail!(
                    "bench --memory --method {} failed: {}",
                    m.name(),
                    String::from_utf8_lossy(&res.stderr).trim()
                );
            }
            let text = String::from_utf8_lossy(&res.stdout);
            let line = text.lines().last().unwrap_or_default();
            let r: bench::MemoryResult = serde_json::from_str(line)
                .with_context(|| format!("unexpected output of the {} run: {text}", m.name()))?;
            out.push(r);
        }
        out
    } else {
        vec![bench::bench_memory(spec, a.method, a.steps)?]
    };
    if a.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let opt_mib = |b: Option<u64>| b.map_or("-".into(), |v| format!("{:.1}", mib(v as usize)));
    println!(
        "batch {} x {} tokens; MiB (peak step RSS: high-water mark reset after loading)",
        a.batch_size, a.seq_len
    );
    println!(
        "{:<11} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "method",
        "weights",
        "grads",
        "optimizer",
        "lin.quant",
        "rss loaded",
        "peak step",
        "peak proc"
    );
    for r in &results {
        println!(
            "{:<11} {:>10.1} {:>10.2} {:>10.2} {:>10} {:>12} {:>12} {:>12}",
            r.method.name(),
            mib(r.weight_bytes),
            mib(r.grad_bytes),
            mib(r.optimizer_bytes),
            if r.quantized_linear_f32_bytes > 0 {
                format!(
                    "{:.4}x",
                    r.quantized_linear_bytes as f64 / r.quantized_linear_f32_bytes as f64
                )
            } else {
                "-".into()
            },
            opt_mib(r.rss_after_load_bytes),
            opt_mib(r.peak_rss_step_bytes),
            opt_mib(r.peak_rss_process_bytes)
        );
    }
    let find = |m: Method| results.iter().find(|r| r.method == m);
    if let (Some(full), Some(lora)) = (find(Method::Full), find(Method::Lora)) {
        let state = |r: &bench::MemoryResult| (r.grad_bytes + r.optimizer_bytes) as f64;
        println!(
            "LoRA gradient + optimizer state: {:.3} % of full fine-tuning's",
            100.0 * state(lora) / state(full)
        );
        for q in [Method::QloraInt8, Method::QloraNf4] {
            if let (Some(r), Some(lp), Some(qp)) = (
                find(q),
                lora.peak_rss_step_bytes,
                find(q).and_then(|r| r.peak_rss_step_bytes),
            ) {
                println!(
                    "{}: quantized linear weights {:.4}x of f32; peak step RSS {:.3}x of LoRA's",
                    q.name(),
                    r.quantized_linear_bytes as f64 / r.quantized_linear_f32_bytes.max(1) as f64,
                    qp as f64 / lp as f64
                );
            }
        }
    }
    Ok(())
}
