//! Numeric building blocks shared by the encoders and the adapters: fused layer norm, attention
//! over a q|k|v projection, GELU (plain and gated), the linear layers whose backward computes only
//! the gradients needed, dropout with a seeded generator, and seeded initialisers.

use std::cell::Cell;

use crate::peft::bf16::Precision;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout,
    Result, Shape, Tensor, WithDType, D,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether a forward pass trains (dropout on) and the generator its dropout masks come from.
///
/// Masks are drawn with our own seeded generator rather than candle's, whose CPU generator cannot
/// be seeded: a run with the same seed must give the same metrics. SplitMix64 is used because
/// masks need millions of draws per step and statistical quality far beyond dropout's needs.
pub struct ForwardCtx {
    train: bool,
    state: Cell<u64>,
    /// Added to the word embeddings (see [`Self::eval_with_embedding_probe`]).
    embedding_probe: Option<Tensor>,
}

impl ForwardCtx {
    /// Evaluation: no dropout.
    pub fn eval() -> Self {
        ForwardCtx {
            train: false,
            state: Cell::new(0),
            embedding_probe: None,
        }
    }

    /// Evaluation with `probe` (batch, seq, hidden) added to the word embeddings. With `probe`
    /// zero the outputs are unchanged, and the gradient of an output with respect to `probe` is
    /// its gradient with respect to each token's embedding: what gradient-times-input
    /// attribution reads.
    pub fn eval_with_embedding_probe(probe: Tensor) -> Self {
        ForwardCtx {
            embedding_probe: Some(probe),
            ..Self::eval()
        }
    }

    /// The word embeddings (batch, seq, hidden) of a forward pass, plus the probe if there is one.
    pub fn probe_word_embeddings(&self, embeddings: Tensor) -> Result<Tensor> {
        match &self.embedding_probe {
            Some(probe) => embeddings + probe,
            None => Ok(embeddings),
        }
    }

    /// Training with dropout masks drawn from `seed`.
    pub fn train(seed: u64) -> Self {
        ForwardCtx {
            train: true,
            state: Cell::new(seed),
            embedding_probe: None,
        }
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by 1/(1-p).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(mask) = self.dropout_mask(x.elem_count(), p) else {
            return Ok(x.clone());
        };
        if fused_for(x) {
            return x.contiguous()?.apply_op1(mask);
        }
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there, from the device's generator (seeded per run by
            // `device::seed_generator`): a mask made on the host and copied over would take longer
            // than the layer it drops from.
            let keep = drawn_dropout_multiplier(x.shape(), p, x.device())?;
            return x.mul(&keep.to_dtype(x.dtype())?);
        }
        let ones = vec![1f32; x.elem_count()];
        let values = Tensor::from_vec(mask.apply(&ones), x.shape(), x.device())?;
        x.mul(&values.to_dtype(x.dtype())?)
    }

    /// The mask of the next dropout of `elements` values with probability `p` (None when
    /// nothing is dropped), advancing the stream past it.
    fn dropout_mask(&self, elements: usize, p: f64) -> Option<DropoutMask> {
        if !self.train || p <= 0.0 {
            return None;
        }
        let keep = 1.0 - p;
        let mask = DropoutMask {
            start: self.state.get(),
            threshold: (keep * 4_294_967_296.0) as u64,
            scale: (1.0 / keep) as f32,
        };
        let draws = elements.div_ceil(2) as u64;
        self.state
            .set(mask.start.wrapping_add(draws.wrapping_mul(SPLITMIX_GAMMA)));
        Some(mask)
    }
}

/// Inverted-dropout multipliers of `shape` drawn from `device`'s own generator: 1/(1-p) with
/// probability 1 - p, else 0. For u uniform in [0, 1), the ceiling of u - p is 1 where u >= p and
/// 0 below, with no scalar to copy to the device for a comparison.
fn drawn_dropout_multiplier(shape: &Shape, p: f64, device: &Device) -> Result<Tensor> {
    let shifted = Tensor::rand(-p as f32, (1.0 - p) as f32, shape, device)?;
    shifted.ceil()? * (1.0 / (1.0 - p))
}

