//! Tests on the real SmolLM2-135M-Instruct GGUF (path in `FINCH_REAL_MODEL`; skipped when unset).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use candle_core::{DType, Device, Tensor, D};
use finch::data::{Message, Role};
use finch::model::ModelFiles;

fn real_model() -> Option<String> {
    match std::env::var("FINCH_REAL_MODEL") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!("skipped: set FINCH_REAL_MODEL to the SmolLM2-135M-Instruct-Q4_1 folder to run this test");
            None
        }
    }
}

#[test]
fn gguf_model_answers_paris() {
    let Some(path) = real_model() else { return };
    let files = ModelFiles::open(&path).unwrap();
    assert!(
        files.path.extension().is_some_and(|e| e == "gguf"),
        "{}",
        files.path.display()
    );
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    let template = files.chat_template().unwrap().expect("SmolLM2 ships a chat template");
    let prompt = template
        .render(&[Message::new(Role::User, "What is the capital of France?")], true)
        .unwrap();
    let mut ids = files.tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
    let prompt_len = ids.len();
    let eos = files.tokenizer.token_to_id("<|im_end|>").unwrap();
    for _ in 0..24 {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.logits(&x).unwrap();
        let next = logits
            .squeeze(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap();
        let next = next.to_scalar::<u32>().unwrap();
        if next == eos {
            break;
        }
        ids.push(next);
    }
    let answer = files.tokenizer.decode(&ids[prompt_len..], true).unwrap();
    eprintln!("answer: {answer}");
    assert!(answer.contains("Paris"), "{answer}");
}

#[test]
fn twenty_lora_steps_on_a_bundled_dataset_lower_the_loss() {
    use finch::train::{Duration, TrainConfig, TrainEvent};
    let Some(path) = real_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/datasets/pirate_persona");
    let cfg = TrainConfig {
        model: path,
        data: assets.join("train.jsonl").to_string_lossy().into_owned(),
        eval_data: Some(assets.join("heldout.jsonl").to_string_lossy().into_owned()),
        out: dir.path().join("run").to_string_lossy().into_owned(),
        duration: Duration::Steps(20),
        batch_size: 4,
        seq_len: 128,
        lr: 5e-4,
        warmup_steps: 2,
        device: finch::train::config::DeviceChoice::Cpu,
        ..TrainConfig::default()
    };
    let mut trainer = finch::train::run::prepare(&cfg, false, &mut |m| eprintln!("{m}")).unwrap();
    let base_eval = trainer.evaluate().unwrap().unwrap();
    let mut losses = vec![];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let summary = trainer
        .run(&stop, &mut |e| {
            if let TrainEvent::Step(m) = e {
                losses.push(m.loss);
            }
        })
        .unwrap();
    let tuned_eval = summary.eval_loss.unwrap();
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[15..].iter().sum::<f32>() / 5.0;
    eprintln!("train loss {first:.3} -> {last:.3}, held-out loss {base_eval:.3} -> {tuned_eval:.3}");
    assert!(last < 0.8 * first, "training loss {first} -> {last}");
    assert!(
        tuned_eval < 0.8 * base_eval,
        "held-out loss {base_eval} -> {tuned_eval}"
    );
}

#[test]
fn data_score_ranks_a_garbage_answer_as_the_hardest_row() {
    let Some(path) = real_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    let mut rows: Vec<String> = [
        ("What is the capital of France?", "The capital of France is Paris."),
        (
            "What color is the sky on a clear day?",
            "The sky is blue on a clear day.",
        ),
        ("How many days are in a week?", "There are seven days in a week."),
        ("What do bees make?", "Bees make honey."),
        ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ]
    .iter()
    .map(|(q, a)| serde_json::json!({"instruction": q, "output": a}).to_string())
    .collect();
    rows.insert(
        2,
        serde_json::json!({"instruction": "What is 2 plus 2?", "output": "qz vlorp xxk jjwq trunble zzv"}).to_string(),
    );
    std::fs::write(&data, rows.join("\n")).unwrap();
    let kept = dir.path().join("kept.jsonl");
    let details = dir.path().join("details.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_finch"))
        .args(["data", "score"])
        .arg(&data)
        .args(["--model", &path, "--keep", "top", "--fraction", "0.17", "--out"])
        .arg(&kept)
        .arg("--details")
        .arg(&details)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(o.stdout.trim_ascii()).unwrap();
    assert_eq!(summary["rows"], 6);
    assert_eq!(summary["kept"], 1);
    let kept = std::fs::read_to_string(&kept).unwrap();
    assert!(kept.contains("trunble"), "{kept}");
    let losses: Vec<f64> = std::fs::read_to_string(&details)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    let garbage = losses[2];
    assert!(
        losses.iter().enumerate().all(|(i, l)| i == 2 || *l < garbage - 1.0),
        "{losses:?}"
    );
}
