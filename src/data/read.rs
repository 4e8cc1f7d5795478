//! Readers for delimited text (CSV/TSV, GUE layout) and FASTA, plain or gzip-compressed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::{
    allowed_letters, chrom_from_id, validate_sequence, DataError, Dataset, LabelPolicy,
    ReadOptions, Record,
};

/// Input formats recognised by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Delimited(u8),
    Fasta,
}

const SUPPORTED: &str = ".csv, .tsv, .tab, .txt, .fa, .fasta, .fna (each optionally .gz)";

/// Splits a file name into (stem, format, gzipped), e.g. `dev.csv.gz` -> (`dev`, CSV, true).
fn classify(path: &Path) -> Option<(String, Format, bool)> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    let (inner, gz) = match lower.strip_suffix(".gz") {
        Some(inner) => (inner, true),
        None => (lower.as_str(), false),
    };
    let (stem_len, ext) = inner.rsplit_once('.').map(|(s, e)| (s.len(), e))?;
    let format = match ext {
        "csv" => Format::Delimited(b','),
        "tsv" | "tab" | "txt" => Format::Delimited(b'\t'),
        "fa" | "fasta" | "fna" => Format::Fasta,
        _ => return None,
    };
    Some((name[..stem_len].to_string(), format, gz))
}

/// Opens `path`, decompressing when `gz`; both `.fa.gz` and bgzip output are multi-member safe.
pub(super) fn open(path: &Path, gz: bool) -> Result<Box<dyn BufRead>, DataError> {
    if path.is_dir() {
        return Err(DataError::new(path, "is a directory, expected a file"));
    }
    let file = File::open(path).map_err(|e| DataError::new(path, format!("cannot open: {e}")))?;
    let inner: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 16, inner)))
}

