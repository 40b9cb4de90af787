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
