//! Fused CPU kernels for the element-wise parts of a transformer layer, each a candle custom op
//! with its own backward pass. The plain compositions build 5-10 graph nodes apiece and their
//! backward passes re-broadcast and re-reduce; here one pass over memory does the work.
//! Every kernel is tested against the plain candle composition (values and gradients).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::simd::multiversion;
use super::{contiguous, with_values};

/// Rows below this many elements in total run on one thread: spawning costs more than it saves.
const PARALLEL_MIN: usize = 1 << 15;

/// Applies `f(row_in, row_out)` to every row, in parallel when the tensor is large.
fn map_rows<T: WithDType, U: WithDType>(
    input: &[T],
    cols: usize,
    out_cols: usize,
    f: impl Fn(&[T], &mut [U]) + Sync,
) -> Vec<U> {
    let rows = input.len() / cols;
    let mut out = vec![U::from_f64(0.0); rows * out_cols];
    let row = |(o, i): (&mut [U], &[T])| f(i, o);
    if input.len() >= PARALLEL_MIN {
        out.par_chunks_mut(out_cols)
            .zip(input.par_chunks(cols))
            .for_each(row);
    } else {
        out.chunks_mut(out_cols)
            .zip(input.chunks(cols))
            .for_each(row);
    }
    out
}

fn last_dim(shape: &Shape) -> usize {
    *shape.dims().last().unwrap_or(&1)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// The LayerNorm op's name, in errors as in candle's graph.
const LAYER_NORM: &str = "fused-layer-norm";

struct LayerNormOp {
    eps: f64,
}

/// Sum of `f(c)` over c in 0..n, in eight independent partial sums so the loop vectorizes.
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let whole = n - n % 8;
    for c in (0..whole).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(c + l);
        }
    }
    (whole..n).map(f).sum::<f64>() + acc.iter().sum::<f64>()
}

/// Mean and 1 / standard deviation of a row, accumulated in f64.
#[inline(always)]
fn row_stats<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len();
    let mean = lane_sum(n, |c| row[c].to_f64()) / n as f64;
    let var = lane_sum(n, |c| (row[c].to_f64() - mean).powi(2)) / n as f64;
    (mean, 1.0 / (var + eps).sqrt())
}

/// One row of LayerNorm.
#[inline(always)]
fn ln_row<T: WithDType>(row: &[T], w: &[T], b: &[T], eps: f64, out: &mut [T]) {
    let (mean, rstd) = row_stats(row, eps);
    for (((o, &x), &w), &b) in out.iter_mut().zip(row).zip(w).zip(b) {
        *o = T::from_f64((x.to_f64() - mean) * rstd * w.to_f64() + b.to_f64());
    }
}

/// LayerNorm's input gradient for a block of rows, adding the block's share of dw and db.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn ln_grad_rows<T: WithDType>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: f64,
    dx: &mut [T],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let cols = w.len();
    let n = cols as f64;
    for ((row, gr), dxr) in x.chunks(cols).zip(g.chunks(cols)).zip(dx.chunks_mut(cols)) {
        let (mean, rstd) = row_stats(row, eps);
        let xhat = |c: usize| (row[c].to_f64() - mean) * rstd;
        let gw = |c: usize| gr[c].to_f64() * w[c].to_f64();
        let sum_gw = lane_sum(cols, gw);
        let sum_gw_xhat = lane_sum(cols, |c| gw(c) * xhat(c));
        for c in 0..cols {
            dw[c] += gr[c].to_f64() * xhat(c);
            db[c] += gr[c].to_f64();
            dxr[c] = T::from_f64(rstd * (gw(c) - sum_gw / n - xhat(c) * sum_gw_xhat / n));
        }
    }
}

multiversion! {
    /// [`ln_row`], compiled for the widest instruction set available.
    fn ln_row_wide<T: WithDType>(row: &[T], w: &[T], b: &[T], eps: f64, out: &mut [T]) {
        ln_row(row, w, b, eps, out)
    }
}

