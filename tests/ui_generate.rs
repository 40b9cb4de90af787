//! The Data page's Generate and Choosing-data panels driven through their widgets with
//! egui_kittest: a Self-Instruct run on a model with a known reply streams rows in, one is
//! accepted (with its provenance, saved with the dataset), one rejected, the run cancelled, and
//! Undo takes the accepted row back; rows scored with the tiny model get the engine's numbers,
//! histograms of both scores, and "keep the top K%" keeps exactly the rows the engine's
//! selection names, undoably.
// egui_kittest is a dev-dependency only outside `--cfg finch_qemu` (Cargo.toml).
#![cfg(not(finch_qemu))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use eframe::egui;
use egui::accesskit::Role as AkRole;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use finch::data::generate::Method;
use finch::data::load::{load_file, LoadOptions};
use finch::data::quality::{select_by, Keep, ScoreKind};
use finch::data::Example;
use finch::model::tiny::write_fixed_reply_model;
use finch::train::score::DataScorer;
use finch::ui::data_page::choose::float_histogram;
use finch::ui::{App, StartOptions};

#[path = "support/ui_harness.rs"]
mod ui_harness;
use ui_harness::*;

fn open_dataset(harness: &mut Harness<'_, App>, path: &Path) {
    nav(harness, "Data");
    harness.get_by_label("Dataset file").focus();
    harness.step();
    harness
        .get_by_label("Dataset file")
        .type_text(&path.display().to_string());
    harness.step();
    click(harness, "Open dataset");
    step_until(harness, "the dataset", Duration::from_secs(120), |app| {
        !app.data_is_busy() && !app.data_rows().is_empty()
    });
}

/// Clicks the widget labelled `label`; the second frame shows what the click changed (actions
/// apply after the frame that saw the click).
fn click(harness: &mut Harness<'_, App>, label: &str) {
    harness.get_by_label(label).click_accesskit();
    harness.step();
    harness.step();
}

/// Replaces the text of the field labelled `label` by `text`.
fn type_into(harness: &mut Harness<'_, App>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.step();
    harness.get_by_label(label).type_text(text);
    harness.step();
}

