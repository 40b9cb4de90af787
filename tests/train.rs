//! Trainer behaviour on tiny random models: it learns, it resumes exactly, it stops cleanly,
//! it detects divergence, it writes PEFT-compatible adapters, it answers probe prompts with the
//! weights being trained without changing the run, and its preflight times steps writing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use finch::data::{Message, Role, TokenizedExample};
use finch::generate::{ChatFormat, GenerateOptions};
use finch::lora::{LoraConfig, Target};
use finch::model::tiny::TinySpec;
use finch::model::{Family, ModelFiles, Transformer};
use finch::rng::Rng;
use finch::train::{Duration, Precision, PreflightProgress, ProbeAnswer, TrainConfig, TrainData, TrainEvent, Trainer};

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

/// A tiny model of `family` trained 100 steps on the eight pairs: the mean of the last five
/// losses ends below a fifth of the first.
fn assert_tiny_family_learns(family: Family) {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path(), family);
    let cfg = config(dir.path(), 100);
    let (events, result) = train(&cfg, model, data, None);
    result.unwrap();
    let l = losses(&events);
    let first = l[0].1;
    let last = l.iter().rev().take(5).map(|x| x.1).sum::<f32>() / 5.0;
    assert!(last < 0.2 * first, "loss fell only from {first} to {last}");
}

/// LoRA over a quantized frozen base (`--precision q8_0` / `q4_1`): the tiny model, its seven
/// projections kept in GGUF blocks, learns the pairs as the f32 base does, and its loss curve
/// stays close to the f32 base's.
#[test]
fn quantized_base_tiny_model_learns() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model_dir).unwrap();
    let files = ModelFiles::open(model_dir.to_str().unwrap()).unwrap();
    let pairs: Vec<_> = PAIRS.iter().map(|(p, a)| encode(&files.tokenizer, p, a)).collect();
    let data = || TrainData {
        train: pairs.clone(),
        eval: vec![encode(&files.tokenizer, "four", "CUATRO")],
        pad_id: 2,
    };
    let mut curves = vec![];
    for precision in [Precision::F32, Precision::Q8_0, Precision::Q4_1] {
        let model = files
            .load_with_base(DType::F32, precision.quantized_base(), &Device::Cpu)
            .unwrap();
        let mut cfg = config(&dir.path().join(precision.name()), 60);
        cfg.precision = precision;
        let (events, result) = train(&cfg, model, data(), None);
        result.unwrap();
        let l: Vec<f32> = losses(&events).iter().map(|x| x.1).collect();
        let last = l.iter().rev().take(5).sum::<f32>() / 5.0;
        assert!(
            last < 0.2 * l[0],
            "{precision:?}: loss fell only from {} to {last}",
            l[0]
        );
        curves.push(l);
    }
    // Q8_0 rounds each weight by at most half a step of its block's scale: the first loss (same
    // adapter init) is within 1% of the f32 base's.
    let gap = (curves[1][0] - curves[0][0]).abs() / curves[0][0];
    assert!(gap < 0.01, "q8_0 first loss {} vs f32 {}", curves[1][0], curves[0][0]);
}

/// Qwen3 (per-head q/k norms before rotary): gradients reach the q/k adapters through the norms.
#[test]
fn qwen3_tiny_model_learns() {
    assert_tiny_family_learns(Family::Qwen3);
}

/// Gemma 3 ((1 + w) norms around attention and MLP, GELU-tanh, sliding-window layers): the
/// tiny model learns the pairs.
#[test]
fn gemma3_tiny_model_learns() {
    assert_tiny_family_learns(Family::Gemma3);
}

/// Phi-3 (fused qkv/gate_up adapters, partial rotary, LongRoPE): the tiny model learns the pairs.
#[test]
fn phi3_tiny_model_learns() {
    assert_tiny_family_learns(Family::Phi3);
}

