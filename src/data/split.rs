//! Train/dev/test splits: GUE directories as given, or one file split by a seeded strategy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::read::read_records;
use super::{
    chrom_from_id, similarity, validate_sequence, DataError, Dataset, Fold, ReadOptions, Record,
    SplitConfig, SplitSource, SplitStrategy, Splits,
};

const TRAIN: u8 = 0;
const DEV: u8 = 1;
const TEST: u8 = 2;
const NAMES: [&str; 3] = ["train", "dev", "test"];

fn config_error(message: impl Into<String>) -> DataError {
    DataError::new(Path::new(""), message)
}

/// Splits records by `cfg.strategy`; the same seed always gives the same split.
///
/// Records keep their input order inside each split. Fails when a split would be empty, when the
/// stratified split meets an unlabelled record, or the chromosome split a record without chromosome.
pub fn split_records(records: Vec<Record>, cfg: &SplitConfig) -> Result<Splits, DataError> {
    let held_out = match cfg.fold {
        Some(_) => vec![("dev", cfg.dev_fraction)],
        None => vec![("dev", cfg.dev_fraction), ("test", cfg.test_fraction)],
    };
    for &(name, f) in &held_out {
        if !(0.0..1.0).contains(&f) {
            return Err(config_error(format!(
                "{name} fraction must be in [0, 1), got {f}"
            )));
        }
    }
    if cfg.fold.is_none() && cfg.dev_fraction + cfg.test_fraction >= 1.0 {
        return Err(config_error(format!(
            "dev fraction {} + test fraction {} leaves nothing for training",
            cfg.dev_fraction, cfg.test_fraction
        )));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let assignment = match cfg.fold {
        Some(fold) => cross_validation(&records, cfg, fold, &mut rng)?,
        None => held_out_by_strategy(&records, cfg, &mut rng)?,
    };
    let mut parts: [Vec<Record>; 3] = Default::default();
    for (record, which) in records.into_iter().zip(&assignment) {
        parts[*which as usize].push(record);
    }
    if let Some(empty) = parts.iter().position(Vec::is_empty) {
        let n: usize = parts.iter().map(Vec::len).sum();
        let settings = match cfg.fold {
            Some(f) => format!(
                "fold {} of {}, dev fraction {}",
                f.index + 1,
                f.count,
                cfg.dev_fraction
            ),
            None => format!(
                "dev fraction {}, test fraction {}",
                cfg.dev_fraction, cfg.test_fraction
            ),
        };
        return Err(config_error(format!(
            "the {} split would be empty ({n} records, {:?} strategy, {settings}); use more \
             data, larger fractions or fewer folds",
            NAMES[empty], cfg.strategy
        )));
    }
    let [train, dev, test] = parts;
    Ok(Splits { train, dev, test })
}

/// Train/dev/test marks of `records` by `cfg.strategy` and the fractions.
fn held_out_by_strategy(
    records: &[Record],
    cfg: &SplitConfig,
    rng: &mut StdRng,
) -> Result<Vec<u8>, DataError> {
    match cfg.strategy {
        SplitStrategy::Random => {
            let all: Vec<usize> = (0..records.len()).collect();
            let mut a = vec![TRAIN; records.len()];
            assign_shuffled(&all, cfg, false, rng, &mut a);
            Ok(a)
        }
        SplitStrategy::Stratified => stratified(records, cfg, rng),
        SplitStrategy::Chromosome => by_chromosome(records, cfg, rng),
        SplitStrategy::Similarity => by_similarity(records, cfg, rng),
    }
}

/// Marks for one cross-validation fold: its records are test, and dev is drawn from the others
/// by the same strategy (whole chromosomes, or per class), so the folds' test sets partition the
/// data and each fold's model is chosen without seeing its test set.
fn cross_validation(
    records: &[Record],
    cfg: &SplitConfig,
    fold: Fold,
    rng: &mut StdRng,
) -> Result<Vec<u8>, DataError> {
    if !cfg.dev_chroms.is_empty() || !cfg.test_chroms.is_empty() {
        return Err(config_error(
            "cross-validation chooses the held-out chromosomes itself; leave dev_chroms and \
             test_chroms empty",
        ));
    }
    if fold.index >= fold.count {
        return Err(config_error(format!(
            "fold {} does not exist among {} folds",
            fold.index + 1,
            fold.count
        )));
    }
    let folds = fold_of_each(records, cfg.strategy, fold.count, cfg.seed, cfg.kmer)?;
    let rest: Vec<usize> = (0..records.len())
        .filter(|&i| folds[i] != fold.index)
        .collect();
    let rest_records: Vec<Record> = rest.iter().map(|&i| records[i].clone()).collect();
    let dev_only = SplitConfig {
        test_fraction: 0.0,
        fold: None,
        ..cfg.clone()
    };
    let inner = held_out_by_strategy(&rest_records, &dev_only, rng)?;
    let mut assignment = vec![TEST; records.len()];
    for (&i, which) in rest.iter().zip(inner) {
        assignment[i] = which;
    }
    Ok(assignment)
}

/// The fold (0-based, below `count`) of each record in a seeded k-fold partition: shuffled
/// records dealt in turn (random), each class dealt in turn so every fold keeps the class
/// proportions (stratified), or whole chromosomes, largest first, to the fold holding fewest
/// records (chromosome).
fn fold_of_each(
    records: &[Record],
    strategy: SplitStrategy,
    count: usize,
    seed: u64,
    kmer: usize,
) -> Result<Vec<usize>, DataError> {
    if count < 2 {
        return Err(config_error(format!(
            "cross-validation needs at least 2 folds, got {count}"
        )));
    }
    if count > records.len() {
        return Err(config_error(format!(
            "{count} folds for {} records: a fold would be empty",
            records.len()
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut folds = vec![0; records.len()];
    match strategy {
        SplitStrategy::Random | SplitStrategy::Stratified => {
            let mut groups = match strategy {
                SplitStrategy::Random => BTreeMap::from([(0, (0..records.len()).collect())]),
                _ => indices_by_class(records)?,
            };
            // Dealing continues across classes, so fold sizes differ by at most one.
            let mut next = 0;
            for members in groups.values_mut() {
                members.shuffle(&mut rng);
                for &i in members.iter() {
                    folds[i] = next % count;
                    next += 1;
                }
            }
        }
        SplitStrategy::Chromosome => {
            let sizes = records_per_chromosome(records)?;
            if sizes.len() < count {
                return Err(config_error(format!(
                    "{} chromosomes cannot fill {count} folds; use fewer folds",
                    sizes.len()
                )));
            }
            let fold_of = deal_groups(sizes, count, &mut rng);
            for (f, r) in folds.iter_mut().zip(records) {
                *f = fold_of[r.chrom.as_deref().expect("checked above")];
            }
        }
        SplitStrategy::Similarity => {
            let groups = similarity::similarity_groups(records, check_kmer(kmer)?);
            let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
            for &g in &groups {
                *sizes.entry(g).or_default() += 1;
            }
            if sizes.len() < count {
                return Err(config_error(format!(
                    "the records form {} groups of shared {kmer}-mers, too few for {count} folds",
                    sizes.len()
                )));
            }
            let fold_of = deal_groups(sizes, count, &mut rng);
            for (f, g) in folds.iter_mut().zip(&groups) {
                *f = fold_of[g];
            }
        }
    }
    Ok(folds)
}

/// The fold of each group (of the given sizes) that must stay whole: in a seeded order among
/// groups of equal size, largest first, each to the fold holding fewest records.
fn deal_groups<K: Ord + Copy>(
    sizes: BTreeMap<K, usize>,
    count: usize,
    rng: &mut StdRng,
) -> BTreeMap<K, usize> {
    let mut order: Vec<(K, usize)> = sizes.into_iter().collect();
    order.shuffle(rng);
    order.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let mut load = vec![0usize; count];
    let mut fold_of = BTreeMap::new();
    for (group, n) in order {
        let lightest = (0..count).min_by_key(|&f| load[f]).expect("count >= 2");
        load[lightest] += n;
        fold_of.insert(group, lightest);
    }
    fold_of
}

/// `kmer` if it is a k-mer length the similarity strategy can use.
fn check_kmer(kmer: usize) -> Result<usize, DataError> {
    if !(similarity::MIN_KMER..=similarity::MAX_KMER).contains(&kmer) {
        return Err(config_error(format!(
            "the similarity split's k-mer length must be {} to {}, got {kmer}",
            similarity::MIN_KMER,
            similarity::MAX_KMER
        )));
    }
    Ok(kmer)
}

/// Held-out groups of records sharing k-mers: groups in a seeded order go whole to test, then
/// dev, while they fit the split's share of the records; the rest (the large families among them)
/// train.
fn by_similarity(
    records: &[Record],
    cfg: &SplitConfig,
    rng: &mut StdRng,
) -> Result<Vec<u8>, DataError> {
    let groups = similarity::similarity_groups(records, check_kmer(cfg.kmer)?);
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    let mut order: Vec<Vec<usize>> = members.into_values().collect();
    order.shuffle(rng);
    let n = records.len() as f64;
    let mut room = [
        (TEST, (n * cfg.test_fraction).round() as usize),
        (DEV, (n * cfg.dev_fraction).round() as usize),
    ];
    let mut assignment = vec![TRAIN; records.len()];
    for group in order {
        if let Some((split, left)) = room.iter_mut().find(|(_, left)| group.len() <= *left) {
            *left -= group.len();
            for i in group {
                assignment[i] = *split;
            }
        }
    }
    Ok(assignment)
}

/// Shuffles `indices` and marks the first ones test, the next dev. With `at_least_one`, groups of
/// three or more give each split at least one record, so small classes still appear everywhere.
fn assign_shuffled(
    indices: &[usize],
    cfg: &SplitConfig,
    at_least_one: bool,
    rng: &mut StdRng,
    assignment: &mut [u8],
) {
    let n = indices.len();
    let mut order = indices.to_vec();
    order.shuffle(rng);
    let mut n_test = (n as f64 * cfg.test_fraction).round() as usize;
    let mut n_dev = (n as f64 * cfg.dev_fraction).round() as usize;
    if at_least_one && n >= 3 {
        // Only a split that is asked for at all: cross-validation draws dev with no test.
        if cfg.test_fraction > 0.0 {
            n_test = n_test.max(1);
        }
        if cfg.dev_fraction > 0.0 {
            n_dev = n_dev.max(1);
        }
    }
    // Training keeps at least one record; trim whichever held-out part is larger.
    while n_test + n_dev > n.saturating_sub(1) && n_test + n_dev > 0 {
        if n_test >= n_dev {
            n_test -= 1;
        } else {
            n_dev -= 1;
        }
    }
    for (k, &i) in order.iter().enumerate() {
        assignment[i] = if k < n_test {
            TEST
        } else if k < n_test + n_dev {
            DEV
        } else {
            TRAIN
        };
    }
}

fn stratified(
    records: &[Record],
    cfg: &SplitConfig,
    rng: &mut StdRng,
) -> Result<Vec<u8>, DataError> {
    let mut assignment = vec![TRAIN; records.len()];
    for members in indices_by_class(records)?.values() {
        assign_shuffled(members, cfg, true, rng, &mut assignment);
    }
    Ok(assignment)
}

/// The indices of `records` per label; a stratified split or stratified folds need every label.
fn indices_by_class(records: &[Record]) -> Result<BTreeMap<usize, Vec<usize>>, DataError> {
    let mut classes: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let label = r.label.ok_or_else(|| {
            config_error(format!(
                "record '{}' has no label; a stratified split needs labels (use the random \
                 strategy for unlabelled data)",
                r.id
            ))
        })?;
        classes.entry(label).or_default().push(i);
    }
    Ok(classes)
}

/// How many records each chromosome holds; splitting by chromosome needs every record's.
fn records_per_chromosome(records: &[Record]) -> Result<BTreeMap<&str, usize>, DataError> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        let chrom = r.chrom.as_deref().ok_or_else(|| {
            config_error(format!(
                "record '{}' has no chromosome; a chromosome split needs ids like chr3:100-200 \
                 (or regions read from a BED file)",
                r.id
            ))
        })?;
        *counts.entry(chrom).or_default() += 1;
    }
    Ok(counts)
}

fn by_chromosome(
    records: &[Record],
    cfg: &SplitConfig,
    rng: &mut StdRng,
) -> Result<Vec<u8>, DataError> {
    let counts = records_per_chromosome(records)?;
    let mut which: BTreeMap<&str, u8> = BTreeMap::new();
    for (split, list) in [(TEST, &cfg.test_chroms), (DEV, &cfg.dev_chroms)] {
        for c in list {
            if !counts.contains_key(c.as_str()) {
                let known: Vec<&str> = counts.keys().copied().collect();
                return Err(config_error(format!(
                    "{} chromosome '{c}' does not occur in the data (chromosomes: {})",
                    NAMES[split as usize],
                    known.join(", ")
                )));
            }
            if let Some(prev) = which.insert(c.as_str(), split) {
                if prev != split {
                    return Err(config_error(format!(
                        "chromosome '{c}' is listed for both dev and test"
                    )));
                }
            }
        }
    }
    // Splits without an explicit list take whole chromosomes, in a seeded order, until they hold
    // their fraction of the records.
    let mut free: Vec<&str> = counts
        .keys()
        .copied()
        .filter(|c| !which.contains_key(c))
        .collect();
    free.shuffle(rng);
    let mut free = free.into_iter();
    let n = records.len() as f64;
    for (split, list, fraction) in [
        (TEST, &cfg.test_chroms, cfg.test_fraction),
        (DEV, &cfg.dev_chroms, cfg.dev_fraction),
    ] {
        if !list.is_empty() {
            continue;
        }
        let target = (n * fraction).round() as usize;
        let mut held = 0;
        while held < target {
            let Some(c) = free.next() else { break };
            which.insert(c, split);
            held += counts[c];
        }
    }
    Ok(records
        .iter()
        .map(|r| {
            let chrom = r.chrom.as_deref().unwrap_or_default();
            which.get(chrom).copied().unwrap_or(TRAIN)
        })
        .collect())
}

/// First existing `<stem>.<ext>` in `dir` for any of the stems (aliases) and usual extensions.
fn find_split_file(dir: &Path, stems: &[&str]) -> Result<PathBuf, DataError> {
    stems
        .iter()
        .flat_map(|s| ["csv", "tsv", "csv.gz", "tsv.gz"].map(|e| dir.join(format!("{s}.{e}"))))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let aliases = if stems.len() > 1 {
                format!(" (or {})", stems[1..].join(", "))
            } else {
                String::new()
            };
            DataError::new(
                &dir.join(format!("{}.csv", stems[0])),
                format!(
                    "missing {}.csv or {}.tsv{aliases} in data directory {}; a directory needs \
                     train, dev and test files (GUE layout)",
                    stems[0],
                    stems[0],
                    dir.display()
                ),
            )
        })
}

