//! End-to-end tests of the `dnatune` binary: bad input must end with exit status 1 and a message
//! naming the file and the problem (never a panic), and the happy paths must write the documented
//! files. Every test builds its own tiny model in a temporary directory, so they run in parallel.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Path of a file shipped in the repository.
fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs the binary with one compute thread, so parallel tests do not oversubscribe the cores.
fn dnatune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dnatune"))
        .arg("--threads")
        .arg("1")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("failed to start the dnatune binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Asserts the command succeeded, showing its stderr if not.
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "expected success, got {:?}; stderr:\n{}",
        out.status,
        stderr(out)
    );
}

/// Asserts a clean failure: exit status 1 (not a panic's 101), no panic text, and every needle
/// present in stderr.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "stderr should contain {needle:?}:\n{err}"
        );
    }
}

/// A one-layer DNABERT-2-shaped model with the bundled BPE tokenizer, written under `dir`.
fn tiny_model(dir: &Path) -> PathBuf {
    let tokenizer = repo_file("assets/tokenizers/dna-bpe-4096/tokenizer.json");
    init_tiny(
        &dir.join("model"),
        &["--arch", "dnabert2", "--tokenizer", s(&tokenizer)],
    )
}

/// `dnatune init-model` of one layer, hidden size 32, 2 heads, intermediate 64 into `out`, with
/// `arch` naming the architecture and tokenizer.
fn init_tiny(out: &Path, arch: &[&str]) -> PathBuf {
    let mut args = vec![
        "init-model",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
    ];
    args.extend(["--intermediate", "64", "--out", s(out)]);
    args.extend_from_slice(arch);
    assert_ok(&dnatune(&args));
    out.to_path_buf()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

/// A GUE-style data directory holding the first `n` records of the bundled train/dev/test files.
fn small_gue(dir: &Path, n: usize, splits: &[&str]) -> PathBuf {
    let out = dir.join("gue");
    fs::create_dir_all(&out).unwrap();
    for split in splits {
        let text = fs::read_to_string(repo_file(&format!("data/gue-tf0/{split}.csv"))).unwrap();
        let head: Vec<&str> = text.lines().take(n + 1).collect();
        fs::write(out.join(format!("{split}.csv")), head.join("\n") + "\n").unwrap();
    }
    out
}

/// `dnatune predict` of `model` on `input` into `out`, with `extra` arguments.
fn predict(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "predict",
        "--model",
        s(model),
        "--input",
        s(input),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    dnatune(&args)
}

/// `dnatune train` of `model` on `data` into `run`, with `extra` arguments.
fn train(model: &Path, data: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(run),
    ];
    args.extend_from_slice(extra);
    dnatune(&args)
}

const WITH_X: &str = "sequence,label\nACGTACGTAC,1\nACGXACGT,0\nGGGCCCAAAT,0\n";

#[test]
fn predict_names_file_line_and_column_of_an_invalid_letter() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "x.csv", WITH_X);
    let preds = tmp.path().join("preds.csv");
    let out = predict(&model, &input, &preds, &[]);
    // Line 3 of the file, fourth letter of the sequence.
    let at = format!("{}:3:4", input.display());
    assert_fails_with(&out, &[&at, "'X'"]);
    assert!(!preds.exists(), "no predictions may be written on failure");
}

#[test]
fn eval_names_file_line_and_column_of_an_invalid_letter_in_fasta() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    // The X sits on the second sequence line of record `a`: file line 3, column 3.
    let input = write(
        tmp.path(),
        "x.fa",
        ">a label=1\nACGT\nACXT\n>b label=0\nGGCC\n",
    );
    let out = dnatune(&["eval", "--model", s(&model), "--data", s(&input)]);
    let at = format!("{}:3:3", input.display());
    assert_fails_with(&out, &[&at, "'X'"]);
}

#[test]
fn eval_rejects_a_csv_without_the_label_column() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "nolabel.csv", "sequence\nACGTACGTAC\nACGT\n");
    let out = dnatune(&["eval", "--model", s(&model), "--data", s(&input)]);
    assert_fails_with(&out, &[s(&input), "'label'", "column"]);
}

#[test]
fn eval_rejects_an_empty_file() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "empty.csv", "");
    let out = dnatune(&["eval", "--model", s(&model), "--data", s(&input)]);
    assert_fails_with(&out, &[s(&input), "empty"]);
}

#[test]
fn eval_rejects_a_non_numeric_label() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(
        tmp.path(),
        "nonnum.csv",
        "sequence,label\nACGTACGTAC,1\nACGT,abc\n",
    );
    let out = dnatune(&["eval", "--model", s(&model), "--data", s(&input)]);
    let at = format!("{}:3", input.display());
    assert_fails_with(&out, &[&at, "'abc'", "label"]);
}

#[test]
fn eval_rejects_a_fasta_header_without_sequence() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(
        tmp.path(),
        "nohead.fa",
        ">s1 label=1\nACGTACGT\n>s2 label=0\n>s3 label=1\nACGT\n",
    );
    let out = dnatune(&["eval", "--model", s(&model), "--data", s(&input)]);
    let at = format!("{}:3", input.display());
    assert_fails_with(&out, &[&at, "s2", "no sequence"]);
}

#[test]
fn skip_invalid_drops_bad_sequences_and_reports_the_count() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "x.csv", WITH_X);
    let preds = tmp.path().join("preds.csv");
    let out = predict(&model, &input, &preds, &["--skip-invalid"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("skipped 1 "), "{}", stderr(&out));
    let rows = fs::read_to_string(&preds).unwrap().lines().count() - 1;
    assert_eq!(rows, 2, "the two valid sequences are predicted");

    let out = dnatune(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&input),
        "--skip-invalid",
        "--json",
    ]);
    assert_ok(&out);
    assert!(stderr(&out).contains("skipped 1 "), "{}", stderr(&out));
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(metrics["n"], 2, "{metrics}");
}