/// A dropout mask as a position in the SplitMix64 stream. SplitMix64 is counter-based (draw k
/// is mix(start + (k + 1) * gamma)), so chunks of the mask are computed in parallel, the masks
/// do not depend on the thread count, and the backward pass recomputes the mask instead of
/// keeping it. Each 64-bit draw decides two elements from 32 bits each.
#[derive(Clone, Copy)]
struct DropoutMask {
    start: u64,
    threshold: u64,
    scale: f32,
}

impl DropoutMask {
    /// Whether element `index` of the masked tensor is kept (what [`Self::apply`] decides for it).
    fn keeps(&self, index: u64) -> bool {
        let draw = index / 2 + 1;
        let r = splitmix_mix(self.start.wrapping_add(draw.wrapping_mul(SPLITMIX_GAMMA)));
        let half = if index.is_multiple_of(2) {
            r & 0xFFFF_FFFF
        } else {
            r >> 32
        };
        half < self.threshold
    }

    /// `x * mask`, element by element.
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (out, x))| mask_chunk_wide(self, (c * CHUNK / 2) as u64, x, out));
        out
    }
}

/// `out = x * mask` for a chunk of a tensor starting at pair `first_draw` of the mask stream.
/// The draws of a block go to a buffer first and are applied in a second loop: both loops then
/// vectorize (the first needs 64-bit multiplies, which AVX-512 DQ has).
#[inline(always)]
fn mask_chunk<T: WithDType>(mask: &DropoutMask, first_draw: u64, x: &[T], out: &mut [T]) {
    const BLOCK: usize = 256;
    let (kept, dropped) = (T::from_f64(mask.scale as f64), T::from_f64(0.0));
    // Below 2^32: p > 0 keeps less than everything.
    let threshold = mask.threshold as u32;
    // Element 2i takes the low 32 bits of draw i, element 2i + 1 the high ones.
    let mut halves = [0u32; 2 * BLOCK];
    for (block, (out, x)) in out
        .chunks_mut(2 * BLOCK)
        .zip(x.chunks(2 * BLOCK))
        .enumerate()
    {
        let first = first_draw + (block * BLOCK) as u64 + 1;
        for (i, pair) in halves.chunks_exact_mut(2).enumerate() {
            let draw = first + i as u64;
            let r = splitmix_mix(mask.start.wrapping_add(draw.wrapping_mul(SPLITMIX_GAMMA)));
            pair[0] = r as u32;
            pair[1] = (r >> 32) as u32;
        }
        for ((o, &v), &half) in out.iter_mut().zip(x).zip(&halves) {
            *o = v * if half < threshold { kept } else { dropped };
        }
    }
}

simd::multiversion! {
    /// [`mask_chunk`], compiled for the widest instruction set available.
    fn mask_chunk_wide<T: WithDType>(mask: &DropoutMask, first_draw: u64, x: &[T], out: &mut [T]) {
        mask_chunk(mask, first_draw, x, out)
    }
}

/// Dropout as one op: forward multiplies by the mask, backward multiplies the gradient by the
/// same (recomputed) mask, so the graph holds no mask tensor.
impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(contiguous(v, l, self.name())?)),
            CpuStorage::F64(v) => CpuStorage::F64(self.apply(contiguous(v, l, self.name())?)),
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn splitmix_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

mod attention;
mod fused;
mod simd;

/// The values a layout covers in a contiguous storage; `what` names the op in the error.
fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: expects a contiguous tensor"),
    }
}

/// Runs `f` on the values of a CPU tensor of element type `T`, read in place when the tensor is
/// contiguous: the custom ops' backward passes and the optimizer read activations and gradients
/// this way instead of copying them out.
pub(crate) fn with_values<T: WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{what}: a tensor is not on the CPU")
    };
    f(contiguous(T::cpu_storage_as_slice(cpu)?, layout, what)?)
}

thread_local! {
    static PLAIN_KERNELS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every fused kernel replaced by its composition of plain candle ops: the
/// reference the kernels are tested against, down to whole training runs. The switch is per
/// thread (candle dispatches and differentiates on the calling thread), so tests running side by
/// side cannot change each other's kernels.
pub fn with_plain_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PLAIN_KERNELS.set(self.0);
        }
    }
    let _restore = Restore(PLAIN_KERNELS.replace(true));
    f()
}

/// Whether work on `t` takes the fused kernels. They are written for the CPU; other devices
/// (CUDA) run the plain compositions, which candle provides for every backend.
pub(crate) fn fused_for(t: &Tensor) -> bool {
    t.device().is_cpu() && !PLAIN_KERNELS.get()
}

