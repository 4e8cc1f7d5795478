//! Scanning long sequences with a classifier trained on short windows.
//!
//! A model fine-tuned on 101-bp ChIP-seq windows answers "is this window bound?"; a lab wants to
//! know where in a locus, a promoter set or a whole chromosome the binding sites are. The scan
//! tiles each sequence with windows of the training width (a last window is aligned to the end so
//! every base is covered), scores every window but those all N, and turns the windows into
//! genome tracks:
//! each base's score is the mean class probability of the windows covering it (a bedGraph that
//! genome browsers draw and `bedGraphToBigWig` converts), and the stretches where that score
//! reaches a threshold are the hits (a BED file).

use std::ops::Range;
use std::path::Path;

use anyhow::Result;
use indicatif::ProgressBar;

use crate::data::{GenomeRegion, Record};

/// A stretch of sequence to scan and where its first base lies: a BED region on its chromosome,
/// or a whole FASTA/CSV sequence (named by its id, starting at 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRegion {
    pub chrom: String,
    pub offset: usize,
    pub seq: String,
}

impl From<GenomeRegion> for ScanRegion {
    fn from(r: GenomeRegion) -> Self {
        ScanRegion {
            chrom: r.chrom,
            offset: r.start,
            seq: r.seq,
        }
    }
}

impl From<Record> for ScanRegion {
    fn from(r: Record) -> Self {
        ScanRegion {
            chrom: r.id,
            offset: 0,
            seq: r.seq,
        }
    }
}

/// The windows tiling `len` bases: `width` wide, every `stride` bases, plus one aligned to the end
/// when the stride does not land there; one window of all `len` bases when `len <= width`.
pub fn windows(len: usize, width: usize, stride: usize) -> Vec<Range<usize>> {
    assert!(
        width > 0 && stride > 0,
        "window width and stride must be positive"
    );
    if len <= width {
        return std::iter::once(0..len).collect();
    }
    let mut out: Vec<Range<usize>> = (0..=len - width)
        .step_by(stride)
        .map(|s| s..s + width)
        .collect();
    if out.last().is_some_and(|w| w.end < len) {
        out.push(len - width..len);
    }
    out
}

/// A run of bases sharing one score, in region coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    pub start: usize,
    pub end: usize,
    pub score: f32,
}

/// Per base, the mean score of the windows covering it, as runs of equal value: `windows` must
/// be sorted by start with their ends sorted too (as [`windows`] makes them). Scores are rounded
/// to 4 decimals, the precision written out, so that neighbouring runs that print alike merge.
pub fn mean_coverage(windows: &[Range<usize>], scores: &[f32]) -> Vec<Segment> {
    assert_eq!(windows.len(), scores.len());
    let n = windows.len();
    let mut segments: Vec<Segment> = Vec::new();
    let (mut next_start, mut next_end) = (0, 0);
    let (mut sum, mut count) = (0f64, 0usize);
    let mut pos = match windows.first() {
        Some(w) => w.start,
        None => return segments,
    };
    while next_end < n {
        let boundary = match windows.get(next_start) {
            Some(w) => w.start.min(windows[next_end].end),
            None => windows[next_end].end,
        };
        if count > 0 && boundary > pos {
            let score = ((sum / count as f64) * 1e4).round() as f32 / 1e4;
            match segments.last_mut() {
                Some(last) if last.end == pos && last.score == score => last.end = boundary,
                _ => segments.push(Segment {
                    start: pos,
                    end: boundary,
                    score,
                }),
            }
        }
        pos = boundary;
        while next_start < n && windows[next_start].start == pos {
            sum += f64::from(scores[next_start]);
            count += 1;
            next_start += 1;
        }
        while next_end < n && windows[next_end].end == pos {
            sum -= f64::from(scores[next_end]);
            count -= 1;
            next_end += 1;
        }
        if count == 0 {
            // No window open: start the next stretch without the subtractions' rounding error.
            sum = 0.0;
        }
    }
    segments
}