/// An IUPAC code fails with a hint at the option; with `--ambiguous-as-n` it is read as N: the
/// prediction equals that of the sequence written with N, in predict and in prepare-bed.
#[test]
fn ambiguous_as_n_reads_iupac_codes_as_n_and_the_error_points_to_it() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let coded = write(
        tmp.path(),
        "coded.csv",
        "sequence\nACGTACGTAC\nACGyACGTkA\n",
    );
    let plain = write(
        tmp.path(),
        "plain.csv",
        "sequence\nACGTACGTAC\nACGNACGTNA\n",
    );
    let from_coded = tmp.path().join("coded-preds.csv");
    let at = format!("{}:3:4", coded.display());
    assert_fails_with(
        &predict(&model, &coded, &from_coded, &[]),
        &[&at, "'y'", "--ambiguous-as-n"],
    );
    assert_ok(&predict(&model, &coded, &from_coded, &["--ambiguous-as-n"]));
    let from_plain = tmp.path().join("plain-preds.csv");
    assert_ok(&predict(&model, &plain, &from_plain, &[]));
    let (_, coded_rows) = read_preds(&from_coded);
    let (_, plain_rows) = read_preds(&from_plain);
    assert_eq!(coded_rows.len(), 2);
    // Same tokens and probabilities; the ids differ by file name.
    let without_ids =
        |rows: &[Vec<String>]| rows.iter().map(|r| r[1..].to_vec()).collect::<Vec<_>>();
    assert_eq!(without_ids(&coded_rows), without_ids(&plain_rows));

    let genome = write(tmp.path(), "genome.fa", ">chr1\nAACMGGTTAC\n");
    let bed = write(tmp.path(), "r.bed", "chr1\t1\t6\n");
    let out = tmp.path().join("regions.csv");
    let bed_arg = format!("{}=1", s(&bed));
    let mut args = vec!["prepare-bed", "--genome", s(&genome), "--bed", &bed_arg];
    args.extend(["--out", s(&out)]);
    assert_fails_with(&dnatune(&args), &["r.bed:1", "'M'", "--ambiguous-as-n"]);
    args.push("--ambiguous-as-n");
    assert_ok(&dnatune(&args));
    let csv = fs::read_to_string(&out).unwrap();
    assert_eq!(csv, "id,chrom,sequence,label\nchr1:1-6,chr1,ACNGG,1\n");
}

/// Sequences cut at --max-length are counted and the first named, on either strand, in predict
/// and eval; nothing is said when all fit.
#[test]
fn predict_and_eval_warn_about_sequences_cut_at_max_length() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let long = "ACGT".repeat(30);
    let text = format!("id,sequence,label\nshort,A,0\nlong1,{long},1\nlong2,G{long},1\n");
    let input = write(tmp.path(), "x.csv", &text);
    let preds = tmp.path().join("preds.csv");
    let warning = "warning: 2 of 3 input sequences are longer than max length 3 tokens";
    for strands in [&[][..], &["--average-strands"][..]] {
        let mut args = vec!["predict", "--model", s(&model), "--input", s(&input)];
        args.extend(["--out", s(&preds), "--max-length", "3"]);
        args.extend(strands);
        let out = dnatune(&args);
        assert_ok(&out);
        let err = stderr(&out);
        assert!(err.contains(warning) && err.contains("`long1`"), "{err}");
        args[0] = "eval";
        args[3] = "--data";
        args.drain(5..7);
        let out = dnatune(&args);
        assert_ok(&out);
        assert!(stderr(&out).contains(warning), "{}", stderr(&out));
    }
    let mut args = vec!["predict", "--model", s(&model), "--input", s(&input)];
    args.extend(["--out", s(&preds), "--max-length", "512"]);
    let out = dnatune(&args);
    assert_ok(&out);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

/// A 6-mer model sees no base of a sequence shorter than 6 bp: predict counts such sequences
/// and names the first; a sequence of exactly 6 bp gives a token and no warning.
#[test]
fn predict_warns_about_sequences_too_short_for_a_kmer_tokenizer() {
    let tmp = TempDir::new().unwrap();
    let model = init_tiny(
        &tmp.path().join("kmer6"),
        &["--arch", "bert", "--kmer", "6"],
    );
    let preds = tmp.path().join("preds.csv");
    let predict_text = |text: &str| {
        let input = write(tmp.path(), "x.csv", text);
        let out = predict(&model, &input, &preds, &[]);
        assert_ok(&out);
        stderr(&out)
    };
    let err = predict_text("id,sequence\nfine,ACGTACGTAC\ntiny,ACGTA\nmer,ACGTAC\nbase,G\n");
    assert!(
        err.contains("warning: 2 of 4 input sequences are too short")
            && err.contains("`tiny`, 5 bp"),
        "{err}"
    );
    assert_eq!(read_csv(&preds).len(), 4);
    let err = predict_text("id,sequence\nfine,ACGTACGTAC\nmer,ACGTAC\n");
    assert!(!err.contains("too short"), "{err}");
}

/// The rows of a CSV file below its header, as strings.
fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    rdr.records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