/// Whether the frozen products on `t` run as custom ops on a GPU (forward on cuBLAS, backward
/// yielding only the input gradient) rather than as candle matmuls, whose backward would also
/// compute the frozen weight's gradient and throw it away.
pub(crate) fn frozen_ops_on_gpu(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && !PLAIN_KERNELS.get()
}

/// LayerNorm over the last dimension: one fused pass on the CPU.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_for(x) {
        fused::layer_norm(x, weight, bias, eps)
    } else {
        plain_layer_norm(x, weight, bias, eps)
    }
}

/// LayerNorm from plain differentiable ops.
fn plain_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Multi-head self-attention on a fused projection: `qkv` (B * T, 3 * hidden) holds every
/// token's q, k and v side by side (DNABERT-2's `Wqkv` output); returns the context vectors
/// (B * T, hidden), heads side by side. `bias` (B or 1, heads, T, T) is added to the scaled
/// scores (ALiBi, the padding mask) and gets no gradient; `dropout` drops probabilities.
pub fn qkv_attention(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    seq_len: usize,
    dropout: f64,
    ctx: &ForwardCtx,
) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if seq_len == 0 || rows % seq_len != 0 || width % (3 * heads) != 0 {
        candle_core::bail!(
            "attention: q|k|v ({rows}, {width}) for {heads} heads of {seq_len} tokens"
        );
    }
    let (batch, hidden) = (rows / seq_len, width / 3);
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if fused_for(qkv) {
        let op = attention::QkvAttention {
            bias: bias.detach(),
            heads,
            seq_len,
            scale,
            dropout: ctx.dropout_mask(batch * heads * seq_len * seq_len, dropout),
        };
        return qkv.contiguous()?.apply_op1(op);
    }
    let part = |k: usize| {
        qkv.narrow(1, k * hidden, hidden)?
            .reshape((batch, seq_len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias.detach())?;
    let probs = softmax_last(&scores)?;
    let probs = ctx.dropout(&probs, dropout)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((rows, hidden))
}

/// DNABERT-2's gated MLP activation: exact GELU of the first half of the last dimension times
/// the second half.
pub fn gated_gelu(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return fused::gated_gelu(x);
    }
    let (gate, value) = halves(x, "gated GELU")?;
    gate.gelu_erf()? * value
}

/// The first and second halves of the last dimension, for the gated activations' compositions.
fn halves(x: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
    let width = x.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("{what} needs an even last dimension, got {width}");
    }
    let half = width / 2;
    Ok((
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    ))
}

/// The Nucleotide Transformer v2's MLP activation: SiLU of the first half of the last dimension
/// times the second half.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return fused::swiglu(x);
    }
    let (gate, value) = halves(x, "SwiGLU")?;
    gate.silu()? * value
}

