//! Multi-head self-attention as one CPU op over the fused q|k|v projection.
//!
//! The plain composition builds about fifteen graph nodes per layer (three head reshapes,
//! transposes and copies, two batched products, the softmax, the output transpose) and candle's
//! backward pass allocates, zero-fills and accumulates a gradient for each of them. At the sizes
//! DNA classifiers run (sequences of ~30 tokens), that bookkeeping costs more than the
//! arithmetic. Here one node reads q, k and v where the projection wrote them, works sequence by
//! sequence (one rayon job each), and its backward pass recomputes the probabilities instead of
//! keeping them, yielding the whole q|k|v gradient in one tensor.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::fused::exp_f32;
use super::simd::multiversion;
use super::{contiguous, with_values, DropoutMask};

/// The op's name, in errors as in candle's graph.
const NAME: &str = "fused-qkv-attention";

/// `softmax(scale * q k^T + bias)` (dropped out) times v, per head, for every sequence.
pub(super) struct QkvAttention {
    /// (B, H, T, T) or (1, H, T, T): ALiBi and the padding mask; no gradient.
    pub bias: Tensor,
    pub heads: usize,
    pub seq_len: usize,
    pub scale: f64,
    /// Attention dropout on the probabilities, as a position in the mask stream.
    pub dropout: Option<DropoutMask>,
}

/// Shapes of one call: `batch` sequences of `t` tokens, `heads` heads of `hd` features.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    t: usize,
    heads: usize,
    hd: usize,
    /// Whether the bias has one (H, T, T) block per sequence or one shared by all.
    bias_per_sequence: bool,
}

impl Dims {
    fn hidden(&self) -> usize {
        self.heads * self.hd
    }
}

/// The element types the kernels run on.
trait AttnFloat: WithDType {
    /// e^x for x <= 0.
    fn exp_nonpositive(self) -> Self;
}

impl AttnFloat for f32 {
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        exp_f32(self)
    }
}

impl AttnFloat for f64 {
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        self.exp()
    }
}

multiversion! {
    /// [`QkvAttention::forward_sequence`], compiled for the widest instruction set available.
    fn forward_sequence_wide<T: AttnFloat>(op: &QkvAttention, d: Dims, b: usize, qkv: &[T], bias: &[T], out: &mut [T]) {
        op.forward_sequence(d, b, qkv, bias, out)
    }
}

multiversion! {
    /// [`QkvAttention::backward_sequence`], compiled for the widest instruction set available.
    #[allow(clippy::too_many_arguments)]
    fn backward_sequence_wide<T: AttnFloat>(
        op: &QkvAttention,
        d: Dims,
        b: usize,
        qkv: &[T],
        bias: &[T],
        g: &[T],
        dqkv: &mut [T],
    ) {
        op.backward_sequence(d, b, qkv, bias, g, dqkv)
    }
}

/// A row-major matrix operand of [`product`], by pointer and row stride, optionally read
/// transposed: one head's q, k, v or gradient columns inside a wider row, or a T x T scratch
/// matrix.
struct Operand<T> {
    ptr: *const T,
    row_stride: usize,
    transposed: bool,
}

impl<T> Operand<T> {
    fn new(values: &[T], row_stride: usize) -> Self {
        Operand {
            ptr: values.as_ptr(),
            row_stride,
            transposed: false,
        }
    }

    fn t(self) -> Self {
        Operand {
            transposed: true,
            ..self
        }
    }

    /// (column stride, row stride) in elements as gemm reads it.
    fn strides(&self) -> (isize, isize) {
        match self.transposed {
            false => (1, self.row_stride as isize),
            true => (self.row_stride as isize, 1),
        }
    }
}