/// Loads train/dev/test: from a GUE-style directory (`train.csv`, `dev.csv`, `test.csv`; `.tsv`
/// also accepted, `valid`/`validation` for dev) as given, or from one file split by `cfg`.
///
/// The last value returned counts the records dropped by `opts.skip_invalid` across all files.
pub fn load_splits(
    data: &Path,
    opts: &ReadOptions,
    cfg: &SplitConfig,
) -> Result<(Splits, SplitSource, usize), DataError> {
    if data.is_dir() {
        if cfg.fold.is_some() {
            return Err(DataError::new(
                data,
                "cross-validation splits one file, and this is a directory of fixed train, \
                 dev and test files (GUE layout)",
            ));
        }
        let train = find_split_file(data, &["train"])?;
        let dev = find_split_file(data, &["dev", "valid", "validation"])?;
        let test = find_split_file(data, &["test"])?;
        let (train, dev, test) = (
            read_records(&train, opts)?,
            read_records(&dev, opts)?,
            read_records(&test, opts)?,
        );
        let skipped = train.skipped + dev.skipped + test.skipped;
        let splits = Splits {
            train: train.records,
            dev: dev.records,
            test: test.records,
        };
        return Ok((splits, SplitSource::GueDirectory, skipped));
    }
    let Dataset { records, skipped } = read_records(data, opts)?;
    let splits = split_records(records, cfg).map_err(|mut e| {
        if e.path.as_os_str().is_empty() {
            e.path = data.to_path_buf();
        }
        e
    })?;
    Ok((splits, SplitSource::SplitFromFile, skipped))
}

