//! Finch against transformers' own modeling code: tiny random models saved by transformers
//! (`scripts/make_transformers_fixtures.py` wrote `tests/fixtures/transformers/`) must give the
//! logits transformers computed for the same ids. Covers the config layouts transformers 5.x
//! writes (`rope_parameters` instead of top-level `rope_theta` / `rope_scaling`), and config
//! fields Finch does not implement must be refused by name rather than run differently.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finch::model::config::ModelConfig;
use finch::model::safetensors::SafetensorsWeights;
use finch::model::Transformer;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name)
}

/// Largest |finch − transformers| over all logits of the fixture's ids.
fn max_logit_diff(name: &str) -> f32 {
    let dir = fixture(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open(&dir).unwrap();
    let model = Transformer::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = expected["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<Vec<f32>> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let got: Vec<Vec<f32>> = model.logits(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn llama_with_transformers5_rope_parameters_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("llama_rope_parameters").join("config.json")).unwrap();
    assert_eq!(cfg.rope_theta, 50000.0, "rope_theta must come from rope_parameters");
    let d = max_logit_diff("llama_rope_parameters");
    assert!(d < 1e-3, "max |logit diff| {d}");
}

#[test]
fn llama3_rope_scaling_in_rope_parameters_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("llama3_scaling").join("config.json")).unwrap();
    assert!(cfg.rope_scaling.is_some());
    let d = max_logit_diff("llama3_scaling");
    assert!(d < 1e-3, "max |logit diff| {d}");
}

#[test]
fn qwen2_matches_transformers() {
    let d = max_logit_diff("qwen2");
    assert!(d < 1e-3, "max |logit diff| {d}");
}

#[test]
fn qwen3_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("qwen3").join("config.json")).unwrap();
    assert!(cfg.qk_norm);
    assert_eq!(cfg.head_dim, 16);
    let d = max_logit_diff("qwen3");
    assert!(d < 1e-3, "max |logit diff| {d}");
}

/// The fixture's config with `edit` applied, parsed; the error text when refused.
fn parse_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ModelConfig, String> {
    let path = fixture("llama_rope_parameters").join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    ModelConfig::from_json(&v, &path).map_err(|e| e.to_string())
}

#[test]
fn unknown_rope_type_is_refused_by_name() {
    let err = parse_edited(|v| v["rope_parameters"]["rope_type"] = "yarn".into()).unwrap_err();
    assert!(
        err.contains("rope_parameters.rope_type") && err.contains("yarn"),
        "{err}"
    );
    let err = parse_edited(|v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        v.as_object_mut().unwrap().remove("rope_parameters");
    })
    .unwrap_err();
    assert!(
        err.contains("rope_scaling.rope_type") && err.contains("dynamic"),
        "{err}"
    );
}

#[test]
fn old_layout_still_reads_and_disagreeing_layouts_are_refused() {
    let cfg = parse_edited(|v| {
        v.as_object_mut().unwrap().remove("rope_parameters");
        v["rope_theta"] = 12345.0.into();
    })
    .unwrap();
    assert_eq!(cfg.rope_theta, 12345.0);
    let err = parse_edited(|v| v["rope_theta"] = 10000.0.into()).unwrap_err();
    assert!(err.contains("rope_theta") && err.contains("disagrees"), "{err}");
}

