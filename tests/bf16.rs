//! `--precision bf16` on a small DNABERT-2: where the bf16 weights are, what they cost in memory,
//! and a LoRA run that trains like the f32 one; plus the kernel's speed against candle's f32
//! GEMM (ignored by default: run with `--ignored --nocapture` on an idle machine).

use std::time::Instant;

use candle_core::{Device, Tensor};
use dnatune::ops::Initializer;
use dnatune::peft::bf16::kernel::{self, f32_to_bf16, PackedB};

/// GFLOP/s of the bf16 kernel and of candle's f32 matmul on DNABERT-2-117M's fused-QKV shape
/// (1024 tokens x 768 -> 2304) and its input gradient, timed alternately in one process.
#[test]
#[ignore = "a measurement, not a check; run on an idle machine"]
fn gemm_speed_against_candle_f32() {
    let (m, k, n) = (1024, 768, 2304);
    let mut init = Initializer::new(1);
    let x = init.normal(m * k, 1.0);
    let w = init.normal(n * k, 0.02);
    let packed = PackedB::pack(n, k, |j, c| f32_to_bf16(w[j * k + c]));
    let packed_t = PackedB::pack(k, n, |j, c| packed.get(c, j));
    let g = init.normal(m * n, 1.0);
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let gt = Tensor::from_vec(g.clone(), (m, n), &Device::Cpu).unwrap();
    let flops = 2.0 * (m * k * n) as f64;
    let time = |f: &mut dyn FnMut()| {
        f();
        let start = Instant::now();
        for _ in 0..5 {
            f();
        }
        flops * 5.0 / start.elapsed().as_secs_f64() / 1e9
    };
    let mut y = vec![0f32; m * n];
    let mut dx = vec![0f32; m * k];
    for round in 0..3 {
        let bf16_fwd =
            time(&mut || kernel::gemm(&x, m, 0..k, &packed, 0..n, None, &mut y).unwrap());
        let f32_fwd = time(&mut || {
            xt.matmul(&wt.t().unwrap()).unwrap();
        });
        let bf16_bwd =
            time(&mut || kernel::gemm(&g, m, 0..n, &packed_t, 0..k, None, &mut dx).unwrap());
        let f32_bwd = time(&mut || {
            gt.matmul(&wt).unwrap();
        });
        println!(
            "round {round}, {} threads: forward bf16 {bf16_fwd:.0} vs f32 {f32_fwd:.0} GFLOP/s ({:.2}x); \
             input gradient bf16 {bf16_bwd:.0} vs f32 {f32_bwd:.0} GFLOP/s ({:.2}x)",
            rayon::current_num_threads(),
            bf16_fwd / f32_fwd,
            bf16_bwd / f32_bwd
        );
    }
}