/// The maximal stretches of contiguous segments scoring at least `threshold`, each with its
/// highest score.
pub fn hits(segments: &[Segment], threshold: f32) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for s in segments.iter().filter(|s| s.score >= threshold) {
        match out.last_mut() {
            Some(hit) if hit.end == s.start => {
                hit.end = s.end;
                hit.score = hit.score.max(s.score);
            }
            _ => out.push(*s),
        }
    }
    out
}

/// A region's windows and their class probabilities (row-major, windows x classes).
pub struct ScannedRegion {
    pub windows: Vec<Range<usize>>,
    pub probs: Vec<f32>,
}

/// What a scan runs with.
pub struct Scanner<'a> {
    pub predictor: crate::train::Predictor<'a>,
    pub width: usize,
    pub stride: usize,
    /// Score each window on both strands and average the probabilities.
    pub both_strands: bool,
}

/// Windows tokenized and scored per call: bounds the memory of the token ids of a chromosome.
const WINDOWS_PER_CHUNK: usize = 16_384;

impl Scanner<'_> {
    /// Scores every window of `region` but those all N (assembly gaps: nothing to score, and
    /// a chromosome's gaps would otherwise cost as much as its sequence); fails, naming the
    /// window, when one tokenizes to more than `max_len` tokens (its tail would be cut off
    /// without a word).
    pub fn scan(
        &self,
        region: &ScanRegion,
        progress: Option<&ProgressBar>,
    ) -> Result<ScannedRegion> {
        let mut windows = windows(region.seq.len(), self.width, self.stride);
        let tiled = windows.len();
        windows.retain(|w| region.seq.as_bytes()[w.clone()].iter().any(|&b| b != b'N'));
        if let Some(pb) = progress {
            pb.inc(((tiled - windows.len()) * (1 + usize::from(self.both_strands))) as u64);
        }
        let mut probs = Vec::with_capacity(windows.len() * self.predictor.model.num_labels);
        for chunk in windows.chunks(WINDOWS_PER_CHUNK) {
            let bases: Vec<&str> = chunk.iter().map(|w| &region.seq[w.clone()]).collect();
            let too_long = |i: usize| {
                let w = &chunk[i];
                anyhow::anyhow!(
                    "window {}:{}-{} is more than --max-length {} tokens; use a narrower --window \
                     or a larger --max-length",
                    region.chrom,
                    region.offset + w.start,
                    region.offset + w.end,
                    self.predictor.max_len
                )
            };
            probs.extend(self.predictor.whole_sequence_probabilities(
                &bases,
                self.both_strands,
                progress,
                too_long,
            )?);
        }
        Ok(ScannedRegion { windows, probs })
    }
}

