//! The Chat and Export pages driven through their widgets with egui_kittest on a tiny generated
//! model and a run folder holding a LoRA adapter with random (nonzero) B: streaming chat with
//! Enter / Shift+Enter / Esc, Compare with answers checked against the engine, blind votes saved
//! to votes.jsonl, PEFT and merged exports that reload with the adapter's greedy tokens, and
//! quantized answers from a GGUF (with and without the adapter) equal to the engine's.
// egui_kittest is a dev-dependency only outside `--cfg finch_qemu` (Cargo.toml).
#![cfg(not(finch_qemu))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use eframe::egui;
use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use finch::data::votes::VoteRecord;
use finch::data::{Message, Role as MsgRole};
use finch::generate::Decoder;
use finch::generate::{chat, chat_with, with_adapter, FinishReason, GenerateOptions, LoadedModel};
use finch::lora::{LoraConfig, PeftConfig};
use finch::model::quantized::QuantizedModel;
use finch::rng::Rng;
use finch::ui::{App, Page, StartOptions};

#[path = "support/ui_harness.rs"]
mod ui_harness;
use ui_harness::*;

/// A run folder `runs/tuned` as the trainer leaves it: `adapter/` (random B, so the adapter
/// changes the answers) and a `metrics.jsonl`, which is what makes the run history list it.
fn tuned_run(model: &Path, runs_dir: &Path) -> PathBuf {
    let loaded = LoadedModel::open(model.to_str().unwrap()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let mut tuned = loaded.model.clone();
    tuned.add_lora(&cfg, &mut Rng::new(2)).unwrap();
    let mut rng = Rng::new(4);
    for (_, w) in tuned.lora_weights() {
        let (out, r) = w.b.as_tensor().dims2().unwrap();
        let vals: Vec<f32> = (0..out * r).map(|_| (rng.next_f32() - 0.5) * 0.5).collect();
        w.b.set(&Tensor::from_vec(vals, (out, r), &Device::Cpu).unwrap())
            .unwrap();
    }
    let run = runs_dir.join("tuned");
    finch::lora::save_adapter(
        &run.join("adapter"),
        &PeftConfig::from_lora(&cfg, None),
        &tuned.lora_weights(),
    )
    .unwrap();
    std::fs::write(run.join("metrics.jsonl"), "").unwrap();
    run
}

/// The app on the Chat page with the tiny model loaded and the tuned run listed.
fn chat_ready(fx: &Fixture, configure: impl FnOnce(&mut finch::ui::Settings)) -> (Harness<'static, App>, PathBuf) {
    let run = tuned_run(&fx.model, &fx.settings.runs_dir);
    let mut settings = fx.settings.clone();
    configure(&mut settings);
    let mut harness = harness(App::with_settings(settings, StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    nav(&mut harness, "Chat");
    assert_eq!(harness.state().page(), Page::Chat);
    step_until(
        &mut harness,
        "the model loaded for chat",
        Duration::from_secs(60),
        |app| app.chat_model_ready(),
    );
    step_until(&mut harness, "the run in the list", Duration::from_secs(30), |app| {
        !app.run_history().is_empty()
    });
    (harness, run)
}

fn type_message(harness: &mut Harness<'_, App>, text: &str) {
    harness.get_by_label("Message").focus();
    harness.step();
    harness.get_by_label("Message").type_text(text);
    harness.step();
}

fn press_enter(harness: &mut Harness<'_, App>) {
    harness.key_press(egui::Key::Enter);
    harness.step();
}

/// Greedy answer of the engine itself, for comparison with what the page shows.
fn engine_answer(
    model: &finch::model::transformer::Transformer,
    format: &finch::generate::ChatFormat,
    prompt: &str,
    max: usize,
) -> finch::generate::Generation {
    let opts = GenerateOptions {
        max_new_tokens: max,
        ..GenerateOptions::default()
    };
    let messages = [Message::new(MsgRole::User, prompt.to_string())];
    chat(model, format, &messages, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap()
}

#[test]
fn chat_streams_on_enter_keeps_shift_enter_newlines_and_esc_stops() {
    let fx = fixture(1);
    let (mut harness, _run) = chat_ready(&fx, |s| s.chat.max_new_tokens = 12);

    // Shift+Enter is a newline in the box; Enter sends.
    type_message(&mut harness, "Hello");
    harness.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::Enter);
    harness.step();
    harness.get_by_label("Message").type_text("there");
    harness.step();
    assert!(harness.state().chat_turns().is_empty(), "Shift+Enter must not send");
    press_enter(&mut harness);
    assert_eq!(
        harness.state().chat_turns().len(),
        1,
        "errors: {:?}",
        harness.state().errors()
    );
    assert_eq!(harness.state().chat_turns()[0].user, "Hello\nthere");
    assert_eq!(
        harness.get_by_label("Message").value().as_deref(),
        Some(""),
        "the box is cleared"
    );
    step_until(&mut harness, "the first answer", Duration::from_secs(60), |app| {
        !app.is_generating()
    });
    let first = &harness.state().chat_turns()[0].answer;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert!(
        matches!(first.finish, Some(FinishReason::Length | FinishReason::Eos)),
        "{:?}",
        first.finish
    );
    assert!(first.tokens >= 1 && first.tokens <= 12, "{} tokens", first.tokens);
    assert!(!first.text.is_empty());
    let (first_prompt_tokens, first_tokens) = (first.prompt_tokens, first.tokens);

    // A long answer: the text grows over several frames, then Esc stops it.
    harness.state_mut().settings_mut().chat.max_new_tokens = 900;
    type_message(&mut harness, "Tell me a long story");
    press_enter(&mut harness);
    assert!(harness.state().is_generating());
    harness.get_by_label("Stop");
    let mut lengths = vec![];
    let start = Instant::now();
    while lengths.iter().filter(|&&n| n > 0).count() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no streaming text: {lengths:?}"
        );
        assert!(harness.state().is_generating(), "ended before Esc: {lengths:?}");
        harness.step();
        let n = harness.state().chat_turns()[1].answer.text.len();
        if lengths.last() != Some(&n) {
            lengths.push(n);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lengths.windows(2).all(|w| w[0] < w[1]), "text only grows: {lengths:?}");
    harness.key_press(egui::Key::Escape);
    harness.step();
    step_until(&mut harness, "the answer to stop", Duration::from_secs(30), |app| {
        !app.is_generating()
    });
    let second = &harness.state().chat_turns()[1].answer;
    assert_eq!(second.finish, Some(FinishReason::Cancelled));
    assert!(second.tokens < 900, "{} tokens", second.tokens);
    assert!(second.text.len() >= *lengths.last().unwrap());
    // The second prompt carries the first exchange.
    assert!(second.prompt_tokens > first_prompt_tokens + first_tokens);
    harness.get_by_label_contains("stopped ·");
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());

    harness.get_by_label("New chat").scroll_to_me();
    harness.step();
    harness.get_by_label("New chat").click();
    harness.step();
    assert!(harness.state().chat_turns().is_empty());
}

#[test]
fn compare_streams_base_and_adapter_side_by_side() {
    let fx = fixture(1);
    let (mut harness, run) = chat_ready(&fx, |s| s.chat.max_new_tokens = 16);
    harness.get_by_label("Compare models").click();
    harness.step();
    harness.get_by_role_and_label(Role::CheckBox, "tuned").click();
    harness.step();
    type_message(&mut harness, "Which is better?");
    press_enter(&mut harness);
    assert_eq!(
        harness.state().compare_rounds().len(),
        1,
        "{:?}",
        harness.state().errors()
    );
    step_until(&mut harness, "both answers", Duration::from_secs(60), |app| {
        !app.is_generating()
    });

    let round = &harness.state().compare_rounds()[0];
    assert_eq!(round.answers.len(), 2);
    assert_eq!(round.order, [0, 1], "not blind: base first");
    assert_eq!(round.column_title(0), "base");
    assert_eq!(round.column_title(1), "tuned");
    // Greedy answers equal the engine's own, and the adapter changes them.
    let loaded = LoadedModel::open(fx.model.to_str().unwrap()).unwrap();
    let tuned = with_adapter(&loaded.model, &run).unwrap();
    let base_expected = engine_answer(&loaded.model, &loaded.format, "Which is better?", 16);
    let tuned_expected = engine_answer(&tuned, &loaded.format, "Which is better?", 16);
    // The random tiny model can repeat one token either way; the adapter shows in the logits.
    let ids = loaded
        .format
        .encode_prompt(&[Message::new(MsgRole::User, "Which is better?")])
        .unwrap();
    let logits = |m: &finch::model::transformer::Transformer| {
        m.forward_last_with_cache(&ids, &mut finch::model::transformer::KvCache::new())
            .unwrap()
    };
    let diff = finch::testing::max_abs_diff(&logits(&loaded.model), &logits(&tuned));
    assert!(diff > 1e-3, "the adapter must change the logits: {diff}");
    for (answer, expected) in round.answers.iter().zip([&base_expected, &tuned_expected]) {
        assert!(answer.error.is_none(), "{:?}", answer.error);
        assert!(!answer.text.is_empty(), "{} gave nothing", answer.model);
        assert_eq!(answer.text, expected.text, "{}", answer.model);
        assert_eq!(answer.tokens, expected.token_ids.len());
        assert_eq!(answer.finish, Some(expected.finish_reason));
    }
    // Both columns are on screen with their titles.
    harness.get_by_label("base");
    assert_eq!(
        harness.query_all_by_label("tuned").count(),
        2,
        "checkbox and column title"
    );
    assert!(
        harness.query_by_label("A is better").is_none(),
        "no vote outside blind mode"
    );
}

/// With "Quantized (GGUF)" ticked and a q8_0 GGUF opened, Compare answers from the GGUF's own
/// blocks: base and adapter columns equal the quantized engine's greedy answers.
#[test]
fn quantized_compare_answers_from_the_gguf_blocks() {
    let mut fx = fixture(1);
    let loaded = LoadedModel::open(fx.model.to_str().unwrap()).unwrap();
    let out = fx.model.parent().unwrap().join("gguf");
    let paths = finch::export::export_gguf(&loaded.files, &loaded.format, &loaded.model, &out).unwrap();
    fx.model = paths[1].clone();
    let (mut harness, run) = chat_ready(&fx, |s| {
        s.chat.max_new_tokens = 16;
        s.chat.quantized = true;
    });
    harness.get_by_label("Quantized (GGUF)");
    harness.get_by_label("Compare models").click();
    harness.step();
    harness.get_by_role_and_label(Role::CheckBox, "tuned").click();
    harness.step();
    type_message(&mut harness, "Which is better?");
    press_enter(&mut harness);
    step_until(&mut harness, "both answers", Duration::from_secs(60), |app| {
        !app.is_generating()
    });
    let gguf = LoadedModel::open(fx.model.to_str().unwrap()).unwrap();
    let mut q = QuantizedModel::open(&gguf.files.path, &gguf.files.config).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ..GenerateOptions::default()
    };
    let messages = [Message::new(MsgRole::User, "Which is better?".to_string())];
    let mut expect = |adapter: Option<&Path>| {
        match adapter {
            Some(a) => q.set_adapter(a).unwrap(),
            None => q.clear_adapter(),
        }
        chat_with(
            &mut q,
            &gguf.format,
            &messages,
            &opts,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap()
    };
    let (base_expected, tuned_expected) = (expect(None), expect(Some(&run)));
    let round = &harness.state().compare_rounds()[0];
    for (answer, expected) in round.answers.iter().zip([&base_expected, &tuned_expected]) {
        assert!(answer.error.is_none(), "{:?}", answer.error);
        assert!(answer.quantized, "{} ran in f32", answer.model);
        assert!(
            answer.status_text().ends_with("· quantized"),
            "{}",
            answer.status_text()
        );
        assert_eq!(answer.text, expected.text, "{}", answer.model);
        assert_eq!(answer.tokens, expected.token_ids.len(), "{}", answer.model);
    }
    // The random tiny model may repeat one token either way; the adapter shows in the logits.
    let ids = gguf.format.encode_prompt(&messages).unwrap();
    let mut last_logits = |adapter: Option<&Path>| {
        match adapter {
            Some(a) => q.set_adapter(a).unwrap(),
            None => q.clear_adapter(),
        }
        q.reset().unwrap();
        q.forward(&ids, false).unwrap()
    };
    let (plain, adapted) = (last_logits(None), last_logits(Some(&run)));
    let diff = plain
        .iter()
        .zip(&adapted)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "the adapter must change the logits: {diff}");
}