/// `train --folds 3` on one file: every record is tested in exactly one fold, by that fold's
/// run; cv_predictions.csv pools the folds' test predictions, and folds_summary.json's pooled
/// MCC and AUROC (and the report's) equal those recomputed by hand from it. A second
/// invocation reuses the runs.
#[test]
fn cross_validation_tests_every_record_once_and_pools_the_folds() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 90, &["dev"]).join("dev.csv");
    let run = tmp.path().join("cv");
    let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
    args.extend(["--out", s(&run), "--folds", "3", "--method", "full"]);
    args.extend([
        "--max-steps",
        "12",
        "--eval-every",
        "4",
        "--batch-size",
        "16",
    ]);
    args.extend(["--lr", "3e-3"]);
    let first = dnatune(&args);
    assert_ok(&first);

    // cv_predictions.csv: fold, id, length, label, prediction, prob_0, prob_1.
    let pooled = read_csv(&run.join("cv_predictions.csv"));
    let input_ids: std::collections::BTreeSet<String> =
        (2..=91).map(|i| format!("dev:{i}")).collect();
    let pooled_ids: Vec<&String> = pooled.iter().map(|r| &r[1]).collect();
    assert_eq!(pooled_ids.len(), 90);
    assert_eq!(
        pooled_ids
            .iter()
            .map(|s| s.to_string())
            .collect::<std::collections::BTreeSet<_>>(),
        input_ids,
        "each record exactly once"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("folds_summary.json")).unwrap()).unwrap();
    for fold in 1..=3 {
        let dir = run.join(format!("fold-{fold}"));
        let own: Vec<Vec<String>> = pooled
            .iter()
            .filter(|r| r[0] == fold.to_string())
            .map(|r| r[1..].to_vec())
            .collect();
        assert_eq!(
            own,
            read_csv(&dir.join("test_predictions.csv")),
            "fold {fold}"
        );
        // The run's own split file holds those records as test, and none of them elsewhere.
        let split = read_csv(&dir.join("split.csv"));
        let tested: Vec<&String> = split
            .iter()
            .filter(|r| r[3] == "test")
            .map(|r| &r[0])
            .collect();
        assert_eq!(tested, own.iter().map(|r| &r[0]).collect::<Vec<_>>());
        let metrics: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
        let mcc = &summary["test"][0];
        assert_eq!(mcc["metric"], "mcc");
        assert_eq!(mcc["values"][fold - 1], metrics["test"]["mcc"]);
    }
    // MCC from the confusion counts and AUROC as the fraction of (positive, negative) pairs
    // ranked right (ties half), from the pooled file.
    let label = |r: &Vec<String>| r[3] == "1";
    let called = |r: &Vec<String>| r[4] == "1";
    let count = |l: bool, c: bool| {
        pooled
            .iter()
            .filter(|r| label(r) == l && called(r) == c)
            .count() as f64
    };
    let (tp, tn, fp, fne) = (
        count(true, true),
        count(false, false),
        count(false, true),
        count(true, false),
    );
    let denominator = ((tp + fp) * (tp + fne) * (tn + fp) * (tn + fne)).sqrt();
    assert!(
        tp + fp > 0.0 && tn + fne > 0.0,
        "both calls made, so the MCC check can fail"
    );
    let mcc = if denominator == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fne) / denominator
    };
    let score = |r: &Vec<String>| r[6].parse::<f64>().unwrap();
    let (pos, neg): (Vec<_>, Vec<_>) = pooled.iter().partition(|r| label(r));
    let mut right = 0.0;
    for p in &pos {
        for n in &neg {
            right += match score(p).partial_cmp(&score(n)).unwrap() {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
        }
    }
    let auroc = right / (pos.len() * neg.len()) as f64;
    let got = &summary["pooled"];
    assert!(
        (got["mcc"].as_f64().unwrap() - mcc).abs() < 1e-9,
        "{got} vs {mcc}"
    );
    assert!(
        (got["auroc"].as_f64().unwrap() - auroc).abs() < 1e-9,
        "{got} vs {auroc}"
    );
    assert_eq!(got["n"], 90);
    // The pooled AUROC's bootstrap interval holds it and is narrower than [0, 1].
    let interval = &summary["pooled_intervals"]["auroc"];
    let (low, high) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
    assert!(
        low < auroc && auroc < high && high - low < 0.5,
        "{interval}"
    );
    let report = fs::read_to_string(run.join("cv_report.html")).unwrap();
    assert_eq!(report.matches("<tr><td>fold ").count(), 3);
    assert!(
        report.contains(&format!("ROC (AUROC {auroc:.3})")),
        "pooled ROC"
    );

    let again = dnatune(&args);
    assert_ok(&again);
    let text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(
        text.matches("reusing the finished run").count(),
        3,
        "{text}"
    );

    // A GUE directory has fixed splits; one fold is no cross-validation; seeds do not combine.
    let gue = small_gue(tmp.path(), 8, &["train", "dev", "test"]);
    let other = tmp.path().join("cv-gue");
    let mut bad = vec!["train", "--model", s(&model), "--data", s(&gue)];
    bad.extend(["--out", s(&other), "--folds", "3"]);
    assert_fails_with(&dnatune(&bad), &["cross-validation splits one file"]);
    bad[4] = s(&data);
    bad[8] = "1";
    assert_fails_with(&dnatune(&bad), &["at least 2 folds"]);
    bad[8] = "3";
    bad.extend(["--seeds", "1,2"]);
    assert_eq!(dnatune(&bad).status.code(), Some(2), "a usage error");
}

/// Rewrites `model.safetensors` in `dir` with `name` stored as `[rows, cols / 2]` (truncated data).
fn halve_last_dim(dir: &Path, name: &str) {
    use safetensors::tensor::{serialize, SafeTensors, TensorView};
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut found = false;
    let tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            if n != name {
                return (n, view);
            }
            found = true;
            let shape = view.shape().to_vec();
            assert_eq!(shape.len(), 2, "{name} should be a matrix");
            let new_shape = vec![shape[0], shape[1] / 2];
            let keep = new_shape.iter().product::<usize>() * view.dtype().bitsize() / 8;
            let data = &view.data()[..keep];
            (n, TensorView::new(view.dtype(), new_shape, data).unwrap())
        })
        .collect();
    assert!(found, "{name} not in the tiny model");
    let out = serialize(tensors, None).unwrap();
    fs::write(&path, out).unwrap();
}

#[test]
fn predict_names_a_mis_shaped_tensor() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let name = "bert.encoder.layer.0.attention.output.dense.weight";
    halve_last_dim(&model, name);
    let input = write(tmp.path(), "in.csv", "sequence\nACGTACGTAC\n");
    let preds = tmp.path().join("preds.csv");
    let out = predict(&model, &input, &preds, &[]);
    assert_fails_with(&out, &[name, "[32, 16]", "[32, 32]"]);
}

#[test]
fn train_names_a_missing_dev_file() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 8, &["train", "test"]);
    let run = tmp.path().join("run");
    let out = train(&model, &data, &run, &["--max-steps", "1"]);
    assert_fails_with(&out, &["dev.csv", s(&data)]);
}

#[test]
fn train_rejects_an_unknown_metric() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 8, &["train", "dev", "test"]);
    let run = tmp.path().join("run");
    let out = train(
        &model,
        &data,
        &run,
        &["--max-steps", "1", "--metric", "bogus"],
    );
    assert_fails_with(&out, &["metric", "bogus", "mcc"]);
}

