//! Elementwise loops compiled for the CPU's vector width.
//!
//! Finch's binary targets baseline x86-64 (SSE2), so a plain loop over `f32`s compiles to 4-wide
//! SSE. [`vectorized`] runs a [`Kernel`] inside a function compiled with the AVX2 or AVX-512
//! features of [`cpu::family`] (so `FINCH_CPU` selects it too); the kernel's `#[inline(always)]`
//! loop is compiled there and vectorizes 8 or 16 wide. (A closure is not enough: the compiler
//! calls it from the wrapper instead of inlining it, and it stays SSE2.)
//!
//! Used by the SwiGLU, RMS-norm and output-head softmax loops. On full-size training tensors
//! these are mostly memory-bound, so the gain is modest (SwiGLU's forward: 3.7 → 3.3 ms a call
//! at b4×256 on a 2-core Intel Xeon, family 6 model 207).
//!
//! Results do not depend on the family: Rust never fuses `a * b + c` into an FMA by itself, and
//! the loops that sum keep 16 lanes whatever the vector width (tested below and in `ops`).

// The target-feature wrappers are `unsafe` to call; `vectorized` calls one only for a family
// `Family::available` found on this CPU.
#![allow(unsafe_code)]

use super::cpu::{self, Family};

/// A loop to compile for the CPU's vector width: its arguments, and in [`Kernel::run`] (which
/// must be `#[inline(always)]`, so that it is compiled inside the wide wrappers) the loop.
pub trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `k` compiled for [`cpu::family`]'s instruction set (see the module doc). Call it per
/// chunk of work, inside any parallel split, so that the loop itself is what gets compiled wide.
#[inline(always)]
pub fn vectorized<K: Kernel>(k: K) -> K::Output {
    vectorized_on(cpu::family(), k)
}

/// [`vectorized`] for `family`, which must be one of `Family::available()` (another runs the
/// portable build of the loop).
#[inline(always)]
pub fn vectorized_on<K: Kernel>(family: Family, k: K) -> K::Output {
    // Families are ordered by what they need, so one above the CPU's best is not available.
    let family = if family <= cpu::best() {
        family
    } else {
        Family::Portable
    };
    match family {
        // SAFETY: `family` is at most `cpu::best()`, the best family `Family::available` detected
        // on this CPU, and on x86-64 each family's features include those of the ones below it.
        #[cfg(target_arch = "x86_64")]
        Family::Avx512 => unsafe { x86::avx512(k) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Family::Avx2 => unsafe { x86::avx2(k) },
        _ => k.run(),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernel;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub unsafe fn avx512<K: Kernel>(k: K) -> K::Output {
        k.run()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
        k.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Squares<'a>(&'a mut [f32]);

    impl Kernel for Squares<'_> {
        type Output = f32;
        #[inline(always)]
        fn run(self) -> f32 {
            self.0.iter_mut().for_each(|x| *x = *x * *x + 0.5);
            crate::kernels::ops::sum(self.0)
        }
    }

    #[test]
    fn every_family_gives_the_same_bits() {
        let input: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut want = input.clone();
        let want_sum = vectorized_on(Family::Portable, Squares(&mut want));
        for family in Family::available() {
            let mut got = input.clone();
            let sum = vectorized_on(family, Squares(&mut got));
            assert_eq!(sum.to_bits(), want_sum.to_bits(), "{family:?}");
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{family:?}"
            );
        }
    }
}