#[test]
fn blind_compare_hides_names_until_the_vote_and_saves_it() {
    let fx = fixture(1);
    let (mut harness, _run) = chat_ready(&fx, |s| {
        s.chat.max_new_tokens = 10;
        s.chat.blind = true;
    });
    harness.get_by_label("Compare models").click();
    harness.step();
    harness.get_by_role_and_label(Role::CheckBox, "tuned").click();
    harness.step();
    type_message(&mut harness, "Pick one");
    press_enter(&mut harness);
    step_until(&mut harness, "both answers", Duration::from_secs(60), |app| {
        !app.is_generating()
    });
    let round = &harness.state().compare_rounds()[0];
    assert!(round.blind);
    assert_eq!(round.column_title(0), "A");
    assert_eq!(round.column_title(1), "B");
    harness.get_by_label("A");
    harness.get_by_label("B");
    assert!(harness.query_by_label("base").is_none(), "names stay hidden");
    let chosen = round.order[1];
    let (chosen_text, chosen_model) = (round.answers[chosen].text.clone(), round.answers[chosen].model.clone());
    let (rejected_text, rejected_model) = (
        round.answers[1 - chosen].text.clone(),
        round.answers[1 - chosen].model.clone(),
    );

    harness.get_by_label("B is better").click();
    harness.step();
    step_until(&mut harness, "the vote saved", Duration::from_secs(30), |app| {
        app.votes_saved().is_some()
    });
    let votes_path = fx.settings.runs_dir.join("votes.jsonl");
    let (count, path) = harness.state().votes_saved().unwrap();
    assert_eq!((count, path), (1, votes_path.as_path()));
    let text = std::fs::read_to_string(&votes_path).unwrap();
    let lines: Vec<VoteRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{text}");
    let v = &lines[0];
    assert_eq!(v.prompt, "Pick one");
    assert_eq!(
        (v.chosen.as_str(), v.chosen_model.as_str()),
        (chosen_text.as_str(), chosen_model.as_str())
    );
    assert_eq!(
        (v.rejected.as_str(), v.rejected_model.as_str()),
        (rejected_text.as_str(), rejected_model.as_str())
    );
    assert_ne!(v.chosen_model, v.rejected_model);
    assert!(v.time.ends_with('Z') && v.time.len() == 20, "{}", v.time);
    // The names are revealed and the buttons are gone.
    harness.get_by_label(&format!("B: {chosen_model} (chosen)"));
    harness.get_by_label(&format!("A: {rejected_model}"));
    assert!(harness.query_by_label("B is better").is_none());
    harness.get_by_label_contains("1 vote saved in");

    // "Train on my votes": the Train page opens on the votes file with DPO chosen.
    harness.get_by_label("Train on my votes").click();
    // One frame draws the click, the next hands the file to the Train page.
    harness.step();
    harness.step();
    assert_eq!(harness.state().page(), finch::ui::Page::Train);
    assert_eq!(harness.state().data_path(), votes_path.display().to_string());
    assert_eq!(harness.state().settings().train.method, finch::train::Method::Dpo);
    // (Whether the method choice appears for the file is tested in tests/ui.rs: the two tiny
    // models here answer alike, a tie, which is no preference.)

    // A later session (a new app on the same runs folder) offers the saved votes too.
    let mut later = ui_harness::harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    later.step();
    nav(&mut later, "Chat");
    later.get_by_label("Compare models").click();
    step_until(
        &mut later,
        "the earlier votes counted",
        Duration::from_secs(30),
        |app| app.votes_saved().is_some(),
    );
    later.step();
    later.get_by_label_contains("1 vote saved in");
    later.get_by_label("Train on my votes").click();
    later.step();
    later.step();
    assert_eq!(later.state().page(), finch::ui::Page::Train);
    assert_eq!(later.state().data_path(), votes_path.display().to_string());
}

