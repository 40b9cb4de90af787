//! Preference training (DPO, ORPO): the losses, per-sequence log-probs and LoRA gradients equal
//! TRL's formulas run by PyTorch on the same tiny model and adapter
//! (`scripts/make_preference_fixtures.py` wrote `tests/fixtures/preference/`); a tiny model
//! trained with DPO / ORPO on preference rows learns to prefer the chosen answers; votes files
//! train end to end from the command line's entry point; and with `FINCH_REAL_MODEL`, a short
//! DPO run on SmolLM2 raises the held-out preference accuracy.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use finch::data::TokenizedExample;
use finch::lora::{ForwardCtx, LoraConfig, Target};
use finch::model::config::ModelConfig;
use finch::model::safetensors::SafetensorsWeights;
use finch::model::tiny::TinySpec;
use finch::model::{Family, Transformer};
use finch::rng::Rng;
use finch::train::preference::{pair_batch, pair_outcome, Objective};
use finch::train::{Duration, Method, TokenizedPair, TrainConfig, TrainEvent};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `|a − b| ≤ tol·(1 + max|b|)` elementwise, with the worst offender in the message.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = 1.0 + want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let (i, d) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f64), |best, (i, d)| if d > best.1 { (i, d) } else { best });
    assert!(
        d <= tol * scale,
        "{what}: element {i} differs by {d} (got {}, want {})",
        got[i],
        want[i]
    );
}

fn tensor_values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The DPO and ORPO loss, the sequence log-probs (and the reference's), the reward margin and
/// the gradient of every lora_A / lora_B equal the Python reference (TRL's functions, float64).
#[test]
fn dpo_and_orpo_match_trl_on_a_tiny_model() {
    let dir = fixture();
    let model_dir = dir.join("transformers/llama_rope_parameters");
    let cfg = ModelConfig::from_file(&model_dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open(&model_dir).unwrap();
    let mut model = Transformer::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap();
    let adapter_dir = dir.join("preference/adapter");
    let adapter = finch::lora::load_adapter(&adapter_dir, &Device::Cpu).unwrap();
    model.set_adapter(&adapter, &adapter_dir).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("preference/expected.json")).unwrap()).unwrap();
    let side = |prompt: &[u32], answer: &[u32]| TokenizedExample {
        input_ids: [prompt, answer].concat(),
        loss_mask: [vec![false; prompt.len()], vec![true; answer.len()]].concat(),
        truncated: false,
    };
    let pairs: Vec<TokenizedPair> = expected["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| TokenizedPair {
            chosen: side(&ids(&p["prompt"]), &ids(&p["chosen"])),
            rejected: side(&ids(&p["prompt"]), &ids(&p["rejected"])),
        })
        .collect();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let objective = Objective {
            method: Method::parse(case["method"].as_str().unwrap()).unwrap(),
            beta: case["beta"].as_f64().unwrap_or(0.1),
            label_smoothing: case["label_smoothing"].as_f64().unwrap_or(0.0),
            orpo_lambda: case["orpo_lambda"].as_f64().unwrap_or(0.1),
        };
        let pb = pair_batch(&refs, objective.method, 0, &Device::Cpu).unwrap();
        // Both ways the fused head prepares its gradient: in the forward (training context)
        // and recomputed in the backward (evaluation context).
        for training in [true, false] {
            let mut rng = Rng::new(0);
            let mut ctx = if training {
                ForwardCtx {
                    dropout_rng: Some(&mut rng),
                }
            } else {
                ForwardCtx::eval()
            };
            let out = pair_outcome(&model, &pb, &objective, &mut ctx).unwrap();
            assert_close(
                &format!("{name} loss"),
                &[out.loss],
                &[case["loss"].as_f64().unwrap()],
                1e-5,
            );
            assert_close(
                &format!("{name} chosen log-probs"),
                &out.chosen_logps,
                &floats(&case["chosen_logps"]),
                1e-5,
            );
            assert_close(
                &format!("{name} rejected log-probs"),
                &out.rejected_logps,
                &floats(&case["rejected_logps"]),
                1e-5,
            );
            if let Some((rc, rr)) = &out.ref_logps {
                assert_close(
                    &format!("{name} reference"),
                    rc,
                    &floats(&case["ref_chosen_logps"]),
                    1e-5,
                );
                assert_close(
                    &format!("{name} reference"),
                    rr,
                    &floats(&case["ref_rejected_logps"]),
                    1e-5,
                );
            }
            let margin: f64 = out
                .chosen_rewards
                .iter()
                .zip(&out.rejected_rewards)
                .map(|(c, r)| c - r)
                .sum::<f64>()
                / out.chosen_rewards.len() as f64;
            assert_close(
                &format!("{name} reward margin"),
                &[margin],
                &[case["reward_margin"].as_f64().unwrap()],
                1e-5,
            );
            let grads = out.surrogate.backward().unwrap();
            let want = case["grads"].as_object().unwrap();
            let adapters = model.lora_weights();
            assert_eq!(
                adapters.len(),
                want.len(),
                "every adapted module has a reference gradient"
            );
            for (module, w) in adapters {
                for (which, var) in [("a", &w.a), ("b", &w.b)] {
                    let got = tensor_values(grads.get(var.as_tensor()).unwrap());
                    let expect = floats(&want[&module][which]);
                    assert_close(
                        &format!("{name}: gradient of {module} lora_{which}"),
                        &got,
                        &expect,
                        2e-5,
                    );
                }
            }
        }
    }
}

