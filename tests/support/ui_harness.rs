//! Shared by the studio's kittest files: a tiny generated model, Alpaca rows it can encode,
//! settings that keep runs and the Hub cache in a temp dir, and helpers that step the harness.
#![allow(dead_code)] // each test file uses a different subset

use std::path::Path;
use std::time::{Duration, Instant};

use eframe::egui;
use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use finch::hub::HubOptions;
use finch::model::tiny::TinySpec;
use finch::model::Family;
use finch::train::presets::Preset;
use finch::train::Duration as TrainDuration;
use finch::ui::{App, Settings};

/// Alpaca rows the tiny byte-level tokenizer can encode.
pub fn write_data(path: &Path, rows: usize) {
    let mut text = String::new();
    for i in 0..rows {
        let row = serde_json::json!({
            "instruction": format!("Add {i} and {}.", i + 1),
            "input": if i % 3 == 0 { "Show the sum only." } else { "" },
            "output": format!("{}", 2 * i + 1),
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub model: std::path::PathBuf,
    pub data: std::path::PathBuf,
    pub settings: Settings,
}

pub fn fixture(steps: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-llama");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let data = dir.path().join("sums.jsonl");
    write_data(&data, 24);
    let mut settings = Settings {
        runs_dir: dir.path().join("runs"),
        ..Settings::default()
    };
    settings.train = Preset::QuickDemo.config();
    settings.train.duration = TrainDuration::Steps(steps);
    settings.train.seq_len = 64;
    settings.train.batch_size = 2;
    settings.train.eval_split = 0.2;
    settings.train.eval_every = 5;
    settings.train.device = finch::train::config::DeviceChoice::Cpu;
    Fixture {
        _dir: dir,
        model,
        data,
        settings,
    }
}

pub fn harness(mut app: App) -> Harness<'static, App> {
    // Keep the user's real Hugging Face cache and the network out of the tests.
    let cache = app.settings().runs_dir.with_file_name("hub-cache");
    app.set_hub_options(HubOptions::new(cache).with_offline(true));
    harness_with(app)
}

pub fn harness_with(app: App) -> Harness<'static, App> {
    Harness::builder()
        .with_size([1400.0, 1100.0])
        .build_ui_state(|ui, app: &mut App| app.show(ui), app)
}

/// Steps the harness (letting background threads run) until `done` holds; panics after `timeout`.
pub fn step_until(harness: &mut Harness<'_, App>, what: &str, timeout: Duration, done: impl Fn(&App) -> bool) {
    let start = Instant::now();
    while !done(harness.state()) {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; errors shown: {:?}",
            harness.state().errors()
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.step();
}

/// Clicks a page in the navigation bar (pages also show their name as a heading).
pub fn nav(harness: &mut Harness<'_, App>, page: &str) {
    harness.get_by_role_and_label(Role::Button, page).click();
    harness.step();
}

pub fn open_tiny_model(harness: &mut Harness<'_, App>, model: &Path) {
    nav(harness, "Models");
    harness.get_by_label("Model path").focus();
    harness.step();
    harness
        .get_by_label("Model path")
        .type_text(&model.display().to_string());
    harness.step();
    harness.get_by_label("Open").click();
    step_until(harness, "the model card", Duration::from_secs(60), |app| {
        app.model_card().is_some()
    });
}
