//! The GEMM behind `--precision bf16`: `C = A B (+ bias)` with A the f32 activations (rounded to
//! bf16 per call), B a bf16 operand packed once, and f32 accumulation.
//!
//! candle's CPU matmul has no bf16 path, and widening bf16 to f32 before an f32 GEMM gains
//! nothing but memory. AVX-512 BF16's `vdpbf16ps` multiplies 16 pairs of bf16 values and adds
//! each pair's sum to one of 16 f32 lanes, twice the work of an f32 FMA per instruction, so the
//! kernel is built around it: B in panels of [`NR`] columns whose depth runs in pairs, A converted
//! per call to rows of bf16 pairs, and an `MR x NR` register tile of 24 zmm accumulators. Work
//! is split into jobs of up to 64 rows times a group of panels on rayon's pool (`--threads`).
//! CPUs with AMX tiles (Intel Sapphire Rapids and later), on which `vdpbf16ps` turned out no
//! faster than f32 FMAs, take the `amx` kernel instead: 0.9-1.2 TFLOP/s on two cores there
//! against 0.24 for the `vdpbf16ps` one (BENCHMARKS.md). CPUs with neither (or not x86-64) take
//! [`gemm_portable`]: the same bf16 values widened to f32 and multiplied by candle's f32 GEMM.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Output columns per packed panel: three 16-lane f32 vectors.
pub const NR: usize = 48;
/// Rows per micro-tile. `MR x 3` = 24 of the 32 zmm registers accumulate; the other 8 hold the
/// three B vectors of a depth pair and the A broadcast, so nothing spills in the inner loop.
pub const MR: usize = 8;
/// Micro-tiles per parallel job (64 rows). A job walks its panels with the same rows, so the
/// rows' bf16 copy (at most 64 x 3072 x 2 B = 384 KiB here) and one B panel (48 x 3072 x 2 B =
/// 288 KiB) share the 1 MiB L2 of a Zen 4 core.
const TILES_PER_JOB: usize = 8;
/// Widened B elements per portable step (1 MiB of f32), as the quantized path tiles.
const PORTABLE_TILE: usize = 1 << 18;

/// `v` rounded to the nearest bf16, ties to even; NaN stays NaN (quieted, sign kept) and the
/// infinities stay infinite. Subnormals are rounded like any other value.
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    // Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the dropped
    // half is above one half, or equal to it with an odd kept half. Overflow rounds to infinity
    // through the exponent, as IEEE rounding does; no finite or infinite input reaches 2^32.
    let round = 0x7fff + ((bits >> 16) & 1);
    ((bits + round) >> 16) as u16
}

/// The f32 a bf16 value stands for (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Whether this CPU runs the AVX-512 BF16 kernel (checked once by the standard library, then a
/// cached flag).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A (cols x depth) operand `B(j, c)` in bf16, packed as [panel][depth pair][NR][2]: one 64-byte
/// load gives 16 columns with two consecutive depth values each (the pairs `vdpbf16ps`
/// multiplies), and a panel is read front to back. Depth is padded to even and columns to whole
/// panels with zeros.
pub struct PackedB {
    cols: usize,
    depth: usize,
    /// The panels, starting at `start`: the first element on a 64-byte boundary, so that a
    /// panel row (96 bf16 values) and each 16-column part of it begins a cache line.
    data: Vec<u16>,
    start: usize,
}

impl PackedB {
    /// Packs the bf16 values `value(j, c)`, panels in parallel.
    pub fn pack(cols: usize, depth: usize, value: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        Self::pack_panels(cols, depth, |p, panel| {
            let width = NR.min(cols - p * NR);
            // Depth outer: the writes of one depth value are 2 apart.
            for c in 0..depth {
                let at = (c / 2) * NR * 2 + c % 2;
                for jj in 0..width {
                    panel[at + 2 * jj] = value(p * NR + jj, c);
                }
            }
        })
    }

    /// Packs `B(j, c) = m[j * depth + c]` rounded to bf16: B's columns are the rows of `m`
    /// (cols x depth, row-major), as a weight W (out, in) is packed for `x W^T`. With AVX-512
    /// BF16 the rounding is vectorised, and like the rounding of A it flushes subnormals (below
    /// 1.2e-38) to zero; otherwise it is [`f32_to_bf16`].
    pub fn of_rows(m: &[f32], cols: usize, depth: usize) -> candle_core::Result<Self> {
        check_matrix(m, cols, depth)?;
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            return Ok(Self::pack_panels(cols, depth, |p, panel| {
                let columns = p * NR..(p * NR + NR).min(cols);
                // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked above), `m` holds cols x
                // depth values (checked by `check_matrix`), and `panel` is panel p.
                unsafe { avx512::pack_panel_of_rows(m, depth, columns, panel) }
            }));
        }
        Ok(Self::pack(cols, depth, |j, c| {
            f32_to_bf16(m[j * depth + c])
        }))
    }

    /// Packs `B(j, c) = m[c * cols + j]` rounded to bf16: B is `m` itself (depth x cols,
    /// row-major), as W (out, in) is packed for the input gradient `g W` and the activations x
    /// (n, in) for the weight gradient `g^T x`. Rounded as [`PackedB::of_rows`] rounds.
    pub fn of_columns(m: &[f32], cols: usize, depth: usize) -> candle_core::Result<Self> {
        check_matrix(m, cols, depth)?;
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            return Ok(Self::pack_panels(cols, depth, |p, panel| {
                let columns = p * NR..(p * NR + NR).min(cols);
                // SAFETY: as in `of_rows`.
                unsafe { avx512::pack_panel_of_columns(m, cols, depth, columns, panel) }
            }));
        }
        Ok(Self::pack(cols, depth, |j, c| f32_to_bf16(m[c * cols + j])))
    }

    /// Zeroed panels, each filled by `fill(p, panel)` in parallel.
    fn pack_panels(cols: usize, depth: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let panel_len = depth.div_ceil(2) * NR * 2;
        let len = cols.div_ceil(NR) * panel_len;
        let (mut data, start) = aligned_zeros::<u16>(len);
        data[start..start + len]
            .par_chunks_mut(panel_len.max(1))
            .enumerate()
            .for_each(|(p, panel)| fill(p, panel));
        PackedB {
            cols,
            depth,
            data,
            start,
        }
    }

    /// (columns, depth) of B.
    pub fn shape(&self) -> (usize, usize) {
        (self.cols, self.depth)
    }

    /// Depth pairs per panel.
    fn pairs(&self) -> usize {
        self.depth.div_ceil(2)
    }

    /// `B(j, c)` as stored.
    pub fn get(&self, j: usize, c: usize) -> u16 {
        self.panels()[((j / NR * self.pairs() + c / 2) * NR + j % NR) * 2 + c % 2]
    }

    /// Columns `cols` over the depth `depth` widened to f32, row-major `(cols.len(),
    /// depth.len())`: for the forward packing, the weight rows they came from.
    pub fn widen(&self, cols: Range<usize>, depth: Range<usize>) -> Vec<f32> {
        cols.flat_map(|j| depth.clone().map(move |c| bf16_to_f32(self.get(j, c))))
            .collect()
    }

    /// The packed panels, from the aligned start.
    fn panels(&self) -> &[u16] {
        &self.data[self.start..]
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        2 * self.data.len()
    }
}

