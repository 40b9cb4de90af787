//! Model-level behaviour: numerical parity of our differentiable forward with candle-transformers'
//! inference models, LoRA identities and gradients, and error messages for broken folders.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use candle_core::{DType, Device, Tensor};
use finch::lora::{ForwardCtx, LoraConfig};
use finch::model::tiny::TinySpec;
use finch::model::{Family, ModelFiles, Transformer};
use finch::rng::Rng;
use finch::testing::max_abs_diff;

fn tiny(family: Family) -> (tempfile::TempDir, Transformer) {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(family).write(dir.path()).unwrap();
    let files = ModelFiles::open(dir.path().to_str().unwrap()).unwrap();
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    (dir, model)
}

const IDS: [u32; 12] = [1, 87, 104, 97, 116, 32, 105, 115, 2, 200, 3, 17];

/// candle-transformers' models return only the last position, so we feed them one token at a
/// time through their KV cache and compare the logits at every position.
///
/// This and the two tests that call it are off under `--cfg finch_qemu` (CI's aarch64 build,
/// which leaves candle-transformers out: Cargo.toml); the rest of this file runs there.
#[cfg(not(finch_qemu))]
fn reference_logits(family: Family, dir: &std::path::Path) -> Tensor {
    use candle_nn::VarBuilder;
    let dev = Device::Cpu;
    let st = dir.join("model.safetensors");
    // SAFETY: test file written just above, not modified while mapped.
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[st], DType::F32, &dev).unwrap() };
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut rows = vec![];
    match family {
        Family::Llama => {
            use candle_transformers::models::llama;
            let cfg: llama::LlamaConfig = serde_json::from_str(&config).unwrap();
            let cfg = cfg.into_config(false);
            let model = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
            for (pos, &id) in IDS.iter().enumerate() {
                let x = Tensor::new(&[[id]], &dev).unwrap();
                rows.push(model.forward(&x, pos, &mut cache).unwrap().squeeze(0).unwrap());
            }
        }
        Family::Qwen2 => {
            use candle_transformers::models::qwen2;
            let cfg: qwen2::Config = serde_json::from_str(&config).unwrap();
            let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            for (pos, &id) in IDS.iter().enumerate() {
                let x = Tensor::new(&[[id]], &dev).unwrap();
                rows.push(model.forward(&x, pos).unwrap().flatten_all().unwrap());
            }
        }
        Family::Qwen3 | Family::Gemma3 | Family::SmolLM3 | Family::Phi3 => {
            unreachable!(
                "Qwen3, Gemma 3, SmolLM3 and Phi-3 are checked against transformers in tests/transformers_parity.rs"
            )
        }
    }
    Tensor::stack(&rows, 0).unwrap()
}

#[cfg(not(finch_qemu))]
fn check_parity(family: Family) {
    let (dir, model) = tiny(family);
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    let ours = model.logits(&ids).unwrap().squeeze(0).unwrap();
    let reference = reference_logits(family, dir.path());
    assert_eq!(ours.dims(), reference.dims());
    let d = max_abs_diff(&ours, &reference);
    assert!(d < 1e-4, "{family:?}: logits differ from candle-transformers by {d}");
    // Not trivially equal: logits vary across positions and vocabulary.
    let spread =
        ours.max_all().unwrap().to_scalar::<f32>().unwrap() - ours.min_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(spread > 1e-3, "degenerate logits");
}

#[cfg(not(finch_qemu))]
#[test]
fn llama_logits_match_candle_transformers_at_every_position() {
    check_parity(Family::Llama);
}

#[cfg(not(finch_qemu))]
#[test]
fn qwen2_logits_match_candle_transformers_at_every_position() {
    check_parity(Family::Qwen2);
}