/// SmolLM3 (no rotary on every fourth layer): the tiny model learns the pairs.
#[test]
fn smollm3_tiny_model_learns() {
    assert_tiny_family_learns(Family::SmolLM3);
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

/// A trainer for `cfg` on the tiny model, with the model's chat format for probes; also returns
/// that format and the base model without adapters.
fn probing_trainer(dir: &Path, cfg: &TrainConfig) -> (Trainer, ChatFormat, Transformer) {
    let (model, data) = setup(dir, Family::Llama);
    let files = ModelFiles::open(dir.join("model").to_str().unwrap()).unwrap();
    let base = files.load(DType::F32, &Device::Cpu).unwrap();
    let format = ChatFormat::from_files(&files).unwrap();
    let mut model = model;
    model
        .add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))
        .unwrap();
    let run_dir = Path::new(&cfg.out).to_path_buf();
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut trainer = Trainer::new(cfg.clone(), model, data, Some(run_dir)).unwrap();
    trainer.set_chat_format(format.clone());
    (trainer, format, base)
}

fn greedy_answer(model: &Transformer, format: &ChatFormat, prompt: &str, max_tokens: usize) -> String {
    let opts = GenerateOptions {
        max_new_tokens: max_tokens,
        ..GenerateOptions::default()
    };
    let messages = [Message::new(Role::User, prompt)];
    finch::generate::chat(model, format, &messages, &opts, &AtomicBool::new(false), &mut |_| {})
        .unwrap()
        .text
}

#[test]
fn probes_are_answered_before_training_at_every_eval_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 10);
    cfg.eval_every = 4;
    cfg.probe_prompts = vec!["red".into(), "What is four?".into()];
    cfg.probe_max_tokens = 12;
    let (mut trainer, format, base) = probing_trainer(dir.path(), &cfg);
    let (events, r) = run_trainer(&mut trainer, None);
    r.unwrap();

    let probes: Vec<(usize, Vec<ProbeAnswer>)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Probe { step, answers } => Some((*step, answers.clone())),
            _ => None,
        })
        .collect();
    let steps: Vec<usize> = probes.iter().map(|p| p.0).collect();
    assert_eq!(steps, vec![0, 4, 8, 10], "before training, at each eval, at the end");
    // Step 0 comes before the first optimizer step.
    let first_probe = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Probe { .. }))
        .unwrap();
    let first_step = events.iter().position(|e| matches!(e, TrainEvent::Step(_))).unwrap();
    assert!(first_probe < first_step);
    for (_, answers) in &probes {
        let prompts: Vec<&str> = answers.iter().map(|a| a.prompt.as_str()).collect();
        assert_eq!(prompts, ["red", "What is four?"]);
        assert!(answers.iter().all(|a| a.tokens <= 12));
    }
    // Fresh adapters (B = 0) change nothing: step 0 answers as the base model does.
    for a in &probes[0].1 {
        assert_eq!(a.text, greedy_answer(&base, &format, &a.prompt, 12));
    }
    // The last answers come from the trained weights, adapters unmerged.
    for a in &probes[3].1 {
        assert_eq!(a.text, greedy_answer(trainer.model(), &format, &a.prompt, 12));
    }

    // metrics.jsonl carries the same answers, one line per probe event.
    let text = std::fs::read_to_string(Path::new(&cfg.out).join("metrics.jsonl")).unwrap();
    let logged: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("probe").is_some())
        .collect();
    assert_eq!(logged.len(), 4);
    for (line, (step, answers)) in logged.iter().zip(&probes) {
        assert_eq!(line["kind"], "probe");
        assert_eq!(line["step"].as_u64().unwrap() as usize, *step);
        let read: Vec<ProbeAnswer> = serde_json::from_value(line["probe"].clone()).unwrap();
        assert_eq!(&read, answers);
    }
    // The step log is unaffected by the extra lines.
    let train_lines = text.lines().filter(|l| l.contains("\"kind\":\"train\"")).count();
    assert_eq!(train_lines, 10);
}

