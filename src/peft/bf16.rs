//! `--precision bf16`: the frozen base's linear weights stored in bfloat16, while everything that
//! trains (adapters, pooler, classifier) and the optimizer state stay f32.
//!
//! A frozen weight never receives a gradient, so its precision only has to carry the forward
//! product and the input gradient. bf16 keeps f32's exponent range with 8 bits of mantissa
//! (relative rounding error at most 2^-8), halves the weight's memory and memory traffic, and on
//! CPUs with AVX-512 BF16 runs the products at twice the f32 FMA rate ([`kernel`]). On CUDA the
//! weight is a bf16 tensor multiplied by candle's (cuBLAS) bf16 matmul: mixed precision.
//! Full fine-tuning under `--precision bf16` keeps its weights f32 and runs only the products
//! on the kernel ([`trained`]).

pub mod kernel;
pub(crate) mod trained;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use kernel::{f32_to_bf16, PackedB};

/// How the frozen base's linear weights are stored and multiplied.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Every weight in f32.
    #[default]
    F32,
    /// Frozen linear weights in bf16 (rounded to nearest even); the rest f32.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

enum Storage {
    /// On the CPU: W packed for the forward kernel (B(j, c) = W[j][c]) and, built at the first
    /// backward pass, W packed for the input gradient (B(j, c) = W[c][j]). The second copy is
    /// built lazily so inference holds only half of the f32 bytes; training holds both, as many
    /// bytes as f32, because re-packing per step would cost a fifth of the product's time.
    Packed {
        forward: PackedB,
        input_grad: OnceLock<PackedB>,
    },
    /// On another device (CUDA): a bf16 tensor (out, in).
    Device(Tensor),
}

/// A frozen (rows x cols) linear weight, `rows` = output features, held in bf16.
pub struct Bf16Weight {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl Bf16Weight {
    /// Rounds a 2-D f32 tensor (out, in) to bf16 and keeps it on its device: packed on the CPU,
    /// a bf16 tensor elsewhere.
    pub fn new(w: &Tensor) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let storage = if w.device().is_cpu() {
            let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Storage::Packed {
                forward: PackedB::pack(rows, cols, |j, c| f32_to_bf16(values[j * cols + c])),
                input_grad: OnceLock::new(),
            }
        } else {
            Storage::Device(w.to_dtype(DType::BF16)?)
        };
        Ok(Bf16Weight {
            rows,
            cols,
            storage,
        })
    }

    /// (rows, cols) = (out, in).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes held now: the packed copies built so far (panel padding included), or the bf16
    /// tensor.
    pub fn storage_bytes(&self) -> usize {
        match &self.storage {
            Storage::Packed {
                forward,
                input_grad,
            } => forward.bytes() + input_grad.get().map_or(0, PackedB::bytes),
            Storage::Device(_) => 2 * self.numel(),
        }
    }

    fn check_rows(&self, rows: &Range<usize>) -> candle_core::Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            candle_core::bail!("rows {rows:?} of a bf16 weight with {} rows", self.rows);
        }
        Ok(())
    }

    fn forward_pack(&self) -> candle_core::Result<&PackedB> {
        match &self.storage {
            Storage::Packed { forward, .. } => Ok(forward),
            Storage::Device(_) => candle_core::bail!("bf16 weight on a device has no CPU packing"),
        }
    }

    /// The packing for `grad @ W`, built from the forward one on first use.
    fn input_grad_pack(&self) -> candle_core::Result<&PackedB> {
        match &self.storage {
            Storage::Packed {
                forward,
                input_grad,
            } => Ok(input_grad
                .get_or_init(|| PackedB::pack(self.cols, self.rows, |j, c| forward.get(c, j)))),
            Storage::Device(_) => candle_core::bail!("bf16 weight on a device has no CPU packing"),
        }
    }
}