/// A learning rate far too large makes the loss NaN within a step or two; the run stops there
/// with an error instead of finishing with NaN weights and metrics. A negative one is refused
/// before anything runs.
#[test]
fn train_stops_when_the_loss_diverges_and_refuses_a_negative_learning_rate() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 16, &["train", "dev", "test"]);
    let run = tmp.path().join("run");
    let train_at = |lr: &str| {
        let lr = format!("--lr={lr}");
        train(
            &model,
            &data,
            &run,
            &["--max-steps", "8", "--batch-size", "4", &lr],
        )
    };
    let out = train_at("1e30");
    assert_fails_with(&out, &["diverged at step", "learning rate"]);
    assert!(!run.join("metrics.json").exists());
    // One step: the weights it leaves give NaN probabilities on dev, which must not be kept
    // as the best checkpoint or scored.
    let one_step = tmp.path().join("one-step");
    let out = train(&model, &data, &one_step, &["--max-steps", "1", "--lr=1e30"]);
    assert_fails_with(&out, &["evaluating on dev after step 1", "NaN or infinite"]);
    assert!(!one_step.join("metrics.json").exists());
    let out = train_at("-1e-4");
    assert_fails_with(&out, &["lr must be a positive number", "-0.0001"]);
}

/// Labels 0 and 2 make three classes, one never trained: the run says so instead of silently
/// fitting a 3-class head; labels 0 and 1 give no such warning.
#[test]
fn train_warns_about_a_class_no_training_sequence_has() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 16, &["train", "dev", "test"]);
    let out = train(
        &model,
        &data,
        &tmp.path().join("run01"),
        &["--max-steps", "1"],
    );
    assert_ok(&out);
    assert!(
        !stderr(&out).contains("no training sequence"),
        "{}",
        stderr(&out)
    );
    for split in ["train", "dev", "test"] {
        let path = data.join(format!("{split}.csv"));
        let text = fs::read_to_string(&path).unwrap().replace(",1\n", ",2\n");
        fs::write(&path, text).unwrap();
    }
    let out = train(
        &model,
        &data,
        &tmp.path().join("run02"),
        &["--max-steps", "1"],
    );
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("no training sequence has label 1;"), "{err}");
    assert!(err.contains("3 classes (0..=2)"), "{err}");
}

/// Parses preds.csv (no quoted fields in these tests) into a header and rows.
fn read_preds(path: &Path) -> (String, Vec<Vec<String>>) {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().expect("preds.csv has a header").to_string();
    let rows = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (header, rows)
}

#[test]
fn predict_writes_one_row_per_input_with_normalised_probabilities() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let seqs = ["ACGTAC", "GGGGTTTTAAAACC", "ACGTNNACGT", "TTGACA"];
    let mut csv = String::from("id,sequence\n");
    for (i, q) in seqs.iter().enumerate() {
        csv.push_str(&format!("r{i},{q}\n"));
    }
    let fasta = ">first some description\nACGTACGTAA\nCCGG\n>second\nTTTT\n";
    let cases = [
        (
            write(tmp.path(), "in.csv", &csv),
            (0..seqs.len())
                .map(|i| (format!("r{i}"), seqs[i].len()))
                .collect::<Vec<_>>(),
        ),
        (
            write(tmp.path(), "in.fa", fasta),
            vec![("first".to_string(), 14), ("second".to_string(), 4)],
        ),
    ];
    for (input, expected) in cases {
        let preds = tmp.path().join("preds.csv");
        let out = predict(&model, &input, &preds, &[]);
        assert_ok(&out);
        let (header, rows) = read_preds(&preds);
        assert_eq!(header, "id,length,prediction,prob_0,prob_1");
        assert_eq!(rows.len(), expected.len(), "one row per input record");
        for (row, (id, len)) in rows.iter().zip(&expected) {
            assert_eq!(row.len(), 5, "{row:?}");
            assert_eq!(&row[0], id, "rows keep the input order");
            assert_eq!(row[1].parse::<usize>().unwrap(), *len);
            let p: Vec<f64> = row[3..].iter().map(|v| v.parse().unwrap()).collect();
            assert!(p.iter().all(|v| (0.0..=1.0).contains(v)), "{row:?}");
            assert!(
                (p[0] + p[1] - 1.0).abs() < 1e-4,
                "probabilities sum to 1: {row:?}"
            );
            let argmax = if p[1] > p[0] { 1 } else { 0 };
            assert_eq!(row[2].parse::<usize>().unwrap(), argmax, "{row:?}");
        }
    }
}

#[test]
fn init_model_bert_kmer_writes_vocab_and_bert_config() {
    let tmp = TempDir::new().unwrap();
    let out = init_tiny(&tmp.path().join("k3"), &["--arch", "bert", "--kmer", "3"]);
    let vocab = fs::read_to_string(out.join("vocab.txt")).unwrap();
    let tokens: Vec<&str> = vocab.lines().collect();
    // 4^3 k-mers plus [PAD], [UNK], [CLS], [SEP], [MASK].
    assert_eq!(tokens.len(), 69);
    for special in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] {
        assert!(tokens.contains(&special), "vocab.txt lacks {special}");
    }
    let kmers: std::collections::BTreeSet<&str> = tokens
        .iter()
        .copied()
        .filter(|t| t.len() == 3 && t.bytes().all(|b| b"ACGT".contains(&b)))
        .collect();
    assert_eq!(kmers.len(), 64, "every 3-mer appears once");
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["vocab_size"], 69);
}