/// `len` zeros in a vector with room to start them on a 64-byte boundary, and that start: the
/// AMX tile loads read 64-byte rows, each two cache lines when misaligned. The vector is never
/// grown, so its buffer (and the alignment) stays put.
fn aligned_zeros<E: Copy + Default>(len: usize) -> (Vec<E>, usize) {
    let size = std::mem::size_of::<E>();
    let data = vec![E::default(); len + 64 / size];
    let start = (64 - data.as_ptr() as usize % 64) % 64 / size;
    (data, start)
}

/// A row-major (depth x cols or cols x depth) matrix for [`PackedB::of_rows`] or
/// [`PackedB::of_columns`] holds exactly its values; a mismatch is a caller's bug, reported
/// rather than read out of bounds.
fn check_matrix(m: &[f32], cols: usize, depth: usize) -> candle_core::Result<()> {
    if m.len() != cols * depth {
        candle_core::bail!(
            "bf16 packing: {} values for {cols} columns of depth {depth}",
            m.len()
        );
    }
    Ok(())
}

/// The left operand A (`m x depth.len()`) of a product, in one of the two layouts it comes in.
/// Either is rounded to bf16 pairs when the product packs it, so neither costs a transposed copy.
#[derive(Clone, Copy)]
pub enum Left<'a> {
    /// Row-major: `a[i * depth + c]`, as activations and upstream gradients lie.
    Rows(&'a [f32]),
    /// Column-major, i.e. A^T row-major: `a[c * m + i]`. A weight gradient `g^T x` multiplies
    /// the transpose of the upstream gradient g (n x out), which is g read by columns.
    Columns(&'a [f32]),
}

impl<'a> Left<'a> {
    fn values(&self) -> &'a [f32] {
        match *self {
            Left::Rows(a) | Left::Columns(a) => a,
        }
    }
}

/// `out[i][j - cols.start] = sum over c in depth of a[i][c - depth.start] * B(j, c)`, plus
/// `bias[j - cols.start]`, for the `m` rows of `a` (row-major `m x depth.len()`) and `j` in
/// `cols`; `out` is row-major `m x cols.len()`. A is rounded to bf16, the sums are f32. Runs
/// on rayon's pool, with the AVX-512 BF16 kernel where the CPU has it.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: &[f32],
    m: usize,
    depth: Range<usize>,
    b: &PackedB,
    cols: Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> candle_core::Result<()> {
    gemm_of(Left::Rows(a), m, depth, b, cols, bias, out)
}

/// [`gemm`] with A in either layout.
#[allow(clippy::too_many_arguments)]
pub fn gemm_of(
    a: Left,
    m: usize,
    depth: Range<usize>,
    b: &PackedB,
    cols: Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> candle_core::Result<()> {
    check_operands(a.values(), m, &depth, b, &cols, bias, out)?;
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        // SAFETY: the CPU has AMX-BF16 and AVX-512 BF16 and the process may use the tiles
        // (checked just above); the operand sizes were checked by `check_operands`.
        unsafe { amx::gemm(a, m, depth, b, cols, bias, out) };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above), and the operand
        // sizes the kernel indexes by were checked by `check_operands`.
        unsafe { avx512::gemm(a, m, depth, b, cols, bias, out) };
        return Ok(());
    }
    gemm_portable(a, m, depth, b, cols, bias, out)
}

