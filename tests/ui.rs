//! The studio driven through its widgets with egui_kittest, on a tiny generated model: open the
//! model, pick data, set a probe prompt, train 10 steps, watch the curve, the probe timeline and
//! the run history, save the chart, preflight the run; close during training; errors in the
//! window; settings that persist.
// egui_kittest is a dev-dependency only outside `--cfg finch_qemu` (Cargo.toml).
#![cfg(not(finch_qemu))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

#[path = "support/fake_hub.rs"]
mod fake_hub;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eframe::egui;
use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use finch::hub::HubOptions;
use finch::ui::{App, Page, StartOptions};

#[path = "support/ui_harness.rs"]
mod ui_harness;
use ui_harness::*;

#[test]
fn open_model_train_ten_steps_and_see_the_curve_and_the_history() {
    let fx = fixture(10);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();

    open_tiny_model(&mut harness, &fx.model);
    let card = harness.state().model_card().unwrap().clone();
    assert_eq!(card.family, "llama");
    assert_eq!(card.chat_template, Ok(true));
    let expected_params = finch::model::ModelFiles::open(fx.model.to_str().unwrap())
        .unwrap()
        .config
        .num_parameters();
    assert_eq!(card.parameters, expected_params);
    // The card is on screen with the template state.
    harness.get_by_label("Chat template");
    harness.get_by_label("present");
    assert_eq!(harness.state().settings().last_model.as_deref(), fx.model.to_str());

    nav(&mut harness, "Train");
    assert_eq!(harness.state().page(), Page::Train);
    // The device choice says what this build and machine offer, and why a device is not offered.
    harness.get_by_label("Device");
    if !cfg!(feature = "cuda") {
        harness.get_by_label_contains("built without CUDA");
    }
    harness.get_by_label("Data file").focus();
    harness.step();
    harness
        .get_by_label("Data file")
        .type_text(&fx.data.display().to_string());
    harness.step();
    let probe = "Add 2 and 3.";
    harness.get_by_label("Probe prompt 1").focus();
    harness.step();
    harness.get_by_label("Probe prompt 1").type_text(probe);
    harness.step();
    assert_eq!(harness.state().settings().train.probe_prompts, [probe]);
    harness.get_by_label("Start training").click();
    harness.step();
    assert!(harness.state().is_training(), "errors: {:?}", harness.state().errors());
    harness.step();
    harness.get_by_label("Stop");

    step_until(&mut harness, "the run to finish", Duration::from_secs(300), |app| {
        !app.is_training()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let loss = harness.state().live_loss_points().to_vec();
    assert_eq!(loss.len(), 10, "one loss point per step: {loss:?}");
    let steps: Vec<f64> = loss.iter().map(|p| p[0]).collect();
    assert_eq!(steps, (1..=10).map(|s| s as f64).collect::<Vec<_>>());
    assert!(loss.iter().all(|p| p[1].is_finite() && p[1] > 0.0));
    harness.get_by_label_contains("Finished 10 steps");

    // The probe was answered before training and at both evaluations (every 5 steps), and the
    // timeline beside the curve lists those steps; clicking one marks it on the loss plot.
    let rounds = harness.state().probe_rounds().to_vec();
    let probe_steps: Vec<usize> = rounds.iter().map(|r| r.step).collect();
    assert_eq!(probe_steps, [0, 5, 10]);
    for round in &rounds {
        assert_eq!(round.answers.len(), 1);
        assert_eq!(round.answers[0].prompt, probe);
        assert!(round.answers[0].tokens <= harness.state().settings().train.probe_max_tokens);
    }
    harness.get_by_label("Probe answers");
    for step in ["Step 0", "Step 5", "Step 10"] {
        harness.get_by_label(step);
    }
    harness.get_by_label("Step 5").click_accesskit();
    harness.step();
    assert_eq!(harness.state().highlighted_probe_step(), Some(5));

    step_until(&mut harness, "the run in the history", Duration::from_secs(30), |app| {
        !app.run_history().is_empty()
    });
    let run = harness.state().run_history()[0].clone();
    assert_eq!(run.last_step, 10);
    assert_eq!(run.loss.len(), 10);
    // The history reads the run folder; its curve is the one the live plot drew.
    for (a, b) in run.loss.iter().zip(&loss) {
        assert_eq!(a[0], b[0]);
        assert!((a[1] - b[1]).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert!(!run.eval_loss.is_empty(), "eval every 5 steps with a 20% split");
    assert_eq!(
        run.probes, rounds,
        "the history reads the probe answers back from metrics.jsonl"
    );
    assert!(run.dir.join("adapter").join("adapter_model.safetensors").exists());
    assert!(!run.resumable(), "a finished run offers no Resume");
    assert!(
        harness.get_all_by_label(&run.name).next().is_some(),
        "the run is listed"
    );
    assert_eq!(harness.state().settings().last_run.as_ref(), Some(&run.dir));

    // Tick the run for comparison, then save the chart in both formats.
    harness.get_by_label("Save chart as PNG…");
    let png = fx.settings.runs_dir.join("chart.png");
    let svg = fx.settings.runs_dir.join("chart.svg");
    let ctx = harness.ctx.clone();
    harness.state_mut().save_chart(&ctx, &png);
    step_until(&mut harness, "the PNG", Duration::from_secs(30), |app| {
        app.errors().is_empty() && png.exists() && app.train_status().starts_with("Saved")
    });
    harness.state_mut().save_chart(&ctx, &svg);
    step_until(&mut harness, "the SVG", Duration::from_secs(30), |app| {
        svg.exists() && app.train_status().contains("chart.svg")
    });
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR width and height.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 700);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg") && svg_text.contains("training loss") && svg_text.contains("eval loss"));

    // Preflight the same settings: a few timed steps, a sentence with the estimate, no new run.
    let runs_before = std::fs::read_dir(&fx.settings.runs_dir).unwrap().count();
    harness.get_by_label("Preflight").click();
    harness.step();
    assert!(harness.state().is_preflighting(), "{:?}", harness.state().errors());
    step_until(&mut harness, "the preflight", Duration::from_secs(120), |app| {
        !app.is_preflighting()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let report = harness.state().preflight_report().unwrap().clone();
    assert_eq!(report.total_steps, 10);
    assert!(report.secs_per_step > 0.0 && report.estimated_total_secs >= 10.0 * report.secs_per_step);
    let sentence = harness.state().preflight_status().to_string();
    assert_eq!(sentence, finch::ui::train_page::preflight_sentence(&report));
    assert!(
        sentence.contains("s per step") && sentence.contains("tokens/s") && sentence.contains("about "),
        "{sentence}"
    );
    assert!(
        sentence.contains(" for 10 steps (including 2 evaluations and 3 rounds of probe answers)"),
        "{sentence}"
    );
    harness.get_by_label(&sentence);
    assert_eq!(std::fs::read_dir(&fx.settings.runs_dir).unwrap().count(), runs_before);
}

/// The Train page offers DPO / ORPO only for preference data; a DPO run from the window draws
/// the reward margin and accuracy curves.
#[test]
fn preference_data_offers_the_method_choice_and_dpo_draws_reward_curves() {
    let fx = fixture(4);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    nav(&mut harness, "Train");
    // Supervised data: no method choice.
    harness.state_mut().set_data_path(&fx.data);
    for _ in 0..20 {
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!harness.state().train_data_is_preference());
    assert!(
        harness.query_by_label("Method").is_none(),
        "no method choice for supervised data"
    );
    let votes = fx.data.with_file_name("votes.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"prompt": format!("Add {i} and 1."), "chosen": format!("{}", i + 1),
                "rejected": format!("{i} {i} {i}"), "chosen_model": "a", "rejected_model": "b",
                "system": "", "time": "2026-11-28T00:00:00Z"})
            .to_string()
        })
        .collect();
    std::fs::write(&votes, rows.join("\n")).unwrap();
    harness.state_mut().set_data_path(&votes);
    step_until(&mut harness, "the data read", Duration::from_secs(30), |app| {
        app.train_data_is_preference()
    });
    harness.step();
    harness.get_by_label("Method");
    harness.state_mut().settings_mut().train.method = finch::train::Method::Dpo;
    harness.step();
    harness.get_by_label("Beta (β)");
    harness.get_by_label("Start training").click();
    harness.step();
    assert!(harness.state().is_training(), "errors: {:?}", harness.state().errors());
    step_until(&mut harness, "the run to finish", Duration::from_secs(300), |app| {
        !app.is_training()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let live = harness.state().live_curves();
    assert_eq!(live.reward_margin.len(), 4, "one reward point per step");
    assert_eq!(live.reward_accuracy.len(), 4);
    assert!(!live.eval_reward_accuracy.is_empty(), "held-out rewards");
    harness.step();
    harness.get_by_label("reward margin");
    harness.get_by_label("reward accuracy");
    // Packing is not offered for DPO, so the padding share comes without the hint.
    harness.get_by_label_contains("% of positions");
    assert!(harness.query_by_label_contains("tick Packing").is_none());
}

/// The Train page's Packing checkbox: ticked, the run the page starts packs its examples (its
/// `config.toml` says `pack = true`, the page shows the engine's note on the packed rows, and an
/// epoch takes fewer steps than the unpacked batches would); for DPO it is greyed out with the
/// reason, unticked, and the run is not packed.
#[test]
fn packing_checkbox_reaches_the_run_and_is_greyed_out_for_preference_methods() {
    use egui::accesskit::Toggled;
    use egui_kittest::kittest::NodeT;
    let fx = fixture(4);
    let mut settings = fx.settings.clone();
    settings.train.seq_len = 256;
    settings.train.duration = finch::train::Duration::Epochs(1.0);
    settings.train.eval_split = 0.0;
    settings.train.eval_every = 0;
    let mut harness = harness(App::with_settings(settings, StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    nav(&mut harness, "Train");
    harness.state_mut().set_data_path(&fx.data);
    harness.step();

    let checkbox = harness.get_by_role_and_label(Role::CheckBox, "Packing");
    assert!(!checkbox.accesskit_node().is_disabled());
    assert_eq!(checkbox.accesskit_node().toggled(), Some(Toggled::False));
    checkbox.click();
    harness.step();
    assert_eq!(
        harness
            .get_by_role_and_label(Role::CheckBox, "Packing")
            .accesskit_node()
            .toggled(),
        Some(Toggled::True)
    );
    assert!(harness.state().settings().train.pack);

    harness.get_by_label("Start training").click();
    harness.step();
    assert!(harness.state().is_training(), "errors: {:?}", harness.state().errors());
    step_until(
        &mut harness,
        "the packed run to finish",
        Duration::from_secs(300),
        |app| !app.is_training(),
    );
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let run_dir = harness.state().settings().last_run.clone().unwrap();
    let cfg = finch::train::TrainConfig::from_toml_file(&run_dir.join("config.toml")).unwrap();
    assert!(cfg.pack, "the run's config.toml does not pack");
    // The engine's note, on the page: 24 examples in a few 256-token rows.
    let note = harness
        .get_by_label_contains("packed 24 training examples into")
        .accesskit_node()
        .value()
        .unwrap();
    let rows: usize = note
        .split(" into ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no row count in {note:?}"));
    assert!(rows < 24 / 2, "{note}");
    // One epoch of packed rows, 2 per step (unpacked: 24 examples would take 12 steps).
    let steps = rows.div_ceil(2);
    harness.get_by_label_contains(&format!("Finished {steps} steps"));

    // Preference data with DPO: the checkbox is greyed out, says why, and unticks itself.
    let votes = fx.data.with_file_name("votes.jsonl");
    let pairs: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({"prompt": format!("Add {i} and 1."), "chosen": format!("{}", i + 1),
                "rejected": format!("{i} {i}")})
            .to_string()
        })
        .collect();
    std::fs::write(&votes, pairs.join("\n")).unwrap();
    harness.state_mut().set_data_path(&votes);
    step_until(&mut harness, "the data read", Duration::from_secs(30), |app| {
        app.train_data_is_preference()
    });
    harness.state_mut().settings_mut().train.method = finch::train::Method::Dpo;
    harness.state_mut().settings_mut().train.duration = finch::train::Duration::Steps(1);
    harness.step();
    harness.step();
    let checkbox = harness.get_by_role_and_label(Role::CheckBox, "Packing");
    assert!(checkbox.accesskit_node().is_disabled(), "packing offered for DPO");
    assert_eq!(checkbox.accesskit_node().toggled(), Some(Toggled::False));
    assert!(!harness.state().settings().train.pack);
    checkbox.hover();
    for _ in 0..10 {
        harness.step();
        std::thread::sleep(Duration::from_millis(60));
    }
    harness.get_by_label("available for SFT only");
    harness.get_by_label("Start training").click();
    harness.step();
    step_until(&mut harness, "the DPO run to finish", Duration::from_secs(300), |app| {
        !app.is_training()
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let dpo_dir = harness.state().settings().last_run.clone().unwrap();
    assert_ne!(dpo_dir, run_dir);
    let cfg = finch::train::TrainConfig::from_toml_file(&dpo_dir.join("config.toml")).unwrap();
    assert_eq!((cfg.method, cfg.pack), (finch::train::Method::Dpo, false));
}

/// The padding share of `metrics.jsonl`'s training steps (1 − Σ tokens / Σ positions), after
/// checking that every line's own `padding_fraction` is its step's share.
fn logged_padding_share(run_dir: &std::path::Path) -> (usize, usize, f64) {
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let (mut tokens, mut padded) = (0usize, 0usize);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "train" {
            continue;
        }
        let (t, p) = (v["tokens"].as_u64().unwrap(), v["padded_tokens"].as_u64().unwrap());
        let step_share = v["padding_fraction"].as_f64().unwrap();
        assert!((step_share - (1.0 - t as f64 / p as f64)).abs() < 1e-12, "{line}");
        tokens += t as usize;
        padded += p as usize;
    }
    (tokens, padded, 1.0 - tokens as f64 / padded as f64)
}

/// Mixed-length rows trained unpacked: the live stats show the padding share of the run (the
/// number `metrics.jsonl` gives) with a hint to tick Packing; packed, a small share and no hint.
#[test]
fn the_padding_share_is_shown_with_a_packing_hint_when_unpacked() {
    let fx = fixture(6);
    // Every third answer is long, the others a number: a batch pads its short rows to the long.
    let rows: Vec<String> = (0..24)
        .map(|i| {
            let output = if i % 3 == 0 {
                format!("The sum of {i} and {} is {}. ", i + 1, 2 * i + 1).repeat(5)
            } else {
                format!("{}", 2 * i + 1)
            };
            serde_json::json!({"instruction": format!("Add {i} and {}.", i + 1), "output": output}).to_string()
        })
        .collect();
    let data = fx.data.with_file_name("mixed.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let mut settings = fx.settings.clone();
    settings.train.seq_len = 256;
    settings.train.eval_split = 0.0;
    settings.train.eval_every = 0;
    let mut harness = harness(App::with_settings(settings, StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    nav(&mut harness, "Train");
    harness.state_mut().set_data_path(&data);
    harness.step();

    let mut shares = vec![];
    for pack in [false, true] {
        if pack {
            harness.get_by_role_and_label(Role::CheckBox, "Packing").click();
            harness.step();
        }
        assert_eq!(harness.state().settings().train.pack, pack);
        harness.get_by_label("Start training").click();
        harness.step();
        assert!(harness.state().is_training(), "errors: {:?}", harness.state().errors());
        step_until(&mut harness, "the run to finish", Duration::from_secs(300), |app| {
            !app.is_training()
        });
        assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
        harness.get_by_label_contains("Finished 6 steps");
        let run_dir = harness.state().settings().last_run.clone().unwrap();
        let (tokens, padded, share) = logged_padding_share(&run_dir);
        // The page adds up the numbers the trainer sent, the same the run folder logged.
        let live = harness.state().live_curves().padding;
        assert_eq!((live.tokens, live.padded_tokens), (tokens, padded));
        let plain = format!("padding {:.0}% of positions", 100.0 * share);
        if pack {
            assert!(share < finch::train::PACKING_HINT_SHARE, "packed share {share}");
            harness.get_by_label(&plain);
        } else {
            assert!(share >= finch::train::PACKING_HINT_SHARE, "unpacked share {share}");
            harness.get_by_label(&format!("{plain} — tick Packing to cut it"));
        }
        assert_eq!(
            harness.query_by_label_contains("tick Packing").is_some(),
            !pack,
            "the hint shows for the unpacked run only"
        );
        shares.push(share);
    }
    assert!(shares[1] < shares[0] / 2.0, "packing cuts the padding: {shares:?}");
}

#[test]
fn closing_during_training_asks_then_stops_with_a_checkpoint_and_resume_continues() {
    let fx = fixture(100_000);
    let mut settings = fx.settings.clone();
    settings.train.eval_split = 0.0;
    settings.train.eval_every = 0;
    let mut harness = harness(App::with_settings(settings, StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    let ctx = harness.ctx.clone();
    harness.state_mut().set_data_path(&fx.data);
    harness.state_mut().start_training(&ctx, None);
    step_until(&mut harness, "a few steps", Duration::from_secs(120), |app| {
        app.live_loss_points().len() >= 3
    });

    harness
        .input_mut()
        .viewports
        .entry(egui::ViewportId::ROOT)
        .or_default()
        .events
        .push(egui::ViewportEvent::Close);
    harness.step();
    assert!(harness.state().is_asking_to_close());
    assert!(harness.state().is_training(), "asking does not stop the run");
    let cancelled = harness.output().viewport_output[&egui::ViewportId::ROOT]
        .commands
        .contains(&egui::ViewportCommand::CancelClose);
    assert!(cancelled, "the close is held back while the question is open");
    // egui lays out a new window invisibly in its first frame.
    harness.step();

    harness.get_by_label("Stop training and close").click();
    step_until(&mut harness, "the trainer to stop", Duration::from_secs(120), |app| {
        !app.is_training()
    });
    // The frame after the trainer ended asks the window to close.
    harness.step();
    let commands = &harness.output().viewport_output[&egui::ViewportId::ROOT].commands;
    assert!(commands.contains(&egui::ViewportCommand::Close), "{commands:?}");
    let run_dir = harness.state().settings().last_run.clone().unwrap();
    let steps_done = harness.state().live_loss_points().len();
    assert!(
        run_dir.join("checkpoints").join(format!("step-{steps_done}")).exists(),
        "a checkpoint at the stop step {steps_done}"
    );

    // A new window (same settings, as after a relaunch) offers Resume and continues the curve.
    let settings = harness.state().settings().clone();
    let mut harness = self::harness(App::with_settings(settings, StartOptions::default()));
    harness.step();
    nav(&mut harness, "Train");
    step_until(&mut harness, "the history", Duration::from_secs(30), |app| {
        app.run_history().iter().any(|r| r.resumable())
    });
    // The relaunched window reopens the last model by itself.
    step_until(
        &mut harness,
        "the last model to reopen",
        Duration::from_secs(60),
        |app| app.model_card().is_some(),
    );
    nav(&mut harness, "Train");
    harness.get_all_by_label("Resume").next().unwrap().click();
    harness.step();
    step_until(&mut harness, "two more steps", Duration::from_secs(120), |app| {
        app.live_loss_points().len() >= steps_done + 2
    });
    let points = harness.state().live_loss_points().to_vec();
    assert_eq!(
        points[steps_done][0],
        (steps_done + 1) as f64,
        "the resumed curve continues the old one"
    );
    harness.state_mut().stop_training();
    step_until(&mut harness, "the stop", Duration::from_secs(120), |app| {
        !app.is_training()
    });
}

#[test]
fn a_model_that_cannot_be_opened_shows_an_error_with_what_to_do() {
    let fx = fixture(10);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    let missing = fx.settings.runs_dir.join("no-such-model");
    let ctx = harness.ctx.clone();
    harness.state_mut().open_model_path(&ctx, &missing);
    step_until(&mut harness, "the error", Duration::from_secs(30), |app| {
        !app.errors().is_empty()
    });
    let error = harness.state().errors()[0].clone();
    assert!(error.what.contains("Cannot open the model"), "{error:?}");
    assert!(error.detail.contains("no-such-model"), "{error:?}");
    harness.get_by_label_contains("What to do: Pick a folder holding config.json");
    assert!(harness.state().model_card().is_none());
    harness.get_by_label("Dismiss").click();
    harness.step();
    assert!(harness.state().errors().is_empty());

    // Start stays disabled without a model: training is never attempted.
    nav(&mut harness, "Train");
    harness.get_by_label("Start training").click();
    harness.step();
    assert!(!harness.state().is_training());
}

#[test]
fn search_the_hub_download_with_progress_and_open_the_model() {
    let fx = fixture(10);
    let mut repo =
        fake_hub::FakeRepo::new("test-org/tiny-llama-chat", &"a".repeat(40)).search_fields(serde_json::json!({
            "downloads": 500, "likes": 40,
            "tags": ["transformers", "safetensors", "llama", "text-generation", "license:apache-2.0"],
            "config": { "model_type": "llama" }, "safetensors": { "total": 1234, "parameters": { "F32": 1234 } },
            "usedStorage": 5_000_000,
        }));
    for entry in std::fs::read_dir(&fx.model).unwrap().flatten() {
        repo = repo.file(
            &entry.file_name().to_string_lossy(),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    let hub = fake_hub::FakeHub::start(vec![repo]);
    let cache = fx.settings.runs_dir.with_file_name("fake-hub-cache");
    let mut app = App::with_settings(fx.settings.clone(), StartOptions::default());
    app.set_hub_options(HubOptions::new(&cache).with_endpoint(hub.endpoint()));
    let mut harness = harness_with(app);
    harness.step();
    harness.get_by_label("Search the Hugging Face Hub").focus();
    harness.step();
    harness.get_by_label("Search the Hugging Face Hub").type_text("tiny");
    harness.step();
    harness.get_by_label("Search").click();
    let start = Instant::now();
    while harness.query_by_label("test-org/tiny-llama-chat").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            harness.state().errors()
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.get_by_label("apache-2.0");
    harness
        .get_by_role_and_label(Role::Button, "Download")
        .click_accesskit();
    harness.run_steps(3);
    assert!(
        harness
            .query_by_label_contains("Downloading test-org/tiny-llama-chat")
            .is_some(),
        "the progress row is shown"
    );
    step_until(&mut harness, "the downloaded model", Duration::from_secs(60), |app| {
        app.model_card().is_some()
    });
    let card = harness.state().model_card().unwrap().clone();
    assert_eq!(
        card.name, "test-org/tiny-llama-chat",
        "a cached snapshot shows its Hub id"
    );
    assert!(card.path.starts_with(&cache));
    step_until(&mut harness, "the cache listing", Duration::from_secs(30), |app| {
        app.cached_models().iter().any(|m| m.id == "test-org/tiny-llama-chat")
    });
}

/// An in-memory `eframe::Storage`, as eframe's file storage behaves between launches.
#[derive(Default)]
struct MemoryStorage(HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn flush(&mut self) {}
}

#[test]
fn scale_model_data_and_settings_persist_between_launches() {
    let fx = fixture(10);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    nav(&mut harness, "Settings");
    harness.get_by_label("Projector").click();
    // The click, then one frame to request the zoom and one in which it applies.
    harness.run_steps(4);
    assert_eq!(harness.state().settings().ui_scale, 2.0);
    assert_eq!(harness.ctx.zoom_factor(), 2.0, "the UI scale applies at once");
    nav(&mut harness, "Train");
    harness.get_by_label("Balanced").click();
    harness.step();
    harness.state_mut().set_data_path(&fx.data);

    let mut storage = MemoryStorage::default();
    harness.state().save_to(&mut storage);
    let restored = App::load_settings(&storage).expect("settings were stored");
    assert_eq!(restored, *harness.state().settings());
    assert_eq!(restored.ui_scale, 2.0);
    assert_eq!(restored.page, Page::Train);
    assert_eq!(restored.last_model.as_deref(), fx.model.to_str());
    assert_eq!(restored.last_data.as_deref(), fx.data.to_str());
    assert_eq!(restored.train.lora.r, 16, "the Balanced preset");

    // The next launch reopens the last model and data by itself.
    let mut harness = self::harness(App::with_settings(restored, StartOptions::default()));
    step_until(&mut harness, "the model reopened", Duration::from_secs(60), |app| {
        app.model_card().is_some()
    });
    assert_eq!(harness.state().data_path(), fx.data.display().to_string());
}