#[test]
fn init_model_nt_writes_an_esm_config_whose_token_ids_match_its_vocabulary() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("nt");
    assert_ok(&dnatune(&[
        "init-model",
        "--arch",
        "nt",
        "--kmer",
        "4",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--intermediate",
        "48",
        "--out",
        s(&out),
    ]));
    let vocab = fs::read_to_string(out.join("vocab.txt")).unwrap();
    let tokens: Vec<&str> = vocab.lines().collect();
    // The NT layout: six specials, the 256 4-mers, then A T C G N for tails.
    assert_eq!(tokens.len(), 6 + 256 + 5);
    assert_eq!(
        &tokens[..6],
        ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    );
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "esm");
    assert_eq!(config["position_embedding_type"], "rotary");
    assert_eq!(config["add_bias_fnn"], false);
    let id = |field: &str| config[field].as_u64().unwrap() as usize;
    assert_eq!(tokens[id("pad_token_id")], "<pad>");
    assert_eq!(tokens[id("mask_token_id")], "<mask>");
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // SwiGLU: one bias-free projection to twice the intermediate width.
    let gate = &weights["esm.encoder.layer.0.intermediate.dense.weight"];
    assert_eq!(gate.dims(), &[96, 32]);
    assert!(!weights.contains_key("esm.encoder.layer.0.intermediate.dense.bias"));
    // `inspect` says which ESM layout the config selects.
    let out = dnatune(&["inspect", s(&out)]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("layout     rotary positions (theta 10000), SwiGLU without biases"),
        "{text}"
    );
}

#[test]
fn init_model_dnabert2_writes_alibi_config_without_model_type() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert!(config.get("model_type").is_none(), "{config}");
    assert!(config.get("alibi_starting_size").is_some(), "{config}");
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["hidden_size"], 32);
    assert!(model.join("tokenizer.json").is_file());
    assert!(model.join("model.safetensors").is_file());
}

#[test]
fn predict_and_eval_reject_a_zero_batch_size() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "in.csv", "sequence,label\nACGTAC,1\nGGCC,0\n");
    let preds = tmp.path().join("preds.csv");
    let m = s(&model);
    let i = s(&input);
    let out = dnatune(&[
        "predict",
        "--model",
        m,
        "--input",
        i,
        "--out",
        s(&preds),
        "--batch-size",
        "0",
    ]);
    assert_fails_with(&out, &["batch"]);
    let out = dnatune(&["eval", "--model", m, "--data", i, "--batch-size", "0"]);
    assert_fails_with(&out, &["batch"]);
}

#[test]
fn predict_rejects_a_zero_max_length() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(tmp.path(), "in.csv", "sequence\nACGTAC\n");
    let preds = tmp.path().join("preds.csv");
    let out = predict(&model, &input, &preds, &["--max-length", "0"]);
    assert_fails_with(&out, &["length"]);
}

#[test]
fn bench_rejects_zero_sizes() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let m = s(&model);
    for (flags, word) in [
        (["--batch-size", "0", "--steps", "1"], "batch"),
        (["--seq-len", "0", "--steps", "1"], "seq"),
        (["--steps", "0", "--batch-size", "2"], "steps"),
    ] {
        let mut args = vec!["bench", "--model", m, "--warmup", "0"];
        args.extend(flags);
        let out = dnatune(&args);
        assert_fails_with(&out, &[word]);
    }
}

#[test]
fn prepare_bed_cuts_labelled_regions_with_their_chromosomes() {
    let tmp = TempDir::new().unwrap();
    let genome = write(
        tmp.path(),
        "genome.fa",
        ">chr1\nAACCGGTTAC\n>chr2 second\nGGGGCCCCAT\n",
    );
    let peaks = write(
        tmp.path(),
        "peaks.bed",
        "chr1\t2\t6\tp1\t0\t+\nchr2\t4\t8\tp2\t0\t-\n",
    );
    let background = write(tmp.path(), "bg.bed", "track name=bg\nchr1\t0\t3\n");
    let out = tmp.path().join("regions.csv");
    let peaks_arg = format!("{}=1", s(&peaks));
    let bg_arg = format!("{}=0", s(&background));
    let run = dnatune(&[
        "prepare-bed",
        "--genome",
        s(&genome),
        "--bed",
        &peaks_arg,
        "--bed",
        &bg_arg,
        "--out",
        s(&out),
    ]);
    assert_ok(&run);
    let csv = std::fs::read_to_string(&out).unwrap();
    // chr1[2..6) = CCGG; chr2[4..8) = CCCC, minus strand -> GGGG; chr1[0..3) = AAC.
    assert_eq!(
        csv,
        "id,chrom,sequence,label\np1,chr1,CCGG,1\np2,chr2,GGGG,1\nchr1:0-3,chr1,AAC,0\n"
    );
    let bad = dnatune(&[
        "prepare-bed",
        "--genome",
        s(&genome),
        "--bed",
        s(&peaks),
        "--out",
        s(&out),
    ]);
    // A usage error: clap's exit status 2, with the expected form named.
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("PATH=LABEL"), "{}", stderr(&bad));
    let beyond = write(tmp.path(), "beyond.bed", "chr2\t5\t50\n");
    let beyond_arg = format!("{}=1", s(&beyond));
    let out_of_range = dnatune(&[
        "prepare-bed",
        "--genome",
        s(&genome),
        "--bed",
        &beyond_arg,
        "--out",
        s(&out),
    ]);
    assert_fails_with(&out_of_range, &["beyond.bed:1"]);
}

