//! Finch's exports checked with the Python tools people take them to (transformers, PEFT,
//! llama.cpp's `gguf` reader): `scripts/check_with_transformers.py` trains a short run on the
//! real model (over an f32 base, and over a Q8_0 base), exports it as PEFT, merged and GGUF,
//! and compares greedy chat answers of Finch and of transformers on each (plus the base model,
//! also through `--quantized`).
//!
//! Needs `FINCH_REAL_MODEL` and `FINCH_PYTHON`, a Python with torch, transformers, peft and
//! gguf (about 5 GB, so `.ci/run` does not install it); skipped with a printed reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::process::Command;

#[test]
fn exports_load_in_transformers_and_peft_with_the_same_answers() {
    check_exports("f32");
}

/// The same checks on the exports of a run trained over a Q8_0 base (`--precision q8_0`): the
/// adapter, the merged folder and the GGUF files it gives are ordinary ones (the quantized
/// base is a training-time choice), so PEFT and transformers answer as Finch does with them.
#[test]
fn exports_of_a_quantized_base_run_load_in_transformers_and_peft() {
    check_exports("q8_0");
}

/// Runs `scripts/check_with_transformers.py` with the training run's base `precision`.
fn check_exports(precision: &str) {
    let (Ok(model), Ok(python)) = (std::env::var("FINCH_REAL_MODEL"), std::env::var("FINCH_PYTHON")) else {
        eprintln!("skipped: needs FINCH_REAL_MODEL and FINCH_PYTHON (a Python with torch, transformers, peft, gguf)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_with_transformers.py");
    let out = Command::new(python)
        .arg(script)
        .args([
            "--finch",
            env!("CARGO_BIN_EXE_finch"),
            "--model",
            &model,
            "--precision",
            precision,
        ])
        .arg("--work")
        .arg(work.path().join("check"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .unwrap_or_else(|| panic!("no summary line; stderr:\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("\"failures\": []"), "{summary}");
    // Every comparison line matched (base ×2, Python-made adapter, peft, merged, f16, q8_0 ×2; 3 prompts each).
    let matched = stdout.lines().filter(|l| l.contains("\"same_text\": true")).count();
    assert_eq!(matched, 24, "{stdout}");
}

/// Each family's adapters move between Finch and PEFT (tiny random models saved by
/// transformers, `tests/fixtures/transformers/`): Finch's adapter on every projection the family
/// has loads in PEFT onto transformers' own model class with Finch's logits, the merged folder
/// (Finch's config.json and merged weights) loads in transformers with them, and an adapter made
/// by Python PEFT on the same modules loads in Finch with PEFT's logits.
/// Needs `FINCH_PYTHON` (torch, transformers, peft); skipped with a printed reason otherwise.
fn check_family_adapters(fixture: &str, targets: &[&str]) {
    use candle_core::{DType, Device, Tensor};
    use finch::model::config::ModelConfig;
    use finch::model::safetensors::SafetensorsWeights;
    use finch::model::Transformer;

    let Ok(python) = std::env::var("FINCH_PYTHON") else {
        eprintln!("skipped: needs FINCH_PYTHON (a Python with torch, transformers, peft)");
        return;
    };
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(fixture);
    let work = tempfile::tempdir().unwrap();
    let base_dir = work.path().join("base");
    std::fs::create_dir_all(&base_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), base_dir.join(f)).unwrap();
    }
    let cfg = ModelConfig::from_file(&fixture.join("config.json")).unwrap();
    let base = Transformer::load(
        &cfg,
        &SafetensorsWeights::open(&fixture).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut tuned = base.clone();
    let lora = finch::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    tuned.add_lora(&lora, &mut finch::rng::Rng::new(3)).unwrap();
    let mut rng = finch::rng::Rng::new(7);
    for (_, w) in tuned.lora_weights() {
        let n = w.b.as_tensor().elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
        w.b.set(&Tensor::from_vec(vals, w.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let mut resolved = lora.clone();
    resolved.targets = tuned.resolve_targets(&lora.targets).unwrap();
    let peft = finch::lora::PeftConfig::from_lora(&resolved, None);
    finch::lora::save_adapter(&work.path().join("adapter"), &peft, &tuned.lora_weights()).unwrap();
    let merged_dir = work.path().join("merged");
    std::fs::create_dir_all(&merged_dir).unwrap();
    std::fs::write(
        merged_dir.join("config.json"),
        serde_json::to_string_pretty(&finch::export::hf_config_json(&tuned.cfg)).unwrap(),
    )
    .unwrap();
    let merged: std::collections::HashMap<String, Tensor> = tuned.merged_weights().unwrap().into_iter().collect();
    candle_core::safetensors::save(&merged, merged_dir.join("model.safetensors")).unwrap();
    let ids: Vec<u32> = vec![1, 5, 17, 33, 2, 60, 61, 62, 8, 95, 40, 3];
    let logits = |m: &Transformer| -> Vec<Vec<f32>> {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        m.logits(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    };
    std::fs::write(
        work.path().join("expect.json"),
        serde_json::json!({"family": fixture.file_name().unwrap().to_string_lossy(), "target_modules": targets})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        work.path().join("finch_logits.json"),
        serde_json::json!({"input_ids": ids, "adapter_logits": logits(&tuned)}).to_string(),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_with_transformers.py");
    let out = Command::new(python)
        .arg(script)
        .arg("--adapters")
        .arg(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("\"ok\": true").count(), 2, "{stdout}");
    // Python PEFT's adapter in Finch.
    let adapter = finch::lora::load_adapter(&work.path().join("python_peft"), &Device::Cpu).unwrap();
    let mut theirs = base.clone();
    theirs.set_adapter(&adapter, &work.path().join("python_peft")).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("python_logits.json")).unwrap()).unwrap();
    let mut worst = 0f32;
    for (row, want_row) in logits(&theirs).iter().zip(want["logits"].as_array().unwrap()) {
        for (a, b) in row.iter().zip(want_row.as_array().unwrap()) {
            worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    println!(
        "Python PEFT's adapter in Finch ({}): max |logit diff| {worst:e}",
        fixture.display()
    );
    assert!(worst < 1e-4, "{worst}");
}

const SPLIT: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Phi-4-mini's layout: fused `qkv_proj` / `gate_up_proj`, partial rotary, LongRoPE (the 12 ids
/// take the long factors), tied head.
#[test]
fn phi3_adapters_load_in_peft_and_back() {
    check_family_adapters("phi4_mini", &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
}

/// Qwen3: per-head q/k norms, head_dim from the config, tied head.
#[test]
fn qwen3_adapters_load_in_peft_and_back() {
    check_family_adapters("qwen3", &SPLIT);
}

/// Gemma 3: (1 + w) norms, four per block, GELU-tanh, sliding and global layers, scaled embeddings.
#[test]
fn gemma3_adapters_load_in_peft_and_back() {
    check_family_adapters("gemma3", &SPLIT);
}

/// SmolLM3: Llama with NoPE layers.
#[test]
fn smollm3_adapters_load_in_peft_and_back() {
    check_family_adapters("smollm3", &SPLIT);
}

/// Qwen2: q/k/v biases, separate head.
#[test]
fn qwen2_adapters_load_in_peft_and_back() {
    check_family_adapters("qwen2", &SPLIT);
}

/// Llama 3.2: llama3 rope scaling.
#[test]
fn llama3_scaling_adapters_load_in_peft_and_back() {
    check_family_adapters("llama3_scaling", &SPLIT);
}