multiversion! {
    /// [`ln_grad_rows`], compiled for the widest instruction set available.
    #[allow(clippy::too_many_arguments)]
    fn ln_grad_rows_wide<T: WithDType>(x: &[T], w: &[T], g: &[T], eps: f64, dx: &mut [T], dw: &mut [f64], db: &mut [f64]) {
        ln_grad_rows(x, w, g, eps, dx, dw, db)
    }
}

fn ln_forward<T: WithDType>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let cols = w.len();
    map_rows(x, cols, cols, |row, out| ln_row_wide(row, w, b, eps, out))
}

/// Rows per job of the LayerNorm backward pass: each job adds its own partial dw and db.
const LN_BLOCK_ROWS: usize = 64;

/// dx, dw, db of LayerNorm for upstream gradient `g`; in parallel over blocks of rows.
fn ln_backward<T: WithDType>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let cols = w.len();
    let block = LN_BLOCK_ROWS * cols;
    let mut dx = vec![T::from_f64(0.0); x.len()];
    let partial = |(i, dx): (usize, &mut [T])| {
        let (mut dw, mut db) = (vec![0f64; cols], vec![0f64; cols]);
        let rows = i * block..i * block + dx.len();
        ln_grad_rows_wide(&x[rows.clone()], w, &g[rows], eps, dx, &mut dw, &mut db);
        (dw, db)
    };
    let partials: Vec<(Vec<f64>, Vec<f64>)> = if x.len() >= PARALLEL_MIN {
        dx.par_chunks_mut(block).enumerate().map(partial).collect()
    } else {
        dx.chunks_mut(block).enumerate().map(partial).collect()
    };
    // Summed in block order, so the result does not depend on the thread count.
    let (mut dw, mut db) = (vec![0f64; cols], vec![0f64; cols]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    (dx, cast(dw), cast(db))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        LAYER_NORM
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(ln_forward(
                    contiguous(x, l1, self.name())?,
                    contiguous(w, l2, self.name())?,
                    contiguous(b, l3, self.name())?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(ln_forward(
                    contiguous(x, l1, self.name())?,
                    contiguous(w, l2, self.name())?,
                    contiguous(b, l3, self.name())?,
                    self.eps,
                ))
            }
            _ => candle_core::bail!("fused layer norm supports f32 and f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: WithDType>(
            x: &Tensor,
            w: &Tensor,
            g: &Tensor,
            eps: f64,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let (dx, dw, db) = with_values(x, LAYER_NORM, |xv: &[T]| {
                with_values(w, LAYER_NORM, |wv: &[T]| {
                    with_values(g, LAYER_NORM, |gv: &[T]| Ok(ln_backward(xv, wv, gv, eps)))
                })
            })?;
            let dev = x.device();
            Ok((
                Tensor::from_vec(dx, x.shape(), dev)?,
                Tensor::from_vec(dw, w.shape(), dev)?,
                Tensor::from_vec(db, w.shape(), dev)?,
            ))
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run::<f32>(x, w, grad, self.eps)?,
            DType::F64 => run::<f64>(x, w, grad, self.eps)?,
            dt => candle_core::bail!("fused layer norm: unsupported dtype {dt:?}"),
        };
        // Frozen affine parameters (adapter training) must not receive gradients.
        let tracked = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((Some(dx), tracked(w, dw), tracked(b, db)))
    }
}

/// LayerNorm over the last dimension in one pass (with a one-pass backward).
pub(super) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, LayerNormOp { eps })
}

// ---------------------------------------------------------------------------------------------
// MLP activations: GELU, gated GELU (gelu(x[.., :i]) * x[.., i:]) and SwiGLU (silu(..) * ..)

/// 1 / sqrt(2 pi): the normal density's constant.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// GELU(a) = a * Phi(a) with the exact normal CDF, and its derivative Phi(a) + a * phi(a), in
/// f64 (the f32 kernels below use [`erf_f32`] and [`exp_f32`] instead).
fn gelu_and_grad_f64(a: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(a * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * a * a).exp() * INV_SQRT_2PI;
    (a * cdf, cdf + a * pdf)
}