#[test]
fn precision_bf16_reaches_predict_bench_and_full_fine_tuning_and_is_refused_with_a_quantized_base()
{
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let m = s(&model);
    let input = write(tmp.path(), "in.csv", "sequence\nACGTACGGTA\nTTGACAGG\n");
    let mut probs = Vec::new();
    for precision in ["f32", "bf16"] {
        let preds = tmp.path().join(format!("preds-{precision}.csv"));
        let out = dnatune(&[
            "predict",
            "--model",
            m,
            "--input",
            s(&input),
            "--out",
            s(&preds),
            "--precision",
            precision,
        ]);
        assert_ok(&out);
        let (_, rows) = read_preds(&preds);
        probs.push(
            rows.iter()
                .map(|r| r[3].parse::<f64>().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    // bf16 rounds weights and activations by at most 2^-8 relative: probabilities move a little.
    for (a, b) in probs[0].iter().zip(&probs[1]) {
        assert!((a - b).abs() < 1e-2, "{probs:?}");
    }
    let both = dnatune(&[
        "predict",
        "--model",
        m,
        "--input",
        s(&input),
        "--out",
        "x.csv",
        "--precision",
        "bf16",
        "--quantize",
        "nf4",
    ]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    let small = [
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
    ];
    for infer in [false, true] {
        let mut args = vec!["bench", "--model", m, "--json", "--precision", "bf16"];
        args.extend(small);
        if infer {
            args.push("--infer");
        }
        let out = dnatune(&args);
        assert_ok(&out);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["precision"], "bf16", "{json}");
    }
    let mut args = vec![
        "bench",
        "--model",
        m,
        "--json",
        "--method",
        "full",
        "--precision",
        "bf16",
    ];
    args.extend(small);
    let out = dnatune(&args);
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&json["precision"], &json["method"]),
        (&"bf16".into(), &"full".into()),
        "{json}"
    );
    let data = small_gue(tmp.path(), 20, &["train", "dev", "test"]);
    let run = tmp.path().join("run");
    let out = dnatune(&[
        "train",
        "--model",
        m,
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--method",
        "qlora-nf4",
        "--precision",
        "bf16",
    ]);
    assert_fails_with(&out, &["bf16", "quantized"]);
}

/// `compare` pairs two prediction files by id (rows in any order; a run directory stands for
/// its test_predictions.csv): B - A per metric, with the accuracy difference as counted by
/// hand; predictions of other sequences or without labels are errors naming the file.
#[test]
fn compare_pairs_predictions_by_id_and_refuses_mismatches() {
    let tmp = TempDir::new().unwrap();
    let header = "id,length,label,prediction,prob_0,prob_1\n";
    // A is right on s0-s5 (6 of 8), B on s0-s6 (7 of 8); B's rows are in another order.
    let a_rows = [
        ("s0", 0, 0.2),
        ("s1", 1, 0.9),
        ("s2", 0, 0.4),
        ("s3", 1, 0.6),
        ("s4", 0, 0.3),
        ("s5", 1, 0.7),
        ("s6", 0, 0.8),
        ("s7", 1, 0.1),
    ];
    let b_p1 = [0.1, 0.8, 0.3, 0.9, 0.2, 0.6, 0.4, 0.45];
    let row = |(id, label, p): (&str, u8, f64)| {
        format!(
            "{id},10,{label},{},{:.2},{p:.2}\n",
            u8::from(p > 0.5),
            1.0 - p
        )
    };
    let a_text: String = a_rows.iter().map(|&r| row(r)).collect();
    let b_text: String = a_rows
        .iter()
        .zip(b_p1)
        .rev()
        .map(|(&(id, label, _), p)| row((id, label, p)))
        .collect();
    let a = write(tmp.path(), "a.csv", &format!("{header}{a_text}"));
    let run = tmp.path().join("run-b");
    fs::create_dir(&run).unwrap();
    write(&run, "test_predictions.csv", &format!("{header}{b_text}"));
    let out = dnatune(&["compare", s(&a), s(&run), "--json", "--resamples", "500"]);
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["n"], 8);
    let accuracy = json["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "accuracy")
        .unwrap();
    let (a_acc, b_acc) = (6.0 / 8.0, 7.0 / 8.0);
    assert!(
        (accuracy["a"].as_f64().unwrap() - a_acc).abs() < 1e-12,
        "{accuracy}"
    );
    assert!((accuracy["difference"].as_f64().unwrap() - (b_acc - a_acc)).abs() < 1e-12);
    let (low, high) = (
        accuracy["low"].as_f64().unwrap(),
        accuracy["high"].as_f64().unwrap(),
    );
    assert!(
        low <= 0.0 && high > 0.0,
        "one sequence of eight proves nothing: {accuracy}"
    );
    let text = dnatune(&["compare", s(&a), s(&run)]);
    assert_ok(&text);
    assert!(String::from_utf8_lossy(&text.stdout).contains("paired bootstrap over the 8 sequences"));

    let fewer = write(
        tmp.path(),
        "fewer.csv",
        &format!(
            "{header}{}",
            a_rows[..7].iter().map(|&r| row(r)).collect::<String>()
        ),
    );
    let out = dnatune(&["compare", s(&fewer), s(&a)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a.csv holds 8 sequences"),
        "{}",
        stderr(&out)
    );
    let unlabelled = write(
        tmp.path(),
        "preds.csv",
        "id,length,prediction,prob_0,prob_1\ns0,10,0,0.8,0.2\n",
    );
    let out = dnatune(&["compare", s(&a), s(&unlabelled)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("preds.csv: needs `id` and `label` columns"),
        "{}",
        stderr(&out)
    );
    let out = dnatune(&["compare", s(&a), s(tmp.path())]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("neither cv_predictions.csv nor test_predictions.csv"),
        "{}",
        stderr(&out)
    );
}

/// `eval --out` writes labelled predictions: predict's probabilities plus the labels, which
/// `compare` reads (one model against itself: no difference).
#[test]
fn eval_writes_labelled_predictions_that_compare_reads() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let input = write(
        tmp.path(),
        "x.csv",
        "id,sequence,label\nq1,ACGTAGCTAGCT,0\nq2,GGGCCCATAT,1\nq3,TTTTACGA,1\n",
    );
    let (labelled, plain) = (tmp.path().join("eval.csv"), tmp.path().join("predict.csv"));
    let out = dnatune(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&input),
        "--out",
        s(&labelled),
    ]);
    assert_ok(&out);
    let out = predict(&model, &input, &plain, &[]);
    assert_ok(&out);
    let evaluated = read_csv(&labelled);
    let predicted = read_csv(&plain);
    assert_eq!(evaluated.len(), 3);
    for (e, p) in evaluated.iter().zip(&predicted) {
        // id, length, label, prediction, probabilities against id, length, prediction, probabilities.
        assert_eq!((&e[0], &e[1]), (&p[0], &p[1]));
        assert_eq!(e[3..], p[2..]);
    }
    let labels: Vec<&str> = evaluated.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(labels, ["0", "1", "1"]);
    let out = dnatune(&["compare", s(&labelled), s(&labelled), "--json"]);
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for metric in json["metrics"].as_array().unwrap() {
        assert_eq!(metric["difference"], 0.0, "{metric}");
        assert_eq!(metric["p_value"], 1.0, "{metric}");
    }
}