/// [`gemm`] without AVX-512 BF16: A rounded to bf16 and B widened to f32 a tile of columns at a
/// time, multiplied by candle's f32 GEMM (the same products, summed in another order).
#[allow(clippy::too_many_arguments)]
pub fn gemm_portable(
    a: Left,
    m: usize,
    depth: Range<usize>,
    b: &PackedB,
    cols: Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> candle_core::Result<()> {
    check_operands(a.values(), m, &depth, b, &cols, bias, out)?;
    let k = depth.len();
    let round = |v: f32| bf16_to_f32(f32_to_bf16(v));
    let rounded: Vec<f32> = match a {
        Left::Rows(a) => a.iter().map(|&v| round(v)).collect(),
        Left::Columns(a) => (0..m * k).map(|at| round(a[at % k * m + at / k])).collect(),
    };
    let a = Tensor::from_vec(rounded, (m, k), &Device::Cpu)?;
    let step = (PORTABLE_TILE / depth.len().max(1)).max(1);
    let width = cols.len();
    for j0 in cols.clone().step_by(step) {
        let j1 = (j0 + step).min(cols.end);
        let w = Tensor::from_vec(
            b.widen(j0..j1, depth.clone()),
            (j1 - j0, depth.len()),
            a.device(),
        )?;
        let part: Vec<f32> = a.matmul(&w.t()?)?.flatten_all()?.to_vec1()?;
        for (i, row) in part.chunks(j1 - j0).enumerate() {
            let at = i * width + j0 - cols.start;
            for (jj, (o, &v)) in out[at..at + row.len()].iter_mut().zip(row).enumerate() {
                *o = v + bias.map_or(0.0, |b| b[j0 - cols.start + jj]);
            }
        }
    }
    Ok(())
}

/// The sizes both paths rely on; a mismatch is a bug in the caller, reported rather than read
/// out of bounds.
fn check_operands(
    a: &[f32],
    m: usize,
    depth: &Range<usize>,
    b: &PackedB,
    cols: &Range<usize>,
    bias: Option<&[f32]>,
    out: &[f32],
) -> candle_core::Result<()> {
    let fits = depth.start <= depth.end
        && depth.end <= b.depth
        && cols.start <= cols.end
        && cols.end <= b.cols
        && a.len() == m * depth.len()
        && out.len() == m * cols.len()
        && bias.is_none_or(|v| v.len() == cols.len());
    if !fits {
        candle_core::bail!(
            "bf16 gemm: A {m} x {depth:?} ({} values), B {} x {}, columns {cols:?}, out {} values, \
             bias {:?}",
            a.len(),
            b.cols,
            b.depth,
            out.len(),
            bias.map(<[f32]>::len)
        );
    }
    Ok(())
}

/// The output of one product shared by its parallel jobs (both x86 kernels), each of which
/// writes its own rectangle of it.
#[cfg(target_arch = "x86_64")]
struct SharedOut(*mut f32);
// SAFETY: jobs write disjoint rectangles (distinct row blocks, panels or subtiles), and the
// buffer outlives the parallel loop that uses the pointer.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}

/// The same product on AMX tiles (Intel Sapphire Rapids and later), where `vdpbf16ps` is no
/// faster than f32 FMAs but one `tdpbf16ps` multiplies a 16 x 32 bf16 tile of A by a 32 x 16
/// tile of B into a 16 x 16 f32 tile. A is packed as for AVX-512 (rows of bf16 pairs, padded
/// to whole tiles); B is read in place: 16 columns of a [`PackedB`] panel over 16 depth pairs
/// are one tile at a row stride of the panel's width. A job is 32 rows times pairs of 16-column
/// subtiles: four accumulator tiles, two of A and two of B, the eight tile registers.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{avx512, Left, PackedB, SharedOut, NR};
    use rayon::prelude::*;
    use std::arch::asm;
    use std::ops::Range;
    use std::sync::OnceLock;

    /// Rows of a tile, columns of a subtile, depth pairs of a tile.
    const T: usize = 16;
    /// Bytes of one row of a [`PackedB`] panel (NR columns of a depth pair).
    const B_STRIDE: usize = NR * 2 * 2;

    /// `ldtilecfg`'s 64-byte operand, palette 1: tiles 0-3 the f32 accumulators, 4-5 A, 6-7 B,
    /// each 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether the CPU has AMX-BF16 (and AVX-512 BF16, which packs A) and Linux lets this
    /// process use the tile registers: asked once (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`), for every thread of the process.
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            // Leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            if !(amx_bf16 && amx_tile && super::has_avx512_bf16()) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission, with no pointer arguments.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// [`available`] must be true, and the operands must satisfy [`super::check_operands`].
    pub(super) unsafe fn gemm(
        a: Left,
        m: usize,
        depth: Range<usize>,
        b: &PackedB,
        cols: Range<usize>,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let lead = depth.start % 2;
        let first_pair = depth.start / 2;
        let k_tiles = (lead + depth.len()).div_ceil(2).div_ceil(T);
        // A's pairs padded with zeros to whole tiles, its rows to whole 32-row blocks.
        let a_pairs = k_tiles * T;
        // SAFETY: the CPU has AVX-512 BF16 (part of `available`).
        let (packed_a, a_start) =
            unsafe { avx512::pack_a(a, m, depth.len(), lead, a_pairs, 2 * T) };
        let subtiles = cols.start / T..cols.end.div_ceil(T);
        let sub_pairs = subtiles.len().div_ceil(2);
        let blocks = m.div_ceil(2 * T);
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(blocks.max(1))
            .clamp(1, sub_pairs.max(1));
        let per_group = sub_pairs.div_ceil(groups);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let product = Product {
            packed_a: &packed_a[a_start..],
            a_pairs,
            m,
            b,
            first_pair,
            k_tiles,
            cols,
            bias,
        };
        (0..blocks * groups).into_par_iter().for_each(|job| {
            let (block, group) = (job / groups, job % groups);
            let pairs_from = group * per_group;
            let pairs_to = (pairs_from + per_group).min(sub_pairs);
            // SAFETY: the tile state is permitted (`available`); the configuration is per thread.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
            let mut scratch = Scratch {
                tails: [[0; T * NR * 2]; 2],
                c: [0.0; T * T],
            };
            for pair in pairs_from..pairs_to {
                let s = subtiles.start + 2 * pair;
                let second = (s + 1 < subtiles.end).then_some(s + 1);
                // SAFETY: see `Product::block`; each job writes rows of its block and columns
                // of its subtiles only.
                unsafe { product.block(block * 2 * T, s, second, &out_ptr, &mut scratch) };
            }
            // SAFETY: releases this thread's tile state.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    }

    /// B rows past the last depth pair of a panel (only in the last depth tile) are read from
    /// a zero-padded copy, so no load leaves the packed buffer; a missing second subtile reads
    /// zeros.
    static ZEROS: [u16; T * NR * 2] = [0; T * NR * 2];

    /// A job's buffers, zeroed once per job rather than per 32 x 32 block: the tail copies of
    /// the two B subtiles (rows past the panel's end stay zero) and an edge tile of C.
    struct Scratch {
        tails: [[u16; T * NR * 2]; 2],
        c: [f32; T * T],
    }

    /// The operands of one call, shared by its jobs.
    struct Product<'a> {
        packed_a: &'a [u32],
        a_pairs: usize,
        m: usize,
        b: &'a PackedB,
        first_pair: usize,
        k_tiles: usize,
        cols: Range<usize>,
        bias: Option<&'a [f32]>,
    }

    impl Product<'_> {
        /// Rows `i0..i0 + 32` times the subtile `s` and, if any, `second` (16 columns each):
        /// the four accumulator tiles over every depth tile, stored into `out`.
        ///
        /// # Safety
        /// The tiles must be configured as [`CONFIG`] on this thread; `out` must be `m x
        /// cols.len()` and this job the only writer of the rectangle.
        unsafe fn block(
            &self,
            i0: usize,
            s: usize,
            second: Option<usize>,
            out: &SharedOut,
            scratch: &mut Scratch,
        ) {
            let panel_pairs = self.b.pairs();
            let tile_of =
                |sub: Option<usize>, kt: usize, tail: &mut [u16; T * NR * 2]| -> *const u16 {
                    let Some(sub) = sub else {
                        return ZEROS.as_ptr();
                    };
                    let (panel, offset) = (sub * T / NR, sub * T % NR);
                    let pair0 = self.first_pair + kt * T;
                    let panel_at = panel * panel_pairs * NR * 2;
                    if pair0 + T <= panel_pairs {
                        return self.b.panels()[panel_at + pair0 * NR * 2 + offset * 2..].as_ptr();
                    }
                    for r in 0..panel_pairs.saturating_sub(pair0) {
                        let from = panel_at + (pair0 + r) * NR * 2 + offset * 2;
                        tail[r * NR * 2..r * NR * 2 + 2 * T]
                            .copy_from_slice(&self.b.panels()[from..from + 2 * T]);
                    }
                    tail.as_ptr()
                };
            let a_stride = self.a_pairs * 4;
            // SAFETY: packed A has whole 32-row blocks of a_pairs pairs.
            let a0 = unsafe { self.packed_a.as_ptr().add(i0 * self.a_pairs) };
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            let [tail0, tail1] = &mut scratch.tails;
            for kt in 0..self.k_tiles {
                let b0 = tile_of(Some(s), kt, tail0);
                let b1 = tile_of(second, kt, tail1);
                // SAFETY: each load reads 16 rows of 64 bytes at its stride, inside packed A
                // (32 rows from i0, pairs kt * 16..kt * 16 + 16), a B panel or a tail copy.
                unsafe {
                    let a_at = a0.add(kt * T);
                    asm!(
                        "tileloadd tmm4, [{a} + {sa}*1]",
                        "tileloadd tmm5, [{a2} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) a_at,
                        a2 = in(reg) a_at.add(T * self.a_pairs),
                        b0 = in(reg) b0,
                        b1 = in(reg) b1,
                        sa = in(reg) a_stride,
                        sb = in(reg) B_STRIDE,
                        options(nostack, readonly),
                    );
                }
            }
            let width = self.cols.len();
            for t in 0..4 {
                let Some(sub) = (if t % 2 == 0 { Some(s) } else { second }) else {
                    continue;
                };
                let rows = i0 + (t / 2) * T..(i0 + (t / 2 + 1) * T).min(self.m);
                if rows.is_empty() {
                    continue;
                }
                let (lo, hi) = (
                    (sub * T).max(self.cols.start),
                    ((sub + 1) * T).min(self.cols.end),
                );
                // A whole tile goes straight into the output; an edge tile through scratch.
                let whole = rows.len() == T && hi - lo == T;
                let (dst, stride) = if whole {
                    // SAFETY: rows and columns of the tile lie inside `out` (m x width).
                    (
                        unsafe { out.0.add(rows.start * width + lo - self.cols.start) },
                        width * 4,
                    )
                } else {
                    (scratch.c.as_mut_ptr(), T * 4)
                };
                // SAFETY: 16 rows of 64 bytes at `stride` from `dst`: this job's rectangle of
                // `out`, or the scratch tile.
                unsafe {
                    match t {
                        0 => {
                            asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) dst, s = in(reg) stride, options(nostack))
                        }
                        1 => {
                            asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) dst, s = in(reg) stride, options(nostack))
                        }
                        2 => {
                            asm!("tilestored [{d} + {s}*1], tmm2", d = in(reg) dst, s = in(reg) stride, options(nostack))
                        }
                        _ => {
                            asm!("tilestored [{d} + {s}*1], tmm3", d = in(reg) dst, s = in(reg) stride, options(nostack))
                        }
                    }
                }
                let bias = self
                    .bias
                    .map(|v| &v[lo - self.cols.start..hi - self.cols.start]);
                for i in rows.clone() {
                    // SAFETY: row i < m, columns lo..hi inside this job's rectangle.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.0.add(i * width + lo - self.cols.start),
                            hi - lo,
                        )
                    };
                    if !whole {
                        let from = (i - rows.start) * T + lo - sub * T;
                        row.copy_from_slice(&scratch.c[from..from + hi - lo]);
                    }
                    if let Some(bias) = bias {
                        row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Left, PackedB, SharedOut, MR, NR, TILES_PER_JOB};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16, and the operands must satisfy
    /// [`super::check_operands`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn gemm(
        a: Left,
        m: usize,
        depth: Range<usize>,
        b: &PackedB,
        cols: Range<usize>,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // A's depth index c maps to the pair c / 2 of B; an odd start puts a zero before it.
        let lead = depth.start % 2;
        let first_pair = depth.start / 2;
        let pairs = (lead + depth.len()).div_ceil(2);
        let tiles = m.div_ceil(MR);
        let (packed_a, a_start) = pack_a(a, m, depth.len(), lead, pairs, MR);
        let packed_a = &packed_a[a_start..];
        let panels = cols.start / NR..cols.end.div_ceil(NR);
        let blocks = tiles.div_ceil(TILES_PER_JOB);
        // Enough jobs for every thread to get several (few rows: split the panels instead).
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(blocks.max(1))
            .clamp(1, panels.len().max(1));
        let per_group = panels.len().div_ceil(groups);
        let width = cols.len();
        let b_panel_len = b.pairs() * NR * 2;
        let out_ptr = SharedOut(out.as_mut_ptr());
        (0..blocks * groups).into_par_iter().for_each(|job| {
            let out_ptr = &out_ptr;
            let (block, group) = (job / groups, job % groups);
            let first_panel = panels.start + group * per_group;
            for panel in first_panel..(first_panel + per_group).min(panels.end) {
                let j0 = panel * NR;
                let (lo, hi) = (j0.max(cols.start), (j0 + NR).min(cols.end));
                // SAFETY: `first_pair + pairs <= b.pairs()` since depth.end <= b.depth, and the
                // panel exists since j0 < cols.end <= b.cols.
                let b_at = unsafe {
                    b.panels()
                        .as_ptr()
                        .add(panel * b_panel_len + first_pair * NR * 2)
                };
                let tile_end = ((block + 1) * TILES_PER_JOB).min(tiles);
                for tile in block * TILES_PER_JOB..tile_end {
                    let i0 = tile * MR;
                    let rows = MR.min(m - i0);
                    // SAFETY: packed_a holds `tiles * MR` rows of `pairs` values.
                    let a_at = unsafe { packed_a.as_ptr().add(tile * MR * pairs) };
                    if rows == MR && lo == j0 && hi == j0 + NR {
                        // A whole tile: straight into the output, bias added on the way.
                        let bias_at = bias.map(|v| v[j0 - cols.start..].as_ptr());
                        // SAFETY: rows i0..i0 + MR and columns j0..j0 + NR lie inside `out`
                        // (m x width) and this job's rectangle; bias has NR values from j0.
                        unsafe {
                            let c = out_ptr.0.add(i0 * width + j0 - cols.start);
                            micro_tile(a_at, b_at, pairs, bias_at, c, width);
                        }
                    } else {
                        // An edge tile: computed whole into a scratch tile, the valid part copied.
                        let mut scratch = [0f32; MR * NR];
                        // SAFETY: the scratch tile is MR x NR with stride NR.
                        unsafe { micro_tile(a_at, b_at, pairs, None, scratch.as_mut_ptr(), NR) };
                        for r in 0..rows {
                            for j in lo..hi {
                                let v = scratch[r * NR + j - j0]
                                    + bias.map_or(0.0, |v| v[j - cols.start]);
                                // SAFETY: row i0 + r < m and column j - cols.start < width, in
                                // this job's rectangle.
                                unsafe { *out_ptr.0.add((i0 + r) * width + j - cols.start) = v };
                            }
                        }
                    }
                }
            }
        });
    }

    /// A (`m x len`) as rows of bf16 pairs (one u32 per pair, the earlier depth value in the
    /// low half as `vdpbf16ps` and `tdpbf16ps` pair them), `pairs` per row after `lead` zeros,
    /// rows padded with zeros to a multiple of `row_multiple` (whole tiles); the rows start at
    /// the returned index, on a 64-byte boundary. Row-major, so the conversion stores whole vectors; the micro-kernel
    /// reads MR rows side by side, each sequentially.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn pack_a(
        a: Left,
        m: usize,
        len: usize,
        lead: usize,
        pairs: usize,
        row_multiple: usize,
    ) -> (Vec<u32>, usize) {
        let packed_len = m.div_ceil(row_multiple) * row_multiple * pairs;
        let (mut packed, start) = super::aligned_zeros::<u32>(packed_len);
        let rows = &mut packed[start..start + packed_len];
        match a {
            Left::Rows(a) => rows
                .par_chunks_mut(pairs.max(1))
                .take(m)
                .enumerate()
                .with_min_len(8)
                .for_each(|(i, row)| {
                    // The closure inherits this function's target features.
                    round_row(
                        &a[i * len..(i + 1) * len],
                        &mut as_u16(row)[lead..lead + len],
                    );
                }),
            Left::Columns(a) => rows
                .par_chunks_mut((COLUMN_BLOCK * pairs).max(1))
                .take(m.div_ceil(COLUMN_BLOCK))
                .enumerate()
                .for_each(|(block, block_rows)| {
                    let i0 = block * COLUMN_BLOCK;
                    let n = COLUMN_BLOCK.min(m - i0);
                    // SAFETY: the CPU has this function's features, inherited by the closure;
                    // rows `i0..i0 + n` of A are columns of `a` (len x m), and `block_rows`
                    // holds `n` rows of `pairs >= (lead + len) / 2` pairs.
                    unsafe { round_columns(a, m, len, i0, n, lead, pairs, block_rows) };
                }),
        }
        (packed, start)
    }

    /// Rows of A that one job of [`pack_a`] takes from a column-major A: one 64-byte line of
    /// each of A^T's rows.
    const COLUMN_BLOCK: usize = 16;

    /// Packed pairs (u32) viewed as twice as many u16, the layout the conversions write.
    fn as_u16(pairs: &mut [u32]) -> &mut [u16] {
        // SAFETY: the same memory with a weaker alignment, any bit pattern valid, borrowed
        // exclusively like `pairs`.
        unsafe { std::slice::from_raw_parts_mut(pairs.as_mut_ptr().cast(), 2 * pairs.len()) }
    }

    /// Rows `i0..i0 + n` (n <= 16) of A, read from `a` = A^T (len x m, row-major), rounded into
    /// `rows` (n rows of `pairs` pairs, the depth values from `lead` on, zeros around them): per
    /// 16 pairs, one masked 16-lane load of A^T per depth value, the lanes paired and the 16 x 16
    /// block of pairs transposed into the rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `a` must hold `len * m` values, `i0 + n <= m`,
    /// and `rows` `n * pairs` values with `lead + len <= 2 * pairs`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn round_columns(
        a: &[f32],
        m: usize,
        len: usize,
        i0: usize,
        n: usize,
        lead: usize,
        pairs: usize,
        rows: &mut [u32],
    ) {
        debug_assert!(n <= COLUMN_BLOCK && i0 + n <= m && a.len() == len * m);
        debug_assert!(rows.len() >= n * pairs && lead + len <= 2 * pairs);
        let lanes = lane_mask(n);
        // Depth value `c` of the rows, zero outside 0..len (the lead and the padding).
        let column = |c: usize| match c.checked_sub(lead) {
            // SAFETY: lanes i0..i0 + n of A^T's row c - lead exist; the mask leaves the others
            // unread.
            Some(c) if c < len => unsafe {
                _mm512_maskz_loadu_ps(lanes, a.as_ptr().add(c * m + i0))
            },
            _ => _mm512_setzero_ps(),
        };
        for q0 in (0..pairs).step_by(16) {
            let count = 16.min(pairs - q0);
            let mut block = [_mm512_setzero_si512(); 16];
            for (qq, pair) in block.iter_mut().enumerate().take(count) {
                let t = 2 * (q0 + qq);
                *pair = bf16_pairs(column(t), column(t + 1));
            }
            transpose_16x16(&mut block);
            for (r, row) in block.iter().enumerate().take(n) {
                // SAFETY: row r < n of `rows` has `pairs` values, `count` of them from q0.
                unsafe {
                    let at = rows.as_mut_ptr().add(r * pairs + q0);
                    _mm512_mask_storeu_epi32(at.cast(), lane_mask(count), *row);
                }
            }
        }
    }

    /// Panel `columns.start / NR` of [`PackedB::of_rows`] (B(j, c) = m[j * depth + c]; at most
    /// NR columns): per 16 columns and 16 depth pairs, each of the 16 rows of `m` rounded to 16
    /// pairs and the block transposed into the panel's [pair][column] order.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `m` must hold `columns.end * depth` values and
    /// `panel` be a whole panel (`depth.div_ceil(2) * NR * 2` values).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panel_of_rows(
        m: &[f32],
        depth: usize,
        columns: Range<usize>,
        panel: &mut [u16],
    ) {
        let pairs = depth.div_ceil(2);
        debug_assert!(m.len() >= columns.end * depth && panel.len() == pairs * NR * 2);
        let panel = panel.as_mut_ptr().cast::<u32>();
        for (g, j0) in columns.clone().step_by(16).enumerate() {
            let width = 16.min(columns.end - j0);
            for q0 in (0..pairs).step_by(16) {
                let mut block = [_mm512_setzero_si512(); 16];
                for (r, pairs_of_row) in block.iter_mut().enumerate().take(width) {
                    let row = (j0 + r) * depth;
                    *pairs_of_row = round_32(&m[row + 2 * q0..row + depth]);
                }
                transpose_16x16(&mut block);
                for (qq, pair) in block.iter().enumerate().take(16.min(pairs - q0)) {
                    // SAFETY: pair q0 + qq < pairs, 16 columns from 16 g of the panel's NR.
                    unsafe {
                        _mm512_storeu_si512(panel.add((q0 + qq) * NR + 16 * g).cast(), *pair)
                    };
                }
            }
        }
    }

    /// Panel `columns.start / NR` of [`PackedB::of_columns`] (B(j, c) = m[c * cols + j]; at
    /// most NR columns): per depth pair, two masked loads of 16 consecutive values of `m` and
    /// one store of their 16 pairs.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `m` must hold `depth * cols` values with
    /// `columns.end <= cols`, and `panel` be a whole panel (`depth.div_ceil(2) * NR * 2` values).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panel_of_columns(
        m: &[f32],
        cols: usize,
        depth: usize,
        columns: Range<usize>,
        panel: &mut [u16],
    ) {
        let pairs = depth.div_ceil(2);
        debug_assert!(m.len() == depth * cols && columns.end <= cols);
        debug_assert!(panel.len() == pairs * NR * 2);
        let panel = panel.as_mut_ptr().cast::<u32>();
        let load = |c: usize, j0: usize, lanes: __mmask16| match c < depth {
            // SAFETY: values j0.. of row c of `m` exist as far as the mask reaches.
            true => unsafe { _mm512_maskz_loadu_ps(lanes, m.as_ptr().add(c * cols + j0)) },
            false => _mm512_setzero_ps(),
        };
        for q in 0..pairs {
            for (g, j0) in columns.clone().step_by(16).enumerate() {
                let lanes = lane_mask(columns.end - j0);
                let pair = bf16_pairs(load(2 * q, j0, lanes), load(2 * q + 1, j0, lanes));
                // SAFETY: pair q < pairs, 16 columns from 16 g of the panel's NR.
                unsafe { _mm512_storeu_si512(panel.add(q * NR + 16 * g).cast(), pair) };
            }
        }
    }

    /// The mask of the first `n` of 16 lanes (all of them for n >= 16).
    fn lane_mask(n: usize) -> __mmask16 {
        match n {
            16.. => 0xffff,
            _ => (1u16 << n) - 1,
        }
    }

    /// Lane i: the pair (bf16(low[i]), bf16(high[i])), the low one in the low half as
    /// `vdpbf16ps` and `tdpbf16ps` pair depth values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn bf16_pairs(low: __m512, high: __m512) -> __m512i {
        // SAFETY: 16 bf16 values and 16 u16 are the same 256 bits.
        let widen = |v: __m512| unsafe {
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(v),
            ))
        };
        _mm512_or_si512(widen(low), _mm512_slli_epi32::<16>(widen(high)))
    }

    /// Transposes the 16 x 16 matrix of 32-bit lanes whose rows are `rows`: the round of each
    /// d in 8, 4, 2, 1 swaps the off-diagonal d x d blocks of every 2d x 2d block, two lane
    /// permutations per pair of rows.
    #[target_feature(enable = "avx512f")]
    fn transpose_16x16(rows: &mut [__m512i; 16]) {
        for d in [8usize, 4, 2, 1] {
            // Indices 16.. take lanes of the second operand (the lower row of the pair).
            let index = |upper: bool| {
                let lanes: [i32; 16] = std::array::from_fn(|k| {
                    let k = k as i32;
                    let d = d as i32;
                    match (k & d == 0, upper) {
                        (true, true) => k,
                        (false, true) => 16 + k - d,
                        (true, false) => k + d,
                        (false, false) => 16 + k,
                    }
                });
                // SAFETY: 16 i32 are 64 readable bytes.
                unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
            };
            let (upper, lower) = (index(true), index(false));
            for i in (0..16).filter(|i| i & d == 0) {
                let (a, b) = (rows[i], rows[i + d]);
                rows[i] = _mm512_permutex2var_epi32(a, upper, b);
                rows[i + d] = _mm512_permutex2var_epi32(a, lower, b);
            }
        }
    }

    /// `out[i] = bf16(row[i])`, 32 at a time ([`round_32`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn round_row(row: &[f32], out: &mut [u16]) {
        debug_assert_eq!(row.len(), out.len());
        for (src, dst) in row.chunks(32).zip(out.chunks_mut(32)) {
            let n = src.len();
            let out_mask: __mmask32 = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
            // SAFETY: the mask covers only the n elements of `dst` (masked-off lanes are not
            // written).
            unsafe { _mm512_mask_storeu_epi16(dst.as_mut_ptr().cast(), out_mask, round_32(src)) };
        }
    }

    /// The first 32 (at most) values of `values` rounded to bf16, in order, zeros after them
    /// (`vcvtne2ps2bf16`: round to nearest even; unlike [`super::f32_to_bf16`] it flushes
    /// subnormals, below 1.2e-38, to zero). Read as 16 u32, lane q is the pair (2q, 2q + 1).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn round_32(values: &[f32]) -> __m512i {
        let n = values.len().min(32);
        let (low_mask, high_mask) = (lane_mask(n), lane_mask(n.saturating_sub(16)));
        // SAFETY: the masks cover only the n values that exist (masked-off lanes are not read);
        // 32 bf16 values and 32 u16 are the same 512 bits.
        unsafe {
            let low = _mm512_maskz_loadu_ps(low_mask, values.as_ptr());
            let high = _mm512_maskz_loadu_ps(high_mask, values.as_ptr().add(16.min(n)));
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low))
        }
    }

    /// One `MR x NR` tile over `pairs` depth pairs: `c[r][j] = sum a[r] * b[j] (+ bias[j])`.
    ///
    /// # Safety
    /// `a` holds MR rows of `pairs` values and `b` `pairs * NR * 2` values; `c` has MR rows of NR writable
    /// floats `ldc` apart; `bias`, when given, has NR values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn micro_tile(
        a: *const u32,
        b: *const u16,
        pairs: usize,
        bias: Option<*const f32>,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for p in 0..pairs {
            // SAFETY (this block): p < pairs, within the sizes the caller guarantees.
            unsafe {
                let bp = b.add(p * NR * 2);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32).cast()));
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(64).cast()));
                let ap = a.add(p);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*ap.add(r * pairs) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
                    acc[2] = _mm512_dpbf16_ps(acc[2], pair, b2);
                }
            }
        }
        let bias = match bias {
            // SAFETY: bias has NR = 48 values.
            Some(v) => unsafe {
                [
                    _mm512_loadu_ps(v),
                    _mm512_loadu_ps(v.add(16)),
                    _mm512_loadu_ps(v.add(32)),
                ]
            },
            None => [_mm512_setzero_ps(); 3],
        };
        for (r, acc) in acc.iter().enumerate() {
            for (v, (&sum, &bias)) in acc.iter().zip(&bias).enumerate() {
                // SAFETY: row r < MR and columns 16 v .. 16 v + 16 <= NR of c are writable.
                unsafe { _mm512_storeu_ps(c.add(r * ldc + 16 * v), _mm512_add_ps(sum, bias)) };
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::ops::Initializer;

    #[test]
    fn bf16_rounding_is_nearest_even_and_keeps_nan_and_infinity() {
        let one = 0x3f80;
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: the even neighbour (1) wins; 1 + 3 * 2^-8
        // lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(f32_to_bf16(1.0), one);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), one);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), one + 2);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), one + 1);
        assert_eq!(
            f32_to_bf16(-(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
            0x8000 | (one + 1)
        );
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        // The largest f32 is above bf16's largest finite value by more than half a step.
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        // A NaN whose payload sits only in the dropped bits must not turn into infinity.
        for bits in [0x7f80_0001u32, 0xff80_0001, 0x7fc0_0000, 0x7fff_ffff] {
            let b = f32_to_bf16(f32::from_bits(bits));
            assert!(bf16_to_f32(b).is_nan(), "{bits:#x} -> {b:#x}");
            assert_eq!(b >> 15, (bits >> 31) as u16, "sign of {bits:#x}");
        }
        // Against the definition on random finite values (subnormals included): the nearer of
        // the two bf16 neighbours, the even one on a tie.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = f32::from_bits(state as u32);
            if !v.is_finite() {
                continue;
            }
            let down = (v.to_bits() >> 16) as u16;
            let up = down + 1;
            // Past the largest finite bf16, the next value up is 2^128 (stored as infinity).
            let up_value = match up & 0x7f80 {
                0x7f80 => (v as f64).signum() * 2f64.powi(128),
                _ => bf16_to_f32(up) as f64,
            };
            let (d_down, d_up) = (
                (v as f64 - bf16_to_f32(down) as f64).abs(),
                (up_value - v as f64).abs(),
            );
            let want = if d_down < d_up || (d_down == d_up && down.is_multiple_of(2)) {
                down
            } else {
                up
            };
            assert_eq!(f32_to_bf16(v), want, "{v:e} ({:#x})", v.to_bits());
        }
    }

    /// bf16-rounded random values.
    pub(in crate::peft::bf16) fn rounded(init: &mut Initializer, n: usize) -> Vec<f32> {
        init.normal(n, 1.0)
            .into_iter()
            .map(|v| bf16_to_f32(f32_to_bf16(v)))
            .collect()
    }

    /// `out` against the f64 sums of the (already bf16) operands. Products of two bf16 values are
    /// exact in f32, so only the f32 summation errs: at most about `k * 2^-24` of the sum of
    /// absolute terms for `k` terms, doubled for the pairwise sums inside `vdpbf16ps`. One
    /// wrong, missing or doubled term (about `1/k` of that sum) exceeds it. `out_rounding` is
    /// the relative rounding of results stored in a narrower type afterwards (0 for f32).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::peft::bf16) fn check_against_reference(
        what: &str,
        a: &[f32],
        m: usize,
        depth: &Range<usize>,
        w: &dyn Fn(usize, usize) -> f32,
        cols: &Range<usize>,
        bias: Option<&[f32]>,
        out: &[f32],
        out_rounding: f64,
    ) {
        let k = depth.len();
        for i in 0..m {
            for j in cols.clone() {
                let (mut sum, mut abs) = (0f64, 0f64);
                for c in depth.clone() {
                    let t = a[i * k + c - depth.start] as f64 * w(j, c) as f64;
                    sum += t;
                    abs += t.abs();
                }
                let b = bias.map_or(0.0, |b| b[j - cols.start] as f64);
                let got = out[i * cols.len() + j - cols.start] as f64;
                let tol = 2.0 * (k as f64 + 1.0) * 2f64.powi(-24) * (abs + b.abs())
                    + out_rounding * (sum + b).abs()
                    + 1e-30;
                assert!(
                    (got - sum - b).abs() <= tol,
                    "{what}: m {m} depth {depth:?} cols {cols:?}: ({i}, {j}) = {got}, want {} \
                     (tolerance {tol:e})",
                    sum + b
                );
            }
        }
    }

    /// The (cols, rows) transpose of a row-major (rows, cols) matrix.
    pub(in crate::peft::bf16) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|at| a[at % rows * cols + at / rows])
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Shapes: K = 1, odd M/N/K, less than one tile or panel, several panels and job blocks,
    /// column windows that start and end inside a panel, and depth windows with odd starts.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (3, 1, 5),
        (8, 2, 48),
        (9, 17, 49),
        (17, 33, 97),
        (5, 64, 200),
        (67, 130, 150),
        (130, 300, 96),
    ];

    #[test]
    fn gemm_equals_the_f64_sums_of_the_rounded_operands() {
        let mut init = Initializer::new(31);
        for (m, k, n) in SHAPES {
            let a = rounded(&mut init, m * k);
            let w = rounded(&mut init, n * k);
            let wf = |j: usize, c: usize| w[j * k + c];
            let b = PackedB::pack(n, k, |j, c| f32_to_bf16(wf(j, c)));
            assert_eq!(b.widen(0..n, 0..k), w, "packing round trip");
            let bias_all = init.normal(n, 1.0);
            // Whole width; a window starting and ending inside panels; a single column.
            let a_t = transpose(&a, m, k);
            for cols in [0..n, n / 3..n - n / 4, n - 1..n] {
                for bias in [None, Some(&bias_all[cols.clone()])] {
                    let mut out = vec![f32::NAN; m * cols.len()];
                    gemm(&a, m, 0..k, &b, cols.clone(), bias, &mut out).unwrap();
                    check_against_reference("gemm", &a, m, &(0..k), &wf, &cols, bias, &out, 0.0);
                    // A by columns: the same bf16 values summed in the same order.
                    let mut by_columns = vec![f32::NAN; m * cols.len()];
                    let a_t = Left::Columns(&a_t);
                    gemm_of(a_t, m, 0..k, &b, cols.clone(), bias, &mut by_columns).unwrap();
                    assert_eq!(
                        bits(&by_columns),
                        bits(&out),
                        "A by columns, {m} x {k} x {n}"
                    );
                }
            }
            // A depth window (the input gradient of a row block): A covers depth 1..k-1 only.
            if k >= 3 {
                let depth = 1..k - 1;
                let a = rounded(&mut init, m * depth.len());
                let mut out = vec![f32::NAN; m * n];
                gemm(&a, m, depth.clone(), &b, 0..n, None, &mut out).unwrap();
                check_against_reference(
                    "depth window",
                    &a,
                    m,
                    &depth,
                    &wf,
                    &(0..n),
                    None,
                    &out,
                    0.0,
                );
                let a_t = transpose(&a, m, depth.len());
                let mut by_columns = vec![f32::NAN; m * n];
                let a_t = Left::Columns(&a_t);
                gemm_of(a_t, m, depth.clone(), &b, 0..n, None, &mut by_columns).unwrap();
                assert_eq!(bits(&by_columns), bits(&out), "depth window by columns");
            }
        }
    }

    #[test]
    fn portable_path_equals_the_fast_path() {
        if !has_avx512_bf16() {
            eprintln!("skipped: this CPU has no AVX-512 BF16, both calls take the portable path");
            return;
        }
        let mut init = Initializer::new(37);
        for (m, k, n) in SHAPES {
            // Unrounded activations: both paths must round them the same way.
            let a = init.normal(m * k, 1.0);
            let w = rounded(&mut init, n * k);
            let b = PackedB::pack(n, k, |j, c| f32_to_bf16(w[j * k + c]));
            let bias = init.normal(n - n / 2, 1.0);
            let cols = n / 2..n;
            let mut fast = vec![f32::NAN; m * cols.len()];
            let mut portable = vec![f32::NAN; m * cols.len()];
            gemm(&a, m, 0..k, &b, cols.clone(), Some(&bias), &mut fast).unwrap();
            gemm_portable(
                Left::Rows(&a),
                m,
                0..k,
                &b,
                cols.clone(),
                Some(&bias),
                &mut portable,
            )
            .unwrap();
            let a_t = transpose(&a, m, k);
            let mut portable_columns = vec![f32::NAN; m * cols.len()];
            gemm_portable(
                Left::Columns(&a_t),
                m,
                0..k,
                &b,
                cols.clone(),
                Some(&bias),
                &mut portable_columns,
            )
            .unwrap();
            assert_eq!(
                bits(&portable_columns),
                bits(&portable),
                "portable, A by columns"
            );
            let a_rounded: Vec<f32> = a.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
            let wf = |j: usize, c: usize| w[j * k + c];
            for (what, out) in [("avx512", &fast), ("portable", &portable)] {
                check_against_reference(
                    what,
                    &a_rounded,
                    m,
                    &(0..k),
                    &wf,
                    &cols,
                    Some(&bias),
                    out,
                    0.0,
                );
            }
        }
    }

    /// On a CPU with AMX, where [`gemm`] takes the tiles, the AVX-512 kernel is checked too, and
    /// both against the reference, on unrounded activations that both must round alike.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn amx_path_and_avx512_path_equal_the_reference() {
        if !amx::available() {
            eprintln!("skipped: this CPU (or kernel) offers no AMX tiles; gemm takes another path");
            return;
        }
        let mut init = Initializer::new(41);
        for (m, k, n) in SHAPES.into_iter().chain([(33, 64, 96), (40, 100, 49)]) {
            let a = init.normal(m * k, 1.0);
            let w = rounded(&mut init, n * k);
            let b = PackedB::pack(n, k, |j, c| f32_to_bf16(w[j * k + c]));
            let wf = |j: usize, c: usize| w[j * k + c];
            let depth = usize::from(k >= 3)..k - usize::from(k >= 3);
            let a = &a[..m * depth.len()];
            let a_rounded: Vec<f32> = a.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
            let cols = n / 3..n;
            let bias = init.normal(cols.len(), 1.0);
            let a_t = transpose(a, m, depth.len());
            for tiles in [true, false] {
                let run = |left: Left| {
                    let mut out = vec![f32::NAN; m * cols.len()];
                    check_operands(a, m, &depth, &b, &cols, Some(&bias), &out).unwrap();
                    let (d, c, bias) = (depth.clone(), cols.clone(), Some(bias.as_slice()));
                    // SAFETY: AMX (and with it AVX-512 BF16) is available, checked above; the
                    // operands fit, as `check_operands` confirmed.
                    unsafe {
                        if tiles {
                            amx::gemm(left, m, d, &b, c, bias, &mut out);
                        } else {
                            avx512::gemm(left, m, d, &b, c, bias, &mut out);
                        }
                    }
                    out
                };
                let out = run(Left::Rows(a));
                assert_eq!(bits(&run(Left::Columns(&a_t))), bits(&out), "A by columns");
                let what = if tiles { "amx" } else { "avx512" };
                check_against_reference(
                    what,
                    &a_rounded,
                    m,
                    &depth,
                    &wf,
                    &cols,
                    Some(&bias),
                    &out,
                    0.0,
                );
            }
        }
    }

    /// The vectorised packings give the scalar packing's bits, padding included, on sizes that
    /// end inside a 16-column group, a panel and a 16-pair block, with odd depths, and on values
    /// that round up, to infinity, or are NaN (subnormals, which the vector rounding flushes,
    /// are left out).
    #[test]
    fn packings_of_rows_and_of_columns_equal_the_scalar_packing() {
        let mut init = Initializer::new(43);
        let specials = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            -0.0,
        ];
        for (cols, depth) in [
            (1, 1),
            (3, 2),
            (17, 31),
            (48, 33),
            (49, 64),
            (100, 70),
            (150, 5),
        ] {
            let mut m = init.normal(cols * depth, 1.0);
            for (at, &v) in (0..m.len()).step_by(7).zip(specials.iter().cycle()) {
                m[at] = v;
            }
            let panels =
                |b: &PackedB| b.panels()[..cols.div_ceil(NR) * b.pairs() * NR * 2].to_vec();
            let scalar = PackedB::pack(cols, depth, |j, c| f32_to_bf16(m[j * depth + c]));
            let rows = PackedB::of_rows(&m, cols, depth).unwrap();
            assert_eq!(panels(&rows), panels(&scalar), "of_rows, {cols} x {depth}");
            let scalar = PackedB::pack(cols, depth, |j, c| f32_to_bf16(m[c * cols + j]));
            let columns = PackedB::of_columns(&m, cols, depth).unwrap();
            assert_eq!(
                panels(&columns),
                panels(&scalar),
                "of_columns, {cols} x {depth}"
            );
        }
        assert!(PackedB::of_rows(&[0.0; 5], 2, 3).is_err());
        assert!(PackedB::of_columns(&[0.0; 7], 2, 3).is_err());
    }

    #[test]
    fn mismatched_operands_are_an_error_not_a_read_out_of_bounds() {
        let b = PackedB::pack(4, 3, |_, _| 0);
        let mut out = vec![0f32; 2 * 4];
        assert!(gemm(&[0.0; 5], 2, 0..3, &b, 0..4, None, &mut out).is_err());
        assert!(gemm(&[0.0; 8], 2, 0..4, &b, 0..4, None, &mut out).is_err());
        assert!(gemm(&[0.0; 6], 2, 0..3, &b, 1..5, None, &mut out).is_err());
        assert!(gemm(&[0.0; 6], 2, 0..3, &b, 0..4, Some(&[0.0; 3]), &mut out).is_err());
        assert!(gemm(&[0.0; 6], 2, 0..3, &b, 0..4, None, &mut out).is_ok());
    }
}
