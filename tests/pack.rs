//! Sequence packing in training: a batch of packed rows (several examples each) gives the loss
//! and LoRA gradients of the same examples unpacked, with and without activation checkpointing,
//! across the attention variants (grouped heads, Gemma 3's sliding windows, Phi-3's partial
//! rotary); a packed run learns, resumes exactly and keeps its setting in `config.toml`;
//! packing with a preference method is an error naming `pack`; and `finch bench train` on
//! mixed-length examples reports the padding that packing removes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use finch::data::pack::{pack, PackedSequence};
use finch::data::TokenizedExample;
use finch::lora::{ForwardCtx, LoraConfig};
use finch::model::tiny::TinySpec;
use finch::model::{Family, ModelFiles};
use finch::rng::Rng;
use finch::train::batch::{make_batch, make_packed_batch};
use finch::train::checkpointing;
use finch::train::{Duration, Method, TrainConfig, TrainData, TrainEvent, Trainer};

const PAIRS: [(&str, &str); 8] = [
    ("red", "ROJO"),
    ("blue and a much longer question", "AZUL"),
    ("green", "VERDE, the colour of grass"),
    ("black", "NEGRO"),
    ("white as snow", "BLANCO"),
    ("one", "UNO"),
    ("two plus nothing", "DOS"),
    ("three", "TRES"),
];

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

fn examples(files: &ModelFiles) -> Vec<TokenizedExample> {
    PAIRS.iter().map(|(p, a)| encode(&files.tokenizer, p, a)).collect()
}

/// One batch of every example unpacked, and the same examples packed into rows of twice the
/// longest example: the loss and the gradient of every adapter matrix agree to 1e-5 relative,
/// for the whole graph and for activation checkpointing.
#[test]
fn packed_batch_has_the_unpacked_loss_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Llama, Family::Gemma3, Family::Phi3] {
        let model_dir = dir.path().join(format!("{family:?}"));
        TinySpec::new(family).write(&model_dir).unwrap();
        let files = ModelFiles::open(model_dir.to_str().unwrap()).unwrap();
        let rows = examples(&files);
        let seq_len = 2 * rows.iter().map(TokenizedExample::len).max().unwrap();
        let packed = pack(&rows, seq_len).unwrap();
        assert!(packed.len() < rows.len() && packed.iter().any(|p| p.source_rows.len() > 2));
        let mut model = files.load(DType::F32, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        };
        model.add_lora(&lora, &mut Rng::new(1)).unwrap();
        let vars = model.trainable_vars();
        for v in &vars {
            v.set(&Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let refs: Vec<&TokenizedExample> = rows.iter().collect();
        let unpacked = make_batch(&refs, 2, &Device::Cpu).unwrap();
        let packed_refs: Vec<&PackedSequence> = packed.iter().collect();
        let packed_batch = make_packed_batch(&packed_refs, 2, &Device::Cpu).unwrap();
        assert_eq!(packed_batch.targets.len(), unpacked.targets.len());
        assert_eq!(packed_batch.tokens, unpacked.tokens);
        let run = |batch, checkpoint| {
            let mut rng = Rng::new(99);
            let mut ctx = ForwardCtx {
                dropout_rng: Some(&mut rng),
            };
            let pass = checkpointing::forward(&model, batch, &mut ctx, checkpoint).unwrap();
            let loss = pass.loss_value().unwrap();
            (loss, pass.backward(&model, 1.0, &vars).unwrap())
        };
        let (loss, grads) = run(&unpacked, false);
        for checkpoint in [false, true] {
            let (loss_p, grads_p) = run(&packed_batch, checkpoint);
            let what = format!("{family:?} checkpointing {checkpoint}");
            assert!(
                (loss - loss_p).abs() <= 1e-5 * loss.abs(),
                "{what}: loss {loss} unpacked vs {loss_p} packed"
            );
            for (i, (g, gp)) in grads.iter().zip(&grads_p).enumerate() {
                let (g, gp) = (g.as_ref().unwrap(), gp.as_ref().unwrap());
                let scale = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 0.0, "{what}: variable {i} got a zero gradient");
                let diff = finch::testing::max_abs_diff(g, gp);
                assert!(
                    diff <= 1e-5 * scale,
                    "{what}: gradient of variable {i} differs by {diff} (max {scale})"
                );
            }
        }
    }
}