/// Writes a scan's three files into `dir`: `windows.tsv` (every window's class probabilities),
/// `scores.bedgraph` (per base, the mean probability of `class` over the windows covering it) and
/// `hits.bed` (stretches where that reaches `threshold`; BED score = 1000 x their highest).
/// Coordinates are 0-based half-open, on the chromosome for BED regions.
pub fn write_scan(
    dir: &Path,
    scanned: &[(ScanRegion, ScannedRegion)],
    num_labels: usize,
    class: usize,
    threshold: f32,
) -> Result<usize> {
    use std::io::Write;
    let class_scores = |s: &ScannedRegion| -> Vec<f32> {
        s.probs.chunks(num_labels).map(|row| row[class]).collect()
    };
    let coverage: Vec<Vec<Segment>> = scanned
        .iter()
        .map(|(_, s)| mean_coverage(&s.windows, &class_scores(s)))
        .collect();
    crate::fsutil::write_atomic_with(&dir.join("windows.tsv"), |w| {
        write!(w, "chrom\tstart\tend")?;
        for c in 0..num_labels {
            write!(w, "\tprob_{c}")?;
        }
        writeln!(w)?;
        for (region, s) in scanned {
            for (win, row) in s.windows.iter().zip(s.probs.chunks(num_labels)) {
                let (start, end) = (region.offset + win.start, region.offset + win.end);
                write!(w, "{}\t{start}\t{end}", region.chrom)?;
                for p in row {
                    write!(w, "\t{p:.6}")?;
                }
                writeln!(w)?;
            }
        }
        Ok(())
    })?;
    crate::fsutil::write_atomic_with(&dir.join("scores.bedgraph"), |w| {
        for ((region, _), segments) in scanned.iter().zip(&coverage) {
            for s in segments {
                let (start, end) = (region.offset + s.start, region.offset + s.end);
                writeln!(w, "{}\t{start}\t{end}\t{:.4}", region.chrom, s.score)?;
            }
        }
        Ok(())
    })?;
    let mut count = 0;
    crate::fsutil::write_atomic_with(&dir.join("hits.bed"), |w| {
        for ((region, _), segments) in scanned.iter().zip(&coverage) {
            for hit in hits(segments, threshold) {
                count += 1;
                let (start, end) = (region.offset + hit.start, region.offset + hit.end);
                let score = (1000.0 * hit.score).round() as u32;
                writeln!(w, "{}\t{start}\t{end}\thit{count}\t{score}", region.chrom)?;
            }
        }
        Ok(())
    })?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_every_base_and_align_the_last_to_the_end() {
        assert_eq!(windows(10, 4, 3), vec![0..4, 3..7, 6..10]);
        assert_eq!(windows(11, 4, 3), vec![0..4, 3..7, 6..10, 7..11]);
        let whole = |end| vec![Range { start: 0, end }];
        assert_eq!(windows(4, 4, 3), whole(4));
        assert_eq!(windows(3, 5, 1), whole(3));
        assert_eq!(windows(6, 2, 2), vec![0..2, 2..4, 4..6]);
        for (len, width, stride) in [(101, 11, 7), (50, 50, 3), (97, 10, 10), (1000, 101, 13)] {
            let ws = windows(len, width, stride);
            let mut covered = vec![false; len];
            for w in &ws {
                assert!(w.end <= len && w.len() == width.min(len));
                covered[w.clone()].iter_mut().for_each(|c| *c = true);
            }
            assert!(covered.iter().all(|&c| c), "{len} {width} {stride}");
            assert!(ws
                .windows(2)
                .all(|p| p[0].start < p[1].start && p[0].end < p[1].end));
        }
    }

    /// The per-base mean written out base by base, the plain way, against the sweep.
    #[test]
    fn coverage_equals_a_per_base_mean() {
        let mut state = 7u64;
        for (len, width, stride) in [(37, 8, 3), (40, 8, 8), (23, 5, 1), (6, 10, 2), (64, 9, 4)] {
            let ws = windows(len, width, stride);
            let scores: Vec<f32> = ws
                .iter()
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect();
            let segments = mean_coverage(&ws, &scores);
            let mut per_base = vec![f32::NAN; len];
            for s in &segments {
                per_base[s.start..s.end]
                    .iter_mut()
                    .for_each(|v| *v = s.score);
            }
            assert_eq!(segments.first().unwrap().start, 0);
            assert_eq!(segments.last().unwrap().end, len);
            assert!(segments
                .windows(2)
                .all(|p| p[0].end == p[1].start && p[0].score != p[1].score));
            for (base, &got) in per_base.iter().enumerate() {
                let covering: Vec<f64> = ws
                    .iter()
                    .zip(&scores)
                    .filter(|(w, _)| w.contains(&base))
                    .map(|(_, &s)| f64::from(s))
                    .collect();
                let want = covering.iter().sum::<f64>() / covering.len() as f64;
                assert!(
                    (f64::from(got) - want).abs() <= 5.1e-5,
                    "base {base}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn hits_join_touching_segments_above_the_threshold() {
        let seg = |start, end, score| Segment { start, end, score };
        let segments = [
            seg(0, 3, 0.2),
            seg(3, 5, 0.6),
            seg(5, 9, 0.9),
            seg(9, 10, 0.5),
            seg(10, 12, 0.4),
            seg(12, 20, 0.7),
            seg(25, 30, 0.8),
        ];
        let found = hits(&segments, 0.5);
        assert_eq!(
            found,
            vec![seg(3, 10, 0.9), seg(12, 20, 0.7), seg(25, 30, 0.8)]
        );
        assert!(hits(&segments, 0.95).is_empty());
    }
}