/// erf for f32 as a rational function, x P(x^2) / Q(x^2), on [-4, 4] (beyond which erf is
/// +-1 in f32); absolute error below 5e-7 (tested against the f64 erf). Branch-free, so loops
/// over it vectorize, where libm's erff (a call with branches) made the gated GELU a fifth of
/// a small model's training step. The coefficients are the minimax fit Eigen and XLA use.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ] {
        p = p * x2 + c;
    }
    let mut q = -1.456_607_2e-5_f32;
    for c in [
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ] {
        q = q * x2 + c;
    }
    x * p / q
}

/// e^x for f32 on x <= 0 (what the normal density needs), branch-free: x = n ln 2 + r with
/// |r| <= ln 2 / 2, e^r by its degree-7 Taylor polynomial, 2^n through the exponent bits.
/// Relative error below 3e-7 down to x = -87 (tested against f64); smaller x gives ~1e-38.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let mut p = 1.0 / 5040.0_f32;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Phi(a) of the standard normal in f32.
#[inline(always)]
fn normal_cdf_f32(a: f32) -> f32 {
    0.5 * (1.0 + erf_f32(a * std::f32::consts::FRAC_1_SQRT_2))
}

/// Phi(a) and phi(a) of the standard normal in f32.
#[inline(always)]
fn normal_cdf_pdf_f32(a: f32) -> (f32, f32) {
    (
        normal_cdf_f32(a),
        exp_f32(-0.5 * a * a) * INV_SQRT_2PI as f32,
    )
}

/// The activations and their derivatives per element type: f32 through the branch-free
/// [`erf_f32`] and [`exp_f32`] (so the row loops vectorize), f64 through the exact functions.
trait ActivationFloat: WithDType {
    fn gelu(self) -> Self;
    fn gelu_and_grad(self) -> (Self, Self);
    /// SiLU(a) = a sigmoid(a) and its derivative s (1 + a (1 - s)), s = sigmoid(a).
    fn silu_and_grad(self) -> (Self, Self);
}

impl ActivationFloat for f32 {
    #[inline(always)]
    fn gelu(self) -> Self {
        self * normal_cdf_f32(self)
    }

    #[inline(always)]
    fn gelu_and_grad(self) -> (Self, Self) {
        let (cdf, pdf) = normal_cdf_pdf_f32(self);
        (self * cdf, cdf + self * pdf)
    }

    #[inline(always)]
    fn silu_and_grad(self) -> (Self, Self) {
        // e^-|a| never overflows; the sigmoid of either sign follows from it.
        let e = exp_f32(-self.abs());
        let s = (if self >= 0.0 { 1.0 } else { e }) / (1.0 + e);
        (self * s, s * (1.0 + self * (1.0 - s)))
    }
}

impl ActivationFloat for f64 {
    #[inline(always)]
    fn gelu(self) -> Self {
        gelu_and_grad_f64(self).0
    }

    #[inline(always)]
    fn gelu_and_grad(self) -> (Self, Self) {
        gelu_and_grad_f64(self)
    }

    #[inline(always)]
    fn silu_and_grad(self) -> (Self, Self) {
        let e = (-self.abs()).exp();
        let s = (if self >= 0.0 { 1.0 } else { e }) / (1.0 + e);
        (self * s, s * (1.0 + self * (1.0 - s)))
    }
}

/// The activation a gated MLP applies to the first half of its input (a zero-sized choice, so
/// the row kernels below are compiled once per gate).
trait Gate: Copy {
    fn act<T: ActivationFloat>(self, a: T) -> T;
    fn act_and_grad<T: ActivationFloat>(self, a: T) -> (T, T);
}

/// GELU gate: DNABERT-2's gated GELU.
#[derive(Clone, Copy)]
struct GeluGate;

impl Gate for GeluGate {
    #[inline(always)]
    fn act<T: ActivationFloat>(self, a: T) -> T {
        a.gelu()
    }

    #[inline(always)]
    fn act_and_grad<T: ActivationFloat>(self, a: T) -> (T, T) {
        a.gelu_and_grad()
    }
}

/// SiLU gate: SwiGLU.
#[derive(Clone, Copy)]
struct SiluGate;

impl Gate for SiluGate {
    #[inline(always)]
    fn act<T: ActivationFloat>(self, a: T) -> T {
        a.silu_and_grad().0
    }