fn setup(dir: &Path) -> (finch::model::Transformer, TrainData) {
    let model_dir = dir.join("model");
    TinySpec::new(Family::Llama).write(&model_dir).unwrap();
    let files = ModelFiles::open(model_dir.to_str().unwrap()).unwrap();
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    let train = examples(&files);
    let eval = vec![encode(&files.tokenizer, "four", "CUATRO")];
    (model, TrainData { train, eval, pad_id: 2 })
}

fn config(dir: &Path, duration: Duration) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        data: "pairs".into(),
        out: dir.join("run").to_string_lossy().into_owned(),
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        },
        duration,
        batch_size: 2,
        seq_len: 96,
        lr: 1e-2,
        warmup_steps: 3,
        pack: true,
        eval_every: 5,
        ..TrainConfig::default()
    }
}

fn trainer(cfg: &TrainConfig, dir: &Path) -> Trainer {
    let (mut model, data) = setup(dir);
    model
        .add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))
        .unwrap();
    let run_dir = Path::new(&cfg.out).to_path_buf();
    std::fs::create_dir_all(&run_dir).unwrap();
    Trainer::new(cfg.clone(), model, data, Some(run_dir)).unwrap()
}

fn run(trainer: &mut Trainer, stop_after: Option<usize>) -> Vec<(usize, f32)> {
    let stop = AtomicBool::new(false);
    let mut losses = vec![];
    trainer
        .run(&stop, &mut |e| {
            if let TrainEvent::Step(m) = e {
                losses.push((m.step, m.loss));
                if Some(m.step) == stop_after {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        })
        .unwrap();
    losses
}

/// A packed run: epochs count packed rows, the loss falls, evaluation runs, the setting is
/// saved in `config.toml`, and a stopped run resumes onto the uninterrupted run's curve.
#[test]
fn packed_run_learns_resumes_and_round_trips_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::Epochs(8.0));
    let mut t = trainer(&cfg, dir.path());
    let rows = t.packed_rows().unwrap();
    assert!(rows < PAIRS.len(), "{} examples packed into {rows} rows", PAIRS.len());
    assert_eq!(t.total_steps(), (8 * rows).div_ceil(2));
    let curve = run(&mut t, None);
    let first = curve[0].1;
    let last = curve.iter().rev().take(3).map(|x| x.1).sum::<f32>() / 3.0;
    assert!(last < 0.5 * first, "packed loss fell only from {first} to {last}");

    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let read = TrainConfig::from_toml_file(&path).unwrap();
    assert!(read.pack);
    assert_eq!(read, cfg);

    // Stop after 5 steps, then a fresh trainer restores the checkpoint and finishes.
    let dir_b = tempfile::tempdir().unwrap();
    let mut cfg_b = config(dir_b.path(), Duration::Epochs(8.0));
    cfg_b.save_every = 0;
    let mut first_half = trainer(&cfg_b, dir_b.path());
    let mut resumed = run(&mut first_half, Some(5));
    assert_eq!(resumed.len(), 5);
    let run_dir = Path::new(&cfg_b.out).to_path_buf();
    let (step, ckpt) = finch::train::checkpoint::latest(&run_dir).unwrap();
    assert_eq!(step, 5);
    let mut second_half = trainer(&cfg_b, dir_b.path());
    second_half.restore(&ckpt).unwrap();
    resumed.extend(run(&mut second_half, None));
    assert_eq!(resumed.len(), curve.len());
    for ((s, a), (_, b)) in curve.iter().zip(&resumed) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: {a} vs {b} resumed");
    }
}

/// Packing is for the SFT loss: DPO and ORPO refuse it with the field's name.
#[test]
fn packing_with_a_preference_method_is_an_error_naming_pack() {
    for method in [Method::Dpo, Method::Orpo] {
        let cfg = TrainConfig {
            model: "m".into(),
            data: "d.jsonl".into(),
            method,
            pack: true,
            ..TrainConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("pack") && err.contains(method.name()), "{err}");
    }
}

fn finch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch"))
}