#[test]
fn generated_rows_stream_in_and_accepted_ones_keep_their_provenance() {
    let fx = fixture(1);
    let dir = fx.data.parent().unwrap().to_path_buf();
    // A model whose reply to every prompt lists two new tasks (see write_fixed_reply_model).
    let model = dir.join("two-tasks");
    let pieces = [
        "Task 4: Describe how bread rises.",
        "\nTask 5: Name two metals that conduct heat.",
    ];
    write_fixed_reply_model(&model, &pieces).unwrap();
    let seeds = dir.join("seeds.jsonl");
    let seed_rows: String = [
        "Write a haiku about the sea.",
        "Explain how rain forms.",
        "Name three primary colours.",
    ]
    .iter()
    .map(|s| format!("{}\n", serde_json::json!({"instruction": s, "output": "An answer."})))
    .collect();
    std::fs::write(&seeds, seed_rows).unwrap();
    let out = dir.join("generated.jsonl");

    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &model);
    open_dataset(&mut harness, &fx.data);
    assert_eq!(harness.state().data_rows().len(), 24);

    type_into(&mut harness, "Seed rows (≥ 3):", &seeds.display().to_string());
    type_into(
        &mut harness,
        "Output JSONL (continued if it exists):",
        &out.display().to_string(),
    );
    // Far more rows than the model can make: every later round is a duplicate, so the run goes
    // on (up to 20 prompts per missing row, two million here) until it is cancelled.
    type_into(&mut harness, "Rows:", "100000");
    assert_eq!(harness.state().data_generate().count_text, "100000");
    click(&mut harness, "Generate");
    assert!(harness.state().data_generate().is_running());

    // (1) The two new tasks stream in while the run goes on.
    step_until(&mut harness, "two generated rows", Duration::from_secs(120), |app| {
        app.data_generate().candidates.len() == 2
    });
    assert!(
        harness.state().data_generate().is_running(),
        "{}",
        harness.state().data_generate().status
    );
    harness.get_by_label("2 generated rows to review");
    harness.get_by_label_contains("1. Describe how bread rises. — Task 4:");

    // (2) Accept the first: one more row, carrying its provenance.
    harness.get_all_by_label("Accept").next().unwrap().click_accesskit();
    harness.step();
    harness.step();
    let rows = harness.state().data_rows().to_vec();
    assert_eq!(rows.len(), 25);
    let Example::Chat { messages, .. } = &rows[24] else {
        panic!("a generated row is a conversation")
    };
    assert_eq!(messages[0].content, "Describe how bread rises.");
    assert_eq!(messages[1].content, pieces.concat());
    let provenance = harness.state().data_meta()[24].provenance.clone().expect("provenance");
    assert_eq!(provenance.method, Method::SelfInstruct);
    assert_eq!(provenance.model, model.display().to_string());
    assert_eq!(provenance.seed_rows.len(), 3);
    // (3) Reject the second: nothing added, nothing left to review.
    click(&mut harness, "Reject");
    assert_eq!(harness.state().data_rows().len(), 25);
    harness.get_by_label("0 generated rows to review");

    // (4) Cancel: the run stops at its next check and says so; both rows are in its file.
    harness.get_by_label("Cancel").click_accesskit();
    step_until(&mut harness, "the run to stop", Duration::from_secs(120), |app| {
        !app.data_generate().is_running()
    });
    let status = harness.state().data_generate().status.clone();
    assert!(
        status.starts_with("self-instruct: 2 rows in") && status.contains("stopped"),
        "{status}"
    );
    assert_eq!(load_file(&out, &LoadOptions::default()).unwrap().rows.len(), 2);

    // (5) The editor shows where the row came from; saving writes it with the row.
    harness.get_by_label("Go to row").set_value_accesskit(25.0);
    for _ in 0..5 {
        harness.step();
    }
    assert_eq!(harness.state().data_selected_row(), Some(24));
    harness.get_by_label_contains("Generated by self-instruct with");
    click(&mut harness, "Save");
    step_until(&mut harness, "the save", Duration::from_secs(60), |app| {
        !app.data_is_busy()
    });
    let saved = load_file(&fx.data, &LoadOptions::default()).unwrap();
    assert_eq!(saved.rows.len(), 25);
    assert_eq!(saved.rows[24].meta.provenance.as_ref(), Some(&provenance));
    assert!(saved.rows[..24].iter().all(|r| r.meta.is_empty()));

    // (6) Undo takes the accepted row (and its provenance) back out.
    click(&mut harness, "Undo");
    assert_eq!(harness.state().data_rows().len(), 24);
    assert!(harness.state().data_meta().iter().all(|m| m.is_empty()));
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
}