#[test]
fn export_peft_and_merged_from_the_export_page() {
    let fx = fixture(1);
    let (mut harness, run) = chat_ready(&fx, |_| {});
    nav(&mut harness, "Export");
    harness.get_by_role_and_label(Role::RadioButton, "tuned").click();
    harness.step();
    let peft_out = run.join("export-peft");
    assert_eq!(harness.state().export_state().out_text, peft_out.display().to_string());
    harness.get_by_label("Start export").click();
    harness.step();
    step_until(&mut harness, "the PEFT export", Duration::from_secs(60), |app| {
        !app.is_exporting()
    });
    let result = harness.state().export_state().result.clone().expect("a result");
    let names: Vec<String> = result
        .files
        .iter()
        .map(|(p, _)| p.strip_prefix(&peft_out).unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    for n in &names {
        assert_eq!(
            std::fs::read(peft_out.join(n)).unwrap(),
            std::fs::read(run.join("adapter").join(n)).unwrap()
        );
    }
    harness.get_by_label("adapter_model.safetensors");

    // The exported PEFT folder comes back as a run (`finch import-adapter`): its config names no
    // base model, so the model open on the Models page is the base; the run lists gain it.
    harness.get_by_label("PEFT folder to import").focus();
    harness.step();
    harness
        .get_by_label("PEFT folder to import")
        .type_text(&peft_out.display().to_string());
    harness.step();
    harness.get_by_label("Import as a run").click();
    step_until(&mut harness, "the import", Duration::from_secs(60), |app| {
        app.export_state().import_result.is_some() || !app.errors().is_empty()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let imported = harness.state().export_state().import_result.clone().unwrap();
    assert_eq!(imported.run, fx.settings.runs_dir.join("imported-export-peft"));
    step_until(
        &mut harness,
        "the imported run listed",
        Duration::from_secs(30),
        |app| app.run_history().iter().any(|r| r.dir == imported.run),
    );
    harness.get_by_label_contains("Imported as");

    harness.get_by_label("Merged model (Hugging Face folder)").click();
    harness.step();
    let merged_out = run.join("export-merged");
    assert_eq!(
        harness.state().export_state().out_text,
        merged_out.display().to_string()
    );
    harness.get_by_label("Start export").click();
    harness.step();
    step_until(&mut harness, "the merged export", Duration::from_secs(120), |app| {
        !app.is_exporting()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let result = harness.state().export_state().result.clone().expect("a result");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            result
                .files
                .iter()
                .any(|(p, size)| *p == merged_out.join(f) && *size > 0),
            "{f}"
        );
    }
    assert!(result.ollama_command.is_none());
    // The merged folder is a model of its own that answers like base + adapter.
    let merged = LoadedModel::open(merged_out.to_str().unwrap()).unwrap();
    finch::model::ModelFiles::open(merged_out.to_str().unwrap()).unwrap();
    let base = LoadedModel::open(fx.model.to_str().unwrap()).unwrap();
    let tuned = with_adapter(&base.model, &run).unwrap();
    let want = engine_answer(&tuned, &base.format, "Hello", 20);
    let got = engine_answer(&merged.model, &merged.format, "Hello", 20);
    assert_eq!(got.token_ids, want.token_ids);

    // Exporting into a folder that is not empty is refused and the folder is left alone.
    harness.get_by_label("Start export").click();
    harness.step();
    step_until(&mut harness, "the refused export", Duration::from_secs(60), |app| {
        !app.is_exporting()
    });
    let errors = harness.state().errors();
    assert!(
        errors
            .iter()
            .any(|e| e.what == "Export failed" && e.detail.contains("is not empty")),
        "{errors:?}"
    );
    assert!(
        merged_out.join("model.safetensors").is_file(),
        "the earlier export is kept"
    );
}

#[test]
fn chat_device_choice_reloads_the_model_there_and_names_what_is_not_offered() {
    let fx = fixture(1);
    let (mut harness, _run) = chat_ready(&fx, |s| s.chat.max_new_tokens = 4);
    // Auto on a machine without a usable GPU: the CPU.
    harness.get_by_label("loaded on cpu");
    // The picker lists the CPU and says why the GPU kinds are not offered in this build.
    harness.get_by_role(egui::accesskit::Role::ComboBox).click();
    harness.step();
    harness.step();
    let cpu = finch::device::offered()
        .into_iter()
        .find(|o| o.choice == finch::device::DeviceChoice::Cpu)
        .unwrap();
    for offer in finch::device::offered().iter().filter(|o| !o.is_usable()) {
        harness.get_by_label_contains(&format!("{}: ", offer.label));
    }
    harness.get_by_label(&cpu.label).click();
    harness.step();
    assert_eq!(harness.state().settings().chat.device, finch::device::DeviceChoice::Cpu);
    step_until(
        &mut harness,
        "the model reloaded on the CPU",
        Duration::from_secs(60),
        |app| app.chat_model_ready(),
    );
    harness.get_by_label("loaded on cpu");
    // Answers still come.
    type_message(&mut harness, "Hi");
    press_enter(&mut harness);
    step_until(&mut harness, "an answer", Duration::from_secs(60), |app| {
        !app.is_generating()
    });
    let answer = &harness.state().chat_turns()[0].answer;
    assert!(answer.error.is_none() && answer.tokens >= 1, "{:?}", answer.error);
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
}