#[test]
fn probes_do_not_change_the_loss_curve() {
    let curve = |probes: Vec<String>| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 12);
        // Dropout draws from the training RNG: a probe that consumed it would shift every loss.
        cfg.lora.dropout = 0.1;
        cfg.eval_every = 3;
        cfg.probe_prompts = probes;
        let (mut trainer, _, _) = probing_trainer(dir.path(), &cfg);
        let (events, r) = run_trainer(&mut trainer, None);
        r.unwrap();
        let probed = events.iter().filter(|e| matches!(e, TrainEvent::Probe { .. })).count();
        (losses(&events), probed)
    };
    let (plain, none) = curve(vec![]);
    let (probed, rounds) = curve(vec!["red".into(), "blue".into(), "seven".into()]);
    assert_eq!(none, 0);
    assert_eq!(rounds, 5, "steps 0, 3, 6, 9, 12");
    assert_eq!(plain.len(), 12);
    for ((s1, l1), (s2, l2)) in plain.iter().zip(&probed) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() <= 1e-6, "step {s1}: {l1} without probes, {l2} with");
    }
}

/// A model folder and an Alpaca JSONL file on disk, as a real run reads them.
fn files_on_disk(dir: &Path) -> (String, String) {
    let model = dir.join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let data = dir.join("pairs.jsonl");
    let rows: String = PAIRS
        .iter()
        .cycle()
        .take(20)
        .enumerate()
        .map(|(i, (p, a))| {
            format!(
                "{}\n",
                serde_json::json!({"instruction": format!("{p} {i}"), "input": "", "output": a})
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    (
        model.to_string_lossy().into_owned(),
        data.to_string_lossy().into_owned(),
    )
}

fn listing(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
            all.push(e.path());
        }
    }
    all.sort();
    all
}

#[test]
fn preflight_writes_nothing_and_reports_positive_figures() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = files_on_disk(dir.path());
    let mut cfg = config(dir.path(), 40);
    cfg.model = model;
    cfg.data = data;
    cfg.eval_split = 0.2;
    cfg.eval_every = 10;
    cfg.probe_prompts = vec!["red".into()];
    cfg.probe_max_tokens = 8;
    let before = listing(dir.path());
    let mut progress = vec![];
    let report = finch::train::preflight_with(&cfg, 4, &AtomicBool::new(false), &mut |p| progress.push(p)).unwrap();
    assert_eq!(listing(dir.path()), before, "the preflight wrote nothing");
    assert!(!Path::new(&cfg.out).exists());

    assert_eq!(report.steps_run, 4);
    assert_eq!(report.total_steps, 40, "the configured run's length");
    for (name, v) in [
        ("secs_per_step", report.secs_per_step),
        ("tokens_per_sec", report.tokens_per_sec),
        ("estimated_total_secs", report.estimated_total_secs),
        ("eval_secs_each", report.eval_secs_each),
        ("probe_secs_each", report.probe_secs_each),
    ] {
        assert!(v.is_finite() && v > 0.0, "{name} = {v}");
    }
    assert!(report.peak_rss_mb.is_some_and(|mb| mb.is_finite() && mb > 0.0));
    assert_eq!(report.eval_runs, 4, "steps 10, 20, 30, 40");
    assert_eq!(report.probe_rounds, 5, "step 0 and every eval");
    let expected = report.secs_per_step * 40.0 + 4.0 * report.eval_secs_each + 5.0 * report.probe_secs_each;
    assert!((report.estimated_total_secs - expected).abs() < 1e-9);
    assert_eq!(
        progress,
        [
            PreflightProgress::Preparing,
            PreflightProgress::Step { step: 1, of: 4 },
            PreflightProgress::Step { step: 2, of: 4 },
            PreflightProgress::Step { step: 3, of: 4 },
            PreflightProgress::Step { step: 4, of: 4 },
            PreflightProgress::Probing,
        ]
    );

    // A run shorter than the preflight is measured over its own steps; epochs count as steps.
    cfg.duration = Duration::Epochs(1.0);
    cfg.probe_prompts.clear();
    let short = finch::train::preflight(&cfg, 5, &AtomicBool::new(false)).unwrap();
    assert_eq!(short.total_steps, 4, "16 training rows in batches of 4");
    assert_eq!(short.steps_run, 4);
    assert_eq!(short.probe_rounds, 0);

    // Cancelled before the first step: an error, still nothing written.
    let err = finch::train::preflight(&cfg, 3, &AtomicBool::new(true)).unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(listing(dir.path()), before);
}