#[test]
fn scores_histograms_and_keeping_the_top_share() {
    let fx = fixture(1);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    open_dataset(&mut harness, &fx.data);
    harness.get_by_label("No row has scores yet: Score rows computes them.");

    // (1) Score with answer loss and IFD on the scoring thread.
    click(&mut harness, "Score rows");
    step_until(&mut harness, "the scores", Duration::from_secs(300), |app| {
        !app.data_is_busy() && app.data_meta().iter().all(|m| m.scores.is_some())
    });
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    let status = harness.state().data_status().to_string();
    assert!(
        status.starts_with("Scored 24 rows") && status.contains("Undo removes the scores"),
        "{status}"
    );

    // The numbers are the engine's (`finch data score` runs the same function).
    let rows = harness.state().data_rows().to_vec();
    let seq_len = fx.settings.train.seq_len;
    let scorer = DataScorer::open(&fx.model.display().to_string()).unwrap();
    let table = scorer
        .score(&rows, seq_len, true, &AtomicBool::new(false), &mut |_| {})
        .unwrap()
        .unwrap();
    let meta = harness.state().data_meta().to_vec();
    for (i, m) in meta.iter().enumerate() {
        assert_eq!(m.scores.as_ref(), Some(&table.row(i)), "row {}", i + 1);
    }
    let ifd: Vec<f32> = meta
        .iter()
        .map(|m| m.scores.as_ref().and_then(|s| s.ifd).unwrap_or(f32::NAN))
        .collect();
    let loss: Vec<f32> = meta
        .iter()
        .map(|m| m.scores.as_ref().and_then(|s| s.answer_loss).unwrap_or(f32::NAN))
        .collect();
    // Rows whose answer seq_len cuts off have no loss; most have one.
    let n_loss = loss.iter().filter(|l| l.is_finite()).count();
    assert!(n_loss >= 12, "{loss:?}");

    // (2) One histogram per score, counting every scored row once.
    assert_eq!(
        harness.state_mut().data_score_bars(ScoreKind::Loss),
        float_histogram(&loss, 30).0
    );
    assert_eq!(
        harness.state_mut().data_score_bars(ScoreKind::Ifd),
        float_histogram(&ifd, 30).0
    );
    let counted: f64 = harness
        .state_mut()
        .data_score_bars(ScoreKind::Loss)
        .iter()
        .map(|b| b[1])
        .sum();
    assert_eq!(counted, n_loss as f64);
    harness.get_by_label(&format!("Answer loss ({n_loss} rows scored)"));

    // (3) Keep the top 25% by answer loss: exactly the rows the engine's selection names.
    click(&mut harness, "answer loss");
    harness
        .get_by_role_and_label(AkRole::Slider, "Keep")
        .set_value_accesskit(25.0);
    harness.step();
    harness.step();
    let chosen = select_by(ScoreKind::Loss, &loss, 0.25, Keep::Top).unwrap();
    assert_eq!(chosen.len(), (n_loss as f64 * 0.25).round() as usize);
    harness.get_by_label_contains(&format!("keeps {} of 24 rows", chosen.len()));
    click(&mut harness, &format!("Keep {} rows", chosen.len()));
    let kept: Vec<Example> = chosen.iter().map(|&i| rows[i].clone()).collect();
    assert_eq!(harness.state().data_rows(), kept.as_slice());
    let kept_meta: Vec<_> = chosen.iter().map(|&i| meta[i].clone()).collect();
    assert_eq!(
        harness.state().data_meta(),
        kept_meta.as_slice(),
        "kept rows keep their scores"
    );
    let min_kept = chosen.iter().map(|&i| loss[i]).fold(f32::INFINITY, f32::min);
    assert!(
        loss.iter()
            .enumerate()
            .all(|(i, l)| chosen.contains(&i) || l.partial_cmp(&min_kept) != Some(std::cmp::Ordering::Greater)),
        "no dropped row scores above a kept one"
    );

    // (4) Undo brings the other rows back, then takes the scores off.
    click(&mut harness, "Undo");
    assert_eq!(harness.state().data_rows(), rows.as_slice());
    assert_eq!(harness.state().data_meta(), meta.as_slice());
    click(&mut harness, "Undo");
    assert!(harness.state().data_meta().iter().all(|m| m.scores.is_none()));
    harness.get_by_label("No row has scores yet: Score rows computes them.");

    // (5) By IFD, rows whose instruction does not help (IFD >= 1) are never kept.
    click(&mut harness, "Redo");
    harness.get_by_label("IFD").click_accesskit();
    harness
        .get_by_role_and_label(AkRole::Slider, "Keep")
        .set_value_accesskit(100.0);
    harness.step();
    harness.step();
    let usable = ifd.iter().filter(|v| **v < 1.0).count();
    assert_eq!(select_by(ScoreKind::Ifd, &ifd, 1.0, Keep::Top).unwrap().len(), usable);
    harness.get_by_label_contains(&format!("keeps {usable} of 24 rows"));
}