/// The probability columns of a predictions file (the last `classes` fields of each row).
fn probabilities(path: &Path, classes: usize) -> Vec<f64> {
    read_csv(path)
        .iter()
        .flat_map(|r| r[r.len() - classes..].iter().map(|v| v.parse().unwrap()))
        .collect()
}

fn max_abs_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn a_head_trained_on_mean_pooling_is_scored_with_it_without_being_told() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 48, &["train", "dev", "test"]);
    let test = data.join("test.csv");
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
    args.extend(["--out", s(&run), "--method", "lora", "--pooling", "mean"]);
    args.extend([
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "16",
    ]);
    args.extend(["--lr", "1e-2"]);
    assert_ok(&dnatune(&args));
    let best = run.join("best");
    let trained = probabilities(&run.join("test_predictions.csv"), 2);

    let predict = |extra: &[&str], out: &Path| {
        let mut args = vec!["predict", "--model", s(&model), "--adapter", s(&best)];
        args.extend(["--input", s(&test), "--out", s(out)]);
        args.extend(extra);
        dnatune(&args)
    };
    let preds = tmp.path().join("preds.csv");
    assert_ok(&predict(&[], &preds));
    let diff = max_abs_difference(&probabilities(&preds, 2), &trained);
    assert!(
        diff < 1e-5,
        "predict repeats the run's test probabilities: {diff}"
    );
    assert_fails_with(
        &predict(&["--pooling", "cls"], &preds),
        &["dnatune.json", "trained on mean pooling", "--pooling cls"],
    );

    // The merged model carries the record, and scores as base + adapter.
    let merged = tmp.path().join("merged");
    let mut args = vec!["merge", "--model", s(&model), "--adapter", s(&best)];
    args.extend(["--out", s(&merged)]);
    assert_ok(&dnatune(&args));
    let merged_preds = tmp.path().join("merged.csv");
    let mut args = vec!["predict", "--model", s(&merged), "--input", s(&test)];
    args.extend(["--out", s(&merged_preds)]);
    assert_ok(&dnatune(&args));
    let diff = max_abs_difference(&probabilities(&merged_preds, 2), &trained);
    assert!(diff < 1e-4, "merged model scores as trained: {diff}");

    // Without the record the same adapter is scored on [CLS]: other probabilities, which is
    // what the record prevents.
    fs::remove_file(best.join("dnatune.json")).unwrap();
    assert_ok(&predict(&[], &preds));
    let diff = max_abs_difference(&probabilities(&preds, 2), &trained);
    assert!(
        diff > 1e-3,
        "cls pooling should change the probabilities: {diff}"
    );
}

#[test]
fn train_reports_shared_kmers_and_the_similarity_split_keeps_copies_together() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    // 80 GUE sequences, then the reverse complements of the first 30 under ids copy-0 ...
    let text = fs::read_to_string(repo_file("data/gue-tf0/train.csv")).unwrap();
    let rows: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .take(80)
        .map(|l| {
            let (seq, label) = l.split_once(',').unwrap();
            (seq.to_string(), label.to_string())
        })
        .collect();
    let mut csv = String::from("id,sequence,label\n");
    for (i, (seq, label)) in rows.iter().enumerate() {
        csv.push_str(&format!("seq-{i},{seq},{label}\n"));
    }
    for (i, (seq, label)) in rows.iter().take(30).enumerate() {
        csv.push_str(&format!(
            "copy-{i},{},{label}\n",
            dnatune::data::reverse_complement(seq)
        ));
    }
    let data = write(tmp.path(), "with-copies.csv", &csv);
    let train = |split: &str, run: &Path| {
        let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
        args.extend(["--out", s(run), "--split", split]);
        args.extend(["--max-steps", "2", "--batch-size", "16"]);
        let out = dnatune(&args);
        assert_ok(&out);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let metrics: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
        let split_of: HashMap<String, String> = read_csv(&run.join("split.csv"))
            .into_iter()
            .map(|r| (r[0].clone(), r[3].clone()))
            .collect();
        (stdout, metrics["overlap"].clone(), split_of)
    };
    // Copies split between training and dev or test (by the stratified default) are counted
    // and the fix suggested.
    let (stdout, overlap, split_of) = train("stratified", &tmp.path().join("stratified"));
    let apart = |split_of: &HashMap<String, String>, held_out: &str| {
        (0..30)
            .filter(|i| {
                let (a, b) = (
                    &split_of[&format!("seq-{i}")],
                    &split_of[&format!("copy-{i}")],
                );
                (a == held_out && b == "train") || (b == held_out && a == "train")
            })
            .count()
    };
    let (dev_apart, test_apart) = (apart(&split_of, "dev"), apart(&split_of, "test"));
    assert!(dev_apart + test_apart > 0, "{split_of:?}");
    // A held-out sequence may also share a 31-mer with an unrelated training one, so the
    // counts are at least the copies split apart.
    let dev_sharing = overlap["dev_sharing"].as_u64().unwrap() as usize;
    let test_sharing = overlap["test_sharing"].as_u64().unwrap() as usize;
    assert!(
        dev_sharing >= dev_apart && test_sharing >= test_apart,
        "{overlap}"
    );
    let line = format!(
        "overlap: {dev_sharing} of {} dev and {test_sharing} of {} test sequences share a 31-mer",
        overlap["dev"], overlap["test"]
    );
    assert!(stdout.contains(&line), "{stdout}");
    assert!(stdout.contains("--split similarity keeps"), "{stdout}");

    let (stdout, overlap, split_of) = train("similarity", &tmp.path().join("similarity"));
    assert_eq!((apart(&split_of, "dev"), apart(&split_of, "test")), (0, 0));
    assert_eq!(
        (&overlap["dev_sharing"], &overlap["test_sharing"]),
        (&0.into(), &0.into())
    );
    assert!(
        stdout.contains("overlap: 0 of 11 dev and 0 of 11 test"),
        "{stdout}"
    );
}

