//! Quantized frozen base weights for QLoRA (Dettmers et al., 2023): int8 with one absmax scale per
//! output row, and 4-bit NormalFloat (NF4) in blocks of 64 with double-quantized block scales.
//!
//! A quantized weight is never expanded whole: [`quantized_matmul`] dequantizes a tile of rows at a
//! time, multiplies it, and drops it, so the f32 copy alive at any moment is one tile. Its backward
//! pass yields only the input gradient (computed tile-wise the same way); the base stays frozen.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D,
};
use rayon::prelude::*;

/// How a frozen linear weight is stored.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    /// 8-bit codes, one f32 absmax scale per output row.
    Int8,
    /// 4-bit NormalFloat codes in blocks of 64, block absmax double-quantized to 8 bits.
    Nf4,
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantKind::Int8 => "int8",
            QuantKind::Nf4 => "nf4",
        })
    }
}

/// The 16 NormalFloat4 levels of the QLoRA paper (bitsandbytes' table): quantiles of N(0, 1) with
/// an exact zero, 8 on the positive and 7 on the negative side, normalised to [-1, 1].
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per NF4 absmax block.
pub const NF4_BLOCK: usize = 64;
/// Block absmax values per second-level (double-quantization) block.
pub const ABSMAX_BLOCK: usize = 256;
/// Target size of one dequantized tile, in elements (1 MiB of f32).
const TILE_ELEMS: usize = 1 << 18;

/// Index of the NF4 level nearest to `v` (in [-1, 1]); ties go to the lower level.
pub fn nf4_code(v: f32) -> u8 {
    // Midpoints between neighbouring levels split the line into 16 bins.
    let mut code = 0u8;
    for k in 0..15 {
        if v > 0.5 * (NF4_LEVELS[k] + NF4_LEVELS[k + 1]) {
            code = k as u8 + 1;
        }
    }
    code
}

/// Packs 4-bit codes two per byte, the first of each pair in the high nibble (bitsandbytes'
/// order); an odd count leaves the last low nibble zero.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect()
}

/// The `n` 4-bit codes held in `packed`.
pub fn unpack_nibbles(packed: &[u8], n: usize) -> Vec<u8> {
    (0..n).map(|i| nibble(packed, i)).collect()
}

fn nibble(packed: &[u8], i: usize) -> u8 {
    let b = packed[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0f
    }
}

/// Double quantization of positive block scales: subtract their mean, then store each centred
/// value as an int8 code against the absmax of its block of [`ABSMAX_BLOCK`].
#[derive(Clone, Debug)]
pub struct DoubleQuant {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub mean: f32,
}

impl DoubleQuant {
    pub fn quantize(values: &[f32]) -> Self {
        let mean = if values.is_empty() {
            0.0
        } else {
            (values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64) as f32
        };
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(values.len().div_ceil(ABSMAX_BLOCK));
        for block in values.chunks(ABSMAX_BLOCK) {
            let s = block.iter().fold(0f32, |m, &v| m.max((v - mean).abs()));
            scales.push(s);
            codes.extend(block.iter().map(|&v| {
                if s == 0.0 {
                    0
                } else {
                    (127.0 * (v - mean) / s).round().clamp(-127.0, 127.0) as i8
                }
            }));
        }
        DoubleQuant {
            codes,
            scales,
            mean,
        }
    }

    /// The reconstructed value `i`.
    pub fn get(&self, i: usize) -> f32 {
        self.mean + self.codes[i] as f32 * self.scales[i / ABSMAX_BLOCK] / 127.0
    }

    fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + 4
    }
}

enum Storage {
    Int8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
    Nf4 {
        packed: Vec<u8>,
        absmax: DoubleQuant,
    },
}