/// Records the split a run used (`id,sequence,label,split`), so it can be audited or reused with
/// [`read_split_csv`]. Unlabelled records get an empty label field.
pub fn write_split_csv(path: &Path, splits: &Splits) -> anyhow::Result<()> {
    crate::fsutil::write_atomic_with(path, |w| {
        let mut out = csv::Writer::from_writer(w);
        out.write_record(["id", "sequence", "label", "split"])?;
        for (name, part) in NAMES.iter().zip([&splits.train, &splits.dev, &splits.test]) {
            for r in part {
                let label = r.label.map(|l| l.to_string()).unwrap_or_default();
                out.write_record([r.id.as_str(), r.seq.as_str(), label.as_str(), name])?;
            }
        }
        out.flush()?;
        Ok(())
    })
}

/// Writes records as `id,chrom,sequence,label` (the layout `read_records` reads back, chromosome
/// included), atomically; for data prepared from BED regions.
pub fn write_records_csv(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    crate::fsutil::write_atomic_with(path, |w| {
        let mut out = csv::Writer::from_writer(w);
        out.write_record(["id", "chrom", "sequence", "label"])?;
        for r in records {
            let label = r.label.map(|l| l.to_string()).unwrap_or_default();
            let chrom = r.chrom.as_deref().unwrap_or("");
            out.write_record([r.id.as_str(), chrom, r.seq.as_str(), label.as_str()])?;
        }
        out.flush()?;
        Ok(())
    })
}