/// Preference rows for the tiny model: the chosen answer is the Spanish word, the rejected one
/// the English word repeated.
const WORDS: [(&str, &str); 10] = [
    ("red", "ROJO"),
    ("blue", "AZUL"),
    ("green", "VERDE"),
    ("black", "NEGRO"),
    ("white", "BLANCO"),
    ("one", "UNO"),
    ("two", "DOS"),
    ("three", "TRES"),
    ("four", "CUATRO"),
    ("five", "CINCO"),
];

fn write_preference_data(path: &Path) {
    let mut text = String::new();
    for (word, spanish) in WORDS {
        let row = serde_json::json!({
            "prompt": format!("Translate {word}"),
            "chosen": spanish,
            "rejected": format!("{word} {word}"),
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    // A tie (the same answer twice) is skipped, not trained on.
    text.push_str(r#"{"prompt": "Translate six", "chosen": "SEIS", "rejected": "SEIS"}"#);
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn tiny_config(dir: &Path, method: Method, steps: usize) -> TrainConfig {
    let model_dir = dir.join("model");
    if !model_dir.exists() {
        TinySpec::new(Family::Llama).write(&model_dir).unwrap();
    }
    let data = dir.join("votes.jsonl");
    write_preference_data(&data);
    TrainConfig {
        model: model_dir.to_string_lossy().into_owned(),
        data: data.to_string_lossy().into_owned(),
        eval_data: Some(data.to_string_lossy().into_owned()),
        out: dir
            .join(format!("run-{}", method.name()))
            .to_string_lossy()
            .into_owned(),
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            use_rslora: false,
        },
        duration: Duration::Steps(steps),
        batch_size: 4,
        seq_len: 64,
        lr: 1e-2,
        warmup_steps: 0,
        eval_every: steps,
        method,
        beta: 0.5,
        // The odds-ratio term must outweigh the NLL, which also trains the prompts.
        orpo_lambda: 1.0,
        ..TrainConfig::default()
    }
}

/// DPO and ORPO on a tiny model through the same entry point `finch train` uses: the run
/// reports rewards, the loss falls, the held-out reward accuracy ends at 100 %, the reward
/// margin grows, ties are announced as skipped, and metrics.jsonl carries the reward curves.
#[test]
fn tiny_model_learns_preferences_with_dpo_and_orpo() {
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Dpo, Method::Orpo] {
        let cfg = tiny_config(dir.path(), method, 30);
        let mut notes = vec![];
        let mut trainer = finch::train::run::prepare(&cfg, false, &mut |n| notes.push(n)).unwrap();
        assert!(
            notes.iter().any(|n| n.contains("1 rows are ties")),
            "{method:?}: {notes:?}"
        );
        let mut events = vec![];
        trainer
            .run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
            .unwrap();
        let steps: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Step(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(steps.len(), 30);
        assert!(
            steps.iter().all(|m| m.preference.is_some()),
            "every step carries rewards"
        );
        let first = steps[0].loss;
        let last = steps[steps.len() - 1].loss;
        assert!(last < 0.5 * first, "{method:?}: loss {first} -> {last}");
        let evals: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Eval { preference, .. } => *preference,
                _ => None,
            })
            .collect();
        let end = evals.last().unwrap();
        assert_eq!(end.accuracy, 1.0, "{method:?}: {end:?}");
        assert!(end.reward_margin > 0.0, "{method:?}: {end:?}");
        assert!(steps[steps.len() - 1].preference.unwrap().reward_margin > steps[0].preference.unwrap().reward_margin);
        let metrics = std::fs::read_to_string(Path::new(&cfg.out).join("metrics.jsonl")).unwrap();
        assert!(metrics
            .lines()
            .any(|l| l.contains("\"kind\":\"eval\"") && l.contains("reward_accuracy")));
        let history = finch::train::history::RunHistory::read(Path::new(&cfg.out)).unwrap();
        assert_eq!(history.reward_margin.len(), 30);
        assert_eq!(history.eval_reward_accuracy.last().map(|p| p[1]), Some(1.0));
    }
}

/// The method must fit the data: DPO on supervised rows is refused naming the method, and a
/// run of a preference file with `sft` trains the chosen answers.
#[test]
fn methods_and_data_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), Method::Dpo, 2);
    let sft = dir.path().join("sft.jsonl");
    std::fs::write(
        &sft,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n",
    )
    .unwrap();
    cfg.data = sft.to_string_lossy().into_owned();
    cfg.eval_data = None;
    let err = finch::train::run::build(&cfg, None, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not preference data") && err.contains("--method dpo"),
        "{err}"
    );
    let mut cfg = tiny_config(dir.path(), Method::Sft, 2);
    cfg.out = dir.path().join("run-sft").to_string_lossy().into_owned();
    let mut notes = vec![];
    let mut trainer = finch::train::run::build(&cfg, None, &mut |n| notes.push(n)).unwrap();
    assert!(notes.iter().any(|n| n.contains("chosen answers")), "{notes:?}");
    trainer.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
}

