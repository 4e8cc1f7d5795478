//! Variants from a VCF file, each turned into the two sequences a classifier compares: the genome
//! window around the variant with the reference allele and the same window with the alternate one.

use std::path::Path;

use super::bed::load_genome;
use super::read::{for_each_line, is_gz, open};
use super::{allowed_letters, validate_sequence, DataError, ReadOptions};

/// One alternate allele of a VCF line, with its reference and alternate windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantWindows {
    pub chrom: String,
    /// 1-based, as in the VCF.
    pub pos: usize,
    pub id: String,
    pub reference: String,
    pub alternate: String,
    /// 0-based start of both windows on the chromosome.
    pub window_start: usize,
    /// The genome's bases: `window` wide (less at a chromosome shorter than that), holding the
    /// reference allele centred where the chromosome's ends allow.
    pub ref_seq: String,
    /// The same left flank, the alternate allele, and the right flank that keeps the width.
    pub alt_seq: String,
}

/// Reads the variants of `vcf` (`CHROM POS ID REF ALT ...`, optionally gzipped; one entry per
/// alternate allele of a multi-allelic line) and cuts `window` bases around each from
/// `genome_fasta`. A REF that disagrees with the genome, an allele that is not plain bases
/// (`<DEL>`, `*`, breakends) or a window holding letters other than A/C/G/T/N is an error naming
/// the line, unless `opts.skip_invalid`: then it is skipped and counted (second value). With
/// `opts.ambiguous_as_n`, IUPAC codes in the genome are read as N, and a REF base matches a code
/// that stands for it (the VCF specification writes R as A, the first base it stands for).
pub fn read_variant_windows(
    vcf: &Path,
    genome_fasta: &Path,
    window: usize,
    opts: &ReadOptions,
) -> Result<(Vec<VariantWindows>, usize), DataError> {
    let reader = open(vcf, is_gz(vcf))?;
    let genome = load_genome(genome_fasta)?;
    let mut variants = Vec::new();
    let mut skipped = 0;
    for_each_line(vcf, reader, |line_no, line| {
        let text = line.trim_end();
        if text.is_empty() || text.starts_with('#') {
            return Ok(());
        }
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() < 5 {
            return Err(DataError::at(
                vcf,
                line_no,
                format!(
                    "expected at least 5 tab-separated columns (CHROM POS ID REF ALT), found {}",
                    fields.len()
                ),
            ));
        }
        let (chrom, id, reference) = (fields[0], fields[2], fields[3]);
        let pos: usize = fields[1].parse().ok().filter(|&p| p >= 1).ok_or_else(|| {
            DataError::at(
                vcf,
                line_no,
                format!("POS must be a 1-based position, found '{}'", fields[1]),
            )
        })?;
        let chrom_seq = genome.get(chrom).ok_or_else(|| {
            DataError::at(
                vcf,
                line_no,
                format!(
                    "chromosome '{chrom}' is not in the genome {}",
                    genome_fasta.display()
                ),
            )
        })?;
        for alternate in fields[4].split(',') {
            let cut = variant_windows(
                chrom_seq,
                pos,
                reference,
                alternate,
                window,
                opts.ambiguous_as_n,
            );
            match cut {
                Ok((window_start, ref_seq, alt_seq)) => variants.push(VariantWindows {
                    chrom: chrom.to_string(),
                    pos,
                    id: id.to_string(),
                    reference: reference.to_ascii_uppercase(),
                    alternate: alternate.to_ascii_uppercase(),
                    window_start,
                    ref_seq,
                    alt_seq,
                }),
                Err(_) if opts.skip_invalid => skipped += 1,
                Err(why) => {
                    return Err(DataError::at(
                        vcf,
                        line_no,
                        format!("{chrom}:{pos} {reference}>{alternate}: {why} (--skip-invalid skips such variants)"),
                    ))
                }
            }
        }
        Ok(())
    })?;
    if variants.is_empty() {
        let why = match skipped {
            0 => "the VCF file has no variants".to_string(),
            n => format!("all {n} variants were skipped"),
        };
        return Err(DataError::new(vcf, format!("no variants: {why}")));
    }
    Ok((variants, skipped))
}