/// Runs `finch bench train` on the tiny model with `extra` arguments; the JSON line.
fn bench(model: &Path, extra: &[&str]) -> serde_json::Value {
    let m = model.to_str().unwrap();
    let args = [
        "bench",
        "train",
        "--model",
        m,
        "--device",
        "cpu",
        "--batch",
        "4",
        "--seq-len",
        "64",
        "--warmup",
        "0",
        "--steps",
        "3",
        "--rank",
        "2",
        "--targets",
        "q,v",
    ];
    let out = finch().args(args).args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Real tokens per second and positions per second differ by the reported padding share.
fn assert_padding_consistent(v: &serde_json::Value) {
    let real = v["tokens_per_sec"].as_f64().unwrap();
    let all = v["padded_tokens_per_sec"].as_f64().unwrap();
    let padding = v["padding_fraction"].as_f64().unwrap();
    assert!(real > 0.0 && all >= real, "{v}");
    assert!((real / all - (1.0 - padding)).abs() < 1e-9, "{v}");
}

/// `bench train --example-lengths`: unpacked batches of mixed-length examples carry padding,
/// packed rows of the same examples almost none; the default (full rows) has none and reports
/// `pack: false`. `--data` trains on a dataset file's rows.
#[test]
fn bench_train_on_mixed_lengths_reports_the_padding_packing_removes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();

    let full = bench(&model, &[]);
    assert_eq!(full["pack"], false);
    assert_eq!(full["padding_fraction"], 0.0);
    assert!(full["example_lengths"].is_null() && full["data"].is_null() && full["packed_rows"].is_null());
    assert_padding_consistent(&full);

    let unpacked = bench(&model, &["--example-lengths", "4-40"]);
    let packed = bench(&model, &["--example-lengths", "4-40", "--pack"]);
    for v in [&unpacked, &packed] {
        assert_eq!(v["example_lengths"], serde_json::json!([4, 40]));
        assert_padding_consistent(v);
        assert!(v["loss_last"].as_f64().unwrap().is_finite());
    }
    assert_eq!((&unpacked["pack"], &packed["pack"]), (&false.into(), &true.into()));
    assert!(unpacked["packed_rows"].is_null());
    // The examples hold 8 full rows of tokens: first-fit packs them into a few more rows.
    let rows = packed["packed_rows"].as_u64().unwrap();
    assert!((8..=10).contains(&rows), "{rows} packed rows");
    let (pad_unpacked, pad_packed) = (
        unpacked["padding_fraction"].as_f64().unwrap(),
        packed["padding_fraction"].as_f64().unwrap(),
    );
    // Batches of 4 padded to their longest (about 40% padding here) against full rows (the
    // last, part-filled row is the rest).
    assert!(pad_unpacked > 0.25, "unpacked padding {pad_unpacked}");
    assert!(
        pad_packed < 0.1,
        "packed padding {pad_packed} (unpacked {pad_unpacked})"
    );

    // A dataset file, tokenized with the model's template as `finch train` does.
    let data = dir.path().join("pairs.jsonl");
    let rows: Vec<String> = PAIRS
        .iter()
        .map(|(p, a)| serde_json::json!({"instruction": p, "output": a}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let d = data.to_str().unwrap();
    let from_file = bench(&model, &["--data", d]);
    let from_file_packed = bench(&model, &["--data", d, "--pack"]);
    assert_eq!(from_file["data"], d);
    assert!(from_file["padding_fraction"].as_f64().unwrap() > 0.0);
    assert!(from_file_packed["packed_rows"].as_u64().unwrap() < PAIRS.len() as u64);
    assert_padding_consistent(&from_file_packed);
}

/// Bad `--example-lengths` and `--data` without a model are one line naming what to fix.
#[test]
fn bench_train_refuses_bad_example_lengths() {
    for (lengths, expected) in [
        ("40-4", "MIN is larger than MAX"),
        ("1-8", "at least 2 tokens"),
        ("4-300", "--seq-len"),
        ("short", "MIN-MAX"),
    ] {
        let out = finch()
            .args(["bench", "train", "--seq-len", "64", "--example-lengths", lengths])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("example_lengths") && err.contains(expected),
            "{lengths}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let out = finch()
        .args(["bench", "train", "--data", "rows.jsonl"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model"));
}