/// A frozen (rows x cols) weight, `rows` = output features, stored quantized.
pub struct QuantizedWeight {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl QuantizedWeight {
    /// Quantizes a row-major (rows x cols) matrix.
    pub fn from_slice(w: &[f32], rows: usize, cols: usize, kind: QuantKind) -> Self {
        assert_eq!(w.len(), rows * cols, "weight size does not match its shape");
        let storage = match kind {
            QuantKind::Int8 => {
                let mut codes = vec![0i8; w.len()];
                let scales: Vec<f32> = w
                    .par_chunks(cols.max(1))
                    .zip(codes.par_chunks_mut(cols.max(1)))
                    .map(|(row, out)| {
                        let s = row.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0;
                        for (o, &v) in out.iter_mut().zip(row) {
                            *o = if s == 0.0 {
                                0
                            } else {
                                (v / s).round().clamp(-127.0, 127.0) as i8
                            };
                        }
                        s
                    })
                    .collect();
                Storage::Int8 { codes, scales }
            }
            QuantKind::Nf4 => {
                let absmax: Vec<f32> = w
                    .chunks(NF4_BLOCK)
                    .map(|b| b.iter().fold(0f32, |m, &v| m.max(v.abs())))
                    .collect();
                // Codes use the exact block absmax; only the stored scale is double-quantized.
                let mut packed = vec![0u8; w.len().div_ceil(2)];
                packed
                    .par_chunks_mut(NF4_BLOCK / 2)
                    .enumerate()
                    .for_each(|(blk, out)| {
                        let a = absmax[blk];
                        let vals = &w[blk * NF4_BLOCK..((blk + 1) * NF4_BLOCK).min(w.len())];
                        let codes: Vec<u8> = vals
                            .iter()
                            .map(|&v| nf4_code(if a == 0.0 { 0.0 } else { v / a }))
                            .collect();
                        out.copy_from_slice(&pack_nibbles(&codes));
                    });
                Storage::Nf4 {
                    packed,
                    absmax: DoubleQuant::quantize(&absmax),
                }
            }
        };
        QuantizedWeight {
            rows,
            cols,
            storage,
        }
    }

    /// Quantizes a 2-D f32 tensor (out, in).
    pub fn quantize(w: &Tensor, kind: QuantKind) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self::from_slice(&values, rows, cols, kind))
    }

    pub fn kind(&self) -> QuantKind {
        match self.storage {
            Storage::Int8 { .. } => QuantKind::Int8,
            Storage::Nf4 { .. } => QuantKind::Nf4,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes held: codes, scales and (NF4) the double-quantization constants.
    pub fn storage_bytes(&self) -> usize {
        match &self.storage {
            Storage::Int8 { codes, scales } => codes.len() + 4 * scales.len(),
            Storage::Nf4 { packed, absmax } => packed.len() + absmax.bytes(),
        }
    }

    /// Writes rows `r0..r1` dequantized into `out` (length `(r1 - r0) * cols`).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let cols = self.cols;
        assert_eq!(out.len(), (r1 - r0) * cols, "tile buffer size");
        if cols == 0 {
            return;
        }
        match &self.storage {
            Storage::Int8 { codes, scales } => {
                out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
                    let r = r0 + i;
                    let s = scales[r];
                    for (o, &c) in row.iter_mut().zip(&codes[r * cols..(r + 1) * cols]) {
                        *o = c as f32 * s;
                    }
                });
            }
            Storage::Nf4 { packed, absmax } => {
                out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
                    let start = (r0 + i) * cols;
                    let mut blk = usize::MAX;
                    let mut a = 0f32;
                    for (j, o) in row.iter_mut().enumerate() {
                        let idx = start + j;
                        if idx / NF4_BLOCK != blk {
                            blk = idx / NF4_BLOCK;
                            a = absmax.get(blk);
                        }
                        *o = NF4_LEVELS[nibble(packed, idx) as usize] * a;
                    }
                });
            }
        }
    }

    /// The whole weight dequantized (for tests, merging and inspection, never in the forward).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    fn tile_rows(&self) -> usize {
        (TILE_ELEMS / self.cols.max(1)).clamp(1, self.rows.max(1))
    }

    /// One dequantized tile of rows `r0..r1` as a (r1 - r0, cols) tensor of `dtype`.
    fn tile(&self, r0: usize, r1: usize, like: &Tensor) -> candle_core::Result<Tensor> {
        let mut buf = vec![0f32; (r1 - r0) * self.cols];
        self.dequantize_rows(r0, r1, &mut buf);
        Tensor::from_vec(buf, (r1 - r0, self.cols), like.device())?.to_dtype(like.dtype())
    }

    /// Checks that `rows` lies within the weight.
    fn check_rows(&self, rows: &Range<usize>) -> candle_core::Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            candle_core::bail!(
                "rows {rows:?} of a quantized weight with {} rows",
                self.rows
            );
        }
        Ok(())
    }

    /// `x @ W[rows]^T` for x (n, cols), tile by tile, outside the autograd graph.
    pub fn matmul_t(&self, x: &Tensor, rows: Range<usize>) -> candle_core::Result<Tensor> {
        self.check_rows(&rows)?;
        let x = x.detach().contiguous()?;
        let step = self.tile_rows();
        let mut parts = Vec::with_capacity(rows.len().div_ceil(step));
        for r0 in rows.clone().step_by(step) {
            let r1 = (r0 + step).min(rows.end);
            let w = self.tile(r0, r1, &x)?;
            parts.push(x.matmul(&w.t()?)?);
        }
        match parts.len() {
            0 => Tensor::zeros((x.dim(0)?, 0), x.dtype(), x.device()),
            1 => Ok(parts.remove(0)),
            _ => Tensor::cat(&parts, D::Minus1),
        }
    }

    /// `g @ W[rows]` for g (n, rows.len()): the input gradient of `x @ W[rows]^T`, tile by tile.
    pub fn matmul(&self, g: &Tensor, rows: Range<usize>) -> candle_core::Result<Tensor> {
        self.check_rows(&rows)?;
        let step = self.tile_rows();
        let mut acc: Option<Tensor> = None;
        for r0 in rows.clone().step_by(step) {
            let r1 = (r0 + step).min(rows.end);
            let w = self.tile(r0, r1, g)?;
            let part = g
                .narrow(1, r0 - rows.start, r1 - r0)?
                .contiguous()?
                .matmul(&w)?;
            acc = Some(match acc {
                None => part,
                Some(a) => (a + part)?,
            });
        }
        match acc {
            Some(a) => Ok(a),
            None => Tensor::zeros((g.dim(0)?, self.cols), g.dtype(), g.device()),
        }
    }
}

