use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};

use super::*;
use crate::lora::{LoraConfig, Target};
use crate::model::config::Family;
use crate::model::tiny::TinySpec;
use crate::rng::Rng;

fn tiny(family: Family) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(family).write(dir.path()).unwrap();
    let m = LoadedModel::open(dir.path().to_str().unwrap()).unwrap();
    (dir, m)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Decoding by recomputing the whole sequence each step (no cache).
fn decode_full(model: &Transformer, prompt: &[u32], n: usize, params: SamplingParams) -> Vec<u32> {
    let mut sampler = Sampler::new(params).unwrap();
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.logits(&input).unwrap();
        let last = logits.get(0).unwrap().get(ids.len() - 1).unwrap();
        let token = sampler.sample(&mut last.to_vec1::<f32>().unwrap(), &ids);
        ids.push(token);
    }
    ids[prompt.len()..].to_vec()
}

fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ignore_eos: true,
        ..GenerateOptions::default()
    }
}

#[test]
fn kv_cache_greedy_equals_full_recomputation() {
    for family in [Family::Llama, Family::Qwen2] {
        let (_dir, m) = tiny(family);
        let prompt = m
            .format
            .encode_prompt(&[Message::new(Role::User, "Hello there, tiny model")])
            .unwrap();
        let no = AtomicBool::new(false);
        let g = generate(&m.model, &m.format, &prompt, &greedy_opts(50), &no, &mut |_| {}).unwrap();
        assert_eq!(g.token_ids.len(), 50);
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert_eq!(
            g.token_ids,
            decode_full(&m.model, &prompt, 50, SamplingParams::greedy()),
            "{family:?}"
        );
        // Greedy decoding of a random tiny model soon repeats one token; seeded sampling at a
        // high temperature walks through many different tokens and positions.
        let varied = GenerateOptions {
            sampling: SamplingParams {
                temperature: 50.0,
                seed: 11,
                ..SamplingParams::default()
            },
            ..greedy_opts(50)
        };
        let g = generate(&m.model, &m.format, &prompt, &varied, &no, &mut |_| {}).unwrap();
        let distinct: std::collections::HashSet<_> = g.token_ids.iter().collect();
        assert!(distinct.len() >= 10, "{:?}", g.token_ids);
        assert_eq!(
            g.token_ids,
            decode_full(&m.model, &prompt, 50, varied.sampling),
            "{family:?}"
        );
    }
}

#[test]
fn chunked_prefill_logits_match_the_full_forward() {
    let (_dir, m) = tiny(Family::Llama);
    let ids: Vec<u32> = (0..23).map(|i| (i * 37 % 250) as u32 + 3).collect();
    let full = m
        .model
        .logits(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = KvCache::new();
    // Chunks exercise the masked path with past > 0 and t > 1, and single-token steps.
    let a = m.model.forward_with_cache(&ids[..10], &mut cache).unwrap();
    let b = m.model.forward_with_cache(&ids[10..21], &mut cache).unwrap();
    let c = m.model.forward_with_cache(&ids[21..22], &mut cache).unwrap();
    let d = m.model.forward_last_with_cache(&ids[22..], &mut cache).unwrap();
    assert_eq!(cache.len(), 23);
    let cached = Tensor::cat(&[a, b, c, d.unsqueeze(0).unwrap()], 0).unwrap();
    assert!(
        max_diff(&cached, &full) < 1e-4,
        "differs by {}",
        max_diff(&cached, &full)
    );
    // Truncating the cache and re-running the tail gives the same logits again.
    cache.truncate(15).unwrap();
    let again = m.model.forward_with_cache(&ids[15..], &mut cache).unwrap();
    let want = full.narrow(0, 15, 8).unwrap();
    assert!(max_diff(&again, &want) < 1e-4);
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        use_rslora: false,
    }
}