/// Whether a path ends in `.gz` (case-insensitive).
pub(super) fn is_gz(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Calls `each(line_number, line)` for every line (1-based, without the line terminator),
/// turning read and UTF-8 failures into errors that name the line.
pub(super) fn for_each_line(
    path: &Path,
    mut reader: Box<dyn BufRead>,
    mut each: impl FnMut(usize, &str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        line_no += 1;
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::at(path, line_no, format!("read error: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|_| DataError::at(path, line_no, "line is not valid UTF-8 text"))?;
        each(line_no, line)?;
    }
}

/// Reads labelled sequences from CSV/TSV or FASTA (optionally gzip-compressed), chosen by extension.
///
/// Fails on the first problem with its file, line and column, except that invalid sequences are
/// dropped and counted when `opts.skip_invalid` is set. An input without any record is an error.
pub fn read_records(path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    let (stem, format, gz) = classify(path).ok_or_else(|| {
        DataError::new(
            path,
            format!("unsupported file type; expected one of {SUPPORTED}"),
        )
    })?;
    let reader = open(path, gz)?;
    let data = match format {
        Format::Delimited(delim) => read_delimited(path, &stem, reader, delim, opts)?,
        Format::Fasta => read_fasta(path, reader, opts)?,
    };
    if data.records.is_empty() {
        let why = if data.skipped > 0 {
            format!("no records: all {} had invalid sequences", data.skipped)
        } else {
            "no records".to_string()
        };
        return Err(DataError::new(path, why));
    }
    Ok(data)
}

/// Parses a label field: a non-negative integer.
fn parse_label(path: &Path, line: usize, value: &str) -> Result<usize, DataError> {
    let v = value.trim();
    v.parse::<usize>().map_err(|_| {
        let why = if v.parse::<i64>().is_ok() {
            "label must not be negative"
        } else {
            "label must be a non-negative integer (class index)"
        };
        DataError::at(path, line, format!("{why}, found '{value}'"))
    })
}

/// Counts physical lines of the bytes flowing into the CSV parser.
///
/// The csv crate's own line numbers drift on CRLF files with blank lines, and errors must point
/// at the line a user sees in an editor. Only the line breaks not yet passed are kept, so memory
/// stays bounded by the parser's read-ahead.
struct LineTracker<R> {
    inner: R,
    offset: u64,
    /// Offsets of `\n` and `\r` bytes at or after the last looked-up position.
    newlines: VecDeque<u64>,
    returns: VecDeque<u64>,
    /// Number of `\n` bytes before the last looked-up position.
    passed: usize,
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for (i, &b) in buf[..n].iter().enumerate() {
            match b {
                b'\n' => self.newlines.push_back(self.offset + i as u64),
                b'\r' => self.returns.push_back(self.offset + i as u64),
                _ => {}
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

impl<R> LineTracker<R> {
    fn new(inner: R) -> Self {
        LineTracker {
            inner,
            offset: 0,
            newlines: VecDeque::new(),
            returns: VecDeque::new(),
            passed: 0,
        }
    }

    /// 1-based line of the record the parser reports at `byte`; positions must not decrease.
    /// The parser reports the end of the previous record, so line breaks there are skipped.
    fn line_of(&mut self, mut byte: u64) -> usize {
        loop {
            while self.newlines.front().is_some_and(|&o| o < byte) {
                self.newlines.pop_front();
                self.passed += 1;
            }
            while self.returns.front().is_some_and(|&o| o < byte) {
                self.returns.pop_front();
            }
            if self.newlines.front() == Some(&byte) || self.returns.front() == Some(&byte) {
                byte += 1;
            } else {
                return self.passed + 1;
            }
        }
    }
}

fn csv_error<R>(path: &Path, e: csv::Error, lines: &mut LineTracker<R>) -> DataError {
    let line = e.position().map(|p| lines.line_of(p.byte()));
    let message = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "line is not valid UTF-8 text".to_string(),
        _ => e.to_string(),
    };
    DataError {
        line,
        ..DataError::new(path, message)
    }
}

fn read_delimited(
    path: &Path,
    stem: &str,
    reader: Box<dyn BufRead>,
    delimiter: u8,
    opts: &ReadOptions,
) -> Result<Dataset, DataError> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true) // field counts are checked below, to report them in our own words
        .from_reader(LineTracker::new(reader));
    let header = match rdr.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(csv_error(path, e, rdr.get_mut())),
    };
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        return Err(DataError::new(path, "no records: the file is empty"));
    }
    let find = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let missing = |what: &str, name: &str| {
        let kind = if delimiter == b',' { "comma" } else { "tab" };
        DataError::at(
            path,
            1,
            format!(
                "no {what} column '{name}' in the header; columns found ({kind}-separated): {}",
                header.join(", ")
            ),
        )
    };
    let seq_col =
        find(&opts.sequence_column).ok_or_else(|| missing("sequence", &opts.sequence_column))?;
    let label_col = match (find(&opts.label_column), opts.labels) {
        (Some(c), _) => Some(c),
        (None, LabelPolicy::Optional) => None,
        (None, LabelPolicy::Required) => return Err(missing("label", &opts.label_column)),
    };
    let id_col = find("id").or_else(|| find("name"));
    // An explicit chromosome column (as `prepare-bed` writes) beats parsing it from the id.
    let chrom_col = find("chrom");

    let mut data = Dataset {
        records: Vec::new(),
        skipped: 0,
    };
    let mut row = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut row) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e, rdr.get_mut())),
        }
        let line = rdr
            .get_mut()
            .line_of(row.position().map_or(0, |p| p.byte()));
        if row.len() != header.len() {
            return Err(DataError::at(
                path,
                line,
                format!(
                    "expected {} fields like the header, found {}",
                    header.len(),
                    row.len()
                ),
            ));
        }
        let raw_seq = &row[seq_col];
        let seq = match validate_sequence(raw_seq, opts.ambiguous_as_n) {
            Ok(s) if !s.is_empty() => s,
            _ if opts.skip_invalid => {
                data.skipped += 1;
                continue;
            }
            Ok(_) => return Err(DataError::at(path, line, "empty sequence")),
            Err((offset, c)) => {
                return Err(DataError::at_column(
                    path,
                    line,
                    offset + 1,
                    format!(
                        "invalid character {c:?} at position {} of the sequence ({})",
                        offset + 1,
                        allowed_letters(c)
                    ),
                ))
            }
        };
        let label = match label_col.map(|c| &row[c]) {
            Some(v) if !v.trim().is_empty() => Some(parse_label(path, line, v)?),
            Some(_) if opts.labels == LabelPolicy::Required => {
                return Err(DataError::at(path, line, "missing label"))
            }
            _ => None,
        };
        let id = match id_col.map(|c| row[c].trim()) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("{stem}:{line}"),
        };
        let chrom = match chrom_col.map(|c| row[c].trim()) {
            Some(c) if !c.is_empty() => Some(c.to_string()),
            _ => chrom_from_id(&id),
        };
        data.records.push(Record {
            chrom,
            id,
            seq,
            label,
        });
    }
    Ok(data)
}

