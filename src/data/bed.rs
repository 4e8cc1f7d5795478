//! Regions from a BED file cut out of a genome FASTA (peaks as positives, background as negatives).

use std::collections::HashMap;
use std::path::Path;

use super::read::{for_each_line, is_gz, open};
use super::{
    allowed_letters, reverse_complement, validate_sequence, DataError, Dataset, LabelPolicy,
    ReadOptions, Record,
};

/// Loads a whole genome FASTA (optionally gzipped) into memory: chromosome name -> raw bases.
///
/// Bases are kept as read (soft-masked lower case included); cut regions are upper-cased later.
pub(super) fn load_genome(path: &Path) -> Result<HashMap<String, Vec<u8>>, DataError> {
    let mut genome: HashMap<String, Vec<u8>> = HashMap::new();
    let mut current: Option<String> = None;
    for_each_line(path, open(path, is_gz(path))?, |line_no, line| {
        let text = line.trim_end();
        if let Some(header) = text.strip_prefix('>') {
            let name = header
                .split_whitespace()
                .next()
                .ok_or_else(|| DataError::at(path, line_no, "FASTA header has no name"))?;
            if genome.insert(name.to_string(), Vec::new()).is_some() {
                return Err(DataError::at(
                    path,
                    line_no,
                    format!("chromosome '{name}' appears twice"),
                ));
            }
            current = Some(name.to_string());
        } else if !text.is_empty() {
            let name = current.as_ref().ok_or_else(|| {
                DataError::at(path, line_no, "sequence data before the first '>' header")
            })?;
            if let Some(seq) = genome.get_mut(name) {
                seq.extend_from_slice(text.as_bytes());
            }
        }
        Ok(())
    })?;
    if genome.is_empty() {
        return Err(DataError::new(path, "genome FASTA holds no sequences"));
    }
    Ok(genome)
}

/// One BED region with its bases as they are on the genome's plus strand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenomeRegion {
    pub chrom: String,
    /// 0-based, half-open.
    pub start: usize,
    pub end: usize,
    pub name: Option<String>,
    /// `+`, `-`, or `None` for `.` or a missing column.
    pub strand: Option<char>,
    /// Validated, upper-case A/C/G/T/N; the plus strand whatever `strand` says.
    pub seq: String,
}

/// The regions of a BED file (`chrom start end [name [score [strand]]]`, 0-based half-open) with
/// their bases cut from `genome_fasta`, in file order, and how many `opts.skip_invalid` dropped
/// for holding a base other than A/C/G/T/N.
pub fn read_genome_regions(
    bed: &Path,
    genome_fasta: &Path,
    opts: &ReadOptions,
) -> Result<(Vec<GenomeRegion>, usize), DataError> {
    // Open the BED first so a mistyped BED path fails before a long genome load.
    let bed_reader = open(bed, is_gz(bed))?;
    let genome = load_genome(genome_fasta)?;
    let mut regions = Vec::new();
    let mut skipped = 0;
    for_each_line(bed, bed_reader, |line_no, line| {
        let text = line.trim();
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.is_empty() || text.starts_with('#') || matches!(fields[0], "track" | "browser") {
            return Ok(());
        }
        if fields.len() < 3 {
            return Err(DataError::at(
                bed,
                line_no,
                format!(
                    "expected at least 3 columns (chrom, start, end), found {}",
                    fields.len()
                ),
            ));
        }
        let coord = |i: usize, what: &str| {
            fields[i].parse::<usize>().map_err(|_| {
                DataError::at(
                    bed,
                    line_no,
                    format!(
                        "{what} must be a non-negative integer, found '{}'",
                        fields[i]
                    ),
                )
            })
        };
        let (chrom, start, end) = (fields[0], coord(1, "start")?, coord(2, "end")?);
        let name = fields.get(3).filter(|n| **n != ".");
        let strand = match fields.get(5).copied() {
            None | Some(".") => None,
            Some("+") => Some('+'),
            Some("-") => Some('-'),
            Some(other) => {
                return Err(DataError::at(
                    bed,
                    line_no,
                    format!("strand must be '+', '-' or '.', found '{other}'"),
                ))
            }
        };
        if start >= end {
            return Err(DataError::at(
                bed,
                line_no,
                format!("start {start} must be less than end {end}"),
            ));
        }
        let chrom_seq = genome.get(chrom).ok_or_else(|| {
            DataError::at(
                bed,
                line_no,
                format!(
                    "chromosome '{chrom}' is not in the genome {}",
                    genome_fasta.display()
                ),
            )
        })?;
        if end > chrom_seq.len() {
            return Err(DataError::at(
                bed,
                line_no,
                format!(
                    "end {end} is beyond the end of {chrom} (length {})",
                    chrom_seq.len()
                ),
            ));
        }
        // Lossy: a non-ASCII byte becomes U+FFFD, which validation then reports.
        let raw = String::from_utf8_lossy(&chrom_seq[start..end]);
        let seq = match validate_sequence(&raw, opts.ambiguous_as_n) {
            Ok(s) => s,
            Err(_) if opts.skip_invalid => {
                skipped += 1;
                return Ok(());
            }
            Err((offset, c)) => {
                return Err(DataError::at(
                    bed,
                    line_no,
                    format!(
                        "region {chrom}:{start}-{end} contains {c:?} at genome position {} \
                         ({}; --skip-invalid skips such regions)",
                        start + offset,
                        allowed_letters(c)
                    ),
                ))
            }
        };
        regions.push(GenomeRegion {
            chrom: chrom.to_string(),
            start,
            end,
            name: name.map(|n| n.to_string()),
            strand,
            seq,
        });
        Ok(())
    })?;
    if regions.is_empty() {
        let why = match skipped {
            0 => "the BED file has no regions".to_string(),
            n => format!("all {n} regions hold bases other than A/C/G/T/N"),
        };
        return Err(DataError::new(bed, format!("no records: {why}")));
    }
    Ok((regions, skipped))
}