#[test]
fn zero_adapter_equals_base_and_merged_equals_unmerged() {
    let (_dir, m) = tiny(Family::Qwen2);
    let ids: Vec<u32> = (0..12).map(|i| i * 11 + 3).collect();
    let run = |model: &Transformer| {
        let mut cache = KvCache::new();
        model.forward_with_cache(&ids, &mut cache).unwrap()
    };
    let base = run(&m.model);
    let mut adapted = m.model.clone();
    adapted.add_lora(&lora_cfg(), &mut Rng::new(3)).unwrap();
    // Fresh adapters have B = 0: exactly the base model.
    assert_eq!(max_diff(&run(&adapted), &base), 0.0);
    let mut rng = Rng::new(9);
    for (_, w) in adapted.lora_weights() {
        let (out, r) = w.b.as_tensor().dims2().unwrap();
        let vals: Vec<f32> = (0..out * r).map(|_| rng.next_f32() - 0.5).collect();
        w.b.set(&Tensor::from_vec(vals, (out, r), &Device::Cpu).unwrap())
            .unwrap();
    }
    let unmerged = run(&adapted);
    assert!(max_diff(&unmerged, &base) > 1e-2, "the adapter must change the logits");
    let merged = run(&adapted.merged().unwrap());
    assert!(
        max_diff(&unmerged, &merged) < 1e-4,
        "differs by {}",
        max_diff(&unmerged, &merged)
    );
    // The base clone is untouched by attaching adapters to its clone.
    assert_eq!(max_diff(&run(&m.model), &base), 0.0);
}

