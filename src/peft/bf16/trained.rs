//! The products of a *trained* linear layer on the bf16 kernel: full fine-tuning under
//! `--precision bf16`, mixed precision as PyTorch's autocast runs it. The weight W, its gradient
//! and the optimizer state stay f32 (the master weights); each product of a step (the forward
//! `x W^T`, the input gradient `g W`, the weight gradient `g^T x`) rounds its two operands to
//! bf16 and sums in f32. W changes at every optimizer step, so it is rounded and packed per
//! product rather than once as a frozen weight is; packing reads W once, a small fraction of a
//! product that reads it n times.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Shape};

use super::kernel::{gemm_of, Left, PackedB};
use super::matrix;

/// `x W^T (+ bias)` for x (n, in) and W (out, in), both row-major: (n, out).
fn forward(
    x: &[f32],
    n: usize,
    w: &[f32],
    (out, inp): (usize, usize),
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    product(Left::Rows(x), n, &PackedB::of_rows(w, out, inp)?, bias)
}

/// `g W` for the upstream gradient g (n, out) and W (out, in): the input gradient, (n, in).
fn input_grad(
    g: &[f32],
    n: usize,
    w: &[f32],
    (out, inp): (usize, usize),
) -> candle_core::Result<Vec<f32>> {
    // B(j, c) = W[c][j]: B is W itself, (out, in) read as depth x columns.
    product(Left::Rows(g), n, &PackedB::of_columns(w, inp, out)?, None)
}

/// `g^T x` for g (n, out) and x (n, in): the weight gradient, (out, in) as W is laid out. g^T
/// is g read by columns, which the kernel rounds and packs as it goes.
fn weight_grad(
    g: &[f32],
    x: &[f32],
    n: usize,
    (out, inp): (usize, usize),
) -> candle_core::Result<Vec<f32>> {
    product(
        Left::Columns(g),
        out,
        &PackedB::of_columns(x, inp, n)?,
        None,
    )
}

/// `A B (+ bias)` over all of B's depth and columns, for the `m` rows of A: a new (m, columns)
/// matrix.
fn product(a: Left, m: usize, b: &PackedB, bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
    let (cols, depth) = b.shape();
    let mut out = vec![0f32; m * cols];
    gemm_of(a, m, 0..depth, b, 0..cols, bias, &mut out)?;
    Ok(out)
}

/// A gradient product of a trained linear layer, applied to the upstream gradient (n, out) and
/// the other operand: W (out, in) for the input gradient, x (n, in) for the weight gradient.
/// The outputs are f32, like the operands they are the gradients of.
pub(crate) enum GradProduct {
    Input,
    Weight,
}

impl CustomOp2 for GradProduct {
    fn name(&self) -> &'static str {
        match self {
            GradProduct::Input => "bf16-trained-input-grad",
            GradProduct::Weight => "bf16-trained-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        other: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, n, out) = matrix(g, gl, self.name())?;
        let (other, rows, inp) = matrix(other, ol, self.name())?;
        match self {
            GradProduct::Input if rows == out => {
                let dx = input_grad(g, n, other, (out, inp))?;
                Ok((CpuStorage::F32(dx), Shape::from((n, inp))))
            }
            GradProduct::Weight if rows == n => {
                let dw = weight_grad(g, other, n, (out, inp))?;
                Ok((CpuStorage::F32(dw), Shape::from((out, inp))))
            }
            _ => candle_core::bail!(
                "{}: gradient ({n}, {out}) against an operand ({rows}, {inp})",
                self.name()
            ),
        }
    }
}

