//! Run-time choice of the instruction set for the element-wise kernels.
//!
//! The crate is built for the x86-64 baseline (SSE2) so one binary runs everywhere, which leaves
//! the hot element-wise loops (activations, layer norm, softmax, dropout) four floats wide on
//! CPUs that have sixteen. [`multiversion`] compiles a kernel's innermost, per-row or per-chunk
//! function once more for AVX-512 and for AVX2 + FMA and picks the copy at run time, so the loops
//! worker threads run are the wide ones.

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

/// The widest instruction set this CPU runs (detected once by the standard library, then a
/// cached flag).
pub(crate) fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Simd::Avx2;
        }
    }
    Simd::Baseline
}

/// Defines `fn $name(args)` that runs `$body` compiled for the widest instruction set this CPU
/// has: the body is an `#[inline(always)]` function copied into one `#[target_feature]` function
/// per instruction set, so everything it inlines (the generic kernels, `erf`, `exp`) is
/// vectorized for those registers. (A closure would not do: it is not reliably inlined into the
/// wide copy.) Type parameters each take one bound and must be inferable from the arguments;
/// arguments are plain identifiers.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$($t:ident: $bound:path),+>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512bw")]
            unsafe fn avx512<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            match $crate::ops::simd::simd() {
                // SAFETY: `simd()` found the instructions these copies are compiled for.
                #[cfg(target_arch = "x86_64")]
                $crate::ops::simd::Simd::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::simd::Simd::Avx2 => unsafe { avx2($($arg),*) },
                $crate::ops::simd::Simd::Baseline => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;
