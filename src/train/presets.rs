//! Starting points for the trainer settings, from a two-minute classroom demo to a careful run.
//! The studio's preset buttons and `finch train --preset` apply the same values; settings given
//! explicitly afterwards (a knob, a flag) override them.

use super::{Duration, Schedule, TrainConfig};
use crate::data::LossOn;
use crate::lora::Target;

/// A named set of trainer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    QuickDemo,
    Balanced,
    Quality,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::QuickDemo, Preset::Balanced, Preset::Quality];

    /// The name shown in the studio.
    pub fn title(self) -> &'static str {
        match self {
            Preset::QuickDemo => "Quick demo",
            Preset::Balanced => "Balanced",
            Preset::Quality => "Quality",
        }
    }

    /// The name on the command line (`--preset quick-demo`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::QuickDemo => "quick-demo",
            Preset::Balanced => "balanced",
            Preset::Quality => "quality",
        }
    }

    /// Parses [`Preset::name`] (case-insensitive; `_` for `-` accepted).
    pub fn from_name(name: &str) -> Option<Preset> {
        let name = name.trim().to_ascii_lowercase().replace('_', "-");
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn description(self) -> &'static str {
        match self {
            Preset::QuickDemo => "A few minutes on a laptop: small adapter, short examples, 30 steps.",
            Preset::Balanced => "A sensible first real run: rank 16 on every projection, 200 steps.",
            Preset::Quality => "Three passes over the data with a larger adapter, warm-up and regular evaluation.",
        }
    }

    /// The preset's settings; model, data and run folder are left empty.
    pub fn config(self) -> TrainConfig {
        let mut cfg = TrainConfig::default();
        self.apply(&mut cfg);
        cfg
    }

    /// Sets the knobs the preset is about; model, data, run folder, seed, device, precision and
    /// probes are kept.
    pub fn apply(self, cfg: &mut TrainConfig) {
        cfg.lora.targets = Target::ALL.to_vec();
        cfg.lora.use_rslora = false;
        cfg.loss_on = LossOn::Assistant;
        cfg.schedule = Schedule::Cosine;
        cfg.max_grad_norm = 1.0;
        cfg.eval_split = 0.1;
        match self {
            Preset::QuickDemo => {
                cfg.duration = Duration::Steps(30);
                cfg.lora.r = 8;
                cfg.lora.alpha = 16.0;
                cfg.lora.dropout = 0.0;
                cfg.batch_size = 2;
                cfg.grad_accum = 1;
                cfg.seq_len = 256;
                cfg.lr = 3e-4;
                cfg.warmup_steps = 0;
                cfg.weight_decay = 0.0;
                cfg.eval_every = 10;
                cfg.save_every = 0;
            }
            Preset::Balanced => {
                cfg.duration = Duration::Steps(200);
                cfg.lora.r = 16;
                cfg.lora.alpha = 32.0;
                cfg.lora.dropout = 0.05;
                cfg.batch_size = 4;
                cfg.grad_accum = 1;
                cfg.seq_len = 512;
                cfg.lr = 2e-4;
                cfg.warmup_steps = 10;
                cfg.weight_decay = 0.0;
                cfg.eval_every = 25;
                cfg.save_every = 50;
            }
            Preset::Quality => {
                cfg.duration = Duration::Epochs(3.0);
                cfg.lora.r = 32;
                cfg.lora.alpha = 64.0;
                cfg.lora.dropout = 0.05;
                cfg.batch_size = 4;
                cfg.grad_accum = 4;
                cfg.seq_len = 1024;
                cfg.lr = 1e-4;
                cfg.warmup_steps = 20;
                cfg.weight_decay = 0.01;
                cfg.eval_every = 50;
                cfg.save_every = 100;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_once_model_and_data_are_set() {
        for preset in Preset::ALL {
            let mut cfg = preset.config();
            cfg.model = "m".into();
            cfg.data = "d.jsonl".into();
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", preset.title()));
        }
    }

    #[test]
    fn a_preset_keeps_what_it_is_not_about() {
        let mut cfg = Preset::Quality.config();
        cfg.seed = 7;
        cfg.model = "m".into();
        cfg.probe_prompts = vec!["Hi?".into()];
        Preset::QuickDemo.apply(&mut cfg);
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.model, "m");
        assert_eq!(cfg.probe_prompts, ["Hi?"]);
        assert_eq!(cfg.duration, Duration::Steps(30));
        assert_eq!(cfg.lora.r, 8);
    }

    #[test]
    fn names_round_trip() {
        for preset in Preset::ALL {
            assert_eq!(Preset::from_name(preset.name()), Some(preset));
        }
        assert_eq!(Preset::from_name("Quick_Demo"), Some(Preset::QuickDemo));
        assert_eq!(Preset::from_name("fast"), None);
    }
}