/// Rotary position embeddings (RoFormer, as ESM applies them) on the first `cols` columns of `x`
/// (batch * seq_len, width): within each head of `head_dim` channels, the pair (j, j + d/2) of
/// the token at position p turns by p / theta^(2j/d); the other columns pass through. The
/// backward pass turns the gradient back.
pub fn rotary(
    x: &Tensor,
    seq_len: usize,
    head_dim: usize,
    cols: usize,
    theta: f64,
) -> Result<Tensor> {
    let half = head_dim / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(seq_len * half),
        Vec::with_capacity(seq_len * half),
    );
    for p in 0..seq_len {
        for j in 0..half {
            let angle = p as f64 / theta.powf(2.0 * j as f64 / head_dim as f64);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    if fused_for(x) {
        let op = fused::Rotary {
            cos: std::sync::Arc::new(cos),
            sin: std::sync::Arc::new(sin),
            seq_len,
            head_dim,
            cols,
            inverse: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    // x cos + rotate_half(x) sin with rotate_half(x1, x2) = (-x2, x1), per head.
    let (rows, width) = x.dims2()?;
    let (batch, heads) = (rows / seq_len, cols / head_dim);
    let table = |values: Vec<f64>| {
        let t = Tensor::from_vec(values, (1, seq_len, 1, half), x.device())?.to_dtype(x.dtype())?;
        Tensor::cat(&[&t, &t], 3)
    };
    let (cos, sin) = (table(cos)?, table(sin)?);
    let heads4 = x
        .narrow(1, 0, cols)?
        .reshape((batch, seq_len, heads, head_dim))?;
    let turned = Tensor::cat(
        &[
            &heads4.narrow(3, half, half)?.neg()?,
            &heads4.narrow(3, 0, half)?,
        ],
        3,
    )?;
    let rotated =
        (heads4.broadcast_mul(&cos)? + turned.broadcast_mul(&sin)?)?.reshape((rows, cols))?;
    if cols == width {
        return Ok(rotated);
    }
    Tensor::cat(&[&rotated, &x.narrow(1, cols, width - cols)?], 1)
}

/// Exact (erf) GELU, BERT's MLP activation.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        fused::gelu(x)
    } else {
        x.gelu_erf()
    }
}

/// Softmax over the last dimension (differentiable).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// `x @ w^T (+ b)` for x (n, in), a weight w (out, in) and a bias b (out) that are not trained.
///
/// candle's matmul backward always computes both operand gradients, which for a frozen base
/// weight is a full extra GEMM per layer thrown away. On the CPU and on a GPU the product is one
/// custom op whose backward yields only `grad @ w`; it runs candle's own GEMM (cuBLAS on a GPU)
/// on the operands' storage and adds the bias there, so the graph holds one (n, out) tensor where
/// a matmul and a bias add would hold two.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !fused_for(x) && !frozen_ops_on_gpu(x) {
        let y = x.matmul(&w.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = FrozenMatmul {
        bias: bias.map(Tensor::detach),
    };
    if !x.track_op() {
        return x.detach().apply_op2_no_bwd(&w.detach(), &op);
    }
    x.apply_op2(&w.detach(), op)
}

/// `x @ w^T + bias` with a gradient for `x` only.
struct FrozenMatmul {
    bias: Option<Tensor>,
}

/// Adds `bias` to every row of `y`.
fn add_rows<T: WithDType>(y: &mut [T], bias: &[T]) {
    for row in y.chunks_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Adds a bias (`out`, contiguous, the dtype of `y`) to every row of a CPU product `y` (n, out).
fn add_bias_rows(y: &mut CpuStorage, out: usize, b: &CpuStorage, bl: &Layout) -> Result<()> {
    let (start, end) = match bl.contiguous_offsets() {
        Some(range) if bl.dims() == [out] => range,
        _ => candle_core::bail!("linear: bias {:?} for {out} outputs", bl.dims()),
    };
    match (y, b) {
        (CpuStorage::F32(y), CpuStorage::F32(b)) => add_rows(y, &b[start..end]),
        (CpuStorage::F64(y), CpuStorage::F64(b)) => add_rows(y, &b[start..end]),
        (y, b) => candle_core::bail!("linear: product {:?} with bias {:?}", y.dtype(), b.dtype()),
    }
    Ok(())
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut y, (n, out)) = product(x, xl, w, wl)?;
        if let Some(bias) = &self.bias {
            let bias = bias.to_dtype(y.dtype())?.contiguous()?;
            let (storage, layout) = bias.storage_and_layout();
            let candle_core::Storage::Cpu(b) = &*storage else {
                candle_core::bail!("frozen-matmul: bias on {:?}", bias.device().location())
            };
            add_bias_rows(&mut y, out, b, layout)?;
        }
        Ok((y, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, (n, out)) = product(x, xl, w, wl)?;
        let y = gpu::add_bias(y, (n, out), self.bias.as_ref())?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x @ w^T` on any backend's storage for x (n, in) and w (out, in): the product and its
/// shape (n, out), on candle's GEMM (cuBLAS on a GPU).
pub(crate) fn product<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> Result<(S, (usize, usize))> {
    let ((n, k), (out, k_w)) = (xl.shape().dims2()?, wl.shape().dims2()?);
    if k != k_w {
        candle_core::bail!("linear: input ({n}, {k}) against weight ({out}, {k_w})");
    }
    let y = x.matmul(w, (1, n, out, k), xl, &wl.transpose(0, 1)?)?;
    Ok((y, (n, out)))
}

/// `x @ w^T (+ b)` for x (n, in) and a weight w (out, in) or bias b (out) being trained.
///
/// candle's composition (a matmul on `w.t()`, a broadcast add) makes the backward pass compute the
/// weight gradient as `x^T grad`, (in, out), and add its transpose into the weight's gradient, and
/// sum the bias gradient over rows in a strided single-threaded reduction: at the small shape's
/// full fine-tuning this cost about a quarter of a step at 2 threads. Here the product is one op
/// whose backward writes `grad^T x` as (out, in) directly and sums the bias gradient in parallel
/// blocks; gradients go only to the operands that are trained or lead to something trained.
///
/// With [`Precision::Bf16`] the three products (forward, input and weight gradient) round their
/// operands to bf16 and sum in f32 ([`crate::peft::bf16::trained`]), while w, its gradient and
/// the bias stay f32: mixed-precision full fine-tuning. The plain composition of that casts x and
/// w to bf16 for candle's matmul (cuBLAS's bf16 GEMM on a GPU) and the product back to f32.
pub fn trained_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    precision: Precision,
) -> Result<Tensor> {
    if !fused_for(x) {
        let y = match precision {
            Precision::F32 => x.matmul(&w.t()?)?,
            Precision::Bf16 => x
                .to_dtype(DType::BF16)?
                .matmul(&w.to_dtype(DType::BF16)?.t()?)?
                .to_dtype(x.dtype())?,
        };
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = TrainedLinear { precision };
    // The bf16 kernel reads x's rows in place.
    let x = &x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

/// `x @ w^T (+ b)` with gradients for whichever operands are tracked (see [`trained_linear`]).
struct TrainedLinear {
    precision: Precision,
}

impl TrainedLinear {
    /// The gradients of x (when tracked), w (when tracked) and the bias (when there is one
    /// and it is tracked) for the upstream gradient `grad` (n, out).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::peft::bf16::trained::GradProduct;
        // The bf16 products and the bias's column sums read the gradient's rows in place.
        let grad = &grad.contiguous()?;
        let (dx, dw) = match self.precision {
            Precision::F32 => (
                x.track_op().then(|| grad.matmul(&w.detach())).transpose()?,
                w.track_op()
                    .then(|| grad.t()?.matmul(&x.detach()))
                    .transpose()?,
            ),
            Precision::Bf16 => (
                x.track_op()
                    .then(|| grad.apply_op2_no_bwd(&w.detach(), &GradProduct::Input))
                    .transpose()?,
                w.track_op()
                    .then(|| grad.apply_op2_no_bwd(&x.detach(), &GradProduct::Weight))
                    .transpose()?,
            ),
        };
        let db = match bias.filter(|b| b.track_op()) {
            Some(b) => Some(column_sums(grad)?.reshape(b.shape())?),
            None => None,
        };
        Ok((dx, dw, db))
    }
}

/// Rows per job of [`column_sums`]: each job adds its own partial sums.
const COLUMN_SUM_BLOCK_ROWS: usize = 64;

/// The sums over rows of a contiguous 2-D tensor, in parallel over blocks of rows, each block's
/// partial sums added in block order (so the result does not depend on the thread count).
fn column_sums(g: &Tensor) -> Result<Tensor> {
    fn run<T: WithDType>(g: &[T], cols: usize) -> Vec<T> {
        use rayon::prelude::*;
        let partial = |block: &[T]| {
            let mut sums = vec![0f64; cols];
            for row in block.chunks(cols) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.to_f64());
            }
            sums
        };
        let partials: Vec<Vec<f64>> = g
            .par_chunks(COLUMN_SUM_BLOCK_ROWS * cols.max(1))
            .map(partial)
            .collect();
        let mut sums = vec![0f64; cols];
        for p in partials {
            sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        sums.into_iter().map(T::from_f64).collect()
    }
    let (_, cols) = g.dims2()?;
    let (storage, layout) = g.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("column sums of a strided tensor".into()))?;
    let sums = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            Tensor::new(run(&v[start..end], cols), g.device())?
        }
        candle_core::Storage::Cpu(CpuStorage::F64(v)) => {
            Tensor::new(run(&v[start..end], cols), g.device())?
        }
        _ => g.sum(0)?,
    };
    Ok(sums)
}

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.precision == Precision::Bf16 {
            return crate::peft::bf16::trained::forward_on_storage((x, xl), (w, wl), None);
        }
        let (y, shape) = product(x, xl, w, wl)?;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.precision == Precision::Bf16 {
            return crate::peft::bf16::trained::forward_on_storage((x, xl), (w, wl), Some((b, bl)));
        }
        let (mut y, (n, out)) = product(x, xl, w, wl)?;
        add_bias_rows(&mut y, out, b, bl)?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), grad)
    }
}

/// Pieces of the GPU forward passes of the frozen products.
#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    use candle_core::{backend::BackendStorage, CudaStorage, Layout, Result, Storage, Tensor};

    /// `y` (rows, cols, contiguous) plus `bias` (cols) on every row, when there is a bias.
    pub(crate) fn add_bias(
        y: CudaStorage,
        (rows, cols): (usize, usize),
        bias: Option<&Tensor>,
    ) -> Result<CudaStorage> {
        let Some(bias) = bias else { return Ok(y) };
        let bias = bias.to_dtype(y.dtype())?;
        let (storage, layout) = bias.storage_and_layout();
        let Storage::Cuda(b) = &*storage else {
            candle_core::bail!("a GPU product's bias is on {:?}", bias.device().location())
        };
        y.binary_impl::<candle_core::op::Add>(
            b,
            &Layout::contiguous((rows, cols)),
            &layout.broadcast_as((rows, cols))?,
        )
    }
}

/// ALiBi head slopes as DNABERT-2 computes them: for a power-of-two head count n, 2^(-8(k+1)/n);
/// otherwise the slopes of the nearest lower power of two p, then every other slope of the
/// 2p-head list, truncated to n.
pub fn alibi_slopes(n_heads: usize) -> Vec<f64> {
    fn power_of_two(n: usize) -> Vec<f64> {
        (0..n)
            .map(|k| 2f64.powf(-8.0 * (k + 1) as f64 / n as f64))
            .collect()
    }
    if n_heads.is_power_of_two() {
        return power_of_two(n_heads);
    }
    let p = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
    let mut slopes = power_of_two(p);
    slopes.extend(alibi_slopes(2 * p).into_iter().step_by(2).take(n_heads - p));
    slopes
}

/// A seeded source of initial values (normal for weights, Kaiming-uniform for LoRA A).
pub struct Initializer {
    rng: StdRng,
}

impl Initializer {
    pub fn new(seed: u64) -> Self {
        Initializer {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Normal(0, std) samples by Box-Muller.
    pub fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = self.rng.random();
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// Uniform(-bound, bound) samples.
    pub fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn drawn_dropout_multipliers_are_zero_or_the_inverse_keep_rate_at_that_rate() {
        // The GPU's dropout draws its multipliers this way; on the CPU the same ops run on
        // candle's CPU generator.
        for p in [0.1, 0.5] {
            let m = drawn_dropout_multiplier(&Shape::from((200, 500)), p, &Device::Cpu).unwrap();
            let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
            let scale = (1.0 / (1.0 - p)) as f32;
            let kept = values.iter().filter(|&&v| v == scale).count();
            assert_eq!(
                values.iter().filter(|&&v| v == 0.0).count() + kept,
                values.len(),
                "every multiplier is 0 or {scale}"
            );
            // 100,000 draws: the kept fraction is within 5 standard deviations of 1 - p.
            let rate = kept as f64 / values.len() as f64;
            let sd = (p * (1.0 - p) / values.len() as f64).sqrt();
            assert!((rate - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {rate}");
        }
    }

    #[test]
    fn alibi_slopes_match_closed_form() {
        let s8 = alibi_slopes(8);
        for (k, s) in s8.iter().enumerate() {
            assert!((s - 0.5f64.powi(k as i32 + 1)).abs() < 1e-15);
        }
        // 12 heads: the 8 power-of-two slopes 2^-1..2^-8, then slopes 0, 2, 4, 6 of the 16-head
        // list 2^(-(k+1)/2): 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
        let expected12: Vec<f64> = (1..=8)
            .map(|k| 2f64.powi(-k))
            .chain([0.5, 1.5, 2.5, 3.5].map(|e| 2f64.powf(-e)))
            .collect();
        let s12 = alibi_slopes(12);
        assert_eq!(s12.len(), 12);
        for (a, b) in s12.iter().zip(&expected12) {
            assert!((a - b).abs() < 1e-15, "{s12:?}");
        }
    }

    #[test]
    fn layer_norm_matches_f64_recomputation() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(3);
        let x = init.normal(2 * 5, 1.5);
        let w = init.normal(5, 1.0);
        let b = init.normal(5, 1.0);
        let t = |v: &Vec<f32>, s: &[usize]| Tensor::from_vec(v.clone(), s, &dev).unwrap();
        let out = layer_norm(&t(&x, &[2, 5]), &t(&w, &[5]), &t(&b, &[5]), 1e-5).unwrap();
        let out: Vec<Vec<f32>> = out.to_vec2().unwrap();
        for r in 0..2 {
            let row: Vec<f64> = x[r * 5..r * 5 + 5].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / 5.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
            for c in 0..5 {
                let want = (row[c] - mean) / (var + 1e-5).sqrt() * w[c] as f64 + b[c] as f64;
                assert!((out[r][c] as f64 - want).abs() < 1e-5);
            }
        }
    }

    /// The fused frozen product (with and without bias, on odd sizes and on a weight that is a
    /// row block of a larger one) equals the plain composition in
    /// values and input gradient, and gives the weight and bias no gradient.
    #[test]
    fn frozen_linear_equals_plain_composition_with_input_gradient_only() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(7);
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (n, inp, out, row0) in [
            (3usize, 4usize, 5usize, 0usize),
            (7, 13, 9, 9),
            (1, 1, 1, 2),
        ] {
            let x = Var::from_vec(init.normal(n * inp, 1.0), (n, inp), &dev).unwrap();
            let whole = Tensor::from_vec(
                init.normal((row0 + out) * inp, 1.0),
                (row0 + out, inp),
                &dev,
            )
            .unwrap();
            let w = whole.narrow(0, row0, out).unwrap();
            let b = Tensor::from_vec(init.normal(out, 1.0), out, &dev).unwrap();
            for bias in [None, Some(&b)] {
                let fused = frozen_linear(x.as_tensor(), &w, bias).unwrap();
                let plain = with_plain_kernels(|| frozen_linear(x.as_tensor(), &w, bias)).unwrap();
                let inference = frozen_linear(&x.as_tensor().detach(), &w, bias).unwrap();
                assert_eq!(fused.dims(), &[n, out]);
                assert!(max_diff(&fused, &plain) < 1e-5);
                assert!(max_diff(&inference, &plain) < 1e-5);
                let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let g_fused = fused.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let (a, b) = (g_plain.get(&x).unwrap(), g_fused.get(&x).unwrap());
                assert!(max_diff(a, b) < 1e-4);
                assert!(g_fused.get(&w).is_none() && g_fused.get(&whole).is_none());
                assert!(bias.is_none_or(|b| g_fused.get(b).is_none()));
            }
        }
    }

    /// The trained product equals the plain composition in values and in the gradients of x,
    /// w and b, in f32 and f64, with and without bias, on odd sizes and on more rows than one
    /// block of the bias sum; operands that are not trained get no gradient.
    #[test]
    fn trained_linear_equals_plain_composition_in_values_and_gradients() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(5);
        let max_abs = |t: Tensor| {
            let m = t.abs().unwrap().max_all().unwrap();
            m.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let max_rel =
            |a: &Tensor, b: &Tensor| max_abs((a - b).unwrap()) / max_abs(b.clone()).max(1e-12);
        let mut var = |dims: &[usize], dtype: DType| {
            let n = dims.iter().product();
            let t = Tensor::from_vec(init.normal(n, 1.0), dims, &dev).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for (n, inp, out) in [(3usize, 4usize, 5usize), (150, 13, 9), (1, 1, 1)] {
                let (x, w, b) = (
                    var(&[n, inp], dtype),
                    var(&[out, inp], dtype),
                    var(&[out], dtype),
                );
                // (x trained, weight trained, bias): every combination the layers produce,
                // including a frozen weight under a trained bias and an input from frozen layers.
                for (x_tracked, w_tracked, bias) in [
                    (true, true, Some(true)),
                    (true, true, None),
                    (true, false, Some(true)),
                    (false, true, Some(false)),
                ] {
                    let pick = |v: &Var, tracked: bool| match tracked {
                        true => v.as_tensor().clone(),
                        false => v.as_tensor().detach(),
                    };
                    let (xt, wt) = (pick(&x, x_tracked), pick(&w, w_tracked));
                    let bt = bias.map(|tracked| pick(&b, tracked));
                    let fused = trained_linear(&xt, &wt, bt.as_ref(), Precision::F32).unwrap();
                    let plain = with_plain_kernels(|| {
                        trained_linear(&xt, &wt, bt.as_ref(), Precision::F32)
                    })
                    .unwrap();
                    assert_eq!(fused.dims(), &[n, out]);
                    assert!(
                        max_rel(&fused, &plain) < tol,
                        "{dtype:?} ({n}, {inp}, {out})"
                    );
                    // A loss whose gradient differs per element, so that a transposed or
                    // misplaced gradient cannot pass.
                    let loss = |y: &Tensor| {
                        (y.sqr().unwrap() * 0.5 + y.sin().unwrap())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                    };
                    let g_fused = loss(&fused).backward().unwrap();
                    let g_plain = loss(&plain).backward().unwrap();
                    for (v, tracked) in [(&x, x_tracked), (&w, w_tracked), (&b, bias == Some(true))]
                    {
                        match (g_fused.get(v), g_plain.get(v)) {
                            (Some(f), Some(p)) => assert!(max_rel(f, p) < tol * 10.0),
                            (None, None) => assert!(!tracked),
                            (f, p) => panic!(
                                "gradient present: fused {}, plain {}",
                                f.is_some(),
                                p.is_some()
                            ),
                        }
                    }
                }
            }
        }
    }

    /// The masks equal SplitMix64's sequential stream (two elements per draw), whatever the
    /// number of threads filling them, and a second call continues the stream.
    #[test]
    fn dropout_masks_follow_the_sequential_generator_on_any_thread_count() {
        let n = 40_001; // odd, and more than two parallel chunks
        let (seed, p) = (77u64, 0.25);
        let mut state = seed;
        let mut sequential = || {
            state = state.wrapping_add(SPLITMIX_GAMMA);
            splitmix_mix(state)
        };
        let threshold = (0.75 * 4_294_967_296.0) as u64;
        let mut expected = Vec::new();
        for _ in 0..2 {
            let mut one = Vec::new();
            while one.len() < n {
                let r = sequential();
                one.extend([r & 0xFFFF_FFFF, r >> 32].map(|h| (h < threshold) as u8 as f32 / 0.75));
            }
            one.truncate(n);
            expected.push(one);
        }
        let x = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let masks: Vec<Vec<f32>> = pool.install(|| {
                let ctx = ForwardCtx::train(seed);
                (0..2)
                    .map(|_| ctx.dropout(&x, p).unwrap().to_vec1().unwrap())
                    .collect()
            });
            for (got, want) in masks.iter().zip(&expected) {
                assert!(
                    got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
                    "{threads} threads"
                );
            }
        }
    }

    /// The dropout op (mask recomputed in the backward pass) equals multiplying by a mask
    /// tensor, in values and gradient, and both advance the stream alike.
    #[test]
    fn dropout_op_equals_the_mask_tensor_composition() {
        let mut init = Initializer::new(11);
        for (n, dtype) in [(1usize, DType::F32), (33, DType::F64), (50_001, DType::F32)] {
            let x = Var::from_tensor(
                &Tensor::from_vec(init.normal(n, 1.0), n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::from_vec(init.normal(n, 1.0), n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = || {
                let ctx = ForwardCtx::train(3);
                let first = ctx.dropout(&x, 0.3).unwrap();
                let second = ctx.dropout(&x, 0.3).unwrap();
                let grads = (&first * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let f64s =
                    |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().to_vec1().unwrap() };
                (f64s(&first), f64s(&second), f64s(grads.get(&x).unwrap()))
            };
            let fused = run();
            let plain = with_plain_kernels(run);
            assert_eq!(fused, plain, "n {n} {dtype:?}");
            assert_ne!(fused.0, fused.1, "the second call must continue the stream");
        }
    }

    #[test]
    fn dropout_is_seeded_and_keeps_expectation() {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let a = ForwardCtx::train(5).dropout(&x, 0.1).unwrap();
        let b = ForwardCtx::train(5).dropout(&x, 0.1).unwrap();
        let same = a
            .eq(&b)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 1.0);
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        let eval = ForwardCtx::eval().dropout(&x, 0.5).unwrap();
        assert_eq!(eval.sum_all().unwrap().to_scalar::<f32>().unwrap(), 10000.0);
    }
}
