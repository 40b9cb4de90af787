//! Trainer behaviour on tiny random models: it learns, it resumes exactly, it stops cleanly,
//! it detects divergence, and it writes PEFT-compatible adapters.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use finch::data::TokenizedExample;
use finch::lora::{LoraConfig, Target};
use finch::model::tiny::TinySpec;
use finch::model::{Family, ModelFiles, Transformer};
use finch::rng::Rng;
use finch::train::{Duration, TrainConfig, TrainData, TrainEvent, Trainer};

fn encode(tok: &tokenizers::Tokenizer, prompt: &str, answer: &str) -> TokenizedExample {
    let p = format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
    let a = format!("{answer}<|im_end|>");
    let p_ids = tok.encode(p, false).unwrap().get_ids().to_vec();
    let a_ids = tok.encode(a, false).unwrap().get_ids().to_vec();
    let mut loss_mask = vec![false; p_ids.len()];
    loss_mask.extend(vec![true; a_ids.len()]);
    TokenizedExample {
        input_ids: [p_ids, a_ids].concat(),
        loss_mask,
        truncated: false,
    }
}

const PAIRS: [(&str, &str); 8] = [
    ("red", "ROJO"),
    ("blue", "AZUL"),
    ("green", "VERDE"),
    ("black", "NEGRO"),
    ("white", "BLANCO"),
    ("one", "UNO"),
    ("two", "DOS"),
    ("three", "TRES"),
];

fn setup(dir: &Path, family: Family) -> (Transformer, TrainData) {
    let model_dir = dir.join("model");
    TinySpec::new(family).write(&model_dir).unwrap();
    let files = ModelFiles::open(model_dir.to_str().unwrap()).unwrap();
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    let train: Vec<_> = PAIRS.iter().map(|(p, a)| encode(&files.tokenizer, p, a)).collect();
    let eval = vec![encode(&files.tokenizer, "four", "CUATRO")];
    (model, TrainData { train, eval, pad_id: 2 })
}

fn config(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        data: "pairs".into(),
        out: dir.join("run").to_string_lossy().into_owned(),
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        },
        duration: Duration::Steps(steps),
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: 5,
        ..TrainConfig::default()
    }
}

fn train(
    cfg: &TrainConfig,
    model: Transformer,
    data: TrainData,
    stop_after: Option<usize>,
) -> (Vec<TrainEvent>, finch::Result<finch::train::TrainSummary>) {
    let mut model = model;
    model
        .add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))
        .unwrap();
    let run_dir = Path::new(&cfg.out).to_path_buf();
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut trainer = Trainer::new(cfg.clone(), model, data, Some(run_dir)).unwrap();
    run_trainer(&mut trainer, stop_after)
}

fn run_trainer(
    trainer: &mut Trainer,
    stop_after: Option<usize>,
) -> (Vec<TrainEvent>, finch::Result<finch::train::TrainSummary>) {
    let stop = AtomicBool::new(false);
    let mut events = vec![];
    let result = trainer.run(&stop, &mut |e| {
        if let (TrainEvent::Step(m), Some(n)) = (e, stop_after) {
            if m.step == n {
                stop.store(true, Ordering::Relaxed);
            }
        }
        events.push(e.clone());
    });
    (events, result)
}