/// The start, reference window and alternate window of a variant at 1-based `pos`.
fn variant_windows(
    chrom_seq: &[u8],
    pos: usize,
    reference: &str,
    alternate: &str,
    window: usize,
    ambiguous_as_n: bool,
) -> Result<(usize, String, String), String> {
    let allele = |a: &str, what: &str| match validate_sequence(a, false) {
        Ok(s) if !s.is_empty() => Ok(s),
        _ => Err(format!(
            "the {what} allele '{a}' is not plain bases (A, C, G, T, N)"
        )),
    };
    let (reference, alternate) = (allele(reference, "REF")?, allele(alternate, "ALT")?);
    let at = pos - 1;
    let len = chrom_seq.len();
    if at + reference.len() > len {
        return Err(format!(
            "REF runs past the end of the chromosome (length {len})"
        ));
    }
    let genome_ref = &chrom_seq[at..at + reference.len()];
    let matches = |(&genome, allele): (&u8, u8)| {
        genome.eq_ignore_ascii_case(&allele) || (ambiguous_as_n && stands_for(genome, allele))
    };
    if !genome_ref.iter().zip(reference.bytes()).all(matches) {
        let genome_ref = String::from_utf8_lossy(genome_ref);
        return Err(format!(
            "REF does not match the genome, which has '{genome_ref}' there"
        ));
    }
    // Centre the reference allele, then move the window inside the chromosome; it always starts
    // at or before the variant so both windows share the left flank.
    let left = window.saturating_sub(reference.len()) / 2;
    let start = at
        .saturating_sub(left)
        .min(len.saturating_sub(window))
        .min(at);
    let cut = |from: usize, to: usize| -> Result<String, String> {
        let raw = String::from_utf8_lossy(&chrom_seq[from..to.min(len)]);
        validate_sequence(&raw, ambiguous_as_n).map_err(|(offset, c)| {
            format!(
                "the window holds {c:?} at genome position {} ({})",
                from + offset,
                allowed_letters(c)
            )
        })
    };
    let ref_seq = cut(start, start + window)?;
    let flank = cut(start, at)?;
    let right_len = window.saturating_sub(flank.len() + alternate.len());
    let after = at + reference.len();
    let mut alt_seq = flank + &alternate + &cut(after, after + right_len)?;
    alt_seq.truncate(window);
    Ok((start, ref_seq, alt_seq))
}