/// Reads BED regions as labelled records: [`read_genome_regions`], with `-` strand regions
/// reverse-complemented.
///
/// Every record gets `label` (e.g. 1 for peaks, 0 for a background BED) and its chromosome, so the
/// result can be split by chromosome. Ids are the BED name, or `chrom:start-end(strand)`.
pub fn read_bed_regions(
    bed: &Path,
    genome_fasta: &Path,
    label: Option<usize>,
    opts: &ReadOptions,
) -> Result<Dataset, DataError> {
    if label.is_none() && opts.labels == LabelPolicy::Required {
        return Err(DataError::new(
            bed,
            "a label for the regions of this BED file is required",
        ));
    }
    let (regions, skipped) = read_genome_regions(bed, genome_fasta, opts)?;
    let records = regions
        .into_iter()
        .map(|r| {
            let GenomeRegion {
                chrom,
                start,
                end,
                name,
                strand,
                seq,
            } = r;
            let seq = if strand == Some('-') {
                reverse_complement(&seq)
            } else {
                seq
            };
            let id = match (name, strand) {
                (Some(n), _) => n,
                (None, Some(s)) => format!("{chrom}:{start}-{end}({s})"),
                (None, None) => format!("{chrom}:{start}-{end}"),
            };
            Record {
                id,
                seq,
                label,
                chrom: Some(chrom),
            }
        })
        .collect();
    Ok(Dataset { records, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(bed: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let genome = dir.path().join("g.fa");
        // chr1 = AACCGGTTAC GTacgtNNAA (20 bp over two lines), chr2 = GATTACA
        std::fs::write(
            &genome,
            ">chr1 test\nAACCGGTTACGT\nacgtNNAA\n>chr2\nGATTACA\n",
        )
        .unwrap();
        let bed_path = dir.path().join("peaks.bed");
        std::fs::write(&bed_path, bed).unwrap();
        (dir, bed_path, genome)
    }

    #[test]
    fn cuts_regions_including_minus_strand() {
        let (_d, bed, genome) = setup(
            "track name=peaks\n# comment\nchr1\t2\t8\nchr1\t10\t16\tpk2\t0\t-\nchr2 0 7 . 5 +\n",
        );
        let d = read_bed_regions(&bed, &genome, Some(1), &ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 3);
        assert_eq!(d.records[0].seq, "CCGGTT");
        assert_eq!(d.records[0].id, "chr1:2-8");
        assert_eq!(d.records[0].chrom.as_deref(), Some("chr1"));
        assert_eq!(d.records[0].label, Some(1));
        // chr1[10..16] = "GTacgt" -> upper "GTACGT" -> reverse complement "ACGTAC"
        assert_eq!(d.records[1].seq, "ACGTAC");
        assert_eq!(d.records[1].id, "pk2");
        assert_eq!(d.records[2].seq, "GATTACA");
        assert_eq!(d.records[2].id, "chr2:0-7(+)");
        assert_eq!(d.records[2].chrom.as_deref(), Some("chr2"));
    }

    #[test]
    fn out_of_range_unknown_chrom_and_empty_interval_name_bed_line() {
        for (bed, line, needle) in [
            ("chr1\t0\t5\nchr2\t3\t8\n", 2, "beyond"),
            ("chr1\t0\t5\n\nchr9\t0\t5\n", 3, "chr9"),
            ("chr1\t5\t5\n", 1, "less than"),
            ("chr1\tx\t5\n", 1, "start"),
            ("chr1\t0\n", 1, "at least 3"),
        ] {
            let (_d, bed_path, genome) = setup(bed);
            let e = read_bed_regions(&bed_path, &genome, Some(0), &ReadOptions::default())
                .expect_err(bed);
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains(needle), "{e}");
            assert!(e.to_string().starts_with(&bed_path.display().to_string()));
        }
    }

    #[test]
    fn label_policy_and_gz_genome() {
        let (d, bed, genome) = setup("chr2\t1\t4\n");
        assert!(read_bed_regions(&bed, &genome, None, &ReadOptions::default()).is_err());
        let gz = d.path().join("g.fa.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut enc, &std::fs::read(&genome).unwrap()).unwrap();
        enc.finish().unwrap();
        let opts = ReadOptions {
            labels: LabelPolicy::Optional,
            ..ReadOptions::default()
        };
        let data = read_bed_regions(&bed, &gz, None, &opts).unwrap();
        assert_eq!(data.records[0].seq, "ATT");
        assert_eq!(data.records[0].label, None);
    }
}