fn losses(events: &[TrainEvent]) -> Vec<(usize, f32)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(m) => Some((m.step, m.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn tiny_model_overfits_eight_examples() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path(), Family::Llama);
    let cfg = config(dir.path(), 100);
    let (events, result) = train(&cfg, model, data, None);
    let summary = result.unwrap();
    let l = losses(&events);
    assert_eq!(l.len(), 100);
    let first = l[0].1;
    let last = l.iter().rev().take(5).map(|x| x.1).sum::<f32>() / 5.0;
    assert!(last < 0.2 * first, "loss fell only from {first} to {last}");
    assert_eq!(summary.loss_first, Some(first));
    assert!(matches!(
        events.first(),
        Some(TrainEvent::Started { total_steps: 100, .. })
    ));
    assert!(matches!(events.last(), Some(TrainEvent::Finished(_))));
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut cfg_a = config(dir_a.path(), 16);
    // Exercise every piece of state a checkpoint must carry: dropout RNG, accumulation, decay.
    cfg_a.lora.dropout = 0.1;
    cfg_a.grad_accum = 2;
    cfg_a.batch_size = 3;
    cfg_a.weight_decay = 0.01;
    cfg_a.eval_every = 4;
    let mut cfg_b = cfg_a.clone();
    cfg_b.out = dir_b.path().join("run").to_string_lossy().into_owned();

    let (model, data) = setup(dir_a.path(), Family::Qwen2);
    let (full, r) = train(&cfg_a, model, data, None);
    r.unwrap();

    let (model, data) = setup(dir_b.path(), Family::Qwen2);
    let (first_half, r) = train(&cfg_b, model, data.clone(), Some(7));
    let s = r.unwrap();
    assert!(s.stopped);
    assert_eq!(s.steps, 7);

    // A new process would do exactly this: fresh model, restore the newest checkpoint.
    let run_dir = Path::new(&cfg_b.out).to_path_buf();
    let (step, ckpt) = finch::train::checkpoint::latest(&run_dir).unwrap();
    assert_eq!(step, 7);
    let (model, _) = setup(dir_b.path(), Family::Qwen2);
    let mut model = model;
    model.add_lora(&cfg_b.lora, &mut Rng::new(999)).unwrap();
    let mut trainer = Trainer::new(cfg_b.clone(), model, data, Some(run_dir.clone())).unwrap();
    trainer.restore(&ckpt).unwrap();
    finch::train::truncate_metrics(&run_dir, step).unwrap();
    let (second_half, r) = run_trainer(&mut trainer, None);
    r.unwrap();

    let a = losses(&full);
    let b: Vec<_> = losses(&first_half).into_iter().chain(losses(&second_half)).collect();
    assert_eq!(a.len(), 16);
    assert_eq!(b.len(), 16);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() < 1e-5, "step {sa}: {la} vs {lb}");
    }
    // The metrics log of the resumed run is one continuous run too.
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=16).collect::<Vec<_>>());
}

#[test]
fn stop_flag_leaves_a_loadable_checkpoint_and_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path(), Family::Llama);
    let mut cfg = config(dir.path(), 50);
    cfg.lora.targets = vec![Target::Q, Target::V, Target::Down];
    let (events, r) = train(&cfg, model, data, Some(3));
    let s = r.unwrap();
    assert!(s.stopped);
    assert!(events
        .iter()
        .any(|e| matches!(e, TrainEvent::Checkpoint { step: 3, .. })));
    let run_dir = Path::new(&cfg.out);
    let (step, ckpt) = finch::train::checkpoint::latest(run_dir).unwrap();
    assert_eq!(step, 3);
    assert!(!ckpt.with_extension("tmp").exists());
    let adapter = finch::lora::load_adapter(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(adapter.weights.len(), 2 * 3);

    // PEFT layout: key names and config fields Python PEFT reads.
    let adapter_dir = run_dir.join("adapter");
    let tensors = candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[8, 64]);
    assert_eq!(b.dims(), &[64, 8]);
    assert_eq!(tensors.len(), 2 * 3 * 2);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["r"], 8);
    assert_eq!(cfg_json["lora_alpha"], 16.0);
    assert_eq!(cfg_json["lora_dropout"], 0.0);
    assert_eq!(cfg_json["base_model_name_or_path"], "tiny");
    assert_eq!(
        cfg_json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
}

#[test]
fn non_finite_loss_stops_the_run_with_an_explanation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut model, data) = setup(dir.path(), Family::Llama);
    let cfg = config(dir.path(), 30);
    model.add_lora(&cfg.lora, &mut Rng::new(1)).unwrap();
    let run_dir = Path::new(&cfg.out).to_path_buf();
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut trainer = Trainer::new(cfg, model, data, Some(run_dir.clone())).unwrap();
    // Simulate a numeric blow-up (as an overflow in f16/bf16 would cause) after step 2.
    let var = trainer.model().trainable_vars()[0].clone();
    let stop = AtomicBool::new(false);
    let mut events = vec![];
    let r = trainer.run(&stop, &mut |e| {
        if let TrainEvent::Step(m) = e {
            if m.step == 2 {
                let nan = (var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
                var.set(&nan).unwrap();
            }
        }
        events.push(e.clone());
    });
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("step 3") && err.contains("NaN") && err.contains("learning rate"),
        "{err}"
    );
    assert!(matches!(events.last(), Some(TrainEvent::Failed { step: 2, .. })));
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(log.lines().last().unwrap().contains("\"failed\""), "{log}");
}