/// Reads a file written by [`write_split_csv`] back into the same splits.
pub fn read_split_csv(path: &Path) -> Result<Splits, DataError> {
    let mut rdr = csv::Reader::from_path(path)
        .map_err(|e| DataError::new(path, format!("cannot open: {e}")))?;
    let header = rdr
        .headers()
        .map_err(|e| DataError::at(path, 1, e.to_string()))?
        .clone();
    if header.iter().collect::<Vec<_>>() != ["id", "sequence", "label", "split"] {
        return Err(DataError::at(
            path,
            1,
            "expected the header id,sequence,label,split of a split file",
        ));
    }
    let mut parts: [Vec<Record>; 3] = Default::default();
    for row in rdr.records() {
        let row = row.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            DataError {
                line,
                ..DataError::new(path, e.to_string())
            }
        })?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        // Written by dnatune from validated records: nothing ambiguous is left to read as N.
        let seq = validate_sequence(&row[1], false).map_err(|(offset, c)| {
            DataError::at_column(path, line, offset + 1, format!("invalid character {c:?}"))
        })?;
        let label = match &row[2] {
            "" => None,
            v => Some(v.parse::<usize>().map_err(|_| {
                DataError::at(
                    path,
                    line,
                    format!("label must be a non-negative integer, found '{v}'"),
                )
            })?),
        };
        let which = NAMES.iter().position(|n| *n == &row[3]).ok_or_else(|| {
            DataError::at(
                path,
                line,
                format!("split must be train, dev or test, found '{}'", &row[3]),
            )
        })?;
        parts[which].push(Record {
            id: row[0].to_string(),
            chrom: chrom_from_id(&row[0]),
            seq,
            label,
        });
    }
    let [train, dev, test] = parts;
    Ok(Splits { train, dev, test })
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_csv_round_trips_with_chromosomes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regions.csv");
        let records = vec![
            Record {
                id: "peak_1".into(),
                seq: "ACGT".into(),
                label: Some(1),
                chrom: Some("chr2".into()),
            },
            Record {
                id: "chr5:10-20".into(),
                seq: "GGN".into(),
                label: Some(0),
                chrom: Some("chr5".into()),
            },
        ];
        write_records_csv(&path, &records).unwrap();
        let back = read_records(&path, &ReadOptions::default()).unwrap();
        assert_eq!(back.records, records);
    }

    use super::*;
    use std::collections::{BTreeSet, HashSet};

    fn rec(id: &str, label: usize, chrom: Option<&str>) -> Record {
        Record {
            id: id.to_string(),
            seq: "ACGT".into(),
            label: Some(label),
            chrom: chrom.map(str::to_string),
        }
    }

    /// 3 classes of unequal size: 70, 25, 5 records.
    fn labelled() -> Vec<Record> {
        (0..100)
            .map(|i| {
                rec(
                    &format!("r{i}"),
                    if i < 70 {
                        0
                    } else if i < 95 {
                        1
                    } else {
                        2
                    },
                    None,
                )
            })
            .collect()
    }

    fn ids(v: &[Record]) -> Vec<&str> {
        v.iter().map(|r| r.id.as_str()).collect()
    }

    fn check_partition(all: &[Record], s: &Splits) {
        let mut seen = HashSet::new();
        for r in s.train.iter().chain(&s.dev).chain(&s.test) {
            assert!(seen.insert(r.id.clone()), "{} in two splits", r.id);
        }
        assert_eq!(seen.len(), all.len());
        assert!(all.iter().all(|r| seen.contains(&r.id)));
    }

    #[test]
    fn stratified_keeps_class_proportions() {
        let all = labelled();
        let s = split_records(all.clone(), &SplitConfig::default()).unwrap();
        check_partition(&all, &s);
        for (class, size) in [(0usize, 70.0), (1, 25.0), (2, 5.0)] {
            let count = |v: &[Record]| v.iter().filter(|r| r.label == Some(class)).count() as f64;
            for part in [&s.dev, &s.test] {
                let expect = size * 0.1;
                assert!(
                    (count(part) - expect).abs() <= 1.0,
                    "class {class}: {}",
                    count(part)
                );
                assert!(count(part) >= 1.0, "class {class} missing from a split");
            }
            assert!((count(&s.train) - size * 0.8).abs() <= 2.0);
        }
    }

    #[test]
    fn random_split_sizes_and_order() {
        let all = labelled();
        let cfg = SplitConfig {
            strategy: SplitStrategy::Random,
            dev_fraction: 0.2,
            test_fraction: 0.1,
            ..SplitConfig::default()
        };
        let s = split_records(all.clone(), &cfg).unwrap();
        check_partition(&all, &s);
        assert_eq!((s.train.len(), s.dev.len(), s.test.len()), (70, 20, 10));
        // Input order is kept inside a split.
        let pos = |id: &str| all.iter().position(|r| r.id == id).unwrap();
        let p: Vec<usize> = s.dev.iter().map(|r| pos(&r.id)).collect();
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn same_seed_same_split_other_seed_different() {
        for strategy in [SplitStrategy::Random, SplitStrategy::Stratified] {
            let cfg = SplitConfig {
                strategy,
                ..SplitConfig::default()
            };
            let a = split_records(labelled(), &cfg).unwrap();
            let b = split_records(labelled(), &cfg).unwrap();
            assert_eq!(a, b);
            let other = SplitConfig { seed: 7, ..cfg };
            let c = split_records(labelled(), &other).unwrap();
            assert_ne!(ids(&a.test), ids(&c.test));
        }
    }

    fn chrom_records() -> Vec<Record> {
        (0..200)
            .map(|i| {
                let chrom = format!("chr{}", i % 10 + 1);
                rec(&format!("{chrom}:{i}-{}", i + 5), i % 2, Some(&chrom))
            })
            .collect()
    }

    fn chroms(v: &[Record]) -> BTreeSet<String> {
        v.iter().map(|r| r.chrom.clone().unwrap()).collect()
    }

    #[test]
    fn chromosome_split_never_shares_a_chromosome() {
        let all = chrom_records();
        let cfg = SplitConfig {
            strategy: SplitStrategy::Chromosome,
            ..SplitConfig::default()
        };
        let s = split_records(all.clone(), &cfg).unwrap();
        check_partition(&all, &s);
        let (tr, dv, te) = (chroms(&s.train), chroms(&s.dev), chroms(&s.test));
        assert!(tr.is_disjoint(&dv) && tr.is_disjoint(&te) && dv.is_disjoint(&te));
        assert_eq!(tr.len() + dv.len() + te.len(), 10);
        // 20 records per chromosome, target 20 for each held-out split.
        assert_eq!((s.dev.len(), s.test.len()), (20, 20));
        let again = split_records(all.clone(), &cfg).unwrap();
        assert_eq!(s, again);

        let fixed = SplitConfig {
            test_chroms: vec!["chr1".into(), "chr2".into()],
            dev_chroms: vec!["chr3".into()],
            ..cfg.clone()
        };
        let s = split_records(all.clone(), &fixed).unwrap();
        assert_eq!(
            chroms(&s.test),
            BTreeSet::from(["chr1".into(), "chr2".into()])
        );
        assert_eq!(chroms(&s.dev), BTreeSet::from(["chr3".to_string()]));
        assert!(!chroms(&s.train).contains("chr1"));

        let typo = SplitConfig {
            test_chroms: vec!["chr99".into()],
            ..cfg.clone()
        };
        assert!(split_records(all, &typo)
            .unwrap_err()
            .message
            .contains("chr99"));
    }

    /// The k folds' test sets partition the records, each fold's splits partition them too, and
    /// dev is `dev_fraction` of the records outside the test fold.
    fn check_folds(all: &[Record], cfg: &SplitConfig, count: usize) -> Vec<Splits> {
        let folds: Vec<Splits> = (0..count)
            .map(|index| {
                let cfg = SplitConfig {
                    fold: Some(Fold { index, count }),
                    ..cfg.clone()
                };
                split_records(all.to_vec(), &cfg).unwrap()
            })
            .collect();
        let mut tested = HashSet::new();
        for s in &folds {
            check_partition(all, s);
            for r in &s.test {
                assert!(tested.insert(r.id.clone()), "{} tested twice", r.id);
            }
            let rest = (all.len() - s.test.len()) as f64;
            assert!((s.dev.len() as f64 - rest * cfg.dev_fraction).abs() <= 20.0);
        }
        assert_eq!(tested.len(), all.len(), "every record tested once");
        folds
    }

    #[test]
    fn random_and_stratified_folds_partition_the_records_evenly() {
        let all = labelled();
        let random = SplitConfig {
            strategy: SplitStrategy::Random,
            ..SplitConfig::default()
        };
        for s in check_folds(&all, &random, 3) {
            assert!([33, 34].contains(&s.test.len()), "{}", s.test.len());
            assert_eq!(
                s.dev.len(),
                ((100 - s.test.len()) as f64 * 0.1).round() as usize
            );
        }
        // Stratified: every fold holds each class in proportion (70 / 25 / 5 over 4 folds),
        // and so does each dev set.
        for s in check_folds(&all, &SplitConfig::default(), 4) {
            let count = |v: &[Record], c: usize| v.iter().filter(|r| r.label == Some(c)).count();
            for (class, per_fold) in [(0, 17.5), (1, 6.25), (2, 1.25)] {
                let n = count(&s.test, class) as f64;
                assert!((n - per_fold).abs() <= 1.0, "class {class}: {n}");
            }
            assert!(count(&s.dev, 0) >= 4 && count(&s.dev, 1) >= 1);
            // As in a plain stratified split, the smallest class still reaches dev.
            assert_eq!(count(&s.dev, 2), 1);
        }
        // The same seed gives the same folds, another seed others.
        let fold = |seed| {
            let cfg = SplitConfig {
                seed,
                fold: Some(Fold { index: 0, count: 3 }),
                ..SplitConfig::default()
            };
            ids(&split_records(all.clone(), &cfg).unwrap().test)
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(fold(1), fold(1));
        assert_ne!(fold(1), fold(2));
    }

    /// 200 random 60-bp sequences in families whose members share their first 40 bases (some
    /// on the other strand): one family of 60, four each of 2 to 6, and 60 singletons.
    fn families() -> Vec<Record> {
        let mut state = 11u64;
        let mut random_bases = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    b"ACGT"[(state >> 60) as usize % 4] as char
                })
                .collect()
        };
        let sizes: Vec<usize> = std::iter::once(60)
            .chain((2..=6).cycle().take(20))
            .chain(std::iter::repeat_n(1, 60))
            .collect();
        let mut records = Vec::new();
        for (f, &size) in sizes.iter().enumerate() {
            let shared = random_bases(40);
            for m in 0..size {
                let seq = format!("{shared}{}", random_bases(20));
                let seq = if m % 2 == 1 {
                    crate::data::reverse_complement(&seq)
                } else {
                    seq
                };
                records.push(Record {
                    id: format!("f{f}m{m}"),
                    seq,
                    label: Some(f % 2),
                    chrom: None,
                });
            }
        }
        records
    }

    /// The held-out records that repeat 31 bases clear of tandem repeats of a training record on
    /// either strand, found by plain substring search.
    fn leaked<'a>(train: &[Record], held_out: &'a [Record]) -> Vec<&'a str> {
        let masked: Vec<String> = train
            .iter()
            .map(|r| similarity::mask_tandem_repeats(&r.seq))
            .collect();
        let train_text = masked.join("|");
        held_out
            .iter()
            .filter(|r| {
                let seq = similarity::mask_tandem_repeats(&r.seq);
                let rc = crate::data::reverse_complement(&seq);
                (0..=seq.len() - 31).any(|i| {
                    let (forward, reverse) = (&seq[i..i + 31], &rc[i..i + 31]);
                    !forward.contains('N')
                        && (train_text.contains(forward) || train_text.contains(reverse))
                })
            })
            .map(|r| r.id.as_str())
            .collect()
    }

    #[test]
    fn similarity_split_keeps_families_in_one_split() {
        let all = families();
        assert_eq!(all.len(), 200);
        let similarity = SplitConfig {
            strategy: SplitStrategy::Similarity,
            ..SplitConfig::default()
        };
        let s = split_records(all.clone(), &similarity).unwrap();
        check_partition(&all, &s);
        assert!(leaked(&s.train, &s.dev).is_empty() && leaked(&s.train, &s.test).is_empty());
        assert!(leaked(&s.dev, &s.test).is_empty());
        // The family larger than a held-out split trains; singletons fill dev and test.
        assert!(s.train.iter().filter(|r| r.id.starts_with("f0m")).count() == 60);
        assert_eq!((s.dev.len(), s.test.len()), (20, 20));
        // The k-mer count agrees with the substring search.
        let overlap = similarity::SplitOverlap::of(&s, 31).unwrap();
        assert_eq!((overlap.dev_sharing, overlap.test_sharing), (0, 0));
        // A random split of the same records leaks, and the count sees it.
        let random = SplitConfig {
            strategy: SplitStrategy::Random,
            ..SplitConfig::default()
        };
        let r = split_records(all.clone(), &random).unwrap();
        let leaks = leaked(&r.train, &r.test).len();
        assert!(leaks > 5, "{leaks}");
        assert_eq!(
            similarity::SplitOverlap::of(&r, 31).unwrap().test_sharing,
            leaks
        );

        // Folds keep families whole too.
        for s in check_folds(&all, &similarity, 5) {
            assert!(leaked(&s.train, &s.test).is_empty() && leaked(&s.dev, &s.test).is_empty());
            assert!(leaked(&s.train, &s.dev).is_empty());
        }
        let too_many = SplitConfig {
            fold: Some(Fold { index: 0, count: 5 }),
            ..similarity.clone()
        };
        let one_family: Vec<Record> = all[..60].to_vec();
        let e = split_records(one_family, &too_many).unwrap_err();
        assert!(e.to_string().contains("1 groups of shared 31-mers"), "{e}");
        let short = SplitConfig {
            kmer: 40,
            ..similarity
        };
        let e = split_records(all, &short).unwrap_err();
        assert!(e.to_string().contains("8 to 32, got 40"), "{e}");
    }

    #[test]
    fn chromosome_folds_keep_chromosomes_whole_and_balance_records() {
        // Chromosome i holds 4 (i + 1) records: 4 ... 40, 220 in all.
        let all: Vec<Record> = (0..10)
            .flat_map(|c| (0..4 * (c + 1)).map(move |j| (c, j)))
            .map(|(c, j)| {
                let chrom = format!("chr{}", c + 1);
                rec(&format!("{chrom}:{j}-{}", j + 5), j % 2, Some(&chrom))
            })
            .collect();
        let cfg = SplitConfig {
            strategy: SplitStrategy::Chromosome,
            ..SplitConfig::default()
        };
        let folds = check_folds(&all, &cfg, 3);
        let mut test_chroms = BTreeSet::new();
        for s in &folds {
            let (tr, dv, te) = (chroms(&s.train), chroms(&s.dev), chroms(&s.test));
            assert!(tr.is_disjoint(&dv) && tr.is_disjoint(&te) && dv.is_disjoint(&te));
            assert!(
                test_chroms.is_disjoint(&te),
                "a chromosome tested in two folds"
            );
            test_chroms.extend(te);
        }
        assert_eq!(test_chroms.len(), 10);
        // Largest first to the lightest fold: 76 / 72 / 72 records, where a seeded shuffle of
        // whole chromosomes could leave one fold with far more.
        let sizes: Vec<usize> = folds.iter().map(|s| s.test.len()).collect();
        let spread = sizes.iter().max().unwrap() - sizes.iter().min().unwrap();
        assert!(spread <= 4, "{sizes:?}");
        let e = fold_of_each(&all, SplitStrategy::Chromosome, 11, 42, 31).unwrap_err();
        assert!(
            e.message.contains("10 chromosomes cannot fill 11 folds"),
            "{e}"
        );
    }

    #[test]
    fn fold_settings_that_cannot_work_are_errors() {
        let one = fold_of_each(&labelled(), SplitStrategy::Random, 1, 42, 31).unwrap_err();
        assert!(one.message.contains("at least 2 folds"), "{one}");
        let listed = SplitConfig {
            strategy: SplitStrategy::Chromosome,
            test_chroms: vec!["chr1".into()],
            fold: Some(Fold { index: 0, count: 2 }),
            ..SplitConfig::default()
        };
        let e = split_records(chrom_records(), &listed).unwrap_err();
        assert!(
            e.message.contains("chooses the held-out chromosomes"),
            "{e}"
        );
        let too_many = SplitConfig {
            fold: Some(Fold {
                index: 0,
                count: 200,
            }),
            ..SplitConfig::default()
        };
        let e = split_records(labelled(), &too_many).unwrap_err();
        assert!(e.message.contains("200 folds for 100 records"), "{e}");
        let gue = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gue-tf0");
        let fold = SplitConfig {
            fold: Some(Fold { index: 0, count: 5 }),
            ..SplitConfig::default()
        };
        let e = load_splits(&gue, &ReadOptions::default(), &fold).unwrap_err();
        assert!(
            e.message.contains("cross-validation splits one file"),
            "{e}"
        );
    }

    #[test]
    fn chromosome_split_needs_region_ids() {
        let cfg = SplitConfig {
            strategy: SplitStrategy::Chromosome,
            ..SplitConfig::default()
        };
        let e = split_records(labelled(), &cfg).unwrap_err();
        assert!(e.message.contains("chr3:100-200"), "{e}");
    }

    #[test]
    fn empty_split_and_bad_fractions_are_errors() {
        let few: Vec<Record> = labelled().into_iter().take(2).collect();
        let e = split_records(few, &SplitConfig::default()).unwrap_err();
        assert!(e.message.contains("would be empty"), "{e}");
        let bad = SplitConfig {
            dev_fraction: 0.6,
            test_fraction: 0.5,
            ..SplitConfig::default()
        };
        assert!(split_records(labelled(), &bad).is_err());
    }

    #[test]
    fn gue_directory_and_single_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gue-tf0");
        let opts = ReadOptions::default();
        let (s, src, _) = load_splits(&root, &opts, &SplitConfig::default()).unwrap();
        assert_eq!(src, SplitSource::GueDirectory);
        assert_eq!((s.dev.len(), s.test.len()), (1000, 1000));
        assert_eq!(s.train.len(), 32378);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.csv"), "sequence,label\nAC,0\n").unwrap();
        std::fs::write(
            dir.path().join("validation.tsv"),
            "sequence\tlabel\nAC\t0\n",
        )
        .unwrap();
        let e = load_splits(dir.path(), &opts, &SplitConfig::default()).unwrap_err();
        assert!(e.to_string().contains("test.csv"), "{e}");
        std::fs::write(dir.path().join("test.csv"), "sequence,label\nGG,1\n").unwrap();
        let (s, _, _) = load_splits(dir.path(), &opts, &SplitConfig::default()).unwrap();
        assert_eq!(s.dev[0].seq, "AC");

        let (s, src, _) =
            load_splits(&root.join("dev.csv"), &opts, &SplitConfig::default()).unwrap();
        assert_eq!(src, SplitSource::SplitFromFile);
        assert_eq!((s.train.len(), s.dev.len(), s.test.len()), (800, 100, 100));
    }

    #[test]
    fn split_csv_round_trip() {
        let s = split_records(labelled(), &SplitConfig::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/split.csv");
        write_split_csv(&path, &s).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("id,sequence,label,split\n"));
        assert_eq!(text.lines().count(), 101);
        assert_eq!(read_split_csv(&path).unwrap(), s);
    }
}