#[test]
fn a_qlora_run_is_scored_at_its_own_length_and_quantization_without_being_told() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 48, &["train", "dev", "test"]);
    let test = data.join("test.csv");
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
    args.extend([
        "--out",
        s(&run),
        "--method",
        "qlora-nf4",
        "--pooling",
        "mean",
    ]);
    // 12 tokens cut every 101-bp GUE sequence (about 25 BPE tokens).
    args.extend(["--max-length", "12", "--average-strands"]);
    args.extend(["--max-steps", "12", "--eval-every", "6"]);
    args.extend(["--batch-size", "16", "--lr", "5e-2"]);
    assert_ok(&dnatune(&args));
    let best = run.join("best");
    let trained = probabilities(&run.join("test_predictions.csv"), 2);

    let predict = |extra: &[&str]| {
        let out_file = tmp.path().join("preds.csv");
        let mut args = vec!["predict", "--model", s(&model), "--adapter", s(&best)];
        args.extend(["--input", s(&test), "--out", s(&out_file)]);
        args.extend(extra);
        let out = dnatune(&args);
        assert_ok(&out);
        (probabilities(&out_file, 2), stderr(&out))
    };
    let (probs, err) = predict(&["--average-strands"]);
    let diff = max_abs_difference(&probs, &trained);
    assert!(
        diff < 1e-5,
        "predict repeats the run's test probabilities: {diff}"
    );
    assert!(
        err.contains("max length 12, nf4-quantized base") && !err.contains("note:"),
        "{err}"
    );
    // One strand is what the user asked for, but the note says the run scored both.
    let (_, err) = predict(&[]);
    assert!(err.contains("add --average-strands"), "{err}");
    // Explicit settings win, and they are what the record saves the user from.
    let (probs, _) = predict(&["--average-strands", "--max-length", "128"]);
    let diff = max_abs_difference(&probs, &trained);
    assert!(
        diff > 1e-3,
        "the full length should change the probabilities: {diff}"
    );
    let (probs, _) = predict(&["--average-strands", "--precision", "f32"]);
    let diff = max_abs_difference(&probs, &trained);
    // A tiny model's head is not very sensitive to its base, but the change is still many
    // times the files' rounding (5e-7).
    assert!(
        diff > 3e-5,
        "the f32 base should change the probabilities: {diff}"
    );

    // Merged into the f32 base, the model keeps the length and drops the quantization.
    let merged = tmp.path().join("merged");
    let mut args = vec!["merge", "--model", s(&model), "--adapter", s(&best)];
    args.extend(["--out", s(&merged)]);
    assert_ok(&dnatune(&args));
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(merged.join("dnatune.json")).unwrap()).unwrap();
    assert_eq!(record["max_length"], 12, "{record}");
    assert_eq!(record["quantize"], serde_json::Value::Null, "{record}");
    assert_eq!(record["average_strands"], true, "{record}");
}

#[test]
fn an_ensemble_scores_the_mean_of_its_members_probabilities() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(tmp.path());
    let data = small_gue(tmp.path(), 48, &["train", "dev", "test"]);
    let test = data.join("test.csv");
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
        args.extend(["--out", s(out), "--max-steps", "4", "--eval-every", "2"]);
        args.extend(["--batch-size", "16", "--lr", "1e-2"]);
        args.extend(extra);
        assert_ok(&dnatune(&args));
    };
    let (lora, full) = (tmp.path().join("lora"), tmp.path().join("full"));
    train(
        &lora,
        &["--method", "lora", "--seeds", "1,2", "--pooling", "mean"],
    );
    train(&full, &["--method", "full"]);
    let out = tmp.path().join("p.csv");
    let predict = |model: &Path, extra: &[&str]| {
        let mut args = vec!["predict", "--model", s(model), "--input", s(&test)];
        args.extend(["--out", s(&out)]);
        args.extend(extra);
        assert_ok(&dnatune(&args));
        probabilities(&out, 2)
    };
    let full_best = full.join("best");
    let members = [
        predict(&model, &["--adapter", s(&lora.join("seed-1/best"))]),
        predict(&model, &["--adapter", s(&lora.join("seed-2/best"))]),
        predict(&full_best, &[]),
    ];
    assert!(
        max_abs_difference(&members[0], &members[1]) > 1e-4,
        "seeds differ"
    );
    let ensemble = predict(&model, &["--ensemble", s(&lora), s(&full_best)]);
    let mean: Vec<f64> = (0..ensemble.len())
        .map(|i| members.iter().map(|m| m[i]).sum::<f64>() / 3.0)
        .collect();
    let diff = max_abs_difference(&ensemble, &mean);
    assert!(diff < 2e-6, "ensemble = mean of its members: {diff}");

    // eval scores the same mean, and writes it with the labels.
    let labelled = tmp.path().join("e.csv");
    let mut args = vec!["eval", "--model", s(&model), "--data", s(&test)];
    args.extend(["--ensemble", s(&lora), s(&full_best), "--out", s(&labelled)]);
    assert_ok(&dnatune(&args));
    assert_eq!(probabilities(&labelled, 2), ensemble);

    // A full model of another shape, an unfinished run and --adapter are refused.
    let other = tmp.path().join("other");
    let tokenizer = repo_file("assets/tokenizers/dna-bpe-4096/tokenizer.json");
    let mut args = vec!["init-model", "--arch", "dnabert2", "--layers", "2"];
    args.extend(["--hidden", "32", "--heads", "2", "--intermediate", "64"]);
    args.extend(["--tokenizer", s(&tokenizer), "--out", s(&other)]);
    assert_ok(&dnatune(&args));
    let mut args = vec!["predict", "--model", s(&model), "--input", s(&test)];
    args.extend(["--out", s(&out), "--ensemble", s(&other)]);
    assert_fails_with(&dnatune(&args), &["is not a fine-tune of"]);
    fs::create_dir_all(lora.join("seed-3")).unwrap();
    let mut args = vec!["predict", "--model", s(&model), "--input", s(&test)];
    args.extend(["--out", s(&out), "--ensemble", s(&lora)]);
    assert_fails_with(&dnatune(&args), &["seed-3 has no best checkpoint"]);
    let mut args = vec!["predict", "--model", s(&model), "--input", s(&test)];
    let seed_1 = lora.join("seed-1/best");
    args.extend(["--out", s(&out), "--ensemble", s(&full_best)]);
    args.extend(["--adapter", s(&seed_1)]);
    let refused = dnatune(&args);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("cannot be used with"));
}