/// A config field and an edit that sets it to something Finch does not implement.
type Case = (&'static str, fn(&mut serde_json::Value));

#[test]
fn unimplemented_attention_variants_are_refused_by_name() {
    let cases: [Case; 5] = [
        ("use_sliding_window", |v| v["use_sliding_window"] = true.into()),
        ("layer_types", |v| {
            v["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"])
        }),
        ("partial_rotary_factor", |v| v["partial_rotary_factor"] = 0.5.into()),
        ("final_logit_softcapping", |v| {
            v["final_logit_softcapping"] = 30.0.into()
        }),
        (
            "rope_parameters",
            |v| {
                v["rope_parameters"] =
                    serde_json::json!({"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}})
            },
        ),
    ];
    for (field, edit) in cases {
        let err = parse_edited(edit).unwrap_err();
        assert!(err.contains(field), "{field}: {err}");
    }
    // Fields transformers writes with their neutral values are accepted.
    parse_edited(|v| {
        v["use_sliding_window"] = false.into();
        v["layer_types"] = serde_json::json!(["full_attention", "full_attention"]);
        v["final_logit_softcapping"] = serde_json::Value::Null;
    })
    .unwrap();
}

/// The fixture's `expected.json`.
fn expected(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows_of(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn load_fixture(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Transformer {
    let dir = fixture(name);
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    let cfg = ModelConfig::from_json(&v, &path).unwrap();
    let weights = SafetensorsWeights::open(&dir).unwrap();
    Transformer::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap()
}

/// Gemma 3 text: (1 + w) norms, four per block, GELU-tanh MLP, √hidden embedding scale,
/// `query_pre_attn_scalar` = 24 (not head_dim), q/k norms, layers [sliding, full, sliding] with
/// a window of 4 over 12 ids, local rope base 10⁴ and global 10⁶ with linear scaling ×2.
#[test]
fn gemma3_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("gemma3").join("config.json")).unwrap();
    assert_eq!(cfg.family, finch::model::Family::Gemma3);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.sliding_window, Some(4));
    assert_eq!(cfg.window(0), Some(4));
    assert_eq!(cfg.window(1), None);
    assert_eq!(cfg.query_pre_attn_scalar, Some(24.0));
    assert_eq!((cfg.rope_theta, cfg.rope_local_theta), (1e6, Some(1e4)));
    assert_eq!(cfg.rope_linear_factor, Some(2.0));
    let d = max_logit_diff("gemma3");
    println!("gemma3: max |logit diff| vs transformers {d:e}");
    assert!(d < 1e-4, "max |logit diff| {d}");
}

/// The test above can fail: reading the window, the scalar or the local rope base wrong moves
/// the logits far beyond the tolerance.
#[test]
fn gemma3_window_scalar_and_local_rope_each_change_the_logits() {
    let want = rows_of(&expected("gemma3")["logits"]);
    let ids = ids_of(&expected("gemma3")["input_ids"]);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 3] = [
        ("sliding_window", |v| v["sliding_window"] = 512.into()),
        ("query_pre_attn_scalar", |v| v["query_pre_attn_scalar"] = 16.into()),
        ("rope_parameters.sliding_attention.rope_theta", |v| {
            v["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e6.into()
        }),
    ];
    for (field, edit) in edits {
        let model = load_fixture("gemma3", edit);
        let got: Vec<Vec<f32>> = model.logits(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let d = got.iter().zip(&want).map(|(g, w)| max_diff(g, w)).fold(0.0, f32::max);
        assert!(d > 1e-2, "changing {field} moved the logits by only {d}");
    }
}

/// Greedy decoding through Finch's KV cache (sliding layers masked to the last 4 positions)
/// gives transformers' tokens and, at every step, transformers' logits (computed through its own
/// sliding-window cache), and the cached logits equal a full recomputation.
#[test]
fn gemma3_cached_greedy_decoding_matches_transformers_and_full_recompute() {
    let exp = expected("gemma3");
    let model = load_fixture("gemma3", |_| {});
    let want_tokens = ids_of(&exp["greedy_tokens"]);
    let want_logits = rows_of(&exp["greedy_logits"]);
    let mut seq = ids_of(&exp["input_ids"]);
    let mut cache = finch::model::transformer::KvCache::new();
    let mut logits: Vec<f32> = model
        .forward_last_with_cache(&seq, &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut worst_tf, mut worst_full) = (0f32, 0f32);
    for (step, (&want_tok, want_row)) in want_tokens.iter().zip(&want_logits).enumerate() {
        worst_tf = worst_tf.max(max_diff(&logits, want_row));
        let full_input = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let full = model.logits(&full_input).unwrap().squeeze(0).unwrap();
        let full_last: Vec<f32> = full.get(seq.len() - 1).unwrap().to_vec1().unwrap();
        worst_full = worst_full.max(max_diff(&logits, &full_last));
        let tok = argmax(&logits);
        assert_eq!(tok, want_tok, "step {step}: Finch chose {tok}, transformers {want_tok}");
        seq.push(tok);
        logits = model
            .forward_last_with_cache(&[tok], &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    println!("gemma3 decoding: max |logit diff| vs transformers {worst_tf:e}, vs full recompute {worst_full:e}");
    assert!(worst_tf < 1e-4, "cached logits differ from transformers' by {worst_tf}");
    assert!(
        worst_full < 1e-4,
        "cached logits differ from a full recomputation by {worst_full}"
    );
    assert!(seq.len() > 2 * 4, "the decode must run past the window");
}

/// Gemma 3 settings Finch does not implement are refused by name.
#[test]
fn gemma3_unimplemented_settings_are_refused_by_name() {
    let path = fixture("gemma3").join("config.json");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases: [Case; 6] = [
        ("attn_logit_softcapping", |v| v["attn_logit_softcapping"] = 50.0.into()),
        ("final_logit_softcapping", |v| {
            v["final_logit_softcapping"] = 30.0.into()
        }),
        ("use_bidirectional_attention", |v| {
            v["use_bidirectional_attention"] = true.into()
        }),
        ("hidden_activation", |v| v["hidden_activation"] = "gelu".into()),
        ("rope_parameters.sliding_attention.rope_type", |v| {
            v["rope_parameters"]["sliding_attention"] = serde_json::json!({"rope_type": "linear", "factor": 2.0})
        }),
        ("rope_parameters.full_attention.rope_type", |v| {
            v["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()
        }),
    ];
    for (field, edit) in cases {
        let mut v = base.clone();
        edit(&mut v);
        let err = ModelConfig::from_json(&v, &path).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    // The 4.x layout of the Hub's Gemma 3 configs: rope_theta, rope_local_base_freq, no
    // layer_types (every sixth layer global).
    let mut v = base.clone();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.remove("layer_types");
    obj.insert("rope_theta".into(), 1e6.into());
    obj.insert("rope_local_base_freq".into(), 1e4.into());
    obj.insert("sliding_window_pattern".into(), 3.into());
    let cfg = ModelConfig::from_json(&v, &path).unwrap();
    assert_eq!((cfg.window(0), cfg.window(1), cfg.window(2)), (Some(4), Some(4), None));
    assert_eq!(
        (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_linear_factor),
        (1e6, Some(1e4), None)
    );
}

/// SmolLM3: Llama with rotary skipped on the layers `no_rope_layers` marks 0 (here layers 1
/// and 3 of 4).
#[test]
fn smollm3_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("smollm3").join("config.json")).unwrap();
    assert_eq!(cfg.family, finch::model::Family::SmolLM3);
    assert_eq!(cfg.rope_layers, [true, false, true, false]);
    let d = max_logit_diff("smollm3");
    println!("smollm3: max |logit diff| vs transformers {d:e}");
    assert!(d < 1e-4, "max |logit diff| {d}");
    // The test can fail: rotary on every layer moves the logits far beyond the tolerance.
    let want = rows_of(&expected("smollm3")["logits"]);
    let ids = ids_of(&expected("smollm3")["input_ids"]);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let model = load_fixture("smollm3", |v| v["no_rope_layers"] = serde_json::json!([1, 1, 1, 1]));
    let got: Vec<Vec<f32>> = model.logits(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let d = got.iter().zip(&want).map(|(g, w)| max_diff(g, w)).fold(0.0, f32::max);
    assert!(d > 1e-3, "rotary on the NoPE layers moved the logits by only {d}");
}

/// SmolLM3 greedy decoding through the KV cache equals transformers' `generate`, step by step.
#[test]
fn smollm3_cached_greedy_decoding_matches_transformers() {
    let exp = expected("smollm3");
    let model = load_fixture("smollm3", |_| {});
    let mut cache = finch::model::transformer::KvCache::new();
    let mut logits: Vec<f32> = model
        .forward_last_with_cache(&ids_of(&exp["input_ids"]), &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst = 0f32;
    for (&want_tok, want_row) in ids_of(&exp["greedy_tokens"])
        .iter()
        .zip(&rows_of(&exp["greedy_logits"]))
    {
        worst = worst.max(max_diff(&logits, want_row));
        let tok = argmax(&logits);
        assert_eq!(tok, want_tok);
        logits = model
            .forward_last_with_cache(&[tok], &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    println!("smollm3 decoding: max |logit diff| vs transformers {worst:e}");
    assert!(worst < 1e-4, "cached logits differ from transformers' by {worst}");
}

/// Logits of `model` for `ids`, every position.
fn logits_of(model: &Transformer, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.logits(&input).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_rows_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| max_diff(x, y)).fold(0.0, f32::max)
}

/// Greedy decoding of `exp["greedy_input_ids"]` through Finch's KV cache against transformers'
/// `generate`: the same tokens, and per step the largest logit difference from transformers'
/// and (for steps whose sequence is at most `recompute_up_to` long) from a full recomputation.
fn cached_greedy_against_transformers(
    model: &Transformer,
    exp: &serde_json::Value,
    recompute_up_to: usize,
) -> (f32, f32) {
    let want_tokens = ids_of(&exp["greedy_tokens"]);
    let want_logits = rows_of(&exp["greedy_logits"]);
    let mut seq = ids_of(&exp["greedy_input_ids"]);
    let mut cache = finch::model::transformer::KvCache::new();
    let mut logits: Vec<f32> = model
        .forward_last_with_cache(&seq, &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut worst_tf, mut worst_full) = (0f32, 0f32);
    for (step, (&want_tok, want_row)) in want_tokens.iter().zip(&want_logits).enumerate() {
        worst_tf = worst_tf.max(max_diff(&logits, want_row));
        if seq.len() <= recompute_up_to {
            let full = logits_of(model, &seq);
            worst_full = worst_full.max(max_diff(&logits, &full[seq.len() - 1]));
        }
        let tok = argmax(&logits);
        assert_eq!(tok, want_tok, "step {step}: Finch chose {tok}, transformers {want_tok}");
        seq.push(tok);
        logits = model
            .forward_last_with_cache(&[tok], &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    (worst_tf, worst_full)
}

/// Phi-3 (Phi-3-mini-4k's layout): fused `qkv_proj` / `gate_up_proj` kept fused, a sliding
/// window of 5 over 12 ids on every layer, separate output head.
#[test]
fn phi3_matches_transformers() {
    let cfg = ModelConfig::from_file(&fixture("phi3").join("config.json")).unwrap();
    assert_eq!(cfg.family, finch::model::Family::Phi3);
    assert_eq!((cfg.window(0), cfg.window(1)), (Some(5), Some(5)));
    assert!(cfg.longrope.is_none() && cfg.rotary_dim.is_none() && !cfg.tie_word_embeddings);
    let d = max_logit_diff("phi3");
    println!("phi3: max |logit diff| vs transformers {d:e}");
    assert!(d < 1e-4, "max |logit diff| {d}");
    // The test can fail: without the window the logits move far beyond the tolerance.
    let want = rows_of(&expected("phi3")["logits"]);
    let model = load_fixture("phi3", |v| v["sliding_window"] = serde_json::Value::Null);
    let d = max_rows_diff(&logits_of(&model, &ids_of(&expected("phi3")["input_ids"])), &want);
    assert!(d > 1e-2, "dropping the window moved the logits by only {d}");
}

/// Phi-3 greedy decoding through the KV cache (window 5 past 20 positions) equals transformers'
/// `generate` step by step, and a full recomputation.
#[test]
fn phi3_cached_greedy_decoding_matches_transformers_and_full_recompute() {
    let model = load_fixture("phi3", |_| {});
    let (tf, full) = cached_greedy_against_transformers(&model, &expected("phi3"), usize::MAX);
    println!("phi3 decoding: max |logit diff| vs transformers {tf:e}, vs full recompute {full:e}");
    assert!(tf < 1e-4, "cached logits differ from transformers' by {tf}");
    assert!(full < 1e-4, "cached logits differ from a full recomputation by {full}");
}

/// Phi-4-mini's layout: partial rotary (12 of 16 dimensions), LongRoPE with an 8-token
/// pretraining context (the 12 ids take the long factors, their first 6 the short ones), the
/// attention factor √2 on cos and sin, tied embeddings.
#[test]
fn phi4_mini_partial_rotary_and_longrope_match_transformers() {
    let cfg = ModelConfig::from_file(&fixture("phi4_mini").join("config.json")).unwrap();
    assert_eq!(cfg.rotary_dims(), 12);
    assert!(cfg.tie_word_embeddings && cfg.sliding_window.is_none());
    let r = cfg.longrope.as_ref().unwrap();
    assert_eq!(r.original_max_position_embeddings, 8);
    assert!(
        (r.attention_factor - 2f64.sqrt()).abs() < 1e-12,
        "{}",
        r.attention_factor
    );
    let exp = expected("phi4_mini");
    let model = load_fixture("phi4_mini", |_| {});
    let long = max_rows_diff(&logits_of(&model, &ids_of(&exp["input_ids"])), &rows_of(&exp["logits"]));
    let short = max_rows_diff(
        &logits_of(&model, &ids_of(&exp["short_input_ids"])),
        &rows_of(&exp["short_logits"]),
    );
    println!("phi4_mini: max |logit diff| vs transformers, long factors {long:e}, short factors {short:e}");
    assert!(long < 1e-4 && short < 1e-4, "long {long}, short {short}");
    // Each setting is read: changing it moves the logits far beyond the tolerance.
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, bool); 4] = [
        (
            "long_factor",
            |v| v["rope_parameters"]["long_factor"] = v["rope_parameters"]["short_factor"].clone(),
            true,
        ),
        (
            "short_factor",
            |v| v["rope_parameters"]["short_factor"] = v["rope_parameters"]["long_factor"].clone(),
            false,
        ),
        (
            "attention_factor",
            |v| v["rope_parameters"]["attention_factor"] = 1.0.into(),
            true,
        ),
        (
            "partial_rotary_factor",
            |v| {
                v["partial_rotary_factor"] = 1.0.into();
                v["rope_parameters"]["partial_rotary_factor"] = 1.0.into();
                let f = serde_json::json!([1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 3.5]);
                v["rope_parameters"]["short_factor"] = f.clone();
                v["rope_parameters"]["long_factor"] = f;
            },
            false,
        ),
    ];
    for (field, edit, on_long) in edits {
        let m = load_fixture("phi4_mini", edit);
        let (ids, want) = if on_long {
            (ids_of(&exp["input_ids"]), rows_of(&exp["logits"]))
        } else {
            (ids_of(&exp["short_input_ids"]), rows_of(&exp["short_logits"]))
        };
        let d = max_rows_diff(&logits_of(&m, &ids), &want);
        assert!(d > 1e-2, "changing {field} moved the logits by only {d}");
    }
}

/// Phi-4-mini greedy decoding from 6 ids through the KV cache equals transformers' `generate`
/// at every step, including past the 8-token pretraining context, where LongRoPE switches to the
/// long factors and transformers' Phi-3 drops its cache to run every position again (so does
/// Finch; keeping the short-factor keys would move these logits by 2e-2); the cached logits
/// equal a full recomputation at every step.
#[test]
fn phi4_mini_cached_greedy_decoding_matches_transformers_across_the_longrope_switch() {
    let model = load_fixture("phi4_mini", |_| {});
    let exp = expected("phi4_mini");
    assert!(ids_of(&exp["greedy_input_ids"]).len() + ids_of(&exp["greedy_tokens"]).len() > 8);
    let (tf, full) = cached_greedy_against_transformers(&model, &exp, usize::MAX);
    println!("phi4_mini decoding: max |logit diff| vs transformers {tf:e}, vs full recompute {full:e}");
    assert!(tf < 1e-4, "cached logits differ from transformers' by {tf}");
    assert!(full < 1e-4, "cached logits differ from a full recomputation by {full}");
}

/// Phi-3 settings Finch does not implement, or that transformers' Phi-3 would not run, are
/// refused by name; the 4.x layout of the Hub's configs (rope_scaling with `type`, top-level
/// rope_theta and partial_rotary_factor) reads to the same settings.
#[test]
fn phi3_config_layouts_and_refusals() {
    let path = fixture("phi4_mini").join("config.json");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let want = ModelConfig::from_json(&base, &path).unwrap();
    let mut v = base.clone();
    let params = v.as_object_mut().unwrap().remove("rope_parameters").unwrap();
    v["rope_theta"] = 10000.0.into();
    v["rope_scaling"] = serde_json::json!({
        "type": "longrope", "long_factor": params["long_factor"], "short_factor": params["short_factor"]});
    assert_eq!(ModelConfig::from_json(&v, &path).unwrap(), want);
    let cases: [Case; 5] = [
        ("rope_parameters.rope_type", |v| {
            v["rope_parameters"]["rope_type"] = "dynamic".into()
        }),
        ("rope_parameters.long_factor", |v| {
            v["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0])
        }),
        ("rope_parameters.short_factor", |v| {
            v["rope_parameters"].as_object_mut().unwrap().remove("short_factor");
        }),
        ("attention_bias", |v| v["attention_bias"] = true.into()),
        ("partial_rotary_factor", |v| v["partial_rotary_factor"] = 0.5.into()),
    ];
    for (field, edit) in cases {
        let mut v = base.clone();
        edit(&mut v);
        let err = ModelConfig::from_json(&v, &path).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

/// Llama 3.2 1B / 3B Instruct configs as published (written from memory; see the fixture's
/// README): Llama 3 rope scaling ×32 from 8192 positions, rope base 5·10⁵, tied embeddings,
/// head_dim 64 / 128, and the parameter counts transformers gives for them (1,235,814,400 and
/// 3,212,749,824, the tied head counted once).
#[test]
fn llama32_1b_and_3b_config_layouts_read_as_transformers_reads_them() {
    for (file, head_dim, params) in [("1b.json", 64, 1_235_814_400usize), ("3b.json", 128, 3_212_749_824)] {
        let cfg = ModelConfig::from_file(&fixture("llama3.2_configs").join(file)).unwrap();
        assert_eq!(cfg.family, finch::model::Family::Llama);
        assert!(cfg.tie_word_embeddings, "{file}");
        assert_eq!(cfg.head_dim, head_dim, "{file}");
        assert_eq!(cfg.rope_theta, 500_000.0);
        let s = cfg.rope_scaling.as_ref().unwrap();
        assert_eq!(
            (
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings
            ),
            (32.0, 1.0, 4.0, 8192)
        );
        assert_eq!(cfg.eos_token_ids, [128001, 128008, 128009]);
        assert_eq!(cfg.num_parameters(), params, "{file}");
    }
}

/// The `config.json` of released checkpoints (copies quoted in public repositories; sources in
/// `tests/fixtures/transformers/real_configs/README.md`; no weights): every field Finch needs
/// is read as transformers reads it, nothing in them is refused, and Finch's parameter count
/// equals transformers' own (`scripts/count_real_config_params.py`, transformers 5.x on the
/// meta device, tied weights counted once).
#[test]
fn real_released_configs_read_and_count_as_transformers() {
    use finch::model::config::LayerType;
    use finch::model::Family;
    let dir = fixture("real_configs");
    let read = |file: &str| ModelConfig::from_file(&dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let heads = |c: &ModelConfig| (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let sizes = |c: &ModelConfig| (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size);

    // Phi-3.5-mini-instruct: full rotary (head_dim 96), LongRoPE from a 4096-token pretraining
    // context to 131072, a separate head, and a window that covers the whole context.
    let phi35 = read("phi3.5-mini-instruct.json");
    assert_eq!(phi35.family, Family::Phi3);
    assert_eq!(heads(&phi35), (32, 32, 96));
    assert_eq!(phi35.rotary_dims(), 96);
    assert!(!phi35.tie_word_embeddings);
    let lr = phi35.longrope.as_ref().expect("Phi-3.5 uses LongRoPE");
    assert_eq!(lr.original_max_position_embeddings, 4096);
    assert_eq!((lr.short_factor.len(), lr.long_factor.len()), (48, 48));
    assert_eq!((lr.short_factor[0], lr.short_factor[47]), (1.0, 2.8399994373321533));
    assert_eq!(
        (lr.long_factor[0], lr.long_factor[47]),
        (1.0800000429153442, 64.83999633789062)
    );
    // transformers: sqrt(1 + ln(131072 / 4096) / ln(4096)).
    let attention_factor = (1.0 + (32f64).ln() / (4096f64).ln()).sqrt();
    assert!(
        (lr.attention_factor - attention_factor).abs() < 1e-12,
        "{}",
        lr.attention_factor
    );
    assert_eq!(phi35.sliding_window, Some(262_144));
    assert_eq!(phi35.eos_token_ids, [32000]);
    assert_eq!(phi35.num_parameters(), PHI35_MINI_PARAMS);

    // Phi-4-mini-instruct: rotary on 96 of 128 head dimensions, grouped keys, tied head.
    let phi4 = read("phi4-mini-instruct.json");
    assert_eq!(phi4.family, Family::Phi3);
    assert_eq!(heads(&phi4), (24, 8, 128));
    assert_eq!(phi4.rotary_dims(), 96);
    assert!(phi4.tie_word_embeddings);
    let lr = phi4.longrope.as_ref().expect("Phi-4-mini uses LongRoPE");
    assert_eq!(lr.original_max_position_embeddings, 4096);
    assert_eq!((lr.short_factor.len(), lr.long_factor.len()), (48, 48));
    assert!(lr.short_factor.iter().all(|&f| f == 1.0));
    assert_eq!((lr.long_factor[0], lr.long_factor[47]), (1.0, 47.77));
    assert!(
        (lr.attention_factor - attention_factor).abs() < 1e-12,
        "{}",
        lr.attention_factor
    );
    assert_eq!(phi4.vocab_size, 200_064);
    assert_eq!(phi4.num_parameters(), PHI4_MINI_PARAMS);

    // gemma-3-270m: every sixth layer global, a 512-token window on the others, local rope
    // base 10⁴, global 10⁶, query_pre_attn_scalar = head_dim = 256, tied head.
    let gemma = read("gemma-3-270m.json");
    assert_eq!(gemma.family, Family::Gemma3);
    assert_eq!(heads(&gemma), (4, 1, 256));
    let full: Vec<usize> = (0..gemma.num_hidden_layers)
        .filter(|&l| gemma.layer_type(l) == LayerType::FullAttention)
        .collect();
    assert_eq!(full, [5, 11, 17]);
    assert_eq!(gemma.window(0), Some(512));
    assert_eq!(gemma.window(5), None);
    assert_eq!(
        (gemma.rope_theta, gemma.rope_local_theta),
        (1_000_000.0, Some(10_000.0))
    );
    assert_eq!(gemma.query_pre_attn_scalar, Some(256.0));
    assert!(gemma.tie_word_embeddings && gemma.norm_plus_one && gemma.sandwich_norms && gemma.embed_scale);
    assert_eq!(gemma.num_parameters(), GEMMA3_270M_PARAMS);

    // gemma-3-1b-it: 26 layers, the global ones every sixth (5, 11, 17, 23) from
    // `sliding_window_pattern` 6 (no `layer_types` in this config), a 512-token window,
    // head_dim 256 set apart from hidden 1152 / 4 heads, one key-value head, tied head.
    let gemma1b = read("gemma-3-1b-it.json");
    assert_eq!(gemma1b.family, Family::Gemma3);
    assert_eq!(sizes(&gemma1b), (1152, 26, 6912, 262_144));
    assert_eq!(heads(&gemma1b), (4, 1, 256));
    let full: Vec<usize> = (0..gemma1b.num_hidden_layers)
        .filter(|&l| gemma1b.layer_type(l) == LayerType::FullAttention)
        .collect();
    assert_eq!(full, [5, 11, 17, 23]);
    assert_eq!((gemma1b.window(0), gemma1b.window(23)), (Some(512), None));
    assert_eq!(
        (gemma1b.rope_theta, gemma1b.rope_local_theta, gemma1b.rope_linear_factor),
        (1_000_000.0, Some(10_000.0), None)
    );
    assert_eq!(gemma1b.query_pre_attn_scalar, Some(256.0));
    assert!(gemma1b.tie_word_embeddings && gemma1b.norm_plus_one && gemma1b.sandwich_norms && gemma1b.embed_scale);
    assert_eq!(gemma1b.eos_token_ids, [1, 106]);
    assert_eq!(gemma1b.num_parameters(), GEMMA3_1B_IT_PARAMS);

    // Qwen3-0.6B: head_dim 128 written out (16 heads x 128 = 2048 > hidden 1024), grouped keys
    // (8 heads), per-head q and k RMS norms, no biases, no sliding window, tied head.
    let qwen3 = read("qwen3-0.6b.json");
    assert_eq!(qwen3.family, Family::Qwen3);
    assert_eq!(sizes(&qwen3), (1024, 28, 3072, 151_936));
    assert_eq!(heads(&qwen3), (16, 8, 128));
    assert!(qwen3.qk_norm && !qwen3.qkv_bias && !qwen3.o_bias && !qwen3.mlp_bias);
    assert!(qwen3.tie_word_embeddings);
    assert_eq!((qwen3.rope_theta, qwen3.rope_scaling.as_ref()), (1_000_000.0, None));
    assert!((0..qwen3.num_hidden_layers).all(|l| qwen3.window(l).is_none() && qwen3.uses_rope(l)));
    assert_eq!(qwen3.eos_token_ids, [151_645]);
    assert_eq!(qwen3.num_parameters(), QWEN3_0_6B_PARAMS);

    // Llama-3.2-1B: Llama 3 rope scaling (factor 32 from an 8192-token context, low 1, high 4)
    // on base 500000, head_dim 64, grouped keys (32 / 8), tied head.
    let llama = read("llama-3.2-1b.json");
    assert_eq!(llama.family, Family::Llama);
    assert_eq!(sizes(&llama), (2048, 16, 8192, 128_256));
    assert_eq!(heads(&llama), (32, 8, 64));
    assert_eq!(llama.rope_theta, 500_000.0);
    let scaling = llama.rope_scaling.as_ref().expect("Llama 3.2 scales its rope");
    assert_eq!(
        (
            scaling.factor,
            scaling.low_freq_factor,
            scaling.high_freq_factor,
            scaling.original_max_position_embeddings
        ),
        (32.0, 1.0, 4.0, 8192)
    );
    assert!(llama.tie_word_embeddings && !llama.qk_norm && !llama.mlp_bias);
    assert_eq!(llama.max_position_embeddings, 131_072);
    assert_eq!(llama.num_parameters(), LLAMA32_1B_PARAMS);
}

/// transformers' parameter counts of the released configs (`scripts/count_real_config_params.py`).
const PHI35_MINI_PARAMS: usize = 3_821_079_552;
const PHI4_MINI_PARAMS: usize = 3_836_021_760;
const GEMMA3_270M_PARAMS: usize = 268_098_176;
/// 999,885,952: the "1B" of the model card.
const GEMMA3_1B_IT_PARAMS: usize = 999_885_952;
/// 596,049,920, of which 440,467,456 outside the tied embedding: the card's "0.6B" and
/// "Number of Parameters (Non-Embedding): 0.44B".
const QWEN3_0_6B_PARAMS: usize = 596_049_920;
/// 1,235,814,400: the card's "1.23B".
const LLAMA32_1B_PARAMS: usize = 1_235_814_400;