/// Bytes a (rows x cols) weight takes quantized as `kind` (what [`QuantizedWeight::storage_bytes`]
/// reports), for estimates made without quantizing.
pub fn quantized_bytes(kind: QuantKind, rows: usize, cols: usize) -> usize {
    let n = rows * cols;
    match kind {
        QuantKind::Int8 => n + 4 * rows,
        QuantKind::Nf4 => {
            let blocks = n.div_ceil(NF4_BLOCK);
            n.div_ceil(2) + blocks + 4 * blocks.div_ceil(ABSMAX_BLOCK) + 4
        }
    }
}

/// `x @ W[rows]^T (+ bias)` for x (n, in), a quantized W (out, in) and a frozen bias for those
/// rows; differentiable in `x` only. A row range lets a fused projection (DNABERT-2's `Wqkv`)
/// be computed block by block, as the dense layers are.
pub fn quantized_linear(
    x: &Tensor,
    w: &Arc<QuantizedWeight>,
    rows: Range<usize>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !crate::ops::fused_for(x) {
        // The plain composition (and the only path off the CPU): the rows dequantized whole.
        let y = x.matmul(&w.tile(rows.start, rows.end, x)?.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = QuantMatmul {
        weight: w.clone(),
        rows,
        bias: bias.map(Tensor::detach),
    };
    if !x.track_op() {
        return op.forward(&x.detach());
    }
    x.contiguous()?.apply_op1(op)
}

/// `x @ W^T` for the whole of a quantized W.
pub fn quantized_matmul(x: &Tensor, w: &Arc<QuantizedWeight>) -> candle_core::Result<Tensor> {
    quantized_linear(x, w, 0..w.rows, None)
}

/// The product (bias added) as a graph node of `x` alone: the graph keeps `x` (shared with the
/// rest of the graph) and the output, but no dequantized weight and no separate bias sum.
/// Backward routes `grad @ W[rows]` (tile-wise) to `x`; weight and bias get nothing.
struct QuantMatmul {
    weight: Arc<QuantizedWeight>,
    rows: Range<usize>,
    bias: Option<Tensor>,
}

impl QuantMatmul {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.matmul_t(x, self.rows.clone())?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("quantized-matmul expects a contiguous input")
        };
        let x = match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu)?,
            other => candle_core::bail!(
                "quantized-matmul supports f32 and f64 inputs, not {:?}",
                other.dtype()
            ),
        };
        let y = self.forward(&x)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let storage = match flat.dtype() {
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            _ => CpuStorage::F32(flat.to_vec1()?),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.weight.matmul(grad_res, self.rows.clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Initializer;
    use candle_core::{Device, Var};

    /// Standard normal CDF by Simpson integration of the density from 0 (independent of any erf
    /// approximation), inverted by bisection.
    fn norm_cdf(x: f64) -> f64 {
        let n = 20_000;
        let h = x / n as f64;
        let pdf = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let mut s = pdf(0.0) + pdf(x);
        for i in 1..n {
            s += pdf(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        0.5 + s * h / 3.0
    }

    fn norm_ppf(p: f64) -> f64 {
        let (mut lo, mut hi) = (-10.0, 10.0);
        for _ in 0..80 {
            let mid = 0.5 * (lo + hi);
            if norm_cdf(mid) < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }

    #[test]
    fn nf4_levels_are_the_papers_normal_quantiles() {
        // QLoRA's construction: offset delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2; 8 positive
        // quantiles at linspace(delta, 0.5, 9)[..8], 7 negative at linspace(delta, 0.5, 8)[..7],
        // plus zero, all divided by the largest.
        let delta = 0.5 * ((1.0 - 1.0 / 30.0) + (1.0 - 1.0 / 32.0));
        let lin = |n: usize, k: usize| delta + (0.5 - delta) * k as f64 / (n - 1) as f64;
        let mut levels: Vec<f64> = (0..8).map(|k| norm_ppf(lin(9, k))).collect();
        levels.extend((0..7).map(|k| -norm_ppf(lin(8, k))));
        levels.push(0.0);
        let top = levels.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut levels: Vec<f64> = levels.iter().map(|v| v / top).collect();
        levels.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for (want, have) in levels.iter().zip(NF4_LEVELS) {
            assert!((want - have as f64).abs() < 1e-6, "{levels:?}");
        }
        for (k, &l) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(nf4_code(l) as usize, k);
        }
    }

    #[test]
    fn nibble_packing_round_trips() {
        let codes: Vec<u8> = (0..37).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let packed = pack_nibbles(&codes);
        assert_eq!(packed.len(), 19);
        assert_eq!(packed[0], (3 << 4) | 10);
        assert_eq!(unpack_nibbles(&packed, codes.len()), codes);
    }

    #[test]
    fn double_quantization_reconstructs_block_scales() {
        let mut init = Initializer::new(11);
        let absmax: Vec<f32> = init.uniform(700, 1.0).iter().map(|v| 2.0 + v).collect();
        let dq = DoubleQuant::quantize(&absmax);
        assert_eq!(dq.scales.len(), 3);
        for (i, &a) in absmax.iter().enumerate() {
            // Rounding to 1/127 of the block scale: at most half a step (plus f32 slack).
            let bound = dq.scales[i / ABSMAX_BLOCK] / 254.0 + 1e-6;
            assert!((dq.get(i) - a).abs() <= bound, "{i}: {} vs {a}", dq.get(i));
        }
    }

    /// Largest gap between neighbouring NF4 levels, halved: the worst rounding error of a
    /// normalised value.
    fn nf4_half_gap() -> f32 {
        NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max)
            / 2.0
    }

    #[test]
    fn nf4_error_on_gaussian_weights_is_within_bound() {
        let (rows, cols) = (96, 200);
        let sigma = 0.02;
        let w = Initializer::new(5).normal(rows * cols, sigma);
        let q = QuantizedWeight::from_slice(&w, rows, cols, QuantKind::Nf4);
        assert_eq!(
            q.storage_bytes(),
            quantized_bytes(QuantKind::Nf4, rows, cols)
        );
        let Storage::Nf4 { absmax, .. } = &q.storage else {
            unreachable!()
        };
        let back = q.dequantize();
        let h = nf4_half_gap();
        let mut sq = 0f64;
        for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
            let blk = i / NF4_BLOCK;
            let true_absmax = w[blk * NF4_BLOCK..((blk + 1) * NF4_BLOCK).min(w.len())]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            // |x - l*a'| <= |x - l*a| + |l| |a - a'| <= h*a + |a - a'|.
            let bound = h * true_absmax + (true_absmax - absmax.get(blk)).abs() + 1e-7;
            assert!(
                (a - b).abs() <= bound,
                "element {i}: {a} -> {b}, bound {bound}"
            );
            sq += ((a - b) as f64).powi(2);
        }
        // For N(0, s^2) the block absmax of 64 is about 2.4 s and the level gaps near the bulk are
        // about 0.08-0.09 of it, so uniform rounding gives an RMS error near 0.2 s / sqrt(12) =
        // 0.06 s (less in the denser centre); 0.1 s leaves room and still fails a broken table.
        let rmse = (sq / w.len() as f64).sqrt();
        assert!(rmse < 0.1 * sigma, "rmse {rmse}");
        assert!(rmse > 0.0, "nothing was quantized");
    }

    #[test]
    fn int8_rows_round_trip_within_half_a_step() {
        let (rows, cols) = (7, 33);
        let w = Initializer::new(9).normal(rows * cols, 1.0);
        let q = QuantizedWeight::from_slice(&w, rows, cols, QuantKind::Int8);
        assert_eq!(q.storage_bytes(), rows * cols + 4 * rows);
        assert_eq!(
            q.storage_bytes(),
            quantized_bytes(QuantKind::Int8, rows, cols)
        );
        let Storage::Int8 { codes, scales } = &q.storage else {
            unreachable!()
        };
        let back = q.dequantize();
        let mut sq = 0f64;
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((scales[r] - absmax / 127.0).abs() < 1e-9);
            // The largest entry maps to +-127 exactly.
            let k = row.iter().position(|v| v.abs() == absmax).unwrap();
            assert_eq!(codes[r * cols + k].unsigned_abs(), 127);
            for c in 0..cols {
                let err = (row[c] - back[r * cols + c]).abs();
                assert!(err <= scales[r] / 2.0 + 1e-6, "({r},{c}) err {err}");
                sq += (err as f64).powi(2);
            }
        }
        // Uniform rounding error of step s has RMS s/sqrt(12); s = absmax/127 ~ 3/127 here.
        let rmse = (sq / w.len() as f64).sqrt();
        assert!(rmse < 3.5 / 127.0 / 12f64.sqrt(), "rmse {rmse}");
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn blocked_kernel_equals_dequantize_then_matmul() {
        // Whole weights, and row blocks with a bias.
        let dev = Device::Cpu;
        let mut init = Initializer::new(21);
        // Odd sizes, sizes not dividing the NF4 block, and one large enough to need several tiles.
        for (n, rows, cols) in [
            (1, 1, 1),
            (3, 5, 7),
            (4, 65, 63),
            (2, 130, 2049),
            (5, 3, 128),
        ] {
            for kind in [QuantKind::Int8, QuantKind::Nf4] {
                let w = init.normal(rows * cols, 0.5);
                let q = Arc::new(QuantizedWeight::from_slice(&w, rows, cols, kind));
                if cols == 2049 {
                    assert!(
                        q.tile_rows() < rows,
                        "the large case must span several tiles"
                    );
                }
                let dense = Tensor::from_vec(q.dequantize(), (rows, cols), &dev).unwrap();
                let x = Var::from_vec(init.normal(n * cols, 1.0), (n, cols), &dev).unwrap();
                let y = quantized_matmul(x.as_tensor(), &q).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let plain =
                    crate::ops::with_plain_kernels(|| quantized_matmul(x.as_tensor(), &q)).unwrap();
                assert_eq!(y.dims(), &[n, rows]);
                assert!(max_abs_diff(&plain, &want) < 1e-6, "plain path {kind}");
                let tol = 1e-5 * (cols as f32).sqrt();
                assert!(max_abs_diff(&y, &want) < tol, "{kind} {n}x{rows}x{cols}");
                let g = Tensor::from_vec(init.normal(n * rows, 1.0), (n, rows), &dev).unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = grads.get(&x).expect("input gradient");
                let want_gx = g.matmul(&dense).unwrap();
                assert!(max_abs_diff(gx, &want_gx) < 1e-5 * (rows as f32).sqrt() + 1e-6);
                // A block of rows with a bias.
                let block = rows / 3..rows;
                let bias =
                    Tensor::from_vec(init.normal(block.len(), 1.0), block.len(), &dev).unwrap();
                let y = quantized_linear(x.as_tensor(), &q, block.clone(), Some(&bias)).unwrap();
                let dense_block = dense.narrow(0, block.start, block.len()).unwrap();
                let want = x
                    .matmul(&dense_block.t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                assert!(max_abs_diff(&y, &want) < tol, "{kind} rows {block:?}");
                let g = Tensor::from_vec(init.normal(n * block.len(), 1.0), (n, block.len()), &dev)
                    .unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let want_gx = g.matmul(&dense_block).unwrap();
                let gx = grads.get(&x).expect("input gradient");
                assert!(max_abs_diff(gx, &want_gx) < 1e-5 * (rows as f32).sqrt() + 1e-6);
                assert!(grads.get(&bias).is_none(), "frozen bias got a gradient");
            }
        }
    }
}