/// Whether the IUPAC code `code` stands for `base` among others (R for A and G, ...).
fn stands_for(code: u8, base: u8) -> bool {
    let bases: &[u8] = match code.to_ascii_uppercase() {
        b'R' => b"AG",
        b'Y' => b"CT",
        b'S' => b"CG",
        b'W' => b"AT",
        b'K' => b"GT",
        b'M' => b"AC",
        b'B' => b"CGT",
        b'D' => b"AGT",
        b'H' => b"ACT",
        b'V' => b"ACG",
        _ => b"",
    };
    bases.contains(&base.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    // 0-based:      0         1         2
    //               0123456789012345678901234
    const CHROM: &[u8] = b"AACCGGTTACGTacgtNNAATTGGC";

    #[test]
    fn windows_centre_the_allele_and_keep_the_width() {
        // SNV at 0-based 12 ('a'): window 7 from 9.
        let (start, r, a) = variant_windows(CHROM, 13, "A", "G", 7, false).unwrap();
        assert_eq!((start, r.as_str(), a.as_str()), (9, "CGTACGT", "CGTGCGT"));
        // Deletion of CG at 0-based 8..10 ("ACG" -> "A"): the right flank grows by two bases.
        let (start, r, a) = variant_windows(CHROM, 9, "ACG", "A", 9, false).unwrap();
        assert_eq!(
            (start, r.as_str(), a.as_str()),
            (5, "GTTACGTAC", "GTTATACGT")
        );
        // Insertion after 0-based 4: "G" -> "GAAA", the right flank shrinks.
        let (start, r, a) = variant_windows(CHROM, 5, "G", "GAAA", 7, false).unwrap();
        assert_eq!((start, r.as_str(), a.as_str()), (1, "ACCGGTT", "ACCGAAA"));
        // Near either end the window moves inside the chromosome.
        let (start, r, a) = variant_windows(CHROM, 1, "A", "T", 5, false).unwrap();
        assert_eq!((start, r.as_str(), a.as_str()), (0, "AACCG", "TACCG"));
        let (start, r, a) = variant_windows(CHROM, 25, "C", "A", 5, false).unwrap();
        assert_eq!((start, r.as_str(), a.as_str()), (20, "TTGGC", "TTGGA"));
        // A window wider than the chromosome is the chromosome.
        let (start, r, _) = variant_windows(CHROM, 3, "C", "T", 100, false).unwrap();
        assert_eq!((start, r.len()), (0, CHROM.len()));
    }

    #[test]
    fn bad_alleles_and_mismatched_references_are_named() {
        for (pos, reference, alternate, needle) in [
            (13, "C", "G", "does not match the genome, which has 'a'"),
            (13, "A", "<DEL>", "ALT allele '<DEL>'"),
            (13, "A", "*", "ALT allele '*'"),
            (25, "CA", "C", "past the end"),
        ] {
            let e = variant_windows(CHROM, pos, reference, alternate, 7, false).unwrap_err();
            assert!(e.contains(needle), "{pos} {reference}>{alternate}: {e}");
        }
        let e = variant_windows(b"ACGTRACGT", 2, "C", "A", 5, false).unwrap_err();
        assert!(e.contains("holds 'R' at genome position 4"), "{e}");
        assert!(e.contains("--ambiguous-as-n"), "{e}");
    }

    #[test]
    fn ambiguous_as_n_reads_iupac_genome_bases_as_n_and_matches_refs_they_stand_for() {
        const GENOME: &[u8] = b"ACGTRACGTk";
        // An R in the window becomes N in both windows.
        let (start, r, a) = variant_windows(GENOME, 2, "C", "A", 5, true).unwrap();
        assert_eq!((start, r.as_str(), a.as_str()), (0, "ACGTN", "AAGTN"));
        // A variant at the R itself: the specification's REF for R is A; G (also R) matches
        // too, C does not. The lower-case k at the end stands for G or T.
        for reference in ["A", "G", "a"] {
            let (_, r, a) = variant_windows(GENOME, 5, reference, "T", 3, true).unwrap();
            assert_eq!((r.as_str(), a.as_str()), ("TNA", "TTA"), "REF {reference}");
        }
        let e = variant_windows(GENOME, 5, "C", "T", 3, true).unwrap_err();
        assert!(e.contains("which has 'R'"), "{e}");
        assert!(variant_windows(GENOME, 10, "T", "A", 3, true).is_ok());
        assert!(variant_windows(GENOME, 10, "A", "C", 3, true).is_err());
        // Without the option the same REF is a mismatch.
        assert!(variant_windows(GENOME, 5, "A", "T", 3, false)
            .unwrap_err()
            .contains("does not match"));
    }

    #[test]
    fn reads_a_vcf_one_entry_per_alternate_allele() {
        let dir = tempfile::tempdir().unwrap();
        let genome = dir.path().join("g.fa");
        std::fs::write(&genome, ">chr1\nAACCGGTTACGT\nacgtNNAATTGGC\n").unwrap();
        let vcf = dir.path().join("v.vcf");
        let body = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\n\
                    chr1\t13\trs1\ta\tG,T\t.\nchr1\t5\t.\tG\tGAAA\t.\n";
        std::fs::write(&vcf, body).unwrap();
        let (variants, skipped) =
            read_variant_windows(&vcf, &genome, 7, &ReadOptions::default()).unwrap();
        assert_eq!(skipped, 0);
        let alts: Vec<(&str, &str, &str)> = variants
            .iter()
            .map(|v| (v.id.as_str(), v.alternate.as_str(), v.alt_seq.as_str()))
            .collect();
        assert_eq!(
            alts,
            [
                ("rs1", "G", "CGTGCGT"),
                ("rs1", "T", "CGTTCGT"),
                (".", "GAAA", "ACCGAAA")
            ]
        );
        assert_eq!(variants[0].reference, "A");
        // A mismatch names the file and line, or is skipped and counted when asked.
        std::fs::write(&vcf, format!("{body}chr1\t3\t.\tG\tT\t.\n")).unwrap();
        let e = read_variant_windows(&vcf, &genome, 7, &ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("does not match"), "{e}");
        let skip = ReadOptions {
            skip_invalid: true,
            ..ReadOptions::default()
        };
        let (variants, skipped) = read_variant_windows(&vcf, &genome, 7, &skip).unwrap();
        assert_eq!((variants.len(), skipped), (3, 1));
        std::fs::write(&vcf, "chr9\t3\t.\tG\tT\n").unwrap();
        let e = read_variant_windows(&vcf, &genome, 7, &ReadOptions::default()).unwrap_err();
        assert!(e.message.contains("chr9"), "{e}");
    }
}