    #[inline(always)]
    fn act_and_grad<T: ActivationFloat>(self, a: T) -> (T, T) {
        a.silu_and_grad()
    }
}

multiversion! {
    /// One row of a gated activation: `out = act(a) * lin` for x = [a | lin].
    fn gated_row<T: ActivationFloat, G: Gate>(gate: G, x: &[T], out: &mut [T]) {
        let (a, lin) = x.split_at(out.len());
        for ((o, &a), &lin) in out.iter_mut().zip(a).zip(lin) {
            *o = gate.act(a) * lin;
        }
    }
}

multiversion! {
    /// One row of a gated activation's input gradient: `dx[.., :i] = g * lin * act'(a)` and
    /// `dx[.., i:] = g * act(a)` for x = [a | lin].
    fn gated_grad_row<T: ActivationFloat, G: Gate>(gate: G, x: &[T], g: &[T], dx: &mut [T]) {
        let half = g.len();
        let (a, lin) = x.split_at(half);
        let (da, dlin) = dx.split_at_mut(half);
        // Zipped slices (no index bounds checks) so the loop vectorizes.
        let inputs = a.iter().zip(lin).zip(g);
        for ((da, dlin), ((&a, &lin), &g)) in da.iter_mut().zip(dlin).zip(inputs) {
            let (act, dact) = gate.act_and_grad(a);
            *da = g * lin * dact;
            *dlin = g * act;
        }
    }
}

multiversion! {
    /// One row of GELU: `out = gelu(x)`.
    fn gelu_row<T: ActivationFloat>(x: &[T], out: &mut [T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = x.gelu();
        }
    }
}

multiversion! {
    /// One row of GELU's input gradient: `dx = g * gelu'(x)`.
    fn gelu_grad_row<T: ActivationFloat>(x: &[T], g: &[T], dx: &mut [T]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            *d = g * x.gelu_and_grad().1;
        }
    }
}

/// An MLP activation over the last dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// Exact (erf) GELU of every element: BERT's MLP.
    Gelu,
    /// GELU of the first half times the second half: DNABERT-2's MLP.
    GatedGelu,
    /// SiLU of the first half times the second half: the Nucleotide Transformer v2's MLP.
    SwiGlu,
}

impl Activation {
    fn gated(self) -> bool {
        self != Activation::Gelu
    }

    /// The output's last dimension for an input's.
    fn out_cols(self, cols: usize) -> usize {
        if self.gated() {
            cols / 2
        } else {
            cols
        }
    }

    fn forward<T: ActivationFloat>(self, x: &[T], cols: usize) -> Vec<T> {
        let row: fn(&[T], &mut [T]) = match self {
            Activation::Gelu => gelu_row,
            Activation::GatedGelu => |x, out| gated_row(GeluGate, x, out),
            Activation::SwiGlu => |x, out| gated_row(SiluGate, x, out),
        };
        map_rows(x, cols, self.out_cols(cols), row)
    }

    /// [`Self::backward`] on the values of the input and its gradient, read in place.
    fn backward_of<T: ActivationFloat>(
        self,
        x: &Tensor,
        g: &Tensor,
        cols: usize,
    ) -> Result<Vec<T>> {
        with_values(x, self.name(), |x: &[T]| {
            with_values(g, self.name(), |g: &[T]| Ok(self.backward(x, g, cols)))
        })
    }