/// `dst (m x n, row stride dst_stride) = beta * lhs (m x k) rhs (k x n) [+ dst]`: the per-head
/// products of one sequence, on gemm's kernels, on the calling thread (sequences already run in
/// parallel).
///
/// # Safety
/// The operands must address m x k and k x n elements inside live slices, none overlapping `dst`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn product<T: AttnFloat>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_stride: usize,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
) {
    debug_assert!(m == 0 || dst.len() >= (m - 1) * dst_stride + n);
    let ((lhs_cs, lhs_rs), (rhs_cs, rhs_rs)) = (lhs.strides(), rhs.strides());
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        dst_stride as isize,
        accumulate,
        lhs.ptr,
        lhs_cs,
        lhs_rs,
        rhs.ptr,
        rhs_cs,
        rhs_rs,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Softmax of every row of `p` (rows of `t`) in place.
#[inline(always)]
fn softmax_rows<T: AttnFloat>(p: &mut [T], t: usize) {
    for row in p.chunks_exact_mut(t) {
        let max = row.iter().fold(
            T::from_f64(f64::NEG_INFINITY),
            |m, &v| if v > m { v } else { m },
        );
        // Separate loops: the exponentials vectorize, the (ordered) sum does not.
        for v in row.iter_mut() {
            *v = (*v - max).exp_nonpositive();
        }
        let sum = row.iter().fold(T::from_f64(0.0), |s, &v| s + v);
        let inv = T::from_f64(1.0) / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

impl QkvAttention {
    /// The attention probabilities of head `h` of sequence `b` into `p` (T x T, rows are
    /// queries), before dropout. `qkv` holds this sequence's T rows of width 3 * hidden.
    #[inline(always)]
    fn probabilities<T: AttnFloat>(
        &self,
        d: Dims,
        b: usize,
        h: usize,
        qkv: &[T],
        bias: &[T],
        p: &mut [T],
    ) {
        let (t, hd, width) = (d.t, d.hd, 3 * d.hidden());
        let block = if d.bias_per_sequence {
            b * d.heads + h
        } else {
            h
        };
        p.copy_from_slice(&bias[block * t * t..(block + 1) * t * t]);
        let q = Operand::new(&qkv[h * hd..], width);
        let k = Operand::new(&qkv[d.hidden() + h * hd..], width);
        // SAFETY: q and k are T rows of hd inside `qkv`; p is T x T.
        unsafe { product((t, t, hd), p, t, true, q, k.t(), T::from_f64(self.scale)) };
        softmax_rows(p, t);
    }

    /// Multiplies `p` (head `h` of sequence `b`, T x T) by the dropout mask: the elements the
    /// plain path's dropout of the (B, H, T, T) probabilities drops.
    #[inline(always)]
    fn drop_out<T: AttnFloat>(&self, d: Dims, b: usize, h: usize, p: &mut [T]) {
        if let Some(mask) = &self.dropout {
            let first = ((b * d.heads + h) * d.t * d.t) as u64;
            let kept = T::from_f64(mask.scale as f64);
            for (e, v) in p.iter_mut().enumerate() {
                *v *= if mask.keeps(first + e as u64) {
                    kept
                } else {
                    T::from_f64(0.0)
                };
            }
        }
    }

    /// Context vectors of sequence `b` into `out` (T rows of width hidden).
    #[inline(always)]
    fn forward_sequence<T: AttnFloat>(
        &self,
        d: Dims,
        b: usize,
        qkv: &[T],
        bias: &[T],
        out: &mut [T],
    ) {
        let (t, hd, width, hidden) = (d.t, d.hd, 3 * d.hidden(), d.hidden());
        let one = T::from_f64(1.0);
        let mut p = vec![T::from_f64(0.0); t * t];
        for h in 0..d.heads {
            self.probabilities(d, b, h, qkv, bias, &mut p);
            self.drop_out(d, b, h, &mut p);
            let v = Operand::new(&qkv[2 * hidden + h * hd..], width);
            // SAFETY: p is T x T, v T rows of hd inside `qkv`, the output T rows of hd in `out`.
            unsafe {
                product(
                    (t, hd, t),
                    &mut out[h * hd..],
                    hidden,
                    false,
                    Operand::new(&p, t),
                    v,
                    one,
                )
            };
        }
    }

    /// The q|k|v gradient of sequence `b` into `dqkv` (T rows of width 3 * hidden) for the
    /// output gradient `g` (T rows of width hidden).
    #[inline(always)]
    fn backward_sequence<T: AttnFloat>(
        &self,
        d: Dims,
        b: usize,
        qkv: &[T],
        bias: &[T],
        g: &[T],
        dqkv: &mut [T],
    ) {
        let (t, hd, width, hidden) = (d.t, d.hd, 3 * d.hidden(), d.hidden());
        let zero = T::from_f64(0.0);
        let one = T::from_f64(1.0);
        let scale = T::from_f64(self.scale);
        let mut p = vec![zero; t * t];
        let mut dropped = vec![zero; t * t];
        let mut dp = vec![zero; t * t];
        for h in 0..d.heads {
            let (q_at, k_at, v_at) = (h * hd, hidden + h * hd, 2 * hidden + h * hd);
            self.probabilities(d, b, h, qkv, bias, &mut p);
            dropped.copy_from_slice(&p);
            self.drop_out(d, b, h, &mut dropped);
            let gh = || Operand::new(&g[h * hd..], hidden);
            let part = |at: usize| Operand::new(&qkv[at..], width);
            // SAFETY (every product below): operands are T x T scratch matrices or T rows of hd
            // inside `g` and `qkv`; destinations are scratch or one head's columns of `dqkv`.
            // Through the product with v: dP' = g V^T and dV = P'^T g.
            unsafe {
                product((t, t, hd), &mut dp, t, false, gh(), part(v_at).t(), one);
                product(
                    (t, hd, t),
                    &mut dqkv[v_at..],
                    width,
                    false,
                    Operand::new(&dropped, t).t(),
                    gh(),
                    one,
                );
            }
            // Through the dropout (the same mask) and the softmax: dS = P (dP - rowsum(P dP)).
            self.drop_out(d, b, h, &mut dp);
            for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                let rowsum = pr
                    .iter()
                    .zip(dr.iter())
                    .fold(zero, |acc, (&p, &g)| acc + p * g);
                for (d, &p) in dr.iter_mut().zip(pr) {
                    *d = p * (*d - rowsum) * scale;
                }
            }
            // Through the scores: dQ = dS K and dK = dS^T Q.
            unsafe {
                product(
                    (t, hd, t),
                    &mut dqkv[q_at..],
                    width,
                    false,
                    Operand::new(&dp, t),
                    part(k_at),
                    one,
                );
                product(
                    (t, hd, t),
                    &mut dqkv[k_at..],
                    width,
                    false,
                    Operand::new(&dp, t).t(),
                    part(q_at),
                    one,
                );
            }
        }
    }

    fn dims(&self, qkv: &Shape) -> Result<Dims> {
        let (rows, width) = qkv.dims2()?;
        let t = self.seq_len;
        if t == 0 || rows % t != 0 || width % (3 * self.heads) != 0 {
            candle_core::bail!(
                "attention: q|k|v ({rows}, {width}) is not sequences of {t} tokens x 3 x {} heads",
                self.heads
            );
        }
        let batch = rows / t;
        let hd = width / (3 * self.heads);
        let per_sequence = match self.bias.dims() {
            [bb, h, ti, tj] if *h == self.heads && *ti == t && *tj == t && *bb == batch => true,
            [1, h, ti, tj] if *h == self.heads && *ti == t && *tj == t => false,
            other => candle_core::bail!(
                "attention: bias {other:?} for {batch} sequences, {} heads, {t} tokens",
                self.heads
            ),
        };
        Ok(Dims {
            batch,
            t,
            heads: self.heads,
            hd,
            bias_per_sequence: per_sequence,
        })
    }

    /// Runs `f(bias)` on the bias values as `T`.
    fn with_bias<T: WithDType, R>(&self, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
        with_values(&self.bias.to_dtype(T::DTYPE)?, NAME, f)
    }

    /// The q|k|v gradient as a tensor, reading the input and the output gradient in place.
    fn backward_tensor<T: AttnFloat>(
        &self,
        d: Dims,
        qkv: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let dqkv = with_values(qkv, NAME, |x: &[T]| {
            with_values(grad, NAME, |g: &[T]| self.backward_all(d, x, g))
        })?;
        Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
    }

    fn forward_all<T: AttnFloat>(&self, d: Dims, qkv: &[T]) -> Result<Vec<T>> {
        self.with_bias(|bias: &[T]| {
            let rows = d.t * d.hidden();
            let mut out = vec![T::from_f64(0.0); d.batch * rows];
            let job = |(b, out): (usize, &mut [T])| {
                let seq = &qkv[b * d.t * 3 * d.hidden()..][..d.t * 3 * d.hidden()];
                forward_sequence_wide(self, d, b, seq, bias, out);
            };
            if d.batch > 1 {
                out.par_chunks_mut(rows).enumerate().for_each(job);
            } else {
                out.chunks_mut(rows).enumerate().for_each(job);
            }
            Ok(out)
        })
    }

    fn backward_all<T: AttnFloat>(&self, d: Dims, qkv: &[T], g: &[T]) -> Result<Vec<T>> {
        self.with_bias(|bias: &[T]| {
            let rows = d.t * 3 * d.hidden();
            let mut dqkv = vec![T::from_f64(0.0); d.batch * rows];
            let job = |(b, dqkv): (usize, &mut [T])| {
                let seq = &qkv[b * rows..][..rows];
                let g = &g[b * d.t * d.hidden()..][..d.t * d.hidden()];
                backward_sequence_wide(self, d, b, seq, bias, g, dqkv);
            };
            if d.batch > 1 {
                dqkv.par_chunks_mut(rows).enumerate().for_each(job);
            } else {
                dqkv.chunks_mut(rows).enumerate().for_each(job);
            }
            Ok(dqkv)
        })
    }
}

impl CustomOp1 for QkvAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l.shape())?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward_all(d, contiguous(v, l, NAME)?)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward_all(d, contiguous(v, l, NAME)?)?),
            other => candle_core::bail!("attention: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((d.batch * d.t, d.hidden()))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.dims(qkv.shape())?;
        let dqkv = match qkv.dtype() {
            DType::F32 => self.backward_tensor::<f32>(d, qkv, grad)?,
            DType::F64 => self.backward_tensor::<f64>(d, qkv, grad)?,
            dt => candle_core::bail!("attention: unsupported dtype {dt:?}"),
        };
        Ok(Some(dqkv))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::ops::{qkv_attention, with_plain_kernels, ForwardCtx, Initializer};

    fn random(seed: u64, dims: &[usize], std: f64, dtype: DType) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(Initializer::new(seed).normal(n, std), dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
        let d = max_diff(a, b);
        assert!(d < tol, "{what} differ by {d:e}");
    }

    /// Output and q|k|v gradient of sum(out * w) for one attention call.
    fn run(
        qkv: &Var,
        bias: &Tensor,
        heads: usize,
        t: usize,
        dropout: f64,
        seed: u64,
    ) -> (Tensor, Tensor) {
        let ctx = ForwardCtx::train(seed);
        let out = qkv_attention(qkv.as_tensor(), bias, heads, t, dropout, &ctx).unwrap();
        let w = random(77, out.dims(), 1.0, out.dtype());
        let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads.get(qkv).unwrap().clone())
    }

    /// A bias as the encoders build it: ALiBi-like per head, plus -10000 on the last keys of
    /// every sequence but the first (padding), or shared by the batch without padding.
    fn bias(batch: usize, heads: usize, t: usize, padded: bool, dtype: DType) -> Tensor {
        let shared = random(5, &[1, heads, t, t], 1.0, dtype);
        if !padded {
            return shared;
        }
        let mut pad = vec![0f32; batch * t];
        for (i, v) in pad.iter_mut().enumerate() {
            let (seq, key) = (i / t, i % t);
            if seq > 0 && key > 0 && key + seq >= t {
                *v = -10000.0;
            }
        }
        let pad = Tensor::from_vec(pad, (batch, 1, 1, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        shared.broadcast_add(&pad).unwrap()
    }

    /// The fused op equals the plain composition (narrow, head transposes, batched products,
    /// softmax, dropout) in values and in the q|k|v gradient, on odd sizes, with a per-sequence
    /// (padded) or shared bias, with and without attention dropout.
    #[test]
    fn fused_attention_equals_plain_composition() {
        for (batch, t, heads, hd) in [
            (2usize, 5usize, 3usize, 4usize),
            (1, 1, 1, 1),
            (3, 17, 2, 8),
            (4, 9, 4, 3),
        ] {
            for padded in [false, true] {
                for dropout in [0.0, 0.3] {
                    let qkv = Var::from_tensor(&random(
                        batch as u64,
                        &[batch * t, 3 * heads * hd],
                        1.5,
                        DType::F64,
                    ))
                    .unwrap();
                    let bias = bias(batch, heads, t, padded, DType::F64);
                    let (out, grad) = run(&qkv, &bias, heads, t, dropout, 11);
                    let (want, want_grad) =
                        with_plain_kernels(|| run(&qkv, &bias, heads, t, dropout, 11));
                    assert_eq!(out.dims(), [batch * t, heads * hd]);
                    let what =
                        format!("b{batch} t{t} h{heads} hd{hd} padded {padded} dropout {dropout}");
                    assert_close(&out, &want, 1e-12, &format!("{what}: values"));
                    assert_close(&grad, &want_grad, 1e-12, &format!("{what}: gradients"));
                    if dropout > 0.0 && batch * t > 4 {
                        // Dropout really dropped something: the output differs from no dropout.
                        let (plain_out, _) = run(&qkv, &bias, heads, t, 0.0, 11);
                        assert!(
                            max_diff(&out, &plain_out) > 1e-3,
                            "{what}: dropout had no effect"
                        );
                    }
                }
            }
        }
    }

    /// The f32 kernel (its own exp) stays within f32 rounding of the f64 one.
    #[test]
    fn f32_attention_matches_f64() {
        let (batch, t, heads, hd) = (3, 31, 4, 16);
        let x64 = random(3, &[batch * t, 3 * heads * hd], 2.0, DType::F64);
        let q64 = Var::from_tensor(&x64).unwrap();
        let q32 = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
        let attend =
            |qkv: &Var, dtype| run(qkv, &bias(batch, heads, t, true, dtype), heads, t, 0.1, 4);
        let ((o64, g64), (o32, g32)) = (attend(&q64, DType::F64), attend(&q32, DType::F32));
        assert_close(&o32, &o64, 1e-5, "values");
        assert_close(&g32, &g64, 1e-4, "gradients");
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let qkv = Tensor::zeros((10, 12), DType::F32, &Device::Cpu).unwrap();
        let ctx = ForwardCtx::eval();
        let bias = Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
        // 10 rows are not sequences of 3 tokens; 12 columns are not 3 x 5 heads.
        assert!(qkv_attention(&qkv, &bias, 2, 3, 0.0, &ctx).is_err());
        assert!(qkv_attention(&qkv, &bias, 5, 5, 0.0, &ctx).is_err());
        // A bias for another number of sequences.
        let wrong = Tensor::zeros((3, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(qkv_attention(&qkv, &wrong, 2, 5, 0.0, &ctx).is_err());
        assert!(qkv_attention(&qkv, &bias, 2, 5, 0.0, &ctx).is_ok());
    }
}