/// The f32 slices of a forward pass's operands, for [`forward`]: x (n, in), W (out, in) and the
/// bias, each contiguous.
pub(crate) fn forward_on_storage(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (xv, n, k) = matrix(x.0, x.1, "bf16-trained-linear")?;
    let (wv, out, k_w) = matrix(w.0, w.1, "bf16-trained-linear")?;
    if k != k_w {
        candle_core::bail!("bf16-trained-linear: input ({n}, {k}) against weight ({out}, {k_w})");
    }
    let bias = match bias {
        Some((b, bl)) => match (b, bl.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) if bl.dims() == [out] => Some(&v[start..end]),
            _ => candle_core::bail!(
                "bf16-trained-linear: bias {:?} {:?} for {out} f32 outputs",
                b.dtype(),
                bl.dims()
            ),
        },
        None => None,
    };
    let y = forward(xv, n, wv, (out, k), bias)?;
    Ok((CpuStorage::F32(y), Shape::from((n, out))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_gradient_operands_are_errors() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let g = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        let w = Tensor::ones((5, 2), DType::F32, &dev).unwrap();
        let x = Tensor::ones((6, 2), DType::F32, &dev).unwrap();
        let err = g.apply_op2_no_bwd(&w, &GradProduct::Input).unwrap_err();
        assert!(err.to_string().contains("input-grad"), "{err}");
        assert!(g.apply_op2_no_bwd(&x, &GradProduct::Weight).is_err());
    }
}

#[cfg(test)]
mod reference_tests {
    use super::super::kernel::tests::{check_against_reference, rounded, transpose};
    use super::super::kernel::{bf16_to_f32, f32_to_bf16};
    use crate::ops::{trained_linear, with_plain_kernels, Initializer};
    use crate::peft::bf16::Precision;
    use candle_core::{Device, Tensor, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The forward product and the gradients of x, W and the bias of a bf16 trained linear
    /// layer, on odd sizes, more rows than a kernel job and several panels, against f64 sums of
    /// the bf16-rounded operands; the plain candle composition (bf16 casts around candle's
    /// matmul) against the same sums within its extra rounding of each product to bf16.
    #[test]
    fn bf16_trained_linear_and_its_gradients_equal_the_reference() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(17);
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect() };
        for (n, inp, out) in [
            (1usize, 1usize, 1usize),
            (3, 7, 13),
            (70, 96, 147),
            (130, 33, 49),
        ] {
            let x_values = init.normal(n * inp, 1.0);
            let w_values = rounded(&mut init, out * inp);
            let b_values = init.normal(out, 1.0);
            let g_values = init.normal(n * out, 1.0);
            let (x_r, g_r) = (round(&x_values), round(&g_values));
            let x = Var::from_vec(x_values, (n, inp), &dev).unwrap();
            let w = Var::from_vec(w_values.clone(), (out, inp), &dev).unwrap();
            let b = Var::from_vec(b_values.clone(), out, &dev).unwrap();
            let g = Tensor::from_vec(g_values.clone(), (n, out), &dev).unwrap();
            let g_t = transpose(&g_r, n, out);
            for plain in [false, true] {
                let bias = (!plain).then_some(b.as_tensor());
                let run = || {
                    let y = trained_linear(x.as_tensor(), w.as_tensor(), bias, Precision::Bf16)
                        .unwrap();
                    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let get = |v: &Var| values(grads.get(v).expect("a gradient"));
                    (values(&y), get(&x), get(&w), bias.map(|_| get(&b)))
                };
                let (y, dx, dw, db) = if plain {
                    with_plain_kernels(run)
                } else {
                    run()
                };
                let (what, rounding) = match plain {
                    true => ("plain", 2f64.powi(-8)),
                    false => ("kernel", 0.0),
                };
                let bias_values = bias.map(|_| b_values.as_slice());
                let w_at = |j: usize, c: usize| w_values[j * inp + c];
                check_against_reference(
                    what,
                    &x_r,
                    n,
                    &(0..inp),
                    &w_at,
                    &(0..out),
                    bias_values,
                    &y,
                    rounding,
                );
                let w_tr = |j: usize, c: usize| w_values[c * inp + j];
                check_against_reference(
                    &format!("{what} input gradient"),
                    &g_r,
                    n,
                    &(0..out),
                    &w_tr,
                    &(0..inp),
                    None,
                    &dx,
                    rounding,
                );
                let x_tr = |j: usize, c: usize| x_r[c * inp + j];
                check_against_reference(
                    &format!("{what} weight gradient"),
                    &g_t,
                    out,
                    &(0..n),
                    &x_tr,
                    &(0..inp),
                    None,
                    &dw,
                    rounding,
                );
                if let Some(db) = db {
                    for (o, &got) in db.iter().enumerate() {
                        let want: f64 = (0..n).map(|i| g_values[i * out + o] as f64).sum();
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (n as f64),
                            "bias gradient"
                        );
                    }
                }
            }
        }
    }
}
