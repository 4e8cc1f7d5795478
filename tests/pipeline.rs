//! End-to-end runs on the shipped GUE tf/0 data: a small model learns, an interrupted run resumes
//! to the metrics the uninterrupted run gives, and the outputs a user reads are written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dnatune::train::config::{ClassWeights, Method, TrainConfig};

mod common;
use common::step_losses;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn dnatune(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dnatune {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tiny two-layer DNABERT-2 with the shipped BPE tokenizer.
fn init_tiny(dir: &Path, hidden: &str) {
    let tok = repo("assets/tokenizers/dna-bpe-4096/tokenizer.json");
    init_tiny_with(
        dir,
        hidden,
        &["--arch", "dnabert2", "--tokenizer", tok.to_str().unwrap()],
    );
}

/// A tiny two-layer classic BERT with an overlapping 3-mer vocabulary (k-mer DNABERT's layout).
fn init_tiny_kmer(dir: &Path, hidden: &str) {
    init_tiny_with(dir, hidden, &["--arch", "bert", "--kmer", "3"]);
}

/// A tiny two-layer ESM in the Nucleotide Transformer v2 layout, non-overlapping 3-mers.
fn init_tiny_nt(dir: &Path, hidden: &str) {
    init_tiny_with(dir, hidden, &["--arch", "nt", "--kmer", "3"]);
}

fn init_tiny_with(dir: &Path, hidden: &str, architecture: &[&str]) {
    let mut args = vec!["init-model"];
    args.extend_from_slice(architecture);
    args.extend_from_slice(&["--layers", "2", "--hidden", hidden, "--heads", "2"]);
    args.extend_from_slice(&["--intermediate", "128", "--out", dir.to_str().unwrap()]);
    dnatune(&args);
}

fn metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn small_model_learns_tf_binding_and_writes_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_tiny(&model, "64");
    let run = tmp.path().join("run");
    let cfg = TrainConfig {
        model: model.clone(),
        data: repo("data/gue-tf0"),
        out: run.clone(),
        method: Method::Full,
        epochs: 2,
        lr: Some(1e-3),
        max_train_samples: Some(4000),
        max_length: 64,
        ..TrainConfig::default()
    };
    let summary = dnatune::train::run(&cfg, false).unwrap();
    assert!(
        summary.dev_best.mcc > 0.2,
        "dev MCC {} is not well above 0",
        summary.dev_best.mcc
    );
    let m = metrics(&run);
    let test = &m["test"];
    for key in [
        "mcc",
        "accuracy",
        "f1",
        "precision",
        "recall",
        "auroc",
        "auprc",
    ] {
        let v = test[key]
            .as_f64()
            .unwrap_or_else(|| panic!("test.{key} missing"));
        assert!((-1.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(test["confusion"].as_array().unwrap().len(), 2);
    let preds = std::fs::read_to_string(run.join("test_predictions.csv")).unwrap();
    assert!(preds.starts_with("id,length,label,prediction,prob_0,prob_1\n"));
    assert_eq!(preds.lines().count(), 1001);
    assert!(run.join("best/model.safetensors").exists() && run.join("best/config.json").exists());
    assert!(run.join("report.html").exists() && run.join("config.toml").exists());
    // The best checkpoint, evaluated on its own by `dnatune eval`, reproduces the test metrics.
    let out = dnatune(&[
        "eval",
        "--model",
        run.join("best").to_str().unwrap(),
        "--data",
        repo("data/gue-tf0/test.csv").to_str().unwrap(),
        "--max-length",
        "64",
        "--json",
    ]);
    let evaluated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((evaluated["mcc"].as_f64().unwrap() - test["mcc"].as_f64().unwrap()).abs() < 1e-9);
    // ... and its bootstrap intervals (same resamples of the same predictions), which hold the
    // test figures.
    let intervals = &m["test_intervals"];
    for name in ["mcc", "accuracy", "f1", "auroc", "auprc"] {
        let [low, high] = [0, 1].map(|i| intervals[name][i].as_f64().unwrap());
        let value = test[name].as_f64().unwrap();
        assert!(
            low < value && value < high,
            "{name}: {value} outside [{low}, {high}]"
        );
        for i in 0..2 {
            let again = evaluated["intervals"][name][i].as_f64().unwrap();
            assert!(
                (again - intervals[name][i].as_f64().unwrap()).abs() < 1e-6,
                "{name}"
            );
        }
    }
    strand_averaged_calls_do_not_depend_on_the_strand(&run.join("best"), tmp.path());
    scanning_a_locus_scores_its_windows_as_predict_scores_them(&run.join("best"), tmp.path());
    variant_effects_are_predictions_of_the_edited_windows(&run.join("best"), tmp.path());
}

/// `scan` over a BED region made of test sequences laid end to end, with windows exactly on
/// them, gives each window `predict`'s probabilities for that sequence at its genome position,
/// and its hits are the runs of those sequences called positive.
fn scanning_a_locus_scores_its_windows_as_predict_scores_them(model: &Path, dir: &Path) {
    let text = std::fs::read_to_string(repo("data/gue-tf0/test.csv")).unwrap();
    let all: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .filter(|q| q.len() == 101)
        .collect();
    // The file lists positives first: stepping by about half of it alternates the classes.
    let pieces: Vec<&str> = (0..60).map(|i| all[i * 503 % all.len()]).collect();
    let flank = "GATTACAGATTACAGATTACAGATTACAGATTACAGAT"; // 38 bases outside the region
    let locus = pieces.concat();
    // A second region: 60 bases, an assembly gap of 300 Ns, 60 bases.
    let (bases, gap) = ("ACGT".repeat(15), "N".repeat(300));
    std::fs::write(
        dir.join("genome.fa"),
        format!(">chrX\n{flank}{locus}{flank}\n>chrGap\n{bases}{gap}{bases}\n"),
    )
    .unwrap();
    let start = flank.len();
    std::fs::write(
        dir.join("locus.bed"),
        format!("chrX\t{start}\t{}\nchrGap\t0\t420\n", start + locus.len()),
    )
    .unwrap();
    std::fs::write(
        dir.join("pieces.csv"),
        format!("sequence\n{}\n", pieces.join("\n")),
    )
    .unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let [bed, genome, csv, predictions, scan_dir, short_dir] = [
        "locus.bed",
        "genome.fa",
        "pieces.csv",
        "pieces-predictions.csv",
        "scan",
        "scan-short",
    ]
    .map(path);
    let model = model.to_str().unwrap();
    // BPE has no merges for N: the windows reaching into the gap hold over 64 tokens.
    let common = ["--model", model, "--max-length", "128"];
    let mut args = vec!["scan", "--bed", &bed, "--genome", &genome];
    args.extend(["--window", "101", "--stride", "101", "--out", &scan_dir]);
    args.extend(common);
    dnatune(&args);
    let mut args = vec!["predict", "--input", &csv, "--out", &predictions];
    args.extend(common);
    dnatune(&args);
    let predicted = probabilities(&dir.join("pieces-predictions.csv"));
    let windows = std::fs::read_to_string(dir.join("scan/windows.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = windows
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    let (rows, gap_rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r[0] == "chrX");
    // Windows all N are not scored, and the bedGraph leaves their bases out.
    let gap_starts: Vec<&str> = gap_rows.iter().map(|r| r[1]).collect();
    assert_eq!(gap_starts, ["0", "303", "319"]);
    let bedgraph = std::fs::read_to_string(dir.join("scan/scores.bedgraph")).unwrap();
    for line in bedgraph.lines().filter(|l| l.starts_with("chrGap")) {
        let f: Vec<usize> = line
            .split('\t')
            .skip(1)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(f[1] <= 101 || f[0] >= 303, "{line}");
    }
    assert_eq!(rows.len(), pieces.len());
    for (i, (row, want)) in rows.iter().zip(&predicted).enumerate() {
        let at = start + 101 * i;
        assert_eq!(row[..3], ["chrX", &at.to_string(), &(at + 101).to_string()]);
        let prob: f64 = row[4].parse().unwrap();
        assert!(
            (prob - want[1]).abs() < 2e-6,
            "window {i}: {prob} vs {}",
            want[1]
        );
    }
    // Runs of consecutive sequences called positive, in genome coordinates.
    let mut expected: Vec<(usize, usize)> = Vec::new();
    for (i, p) in predicted.iter().enumerate() {
        let (a, b) = (start + 101 * i, start + 101 * (i + 1));
        match expected.last_mut() {
            Some(run) if p[1] >= 0.5 && run.1 == a => run.1 = b,
            _ if p[1] >= 0.5 => expected.push((a, b)),
            _ => {}
        }
    }
    assert!(
        expected.len() > 3,
        "too few positive calls for the check to mean much"
    );
    let hits_text = std::fs::read_to_string(dir.join("scan/hits.bed")).unwrap();
    let hits: Vec<(usize, usize)> = hits_text
        .lines()
        .filter(|l| l.starts_with("chrX\t"))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(hits, expected);
    // Overlapping regions are scanned, with a warning that their tracks overlap.
    std::fs::write(
        dir.join("overlap.bed"),
        "chrGap\t0\t200\nchrGap\t150\t420\n",
    )
    .unwrap();
    let overlap_bed = path("overlap.bed");
    let mut args = vec!["scan", "--bed", &overlap_bed, "--genome", &genome];
    args.extend(["--window", "101", "--out", &short_dir]);
    args.extend(common);
    let stderr = String::from_utf8(dnatune(&args).stderr).unwrap();
    assert!(
        stderr.contains("chrGap:0-200 and chrGap:150-420 overlap"),
        "{stderr}"
    );
    // A window longer than --max-length tokens is an error naming it, not a silent truncation.
    let out = Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .args([
            "scan",
            "--model",
            model,
            "--max-length",
            "8",
            "--input",
            &csv,
        ])
        .args(["--window", "101", "--out", &short_dir])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pieces:2:0-101"),
        "{stderr}"
    );
}

/// `variants` on SNVs at the centres of the sequences the scan test laid end to end (its genome,
/// pieces and their predictions): the reference window is the sequence, the alternate the
/// sequence with that base changed, and both probabilities are `predict`'s for those.
fn variant_effects_are_predictions_of_the_edited_windows(model: &Path, dir: &Path) {
    let text = std::fs::read_to_string(dir.join("pieces.csv")).unwrap();
    let pieces: Vec<&str> = text.lines().skip(1).collect();
    let genome = std::fs::read_to_string(dir.join("genome.fa")).unwrap();
    let start = genome.lines().nth(1).unwrap().find(pieces[0]).unwrap();
    let mut vcf = String::from("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n");
    let mut edited = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let reference = &piece[50..51];
        let alternate = if reference == "A" { "C" } else { "A" };
        let pos = start + 101 * i + 51; // 1-based
        vcf.push_str(&format!("chrX\t{pos}\tv{i}\t{reference}\t{alternate}\n"));
        edited.push(format!("{}{alternate}{}", &piece[..50], &piece[51..]));
    }
    std::fs::write(dir.join("v.vcf"), vcf).unwrap();
    std::fs::write(
        dir.join("edited.csv"),
        format!("sequence\n{}\n", edited.join("\n")),
    )
    .unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let [vcf, genome, edited, edited_predictions, effects] = [
        "v.vcf",
        "genome.fa",
        "edited.csv",
        "edited-predictions.csv",
        "effects.tsv",
    ]
    .map(path);
    let model = model.to_str().unwrap();
    let common = ["--model", model, "--max-length", "64"];
    let mut args = vec!["variants", "--vcf", &vcf, "--genome", &genome];
    args.extend(["--window", "101", "--out", &effects]);
    args.extend(common);
    dnatune(&args);
    let mut args = vec!["predict", "--input", &edited, "--out", &edited_predictions];
    args.extend(common);
    dnatune(&args);
    let reference = probabilities(&dir.join("pieces-predictions.csv"));
    let alternate = probabilities(Path::new(&edited_predictions));
    let text = std::fs::read_to_string(&effects).unwrap();
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').skip(6).map(|f| f.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), pieces.len());
    let logit = |p: f64| (p / (1.0 - p)).ln();
    let mut moved = 0;
    for (i, row) in rows.iter().enumerate() {
        let (r, a) = (reference[i][1], alternate[i][1]);
        assert!(
            (row[0] - r).abs() < 2e-6 && (row[1] - a).abs() < 2e-6,
            "variant {i}: {row:?} vs {r} {a}"
        );
        assert!(
            (row[3] - (logit(a) - logit(r))).abs() < 1e-3,
            "variant {i}: {row:?}"
        );
        moved += usize::from((a - r).abs() > 1e-3);
    }
    assert!(
        moved > 10,
        "only {moved} substitutions moved a call: the check proves little"
    );
}

/// The complementary strand, read 5' to 3' (written here, apart from the crate's own).
fn other_strand(seq: &str) -> String {
    seq.chars()
        .rev()
        .map(|b| match b {
            'A' => 'T',
            'C' => 'G',
            'G' => 'C',
            'T' => 'A',
            other => other,
        })
        .collect()
}

/// `predict --average-strands` gives a sequence and its reverse complement the same
/// probabilities, the mean of the two one-strand predictions; the trained model alone does not.
fn strand_averaged_calls_do_not_depend_on_the_strand(model: &Path, dir: &Path) {
    let text = std::fs::read_to_string(repo("data/gue-tf0/test.csv")).unwrap();
    let seqs: Vec<&str> = text
        .lines()
        .skip(1)
        .take(200)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let forward = dir.join("forward.csv");
    let reverse = dir.join("reverse.csv");
    let csv = |rows: Vec<String>| format!("sequence\n{}\n", rows.join("\n"));
    std::fs::write(&forward, csv(seqs.iter().map(|q| q.to_string()).collect())).unwrap();
    std::fs::write(
        &reverse,
        csv(seqs.iter().map(|q| other_strand(q)).collect()),
    )
    .unwrap();
    let predict = |input: &Path, name: &str, both: bool| {
        let out = dir.join(name);
        let mut args = vec!["predict", "--model", model.to_str().unwrap()];
        args.extend([
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(["--max-length", "64"]);
        if both {
            args.push("--average-strands");
        }
        dnatune(&args);
        probabilities(&out)
    };
    let one_strand = [
        predict(&forward, "f.csv", false),
        predict(&reverse, "r.csv", false),
    ];
    let both_strands = [
        predict(&forward, "fb.csv", true),
        predict(&reverse, "rb.csv", true),
    ];
    let largest = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x[1] - y[1]).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        largest(&one_strand[0], &one_strand[1]) > 1e-2,
        "the model alone already scores both strands alike: the check below would prove nothing"
    );
    assert!(largest(&both_strands[0], &both_strands[1]) < 2e-6);
    let mean: Vec<Vec<f64>> = one_strand[0]
        .iter()
        .zip(&one_strand[1])
        .map(|(f, r)| f.iter().zip(r).map(|(a, b)| 0.5 * (a + b)).collect())
        .collect();
    assert!(largest(&both_strands[0], &mean) < 2e-6);
}

/// Class weights enter the loss as a weighted mean over the accumulated batch: the same weight on
/// every class changes nothing, and weighing one class up makes the model call it more often.
#[test]
fn class_weights_form_a_weighted_mean_that_shifts_the_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_tiny(&model, "32");
    // eps = 1 makes AdamW's step follow the gradient's scale, so a loss divided by the wrong
    // total (the count of sequences instead of their weights) changes the curve.
    let run = |name: &str, weights: Option<[f64; 2]>| {
        let cfg = TrainConfig {
            model: model.clone(),
            data: repo("data/gue-tf0"),
            out: tmp.path().join(name),
            method: Method::Full,
            max_steps: 30,
            log_every: 1,
            lr: Some(1e-2),
            eps: 1.0,
            batch_size: 16,
            grad_accum: 2,
            max_train_samples: Some(480),
            max_length: 48,
            class_weights: weights.map(|w| ClassWeights::Given(w.to_vec())),
            ..TrainConfig::default()
        };
        dnatune::train::run(&cfg, false).unwrap();
        cfg.out
    };
    let unweighted = step_losses(&run("unweighted", None));
    let uniform = step_losses(&run("uniform", Some([2.5, 2.5])));
    assert_eq!(unweighted.len(), 30);
    for (step, (u, w)) in unweighted.iter().zip(&uniform).enumerate() {
        assert!((u - w).abs() < 1e-4 * u.abs(), "step {step}: {u} vs {w}");
    }
    let called_1 = |run: &Path| {
        let probs = probabilities(&run.join("test_predictions.csv"));
        probs.iter().filter(|p| p[1] > p[0]).count() as f64 / probs.len() as f64
    };
    let favour_1 = called_1(&run("favour-1", Some([1.0, 4.0])));
    let favour_0 = called_1(&run("favour-0", Some([4.0, 1.0])));
    assert!(
        favour_1 > favour_0 + 0.3,
        "class 1 called on {favour_1} of the test set with weights 1,4 and on {favour_0} with 4,1"
    );
}

fn train_args<'a>(model: &'a str, run: &'a str) -> Vec<&'a str> {
    let data = Box::leak(
        repo("data/gue-tf0")
            .to_string_lossy()
            .into_owned()
            .into_boxed_str(),
    );
    vec![
        "--threads",
        "1",
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        run,
        "--method",
        "lora",
        "--epochs",
        "2",
        "--max-train-samples",
        "1200",
        "--batch-size",
        "16",
        "--eval-every",
        "8",
        "--max-length",
        "48",
        "--lr",
        "1e-3",
        "--patience",
        "0",
        "--seed",
        "7",
    ]
}

#[test]
fn interrupted_lora_run_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_tiny(&model, "32");
    let model_s = model.to_str().unwrap().to_string();

    let full = tmp.path().join("full");
    dnatune(&train_args(&model_s, full.to_str().unwrap()));

    let cut = tmp.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .args(train_args(&model_s, cut.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !cut.join("checkpoint/state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cut.join("metrics.json").exists(),
        "the run finished before it could be interrupted"
    );

    dnatune(&["--threads", "1", "train", "--resume", cut.to_str().unwrap()]);
    let (a, b) = (metrics(&full), metrics(&cut));
    assert_eq!(a["test"], b["test"]);
    assert_eq!(a["dev_best"], b["dev_best"]);
    assert!(cut.join("best/adapter_config.json").exists());
}

#[test]
fn rerun_seed_sweep_reuses_finished_seeds_and_resumes_interrupted_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_tiny(&model, "32");
    let model_s = model.to_str().unwrap().to_string();
    let sweep = tmp.path().join("sweep");
    let sweep_args = |lr: &'static str| {
        let mut args = train_args(&model_s, sweep.to_str().unwrap());
        let seed = args.iter().position(|a| *a == "--seed").unwrap();
        args[seed] = "--seeds";
        args[seed + 1] = "7,8";
        let at = args.iter().position(|a| *a == "--lr").unwrap();
        args[at + 1] = lr;
        args
    };
    let summary = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(sweep.join("seeds_summary.json")).unwrap())
            .unwrap()
    };
    dnatune(&sweep_args("1e-3"));
    let first = summary();
    let seed7_log = std::fs::read(sweep.join("seed-7/log.jsonl")).unwrap();

    // Seed 8 as if stopped after its last checkpoint, before the test evaluation was written.
    std::fs::remove_file(sweep.join("seed-8/metrics.json")).unwrap();
    let out = dnatune(&sweep_args("1e-3"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reusing the finished run") && stdout.contains("seed-7"),
        "{stdout}"
    );
    assert!(stdout.contains("resuming"), "{stdout}");
    assert_eq!(first["test"], summary()["test"]);
    assert_eq!(
        seed7_log,
        std::fs::read(sweep.join("seed-7/log.jsonl")).unwrap(),
        "seed 7 was trained again"
    );

    // Another configuration in the same folder is refused, not mixed in.
    let out = Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .args(sweep_args("5e-4"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another configuration"), "{stderr}");
}

#[test]
fn fused_kernels_train_like_the_plain_candle_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let dnabert2 = tmp.path().join("dnabert2");
    init_tiny(&dnabert2, "64");
    let kmer_bert = tmp.path().join("kmer-bert");
    init_tiny_kmer(&kmer_bert, "64");
    let nt = tmp.path().join("nt");
    init_tiny_nt(&nt, "64");
    let cases = [
        (&dnabert2, Method::Full),
        (&dnabert2, Method::Lora),
        (&dnabert2, Method::QloraNf4),
        (&kmer_bert, Method::Full),
        (&kmer_bert, Method::Lora),
        (&nt, Method::Full),
        (&nt, Method::Lora),
    ];
    for (model, method) in cases {
        let arch = model.file_name().unwrap().to_str().unwrap();
        let cfg = |out: &str| TrainConfig {
            model: model.clone(),
            data: repo("data/gue-tf0"),
            out: tmp.path().join(out),
            method,
            max_steps: 6,
            log_every: 1,
            lr: Some(1e-3),
            max_train_samples: Some(192),
            max_length: 48,
            ..TrainConfig::default()
        };
        let fast_cfg = cfg(&format!("fast-{arch}-{}", method.name()));
        let plain_cfg = cfg(&format!("plain-{arch}-{}", method.name()));
        dnatune::train::run(&fast_cfg, false).unwrap();
        dnatune::ops::with_plain_kernels(|| dnatune::train::run(&plain_cfg, false)).unwrap();
        let fast = step_losses(&fast_cfg.out);
        let plain = step_losses(&plain_cfg.out);
        assert_eq!(fast.len(), 6, "{arch} {method:?}: one loss per step");
        assert_eq!(fast.len(), plain.len());
        // The run must move, or equal curves would prove nothing about the backward passes.
        assert!(
            fast[0] != fast[5],
            "{arch} {method:?}: loss did not change: {fast:?}"
        );
        for (step, (f, p)) in fast.iter().zip(&plain).enumerate() {
            let rel = (f - p).abs() / p.abs().max(1e-12);
            assert!(
                rel < 1e-4,
                "{arch} {method:?} step {step}: fused {f} vs plain {p} (relative {rel:e})"
            );
        }
    }
}

/// The probability columns of a `predict` output file.
fn probabilities(path: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let columns: Vec<usize> = (0..header.len())
        .filter(|&i| header[i].starts_with("prob_"))
        .collect();
    assert_eq!(columns.len(), 2, "{header:?}");
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            columns
                .iter()
                .map(|&i| fields[i].parse().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn nucleotide_transformer_checkpoint_fine_tunes_merges_and_predicts() {
    // The transformers-made v2 fixture (rotary, SwiGLU) through LoRA training, the PEFT
    // adapter, merging, and prediction from the adapter and from the merged directory.
    let tmp = tempfile::tempdir().unwrap();
    let base = repo("tests/fixtures/tiny-nt-v2");
    let run = tmp.path().join("run");
    let cfg = TrainConfig {
        model: base.clone(),
        data: repo("data/gue-tf0"),
        out: run.clone(),
        method: Method::Lora,
        max_steps: 12,
        lr: Some(1e-2),
        max_train_samples: Some(384),
        max_length: 48,
        ..TrainConfig::default()
    };
    dnatune::train::run(&cfg, false).unwrap();
    let adapter = run.join("best");
    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        adapter_config["target_modules"],
        serde_json::json!(["query", "key", "value"])
    );
    let merged = tmp.path().join("merged");
    let (base_s, adapter_s, merged_s) = (
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        merged.to_str().unwrap(),
    );
    dnatune(&[
        "merge",
        "--model",
        base_s,
        "--adapter",
        adapter_s,
        "--out",
        merged_s,
    ]);
    // The merged directory is a plain ESM model: HF names, its head under `classifier.*`.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["position_embedding_type"], "rotary");
    assert_eq!(config["add_bias_fnn"], false);
    let tensors =
        candle_core::safetensors::load(merged.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(tensors.contains_key("classifier.out_proj.weight"));
    assert!(tensors.contains_key("esm.encoder.layer.1.attention.self.query.weight"));
    assert!(!tensors.keys().any(|k| k.contains("lora_")));

    let input = repo("data/gue-tf0/test.csv");
    let input_s = input.to_str().unwrap();
    let (from_adapter, from_merged) = (tmp.path().join("a.csv"), tmp.path().join("m.csv"));
    dnatune(&[
        "predict",
        "--model",
        base_s,
        "--adapter",
        adapter_s,
        "--input",
        input_s,
        "--out",
        from_adapter.to_str().unwrap(),
        "--max-length",
        "48",
    ]);
    dnatune(&[
        "predict",
        "--model",
        merged_s,
        "--input",
        input_s,
        "--out",
        from_merged.to_str().unwrap(),
        "--max-length",
        "48",
    ]);
    let (a, m) = (probabilities(&from_adapter), probabilities(&from_merged));
    assert_eq!(a.len(), 1000);
    let gap = a
        .iter()
        .flatten()
        .zip(m.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(gap < 1e-4, "adapter and merged predictions differ by {gap}");
    // Training moved the classifier away from a constant call.
    let spread = a.iter().map(|p| p[1]).fold(f64::NAN, f64::max)
        - a.iter().map(|p| p[1]).fold(f64::NAN, f64::min);
    assert!(spread > 0.05, "probabilities hardly vary: spread {spread}");
}