#[test]
fn lora_with_zero_b_equals_base_and_merge_matches_unmerged() {
    let (_dir, base) = tiny(Family::Qwen2);
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    let base_logits = base.logits(&ids).unwrap();
    let mut tuned = base.clone();
    tuned.add_lora(&LoraConfig::default(), &mut Rng::new(1)).unwrap();
    assert_eq!(tuned.lora_weights().len(), 2 * 7);
    let d = max_abs_diff(&tuned.logits(&ids).unwrap(), &base_logits);
    assert_eq!(d, 0.0, "B = 0 must leave the model unchanged");
    // Give B values: the model must change, and folding the adapter into W must agree.
    let mut rng = Rng::new(5);
    for (_, w) in tuned.lora_weights() {
        let n = w.b.as_tensor().elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.2 - 0.1).collect();
        w.b.set(&Tensor::from_vec(vals, w.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let tuned_logits = tuned.logits(&ids).unwrap();
    assert!(max_abs_diff(&tuned_logits, &base_logits) > 1e-3);
    let merged = tuned.merged_weights().unwrap();
    let map: std::collections::HashMap<String, Tensor> = merged.into_iter().collect();
    let src = finch::model::weights::TensorMap {
        tensors: map,
        origin: "merged".into(),
    };
    let merged_model = Transformer::load(&tuned.cfg, &src, DType::F32, &Device::Cpu).unwrap();
    let d = max_abs_diff(&merged_model.logits(&ids).unwrap(), &tuned_logits);
    assert!(d < 1e-4, "merged vs unmerged logits differ by {d}");
}

fn loss_of(model: &Transformer, ids: &Tensor, targets: &[u32]) -> Tensor {
    let h = model.hidden_states(ids, &mut ForwardCtx::eval()).unwrap();
    let (_, t, hd) = h.dims3().unwrap();
    let h = h.reshape((t, hd)).unwrap().narrow(0, 0, t - 1).unwrap();
    let logits = model.lm_head(&h).unwrap();
    finch::model::loss::cross_entropy(&logits, targets).unwrap()
}

#[test]
fn lora_gradients_match_finite_differences() {
    lora_gradients_match_finite_differences_for(Family::Llama);
}

/// Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMS norms before rotary) and SmolLM3 (NoPE
/// layers): LoRA gradients through each family's own parts.
#[test]
fn qwen2_qwen3_smollm3_lora_gradients_match_finite_differences() {
    for family in [Family::Qwen2, Family::Qwen3, Family::SmolLM3] {
        lora_gradients_match_finite_differences_for(family);
    }
}

/// Gemma 3: gradients through the (1 + w) norms around attention and MLP, GELU-tanh, the
/// sliding-window layers (window 4 < the 12 ids) and the √hidden embedding scale.
#[test]
fn gemma3_lora_gradients_match_finite_differences() {
    lora_gradients_match_finite_differences_for(Family::Gemma3);
}

/// Phi-3: one adapter on each fused matrix (`qkv_proj`, `gate_up_proj`, PEFT's shapes), gradients
/// through the split of their outputs and the partial rotary (12 of 16 dimensions, LongRoPE's
/// scaled tables).
#[test]
fn phi3_lora_gradients_match_finite_differences() {
    lora_gradients_match_finite_differences_for(Family::Phi3);
}

/// Phi-3: the adapters sit on the fused matrices with PEFT's shapes (A `[r, hidden]`, B over the
/// whole fused output); q, k, v chosen together become `qkv_proj`, one alone is refused; merging
/// writes the fused weights back.
#[test]
fn phi3_adapters_cover_the_fused_matrices_and_merge_back() {
    let (_dir, base) = tiny(Family::Phi3);
    let cfg = &base.cfg;
    let (h, q, kv, i) = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    let mut tuned = base.clone();
    let lora = LoraConfig {
        r: 4,
        ..LoraConfig::default()
    };
    tuned.add_lora(&lora, &mut Rng::new(1)).unwrap();
    let names: Vec<String> = tuned.lora_weights().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        &names[..4],
        [
            "model.layers.0.self_attn.qkv_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_up_proj",
            "model.layers.0.mlp.down_proj"
        ]
    );
    for (name, w) in tuned.lora_weights() {
        let out = if name.ends_with("qkv_proj") {
            q + 2 * kv
        } else if name.ends_with("gate_up_proj") {
            2 * i
        } else {
            h // o_proj, down_proj
        };
        assert_eq!(w.b.dims(), [out, 4], "{name}");
    }
    let err = tuned
        .add_lora(
            &LoraConfig {
                targets: vec![finch::lora::Target::Q],
                ..lora.clone()
            },
            &mut Rng::new(1),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("qkv_proj"), "{err}");
    let mut rng = Rng::new(5);
    for (_, w) in tuned.lora_weights() {
        let n = w.b.as_tensor().elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.2 - 0.1).collect();
        w.b.set(&Tensor::from_vec(vals, w.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    let tuned_logits = tuned.logits(&ids).unwrap();
    assert!(max_abs_diff(&tuned_logits, &base.logits(&ids).unwrap()) > 1e-3);
    let merged: std::collections::HashMap<String, Tensor> = tuned.merged_weights().unwrap().into_iter().collect();
    assert_eq!(
        merged["model.layers.1.self_attn.qkv_proj.weight"].dims(),
        [q + 2 * kv, h]
    );
    assert_eq!(merged["model.layers.1.mlp.gate_up_proj.weight"].dims(), [2 * i, h]);
    assert!(!merged
        .keys()
        .any(|k| k.contains("q_proj.") || k.contains("up_proj.") && !k.contains("gate_up")));
    let src = finch::model::weights::TensorMap {
        tensors: merged,
        origin: "merged".into(),
    };
    let merged_model = Transformer::load(&tuned.cfg, &src, DType::F32, &Device::Cpu).unwrap();
    let d = max_abs_diff(&merged_model.logits(&ids).unwrap(), &tuned_logits);
    assert!(d < 1e-4, "merged vs unmerged logits differ by {d}");
}

fn lora_gradients_match_finite_differences_for(family: Family) {
    let (_dir, mut model) = tiny(family);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    model.add_lora(&cfg, &mut Rng::new(3)).unwrap();
    // B starts at zero, which makes dL/dA zero: give B values so both gradients are informative.
    let mut rng = Rng::new(9);
    for (_, w) in model.lora_weights() {
        let n = w.b.as_tensor().elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
        w.b.set(&Tensor::from_vec(vals, w.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    let targets: Vec<u32> = IDS[1..].to_vec();
    let loss = loss_of(&model, &ids, &targets);
    let grads = loss.backward().unwrap();
    let weights = model.lora_weights();
    let mut checked = 0;
    // Probe A and B of an attention and an MLP adapter in both layers, a few coordinates each.
    for (name, w) in weights.iter().filter(|(n, _)| {
        ["q_proj", "qkv_proj", "gate_up_proj", "down_proj"]
            .iter()
            .any(|m| n.ends_with(m))
    }) {
        for var in [&w.a, &w.b] {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for k in [0, orig.len() / 3, orig.len() - 1] {
                let h = 1e-2f32;
                let eval_at = |delta: f32| {
                    let mut v = orig.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&model, &ids, &targets).to_scalar::<f32>().unwrap()
                };
                let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let tol = 2e-3 + 2e-2 * fd.abs().max(g[k].abs());
                assert!(
                    (fd - g[k]).abs() < tol,
                    "{name}[{k}]: analytic {} vs finite difference {fd}",
                    g[k]
                );
                checked += 1;
            }
        }
    }
    let modules = if family == Family::Phi3 { 3 } else { 2 };
    assert_eq!(checked, model.cfg.num_hidden_layers * modules * 2 * 3);
}

#[test]
fn broken_model_folders_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(Family::Llama).write(dir.path()).unwrap();
    let p = dir.path();
    let open = |p: &std::path::Path| match ModelFiles::open(p.to_str().unwrap()) {
        Ok(f) => f.load(DType::F32, &Device::Cpu).map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(open(p).is_ok());

    std::fs::write(
        p.join("config.json"),
        "{\"model_type\": \"gpt_neox\", \"hidden_size\": 8}",
    )
    .unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("config.json") && e.contains("gpt_neox"), "{e}");

    TinySpec::new(Family::Llama).write(p).unwrap();
    std::fs::write(p.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("config.json") && e.contains("line"), "{e}");

    // Wrong shape: claim a bigger hidden size than the weights have.
    TinySpec::new(Family::Llama).write(p).unwrap();
    let mut spec = TinySpec::new(Family::Llama);
    spec.intermediate_size = 96;
    std::fs::write(p.join("config.json"), spec.config_json().to_string()).unwrap();
    let e = open(p).unwrap_err();
    assert!(
        e.contains("model.safetensors") && e.contains("gate_proj.weight") && e.contains("[96, 64]"),
        "{e}"
    );

    // Missing tensor: untied config but no lm_head in the file.
    spec = TinySpec::new(Family::Llama);
    spec.tie_word_embeddings = false;
    std::fs::write(p.join("config.json"), spec.config_json().to_string()).unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("lm_head.weight"), "{e}");

    TinySpec::new(Family::Llama).write(p).unwrap();
    std::fs::remove_file(p.join("tokenizer.json")).unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("tokenizer.json"), "{e}");

    TinySpec::new(Family::Llama).write(p).unwrap();
    std::fs::remove_file(p.join("model.safetensors")).unwrap();
    std::fs::write(p.join("pytorch_model.bin"), b"pickle").unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("model.safetensors") && e.contains("pickle"), "{e}");

    std::fs::write(p.join("model.safetensors"), b"garbage").unwrap();
    let e = open(p).unwrap_err();
    assert!(e.contains("model.safetensors"), "{e}");

    let e = open(&p.join("nope")).unwrap_err();
    assert!(e.contains("nope"), "{e}");
}