/// `finch train` on the data issue 16 adds: a ShareGPT tool-calling file (its bad rows noted,
/// the good ones trained under a template that supports tools) and a folder of text documents
/// cut into overlapping windows. Under a template without tool support the run fails naming
/// the first tool row's line instead of training on conversations without their calls.
#[test]
fn tool_calls_and_raw_text_folders_train_end_to_end() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let run = |name: &str, data: &Path, seq_len: usize| {
        let mut cfg = config(&dir.path().join(name), 3);
        cfg.model = model.to_string_lossy().into_owned();
        cfg.data = data.to_string_lossy().into_owned();
        cfg.eval_split = 0.0;
        cfg.batch_size = 2;
        cfg.seq_len = seq_len;
        cfg.text_overlap = 8;
        let mut notes = vec![];
        let result = finch::train::run::prepare(&cfg, false, &mut |n| notes.push(n)).map(|mut trainer| {
            let (events, result) = run_trainer(&mut trainer, None);
            result.unwrap();
            losses(&events)
        });
        (result, notes)
    };
    let tools = fixtures.join("data/tools_sharegpt.jsonl");
    // The tiny model's own ChatML template never reads tools.
    let (result, _) = run("chatml", &tools, 1024);
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("line 1") && err.contains("does not support tool calls"),
        "{err}"
    );

    // Qwen2.5's template does.
    let config_path = model.join("tokenizer_config.json");
    let mut tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    tokenizer_config["chat_template"] = std::fs::read_to_string(fixtures.join("templates/qwen2.5.jinja"))
        .unwrap()
        .into();
    std::fs::write(&config_path, tokenizer_config.to_string()).unwrap();
    // Qwen2.5's system prompt with the tool list is ~900 bytes, one token each here.
    let (result, notes) = run("tools", &tools, 1024);
    let losses = result.unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0), "{losses:?}");
    assert!(notes.iter().any(|n| n.contains("4 rows ok, 5 rejected")), "{notes:?}");

    let (result, notes) = run("text", &fixtures.join("data/docs"), 32);
    let losses = result.unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0), "{losses:?}");
    // 44 + 74 tokens (bytes and EOS) in windows of 32 starting every 24 tokens: 2 + 3 windows.
    assert!(
        notes
            .iter()
            .any(|n| n.contains("2 raw-text rows were cut into 5 windows")),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.contains("empty.md")), "{notes:?}");
}