#[test]
fn adapter_folder_and_run_folder_both_load() {
    let (_dir, m) = tiny(Family::Llama);
    let mut trained = m.model.clone();
    trained.add_lora(&lora_cfg(), &mut Rng::new(1)).unwrap();
    for (_, w) in trained.lora_weights() {
        w.b.set(&(w.b.as_tensor().ones_like().unwrap() * 0.05).unwrap())
            .unwrap();
    }
    let run = tempfile::tempdir().unwrap();
    let adapter_dir = run.path().join("adapter");
    let peft = crate::lora::PeftConfig::from_lora(&lora_cfg(), None);
    crate::lora::save_adapter(&adapter_dir, &peft, &trained.lora_weights()).unwrap();
    let ids = [5u32, 9, 100, 42];
    let logits = |model: &Transformer| model.forward_with_cache(&ids, &mut KvCache::new()).unwrap();
    let want = logits(&trained);
    for path in [run.path(), adapter_dir.as_path()] {
        let loaded = with_adapter(&m.model, path).unwrap();
        assert!(max_diff(&logits(&loaded), &want) < 1e-5);
    }
    let err = with_adapter(&m.model, &run.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("no such folder"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_adapter_dir(empty.path()).unwrap_err().to_string();
    assert!(err.contains("run folder holding adapter/"), "{err}");
}

#[test]
fn stop_strings_streaming_and_cancel() {
    let (_dir, m) = tiny(Family::Llama);
    let prompt = m.format.encode_prompt(&[Message::new(Role::User, "abc")]).unwrap();
    let no = AtomicBool::new(false);
    // Sampling (greedy decoding of a random tiny model repeats one byte); a seed makes it repeatable.
    let sampled = GenerateOptions {
        sampling: SamplingParams {
            // The tiny model's logits are very peaked; a high temperature gives varied text.
            temperature: 50.0,
            seed: 5,
            ..SamplingParams::default()
        },
        ..greedy_opts(40)
    };
    let mut pieces = String::new();
    let full = generate(&m.model, &m.format, &prompt, &sampled, &no, &mut |s| pieces.push_str(s)).unwrap();
    assert_eq!(pieces, full.text, "streamed pieces add up to the answer");
    // A stop string taken from the middle of the answer cuts it there.
    let (at, ch) = full
        .text
        .char_indices()
        .skip(3)
        .find(|(_, c)| !c.is_control() && !c.is_whitespace() && *c != '\u{FFFD}')
        .unwrap_or_else(|| panic!("no printable character in {:?}", full.text));
    let stop = ch.to_string();
    let first = full.text.find(&stop).unwrap();
    assert!(first <= at);
    let opts = GenerateOptions {
        stop: vec![stop.clone()],
        ..sampled.clone()
    };
    let mut pieces = String::new();
    let g = generate(&m.model, &m.format, &prompt, &opts, &no, &mut |s| pieces.push_str(s)).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, full.text[..first]);
    assert_eq!(pieces, g.text);
    // Cancelling from the callback stops between tokens.
    let cancel = AtomicBool::new(false);
    let mut calls = 0;
    let g = generate(&m.model, &m.format, &prompt, &greedy_opts(40), &cancel, &mut |_| {
        calls += 1;
        if calls == 2 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.token_ids.len() < 40);
}

#[test]
fn end_of_turn_stops_and_context_is_handled() {
    let (_dir, m) = tiny(Family::Llama);
    // The tiny ChatML template's end-of-turn is <|im_end|> = 2, EOS <|endoftext|> = 0.
    assert!(m.format.stop_token_ids.contains(&2), "{:?}", m.format.stop_token_ids);
    // Whatever token the model would produce third, declared an end token, ends the answer there
    // with `eos` and is not part of it.
    let prompt = m.format.encode_prompt(&[Message::new(Role::User, "hi")]).unwrap();
    let no = AtomicBool::new(false);
    let free = generate(&m.model, &m.format, &prompt, &greedy_opts(3), &no, &mut |_| {}).unwrap();
    let mut format = m.format.clone();
    format.stop_token_ids = vec![free.token_ids[2]];
    let first_hit = free.token_ids.iter().position(|t| *t == free.token_ids[2]).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 5,
        ..GenerateOptions::default()
    };
    let g = generate(&m.model, &format, &prompt, &opts, &no, &mut |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Eos);
    assert_eq!(g.token_ids, free.token_ids[..first_hit]);
    // A prompt at the context length is a clear error, not a crash.
    let long = vec![65u32; 1024];
    let err = generate(&m.model, &m.format, &long, &opts, &no, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("context of 1024 tokens"), "{err}");
    // Reaching the context length mid-answer ends it with `length`.
    let near = vec![65u32; 1020];
    let g = generate(&m.model, &m.format, &near, &greedy_opts(50), &no, &mut |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.token_ids.len(), 4);
    // A long history is trimmed from the oldest turns; the system message stays.
    let mut history = vec![Message::new(Role::System, "be brief")];
    for i in 0..40 {
        history.push(Message::new(Role::User, format!("question {i} {}", "x".repeat(40))));
        history.push(Message::new(Role::Assistant, format!("answer {i} {}", "y".repeat(40))));
    }
    history.push(Message::new(Role::User, "last question"));
    let (ids, dropped) = m.format.fit_prompt(&history, 1024, 100).unwrap();
    assert!(dropped > 0 && ids.len() <= 924);
    let text = m.format.decode(&ids).unwrap();
    assert!(text.contains("be brief") && text.contains("last question") && !text.contains("question 0 "));
    let huge = vec![Message::new(Role::User, "z".repeat(5000))];
    let err = m.format.fit_prompt(&huge, 1024, 100).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn real_model_answers_paris() {
    let Ok(path) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipped: FINCH_REAL_MODEL is not set");
        return;
    };
    let m = LoadedModel::open(&path).unwrap();
    let no = AtomicBool::new(false);
    let msgs = [Message::new(
        Role::User,
        "What is the capital of France? Answer in one word.",
    )];
    let opts = GenerateOptions {
        max_new_tokens: 20,
        ..GenerateOptions::default()
    };
    let g = chat(&m.model, &m.format, &msgs, &opts, &no, &mut |_| {}).unwrap();
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Eos, "{:?}", g.text);
}