/// A FASTA record being collected: its header and the first invalid character seen, if any.
struct PendingFasta {
    id: String,
    label: Option<usize>,
    header_line: usize,
    seq: String,
    /// (line, 1-based column in that line, character)
    bad: Option<(usize, usize, char)>,
}

fn read_fasta(
    path: &Path,
    reader: Box<dyn BufRead>,
    opts: &ReadOptions,
) -> Result<Dataset, DataError> {
    let mut data = Dataset {
        records: Vec::new(),
        skipped: 0,
    };
    let mut pending: Option<PendingFasta> = None;
    let finish = |p: PendingFasta, data: &mut Dataset| -> Result<(), DataError> {
        if let Some((line, col, c)) = p.bad {
            if opts.skip_invalid {
                data.skipped += 1;
                return Ok(());
            }
            return Err(DataError::at_column(
                path,
                line,
                col,
                format!(
                    "invalid character {c:?} in sequence '{}' ({})",
                    p.id,
                    allowed_letters(c)
                ),
            ));
        }
        if p.seq.is_empty() {
            return Err(DataError::at(
                path,
                p.header_line,
                format!("FASTA header '{}' has no sequence", p.id),
            ));
        }
        data.records.push(Record {
            chrom: chrom_from_id(&p.id),
            id: p.id,
            seq: p.seq,
            label: p.label,
        });
        Ok(())
    };
    for_each_line(path, reader, |line_no, line| {
        let text = line.trim_end();
        if text.trim_start().is_empty() {
            return Ok(());
        }
        if let Some(header) = text.strip_prefix('>') {
            if let Some(p) = pending.take() {
                finish(p, &mut data)?;
            }
            pending = Some(parse_fasta_header(path, line_no, header, opts.labels)?);
            return Ok(());
        }
        let Some(p) = pending.as_mut() else {
            return Err(DataError::at(
                path,
                line_no,
                "sequence data before the first '>' header",
            ));
        };
        if p.bad.is_some() {
            return Ok(());
        }
        match validate_sequence(text, opts.ambiguous_as_n) {
            Ok(s) => p.seq.push_str(&s),
            Err((offset, c)) => p.bad = Some((line_no, offset + 1, c)),
        }
        Ok(())
    })?;
    if let Some(p) = pending.take() {
        finish(p, &mut data)?;
    }
    Ok(data)
}