    /// The input gradient for every row; in parallel over rows for large tensors.
    fn backward<T: ActivationFloat>(self, x: &[T], g: &[T], cols: usize) -> Vec<T> {
        let mut dx = vec![T::from_f64(0.0); x.len()];
        let g_cols = self.out_cols(cols);
        let row: fn(&[T], &[T], &mut [T]) = match self {
            Activation::Gelu => gelu_grad_row,
            Activation::GatedGelu => |x, g, dx| gated_grad_row(GeluGate, x, g, dx),
            Activation::SwiGlu => |x, g, dx| gated_grad_row(SiluGate, x, g, dx),
        };
        if x.len() >= PARALLEL_MIN {
            dx.par_chunks_mut(cols)
                .zip(x.par_chunks(cols).zip(g.par_chunks(g_cols)))
                .for_each(|(d, (xr, gr))| row(xr, gr, d));
        } else {
            dx.chunks_mut(cols)
                .zip(x.chunks(cols).zip(g.chunks(g_cols)))
                .for_each(|(d, (xr, gr))| row(xr, gr, d));
        }
        dx
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Gelu => "fused-gelu",
            Activation::GatedGelu => "fused-gated-gelu",
            Activation::SwiGlu => "fused-swiglu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l.shape());
        if self.gated() && !cols.is_multiple_of(2) {
            candle_core::bail!("{} needs an even last dimension, got {cols}", self.name());
        }
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.forward(contiguous(x, l, self.name())?, cols))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.forward(contiguous(x, l, self.name())?, cols))
            }
            _ => candle_core::bail!("{} supports f32 and f64", self.name()),
        };
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_cols(cols);
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let cols = last_dim(x.shape());
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                self.backward_of::<f32>(x, grad, cols)?,
                x.shape(),
                x.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                self.backward_of::<f64>(x, grad, cols)?,
                x.shape(),
                x.device(),
            )?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok(Some(dx))
    }
}

/// DNABERT-2's gated MLP activation: exact GELU of the first half of the last dimension times
/// the second half.
pub(super) fn gated_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::GatedGelu)
}

/// Exact GELU of every element.
pub(super) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::Gelu)
}

/// SiLU of the first half of the last dimension times the second half.
pub(super) fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embeddings

/// Turns each head's channel pairs (j, j + d/2) in the first `cols` columns of every row by the
/// angle of the row's position (row index modulo `seq_len`); later columns pass through.
/// `inverse` turns the other way: the transpose of the rotation, so the backward pass is the
/// same op inverted.
#[derive(Clone)]
pub(super) struct Rotary {
    /// cos and sin of position p's angle for pair j, at p * head_dim / 2 + j.
    pub(super) cos: std::sync::Arc<Vec<f64>>,
    pub(super) sin: std::sync::Arc<Vec<f64>>,
    pub(super) seq_len: usize,
    pub(super) head_dim: usize,
    pub(super) cols: usize,
    pub(super) inverse: bool,
}