/// `x @ W[rows]^T (+ bias)` for x (n, in), a bf16 W (out, in) and a frozen bias for those rows;
/// differentiable in `x` only (the input gradient uses the same bf16 W). The row range lets
/// DNABERT-2's fused `Wqkv` be computed block by block, as the dense layers are.
pub fn bf16_linear(
    x: &Tensor,
    w: &Arc<Bf16Weight>,
    rows: Range<usize>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    w.check_rows(&rows)?;
    let add_bias = |y: Tensor| match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    };
    match &w.storage {
        // Mixed precision on the GPU: bf16 operands, cuBLAS, f32 out; one op whose backward
        // yields only the input gradient.
        Storage::Device(wb) if crate::ops::frozen_ops_on_gpu(x) => {
            let op = DeviceBf16Matmul {
                weight: wb.narrow(0, rows.start, rows.len())?.contiguous()?,
                bias: bias.map(Tensor::detach),
            };
            if !x.track_op() {
                return x.detach().apply_op1_no_bwd(&op);
            }
            x.apply_op1(op)
        }
        // The plain composition of the same (candle's matmul backward also computes the weight's
        // gradient, which is thrown away).
        Storage::Device(wb) => add_bias(
            x.to_dtype(DType::BF16)?
                .matmul(&wb.narrow(0, rows.start, rows.len())?.t()?)?
                .to_dtype(x.dtype())?,
        ),
        // The plain composition the kernel is tested against: x rounded to bf16 by candle, the
        // rows widened to f32, candle's matmul.
        Storage::Packed { forward, .. } if !crate::ops::fused_for(x) => {
            let rounded = x.to_dtype(DType::BF16)?.to_dtype(x.dtype())?;
            let shape = (rows.len(), w.cols);
            let w_rows = Tensor::from_vec(forward.widen(rows, 0..w.cols), shape, x.device())?;
            add_bias(rounded.matmul(&w_rows.t()?)?)
        }
        Storage::Packed { .. } => {
            let op = Bf16Matmul {
                weight: w.clone(),
                rows,
                bias: bias
                    .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                    .transpose()?,
            };
            if !x.track_op() {
                return x.detach().contiguous()?.apply_op1_no_bwd(&op);
            }
            x.contiguous()?.apply_op1(op)
        }
    }
}

/// `x @ W^T (+ bias)` on a GPU for an f32 x and a bf16 W (out, in): x rounded to bf16, the product
/// on cuBLAS, the result widened to f32, the bias added. Backward: `grad @ W` the same way.
struct DeviceBf16Matmul {
    weight: Tensor,
    // Read by the CUDA forward pass alone.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    bias: Option<Tensor>,
}

impl CustomOp1 for DeviceBf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul-gpu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bf16-matmul-gpu runs on a GPU; the CPU has its packed kernel")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let xb = x.to_dtype(xl, DType::BF16)?;
        let (storage, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*storage else {
            candle_core::bail!("bf16-matmul-gpu: the weight is not on the GPU")
        };
        let (y, (n, out)) =
            crate::ops::product(&xb, &Layout::contiguous(xl.shape().dims()), w, wl)?;
        let y = y.to_dtype(&Layout::contiguous((n, out)), x.dtype())?;
        let y = crate::ops::gpu::add_bias(y, (n, out), self.bias.as_ref())?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gb = grad.to_dtype(DType::BF16)?;
        Ok(Some(gb.matmul(&self.weight)?.to_dtype(grad.dtype())?))
    }
}

/// The f32 values of a contiguous 2-D CPU tensor, and its (rows, cols).
fn matrix<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (rows, cols) = l.shape().dims2()?;
    let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!(
            "{what} takes a contiguous f32 matrix, not {:?} {:?}",
            s.dtype(),
            l.shape()
        )
    };
    Ok((&v[start..end], rows, cols))
}

/// The frozen product as a graph node of `x` alone (the bias added inside); backward yields only
/// `grad @ W[rows]`.
struct Bf16Matmul {
    weight: Arc<Bf16Weight>,
    rows: Range<usize>,
    bias: Option<Vec<f32>>,
}