/// `>id free text label=K more text`: the id is the first word, the label a `label=K` token.
fn parse_fasta_header(
    path: &Path,
    line: usize,
    header: &str,
    policy: LabelPolicy,
) -> Result<PendingFasta, DataError> {
    let mut words = header.split_whitespace();
    let id = words
        .next()
        .ok_or_else(|| DataError::at(path, line, "FASTA header has no id after '>'"))?;
    let label = match words.find_map(|w| w.strip_prefix("label=")) {
        Some(v) => Some(parse_label(path, line, v)?),
        None if policy == LabelPolicy::Required => {
            return Err(DataError::at(
                path,
                line,
                format!("FASTA header '{id}' has no label=K token (labels are required here)"),
            ))
        }
        None => None,
    };
    Ok(PendingFasta {
        id: id.to_string(),
        label,
        header_line: line,
        seq: String::new(),
        bad: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err(path: &Path, opts: &ReadOptions) -> DataError {
        read_records(path, opts).expect_err("expected an error")
    }

    #[test]
    fn shipped_gue_dev_reads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gue-tf0/dev.csv");
        let d = read_records(&p, &ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 1000);
        assert_eq!(d.skipped, 0);
        assert!(d.records.iter().all(|r| matches!(r.label, Some(0 | 1))));
        assert!(d.records.iter().any(|r| r.label == Some(0)));
        assert!(d.records.iter().any(|r| r.label == Some(1)));
        assert!(d.records.iter().all(|r| r.seq.len() == 101));
        assert_eq!(d.records[0].id, "dev:2");
        assert!(d.records[0].seq.starts_with("TGACCACCCC"));
        assert_eq!(d.records[0].label, Some(1));
    }

    #[test]
    fn bad_character_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bad.csv", "sequence,label\nACGT,0\nACGXA,1\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!((e.line, e.column), (Some(3), Some(4)));
        let shown = e.to_string();
        assert!(shown.contains("bad.csv:3:4:"), "{shown}");
        assert!(shown.contains("'X'"), "{shown}");
    }

    #[test]
    fn lowercase_is_accepted_and_id_column_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "x.tsv",
            "name\tsequence\tlabel\nchr3:100-200\tacgn\t2\nfoo\tTTTT\t0\n",
        );
        let d = read_records(&p, &ReadOptions::default()).unwrap();
        assert_eq!(d.records[0].seq, "ACGN");
        assert_eq!(d.records[0].id, "chr3:100-200");
        assert_eq!(d.records[0].chrom.as_deref(), Some("chr3"));
        assert_eq!(d.records[0].label, Some(2));
        assert_eq!(d.records[1].chrom, None);
    }

    #[test]
    fn missing_label_column_lists_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "nolab.csv", "sequence,class\nACGT,0\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("'label'"), "{e}");
        assert!(e.message.contains("sequence, class"), "{e}");
        // Prediction input: no label column is fine.
        let opts = ReadOptions {
            labels: LabelPolicy::Optional,
            ..ReadOptions::default()
        };
        let d = read_records(&p, &opts).unwrap();
        assert_eq!(d.records[0].label, None);
    }

    #[test]
    fn empty_and_header_only_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("empty.csv", ""), ("header.csv", "sequence,label\n")] {
            let p = write(&dir, name, text);
            let e = err(&p, &ReadOptions::default());
            assert!(e.message.contains("no records"), "{e}");
            assert!(e.to_string().contains(name));
        }
    }

    #[test]
    fn non_numeric_and_negative_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "l.csv", "sequence,label\nACGT,0\nACGT,1\nACGT,yes\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("'yes'"), "{e}");
        let p = write(&dir, "n.csv", "sequence,label\nACGT,-1\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("negative"), "{e}");
    }

    #[test]
    fn wrong_field_count_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "f.csv", "sequence,label\nACGT,0\nACGT,1,7\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("found 3"), "{e}");
    }

    #[test]
    fn crlf_and_blank_lines_keep_physical_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "w.csv",
            "sequence,label\r\nACGT,0\r\n\r\nACGT,1\r\nAC?T,1\r\n",
        );
        let e = err(&p, &ReadOptions::default());
        assert_eq!((e.line, e.column), (Some(5), Some(3)), "{e}");
        let p = write(&dir, "ok.csv", "sequence,label\r\nACGT,0\r\n\r\nACGT,1\r\n");
        let d = read_records(&p, &ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 2);
        assert_eq!(d.records[1].id, "ok:4");
        let p = write(
            &dir,
            "q.csv",
            "id,sequence,label\n\"x\ny\",ACGT,0\n\nz,AXGT,1\n",
        );
        assert_eq!(err(&p, &ReadOptions::default()).line, Some(5));
    }

    #[test]
    fn skip_invalid_counts_skipped_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "s.csv",
            "sequence,label\nACGT,0\nAC-GT,1\n,1\nGGGG,1\nNNXN,0\n",
        );
        let e = err(&p, &ReadOptions::default());
        assert_eq!((e.line, e.column), (Some(3), Some(3)));
        let opts = ReadOptions {
            skip_invalid: true,
            ..ReadOptions::default()
        };
        let d = read_records(&p, &opts).unwrap();
        assert_eq!(d.skipped, 3);
        let seqs: Vec<_> = d.records.iter().map(|r| r.seq.as_str()).collect();
        assert_eq!(seqs, ["ACGT", "GGGG"]);
        assert_eq!(d.records[1].id, "s:5");
    }

    #[test]
    fn fasta_multiline_labels_and_chrom() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "r.fa",
            ">chr1:10-20 some text label=1\nACGT\nacgt\n\n>b label=0\nNNNN\n",
        );
        let d = read_records(&p, &ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 2);
        assert_eq!(d.records[0].seq, "ACGTACGT");
        assert_eq!(d.records[0].label, Some(1));
        assert_eq!(d.records[0].chrom.as_deref(), Some("chr1"));
        assert_eq!(d.records[1].id, "b");
        assert_eq!(d.records[1].label, Some(0));
    }

    #[test]
    fn fasta_header_without_sequence_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "h.fasta",
            ">a label=1\nACGT\n>b label=0\n>c label=1\nAC\n",
        );
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("'b'"), "{e}");
        let p = write(&dir, "t.fasta", ">a label=1\nACGT\n>last label=0\n\n");
        assert_eq!(err(&p, &ReadOptions::default()).line, Some(3));
    }

    #[test]
    fn fasta_missing_label_and_bad_char() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "m.fa", ">a label=1\nACGT\n>b\nACGT\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("label="), "{e}");
        let opts = ReadOptions {
            labels: LabelPolicy::Optional,
            ..ReadOptions::default()
        };
        assert_eq!(read_records(&p, &opts).unwrap().records[1].label, None);

        let p = write(&dir, "x.fa", ">a label=1\nACGT\nAAXA\n>b label=0\nCC\n");
        let e = err(&p, &ReadOptions::default());
        assert_eq!((e.line, e.column), (Some(3), Some(3)));
        let opts = ReadOptions {
            skip_invalid: true,
            ..ReadOptions::default()
        };
        let d = read_records(&p, &opts).unwrap();
        assert_eq!((d.records.len(), d.skipped), (1, 1));
        assert_eq!(d.records[0].id, "b");
    }

    #[test]
    fn gz_fasta_and_csv_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let gz = |name: &str, text: &str| {
            let p = dir.path().join(name);
            let mut enc = flate2::write::GzEncoder::new(
                File::create(&p).unwrap(),
                flate2::Compression::default(),
            );
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish().unwrap();
            p
        };
        let fa = gz("r.fa.gz", ">x label=3\nACGT\nTT\n>y label=0\nG\n");
        let d = read_records(&fa, &ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 2);
        assert_eq!(
            (d.records[0].seq.as_str(), d.records[0].label),
            ("ACGTTT", Some(3))
        );
        assert_eq!(d.records[1].seq, "G");

        let csv = gz("r.csv.gz", "sequence,label\nCAT,1\n");
        let d = read_records(&csv, &ReadOptions::default()).unwrap();
        assert_eq!(d.records[0].id, "r:2");
        assert_eq!(d.records[0].seq, "CAT");
    }

    #[test]
    fn unsupported_extension_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "x.json", "{}");
        assert!(err(&p, &ReadOptions::default())
            .message
            .contains("unsupported"));
        let e = err(&dir.path().join("none.csv"), &ReadOptions::default());
        assert!(e.message.contains("cannot open"), "{e}");
    }
}