/// With `FINCH_REAL_MODEL` (SmolLM2-135M-Instruct): 30 DPO steps on the pirate preference demo
/// (pirate answers chosen over plain ones) make the held-out pairs, whose facts never occur in
/// training, preferred the right way: a positive reward margin and at least 90 % accuracy.
/// Not in the default suite: it took 466 s in the test profile on the shared 2-core machine
/// (over the one-minute budget of a test). Run it with
/// `FINCH_REAL_MODEL=… cargo test --release --test preference real_model -- --ignored --nocapture`.
#[test]
#[ignore = "about 8 minutes on 2 cores; run with --ignored and FINCH_REAL_MODEL"]
fn real_model_dpo_prefers_the_chosen_style_on_held_out_pairs() {
    let Ok(model) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipping: FINCH_REAL_MODEL is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/datasets/pirate_preference");
    let cfg = TrainConfig {
        model,
        data: data.join("train.jsonl").to_string_lossy().into_owned(),
        eval_data: Some(data.join("heldout.jsonl").to_string_lossy().into_owned()),
        out: dir.path().join("run").to_string_lossy().into_owned(),
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            use_rslora: false,
        },
        duration: Duration::Steps(30),
        batch_size: 2,
        seq_len: 128,
        lr: 5e-4,
        warmup_steps: 0,
        eval_every: 0,
        method: Method::Dpo,
        beta: 0.1,
        device: finch::train::config::DeviceChoice::Cpu,
        ..TrainConfig::default()
    };
    let mut trainer = finch::train::run::prepare(&cfg, false, &mut |n| eprintln!("{n}")).unwrap();
    let mut evals = vec![];
    let summary = trainer
        .run(&AtomicBool::new(false), &mut |e| {
            if let TrainEvent::Eval { preference, loss, .. } = e {
                evals.push((*loss, preference.unwrap()));
            }
        })
        .unwrap();
    let (loss, held_out) = *evals.last().unwrap();
    eprintln!(
        "held-out after 30 DPO steps: loss {loss:.4}, {held_out:?}; {:.1} s",
        summary.elapsed_secs
    );
    // Before training the adapter is zero: every reward is 0, the margin 0 and the accuracy 0
    // (a tie is not a win), and the loss ln 2.
    assert!(loss < std::f32::consts::LN_2, "held-out loss {loss}");
    assert!(held_out.reward_margin > 0.0, "{held_out:?}");
    assert!(held_out.accuracy >= 0.9, "{held_out:?}");
}