impl CustomOp1 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n, k) = matrix(s, l, "bf16-matmul")?;
        if k != self.weight.cols {
            candle_core::bail!(
                "bf16-matmul: input ({n}, {k}) against weight {:?}",
                self.weight.shape()
            );
        }
        let width = self.rows.len();
        let mut y = vec![0f32; n * width];
        let pack = self.weight.forward_pack()?;
        kernel::gemm(
            x,
            n,
            0..k,
            pack,
            self.rows.clone(),
            self.bias.as_deref(),
            &mut y,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((n, width))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = Bf16InputGrad {
            weight: self.weight.clone(),
            rows: self.rows.clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// `grad @ W[rows]` for grad (n, rows.len()): the input gradient of [`Bf16Matmul`].
struct Bf16InputGrad {
    weight: Arc<Bf16Weight>,
    rows: Range<usize>,
}

impl CustomOp1 for Bf16InputGrad {
    fn name(&self) -> &'static str {
        "bf16-matmul-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, n, width) = matrix(s, l, "bf16-matmul-input-grad")?;
        if width != self.rows.len() {
            candle_core::bail!(
                "bf16-matmul-input-grad: gradient ({n}, {width}) for rows {:?}",
                self.rows
            );
        }
        let cols = self.weight.cols;
        let mut dx = vec![0f32; n * cols];
        let pack = self.weight.input_grad_pack()?;
        kernel::gemm(g, n, self.rows.clone(), pack, 0..cols, None, &mut dx)?;
        Ok((CpuStorage::F32(dx), Shape::from((n, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::kernel::bf16_to_f32;
    use super::kernel::tests::{check_against_reference, rounded};
    use super::*;
    use crate::ops::{with_plain_kernels, Initializer};
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn round_all(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect()
    }

    /// The product and its input gradient, whole and on row blocks (odd starts included), with
    /// and without bias, against f64 sums of the bf16 operands; the same for the plain candle
    /// composition; the bias gets no gradient and the input-gradient packing is built once.
    #[test]
    fn bf16_linear_and_its_input_gradient_equal_the_reference() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(41);
        for (n, inp, out) in [
            (1usize, 1usize, 1usize),
            (3, 7, 13),
            (9, 50, 100),
            (70, 96, 147),
        ] {
            let w_values = rounded(&mut init, out * inp);
            let w_t = Tensor::from_vec(w_values.clone(), (out, inp), &dev).unwrap();
            let w = Arc::new(Bf16Weight::new(&w_t).unwrap());
            let f32_bytes = 4 * out * inp;
            // Half the f32 bytes, plus panel padding and 64 bytes of alignment slack.
            assert!(
                w.storage_bytes() < f32_bytes / 2 + 2 * 48 * (inp + 1) + 64,
                "packed size"
            );
            let w_at = |j: usize, c: usize| w_values[j * inp + c];
            let w_tr = |j: usize, c: usize| w_values[c * inp + j];
            let x_values = init.normal(n * inp, 1.0);
            let x_rounded = round_all(&x_values);
            let x = Var::from_vec(x_values, (n, inp), &dev).unwrap();
            let bias_all = init.normal(out, 1.0);
            for rows in [0..out, out / 3..out, out - 1..out] {
                let width = rows.len();
                let b = Tensor::from_slice(&bias_all[rows.clone()], width, &dev).unwrap();
                let g_values = init.normal(n * width, 1.0);
                let g = Tensor::from_vec(g_values.clone(), (n, width), &dev).unwrap();
                for bias in [None, Some(&b)] {
                    let bias_values = bias.map(values);
                    for plain in [false, true] {
                        let what = if plain { "plain" } else { "kernel" };
                        let run = || {
                            let y = bf16_linear(x.as_tensor(), &w, rows.clone(), bias).unwrap();
                            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                            assert!(bias.is_none_or(|b| grads.get(b).is_none()), "bias gradient");
                            (values(&y), values(grads.get(&x).expect("input gradient")))
                        };
                        let (y, dx) = if plain {
                            with_plain_kernels(run)
                        } else {
                            run()
                        };
                        check_against_reference(
                            what,
                            &x_rounded,
                            n,
                            &(0..inp),
                            &w_at,
                            &rows,
                            bias_values.as_deref(),
                            &y,
                            0.0,
                        );
                        // The kernel rounds the gradient to bf16 before the product; the plain
                        // composition multiplies it unrounded and rounds the product to bf16
                        // (candle's cast passes the gradient back through the bf16 node).
                        let (g_used, out_rounding) = match plain {
                            true => (g_values.clone(), 2f64.powi(-8)),
                            false => (round_all(&g_values), 0.0),
                        };
                        check_against_reference(
                            &format!("{what} input gradient"),
                            &g_used,
                            n,
                            &rows,
                            &w_tr,
                            &(0..inp),
                            None,
                            &dx,
                            out_rounding,
                        );
                    }
                }
            }
            // Both packings are held now, and only once each.
            let both = w.storage_bytes();
            assert!(both > f32_bytes / 2 && both < f32_bytes + 4 * 48 * (inp + out + 2));
            bf16_linear(x.as_tensor(), &w, 0..out, None)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(w.storage_bytes(), both);
        }
    }

    #[test]
    fn bad_row_ranges_and_inputs_are_errors() {
        let dev = Device::Cpu;
        let w = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        let w = Arc::new(Bf16Weight::new(&w).unwrap());
        let x = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        assert!(bf16_linear(&x, &w, 2..5, None).is_err());
        let wrong_width = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
        assert!(bf16_linear(&wrong_width, &w, 0..4, None).is_err());
        let f64_input = Tensor::ones((2, 3), DType::F64, &dev).unwrap();
        let err = bf16_linear(&f64_input, &w, 0..4, None).unwrap_err();
        assert!(err.to_string().contains("f32"), "{err}");
    }
}