/// Activation checkpointing (`checkpoint_activations`) changes what is kept in memory, not the
/// numbers: for each family's block layout (Llama; Qwen2 with q/k/v biases; Gemma 3 with
/// sandwich norms and sliding windows), with and without LoRA dropout, over a dense and a Q4_1
/// base, the loss and the gradient of every adapter matrix (A and B, all random so every one is
/// non-zero) equal the whole-graph backward's, and the dropout stream ends in the same state.
#[test]
fn checkpointed_step_gives_the_whole_graph_gradients() {
    use finch::train::batch::make_batch;
    use finch::train::checkpointing;
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Llama, Family::Qwen2, Family::Gemma3] {
        let model_dir = dir.path().join(format!("{family:?}"));
        TinySpec::new(family).write(&model_dir).unwrap();
        let files = ModelFiles::open(model_dir.to_str().unwrap()).unwrap();
        let rows: Vec<_> = PAIRS[..3].iter().map(|(p, a)| encode(&files.tokenizer, p, a)).collect();
        let refs: Vec<&TokenizedExample> = rows.iter().collect();
        for precision in [Precision::F32, Precision::Q4_1] {
            for dropout in [0.0, 0.2] {
                let mut model = files
                    .load_with_base(DType::F32, precision.quantized_base(), &Device::Cpu)
                    .unwrap();
                let lora = LoraConfig {
                    r: 4,
                    alpha: 8.0,
                    dropout,
                    ..LoraConfig::default()
                };
                model.add_lora(&lora, &mut Rng::new(1)).unwrap();
                let vars = model.trainable_vars();
                for v in &vars {
                    v.set(&candle_core::Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                }
                let batch = make_batch(&refs, 2, &Device::Cpu).unwrap();
                let run = |checkpoint: bool| {
                    let mut rng = Rng::new(99);
                    let mut ctx = finch::lora::ForwardCtx {
                        dropout_rng: Some(&mut rng),
                    };
                    let pass = checkpointing::forward(&model, &batch, &mut ctx, checkpoint).unwrap();
                    let loss = pass.loss_value().unwrap();
                    let grads = pass.backward(&model, 0.5, &vars).unwrap();
                    (loss, grads, rng)
                };
                let (loss, grads, rng) = run(false);
                let (loss_c, grads_c, rng_c) = run(true);
                let what = format!("{family:?} {precision:?} dropout {dropout}");
                assert!(
                    (loss - loss_c).abs() <= 1e-6 * loss.abs(),
                    "{what}: loss {loss} vs {loss_c}"
                );
                assert_eq!(
                    rng, rng_c,
                    "{what}: the dropout stream must advance as without checkpointing"
                );
                assert_eq!(grads.len(), vars.len());
                for (i, (g, gc)) in grads.iter().zip(&grads_c).enumerate() {
                    let (g, gc) = (g.as_ref().unwrap(), gc.as_ref().unwrap());
                    let scale = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(scale > 0.0, "{what}: variable {i} got a zero gradient");
                    let diff = finch::testing::max_abs_diff(g, gc);
                    assert!(
                        diff <= 1e-5 * scale,
                        "{what}: gradient of variable {i} differs by {diff} (max {scale})"
                    );
                }
            }
        }
    }
}

/// A short run with checkpointing (dropout on, gradient accumulation) follows the loss curve of
/// the same run without it and ends with the same adapter.
#[test]
fn checkpointed_run_follows_the_same_curve() {
    let dir = tempfile::tempdir().unwrap();
    let mut curves = vec![];
    let mut adapters = vec![];
    for checkpoint in [false, true] {
        let sub = dir.path().join(format!("ckpt-{checkpoint}"));
        let (model, data) = setup(&sub, Family::Llama);
        let mut cfg = config(&sub, 8);
        cfg.lora.dropout = 0.1;
        cfg.grad_accum = 2;
        cfg.checkpoint_activations = checkpoint;
        let (events, result) = train(&cfg, model, data, None);
        let summary = result.unwrap();
        curves.push(losses(&events));
        let adapter = finch::lora::load_adapter(&summary.adapter_dir.unwrap(), &Device::Cpu).unwrap();
        adapters.push(adapter.weights);
    }
    assert_eq!(curves[0].len(), 8);
    for ((s, a), (_, b)) in curves[0].iter().zip(&curves[1]) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {s}: loss {a} vs {b} with checkpointing"
        );
    }
    for (name, (a, b)) in &adapters[0] {
        let (ca, cb) = &adapters[1][name];
        assert!(finch::testing::max_abs_diff(a, ca) < 1e-5, "{name}.lora_A");
        assert!(finch::testing::max_abs_diff(b, cb) < 1e-5, "{name}.lora_B");
    }
}