impl Rotary {
    fn forward<T: WithDType>(&self, x: &[T], width: usize) -> Vec<T> {
        let half = self.head_dim / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let cos: Vec<T> = self.cos.iter().map(|&c| T::from_f64(c)).collect();
        let sin: Vec<T> = self.sin.iter().map(|&s| T::from_f64(sign * s)).collect();
        let mut out = x.to_vec();
        let rotate = |(row, o): (usize, &mut [T])| {
            let p = row % self.seq_len;
            let (cos, sin) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for head in o[..self.cols].chunks_mut(self.head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for (((a, b), &c), &s) in x1.iter_mut().zip(x2).zip(cos).zip(sin) {
                    let (xa, xb) = (*a, *b);
                    *a = xa * c - xb * s;
                    *b = xb * c + xa * s;
                }
            }
        };
        if x.len() >= PARALLEL_MIN {
            out.par_chunks_mut(width).enumerate().for_each(rotate);
        } else {
            out.chunks_mut(width).enumerate().for_each(rotate);
        }
        out
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "fused-rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        if !rows.is_multiple_of(self.seq_len)
            || self.cols > width
            || !self.cols.is_multiple_of(self.head_dim)
            || self.cos.len() != self.seq_len * self.head_dim / 2
        {
            candle_core::bail!(
                "rotary: ({rows}, {width}) rows for sequences of {}, {} columns of heads of {}",
                self.seq_len,
                self.cols,
                self.head_dim
            );
        }
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.forward(contiguous(x, l, self.name())?, width))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.forward(contiguous(x, l, self.name())?, width))
            }
            _ => candle_core::bail!("{} supports f32 and f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rotary {
            inverse: !self.inverse,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Initializer;
    use candle_core::{Device, Var};

    fn random(init: &mut Initializer, dims: &[usize], std: f64) -> Var {
        let n = dims.iter().product();
        let t = Tensor::from_vec(init.normal(n, std), dims, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Compares values and the gradients of sum(out * w) for the fused and the plain version.
    fn compare(fused: &Tensor, plain: &Tensor, inputs: &[&Var], tol: f64) {
        assert_eq!(fused.dims(), plain.dims());
        assert!(
            max_diff(fused, plain) < tol,
            "values differ by {}",
            max_diff(fused, plain)
        );
        let w = Tensor::from_vec(
            Initializer::new(99).normal(fused.elem_count(), 1.0),
            fused.shape(),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let d = max_diff(gf.get(v).unwrap(), gp.get(v).unwrap());
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn layer_norm_equals_plain_composition() {
        let mut init = Initializer::new(1);
        for dims in [[3usize, 5, 7], [2, 1, 256], [1, 40, 33]] {
            let h = dims[2];
            let x = random(&mut init, &dims, 2.0);
            let w = random(&mut init, &[h], 1.0);
            let b = random(&mut init, &[h], 1.0);
            let fused = layer_norm(&x, &w, &b, 1e-12).unwrap();
            let reference = plain(|| crate::ops::layer_norm(&x, &w, &b, 1e-12)).unwrap();
            compare(&fused, &reference, &[&x, &w, &b], 1e-9);
        }
    }

    /// The composition the other devices run, through the public entry point.
    fn plain<R>(f: impl FnOnce() -> R) -> R {
        crate::ops::with_plain_kernels(f)
    }

    #[test]
    fn activations_equal_plain_composition() {
        let mut init = Initializer::new(3);
        for dims in [[2usize, 3, 8], [1, 1, 2], [5, 7, 66], [3, 200, 70]] {
            let x = random(&mut init, &dims, 2.0);
            // candle's GELU backward uses 1/sqrt(2 pi) rounded to 0.398942 (relative error 1e-6);
            // the fused kernel is exact, and the model's finite-difference test checks it.
            let reference = plain(|| crate::ops::gated_gelu(&x)).unwrap();
            compare(&gated_gelu(&x).unwrap(), &reference, &[&x], 1e-5);
            let reference = plain(|| crate::ops::gelu(&x)).unwrap();
            compare(&gelu(&x).unwrap(), &reference, &[&x], 1e-5);
            let reference = plain(|| crate::ops::swiglu(&x)).unwrap();
            compare(&swiglu(&x).unwrap(), &reference, &[&x], 1e-12);
        }
        let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(gated_gelu(&odd).is_err());
        assert!(plain(|| crate::ops::gated_gelu(&odd)).is_err());
        assert!(swiglu(&odd).is_err());
        assert!(plain(|| crate::ops::swiglu(&odd)).is_err());
        assert_eq!(gelu(&odd).unwrap().dims(), &[2, 3]);
    }

    #[test]
    fn f32_erf_and_exp_match_f64_references() {
        let mut worst_erf = 0f64;
        for i in 0..=120_000 {
            let x = -6.0 + 12.0 * i as f64 / 120_000.0;
            let got = erf_f32(x as f32) as f64;
            worst_erf = worst_erf.max((got - candle_core::cpu::erf::erf_f64(x)).abs());
        }
        assert!(worst_erf < 5e-7, "erf error {worst_erf:e}");
        let mut worst_exp = 0f64;
        for i in 0..=87_000 {
            let x = -(i as f64) / 1000.0;
            let got = exp_f32(x as f32) as f64;
            // Relative to e^x evaluated at the f32-rounded argument.
            let want = (x as f32 as f64).exp();
            worst_exp = worst_exp.max((got - want).abs() / want);
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp:e}");
        assert!(exp_f32(-200.0) < 1e-37 && exp_f32(-200.0) >= 0.0);
    }

    #[test]
    fn f32_activations_match_f64_kernels() {
        let mut init = Initializer::new(5);
        // Odd widths, rows below and above the parallel threshold, values far into the tails.
        for (dims, activation) in [
            ([3usize, 5, 14], Activation::GatedGelu),
            ([2, 300, 130], Activation::GatedGelu),
            ([3, 7, 9], Activation::Gelu),
            ([3, 5, 14], Activation::SwiGlu),
            ([2, 300, 130], Activation::SwiGlu),
        ] {
            let gated = activation.gated();
            let x64 = random(&mut init, &dims, 3.0);
            let x32 = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
            let out_cols = if gated { dims[2] / 2 } else { dims[2] };
            let w = Tensor::from_vec(
                Initializer::new(8).normal(dims[0] * dims[1] * out_cols, 1.0),
                (dims[0], dims[1], out_cols),
                &Device::Cpu,
            )
            .unwrap();
            let apply = |x: &Tensor| x.apply_op1(activation).unwrap();
            let (y32, y64) = (apply(&x32), apply(&x64));
            let g32 = (&y32 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = (&y64 * &w.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let scale = |t: &Tensor| max_diff(t, &t.zeros_like().unwrap());
            assert!(max_diff(&as64(&y32), &y64) < 2e-6 * scale(&y64).max(1.0));
            let (d32, d64) = (as64(g32.get(&x32).unwrap()), g64.get(&x64).unwrap().clone());
            assert!(max_diff(&d32, &d64) < 2e-6 * scale(&d64).max(1.0));
        }
    }

    #[test]
    fn rotary_equals_plain_composition() {
        let mut init = Initializer::new(6);
        // (batch, seq_len, head_dim, heads rotated, extra columns passed through, theta): q|k|v
        // with v passing through, one head, an odd sequence length, rows above the parallel
        // threshold.
        for (batch, seq_len, head_dim, heads, extra, theta) in [
            (2usize, 5usize, 4usize, 6usize, 12usize, 10_000.0),
            (1, 1, 2, 1, 0, 10_000.0),
            (3, 7, 8, 2, 0, 500.0),
            (4, 33, 16, 8, 64, 10_000.0),
        ] {
            let cols = heads * head_dim;
            let x = random(&mut init, &[batch * seq_len, cols + extra], 1.0);
            let rotate = || crate::ops::rotary(&x, seq_len, head_dim, cols, theta).unwrap();
            let (fused, reference) = (rotate(), plain(rotate));
            compare(&fused, &reference, &[&x], 1e-12);
            if extra > 0 {
                let passed = fused.narrow(1, cols, extra).unwrap();
                assert_eq!(max_diff(&passed, &x.narrow(1, cols, extra).unwrap()), 0.0);
            }
            // A rotation keeps each pair's length, and position 0 does not turn.
            let norms = |t: &Tensor| t.narrow(1, 0, cols).unwrap().sqr().unwrap().sum(1).unwrap();
            assert!(max_diff(&norms(&fused), &norms(&x)) < 1e-10);
            let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
            assert!(max_diff(&first(&fused), &first(&x)) < 1e-15);
        }
        let x = random(&mut init, &[6, 8], 1.0);
        assert!(
            crate::ops::rotary(&x, 4, 4, 8, 1e4).is_err(),
            "6 rows are not sequences of 4"
        );
        assert!(
            crate::ops::rotary(&x, 3, 4, 12, 1e4).is_err(),
            "12 columns exceed 8"
        );
    }

    #[test]
    fn public_entry_points_take_the_fused_kernels_on_the_cpu() {
        let mut init = Initializer::new(4);
        let x = random(&mut init, &[2, 3, 6], 1.0);
        let w = random(&mut init, &[6], 1.0);
        let b = random(&mut init, &[6], 1.0);
        // The fused ops are single graph nodes; the plain ones are chains of broadcasts, so
        // their outputs differ in the last bits. Equality to the fused output shows the dispatch.
        let via_ops = crate::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let fused = layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_eq!(max_diff(&via_ops, &fused), 0.0);
        let via_ops = crate::ops::gated_gelu(&x).unwrap();
        assert_eq!(max_diff(&via_ops, &gated_gelu(&x).unwrap()), 0.0);
        let via_ops = crate::ops::gelu(&x).unwrap();
        assert_eq!(max_diff(&via_ops, &gelu(&x).unwrap()), 0.0);
        let via_ops = crate::ops::swiglu(&x).unwrap();
        assert_eq!(max_diff(&via_ops, &swiglu(&x).unwrap()), 0.0);
        assert!(plain(|| !crate::ops::fused_for(&x)));
        assert!(
            crate::ops::fused_for(&x),
            "the switch must reset after the scope"
        );
    }
}
