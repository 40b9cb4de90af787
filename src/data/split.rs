//! Deterministic train/validation split: the same rows, seed and fraction always give the same
//! split, on every machine, because it uses Finch's own seeded generator.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Indices (ascending) into the rows that were split.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
}

/// Puts `round(n * validation_fraction)` of `n` rows into validation, chosen by a shuffle seeded
/// with `seed`. A positive fraction of at least two rows always leaves at least one row on each
/// side, so a small dataset still gets an evaluation signal.
pub fn train_validation_split(n: usize, validation_fraction: f32, seed: u64) -> Result<Split> {
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(Error::config(
            "validation_fraction",
            format!("must be in [0, 1), got {validation_fraction}"),
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "train-validation-split").shuffle(&mut order);
    let mut n_validation = (n as f64 * validation_fraction as f64).round() as usize;
    if validation_fraction > 0.0 && n >= 2 {
        n_validation = n_validation.clamp(1, n - 1);
    }
    let mut validation = order[..n_validation].to_vec();
    let mut train = order[n_validation..].to_vec();
    validation.sort_unstable();
    train.sort_unstable();
    Ok(Split { train, validation })
}

/// Splits items by a [`Split`] (cloning them).
pub fn apply_split<T: Clone>(items: &[T], split: &Split) -> (Vec<T>, Vec<T>) {
    let pick = |idx: &[usize]| idx.iter().filter_map(|&i| items.get(i).cloned()).collect();
    (pick(&split.train), pick(&split.validation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_disjoint_and_sized() {
        let a = train_validation_split(1000, 0.1, 7).unwrap();
        assert_eq!(a, train_validation_split(1000, 0.1, 7).unwrap());
        assert_ne!(a, train_validation_split(1000, 0.1, 8).unwrap());
        assert_eq!(a.validation.len(), 100);
        let mut all: Vec<usize> = a.train.iter().chain(&a.validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Not just the first or last rows.
        assert!(a.validation.iter().any(|&i| i < 500) && a.validation.iter().any(|&i| i >= 500));
        let tiny = train_validation_split(3, 0.05, 1).unwrap();
        assert_eq!((tiny.train.len(), tiny.validation.len()), (2, 1));
        assert!(train_validation_split(0, 0.1, 1).unwrap().train.is_empty());
        assert_eq!(train_validation_split(5, 0.0, 1).unwrap().validation.len(), 0);
        assert!(train_validation_split(5, 1.0, 1).is_err());
        assert!(train_validation_split(5, f32::NAN, 1).is_err());
        let (t, v) = apply_split(&["a", "b", "c"], &tiny);
        assert_eq!(t.len() + v.len(), 3);
    }
}
