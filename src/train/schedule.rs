//! Learning-rate schedules with linear warm-up, matching Hugging Face's
//! `get_{constant,linear,cosine}_schedule_with_warmup`.

use crate::train::config::Schedule;

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, base_lr: f64, warmup: usize, step: usize, total: usize) -> f64 {
    if step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Constant => base_lr,
        Schedule::Linear => base_lr * (1.0 - progress),
        Schedule::Cosine => base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert!((lr_at(Schedule::Cosine, 1.0, 4, 0, 10) - 0.25).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 4, 3, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 4, 4, 10) - 1.0).abs() < 1e-12);
        // Halfway through the decay phase cosine is at half the peak.
        assert!((lr_at(Schedule::Cosine, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 2.0, 0, 9, 10) - 0.2).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 3.0, 0, 9, 10), 3.0);
    }
}
