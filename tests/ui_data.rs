//! The Data page driven through its widgets with egui_kittest: open a file with bad rows and
//! duplicates, see the rejections, filter, edit / delete / undo / save, split; with the tiny
//! model open, the token-length histogram and the template/mask inspector; and a 100k-row file
//! whose table lays out only the visible rows.
// egui_kittest is a dev-dependency only outside `--cfg finch_qemu` (Cargo.toml).
#![cfg(not(finch_qemu))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::time::Duration;

use eframe::egui;
use egui::accesskit::Role as AkRole;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use finch::data::load::{load_file, LoadOptions};
use finch::data::tokenize::{assistant_spans, encode_example};
use finch::data::{Example, LossOn, Role};
use finch::ui::{App, Page, StartOptions};

#[path = "support/ui_harness.rs"]
mod ui_harness;
use ui_harness::*;

fn open_through_field(harness: &mut Harness<'_, App>, path: &Path) {
    nav(harness, "Data");
    assert_eq!(harness.state().page(), Page::Data);
    harness.get_by_label("Dataset file").focus();
    harness.step();
    harness
        .get_by_label("Dataset file")
        .type_text(&path.display().to_string());
    harness.step();
    harness.get_by_label("Open dataset").click_accesskit();
    harness.step();
}

fn wait_idle(harness: &mut Harness<'_, App>, what: &str) {
    step_until(harness, what, Duration::from_secs(120), |app| !app.data_is_busy());
}

fn answer(ex: &Example) -> String {
    match ex {
        Example::Chat { messages, .. } => messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.clone())
            .collect(),
        Example::Text { text } => text.clone(),
        Example::Preference { chosen, .. } => chosen.iter().map(|m| m.content.clone()).collect(),
    }
}

/// Table rows on screen: the row-number buttons, whose labels are exactly a number.
fn row_widgets(harness: &Harness<'_, App>) -> Vec<usize> {
    harness
        .query_all_by_role(AkRole::Button)
        .filter_map(|n| n.accesskit_node().label().and_then(|l| l.parse::<usize>().ok()))
        .collect()
}

#[test]
fn rejections_filters_edit_undo_save_and_split_without_a_model() {
    let fx = fixture(1);
    let file = fx.data.with_file_name("mixed.jsonl");
    let row = |i: usize, out: &str| {
        serde_json::json!({"instruction": format!("Question {i}?"), "input": "", "output": out}).to_string()
    };
    let lines = [
        row(1, "Answer one."),
        row(2, "Answer two."),
        "{\"instruction\": \"broken".to_string(), // line 3: not JSON
        row(4, "Answer four."),
        row(5, "Answer five."),
        row(6, ""), // line 6: empty answer
        row(7, "Answer seven."),
        row(1, "Answer one."), // line 8: duplicate of line 1
        row(2, "answer TWO"),  // line 9: duplicate of line 2 up to case and punctuation
        row(10, "Answer ten."),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_through_field(&mut harness, &file);
    wait_idle(&mut harness, "the file to load");
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());

    // (1) Two rejected records, with their line numbers on screen; duplicates stay rows.
    let rejected: Vec<usize> = harness.state().data_rejected().iter().map(|r| r.line).collect();
    assert_eq!(rejected, vec![3, 6]);
    assert_eq!(harness.state().data_rows().len(), 8);
    harness.get_by_label("Rejected records (2)");
    harness.get_by_label_contains("line 3:");
    harness.get_by_label_contains("line 6, field output");
    // No model: the token views say so instead of showing dead controls.
    harness.get_by_label("Open a model to see token lengths (Models page).");
    harness.get_by_label("Open a model to see a row rendered with its chat template.");
    assert!(harness.query_by_label("Stop counting").is_none());
    // Opening a file makes it the Train page's data and the persisted last dataset.
    assert_eq!(harness.state().data_path(), file.display().to_string());
    assert_eq!(harness.state().settings().last_data, Some(file.display().to_string()));

    // (5) The exact-duplicate filter counts and removes exactly the two later copies.
    let before: Vec<Example> = harness.state().data_rows().to_vec();
    harness.get_by_label("Count rows to remove").click_accesskit();
    harness.step();
    wait_idle(&mut harness, "the filter counts");
    let counts = harness.state().data_filter_counts().expect("counted").clone();
    assert_eq!(counts.exact, vec![5, 6], "rows of lines 8 and 9");
    assert!(harness.query_all_by_label("removes 2 rows").count() >= 1);
    harness.get_by_label("Remove exact duplicates").click_accesskit();
    harness.step();
    let expected: Vec<Example> = [0, 1, 2, 3, 4, 7].iter().map(|&i| before[i].clone()).collect();
    assert_eq!(harness.state().data_rows(), expected.as_slice());
    assert!(harness.state().data_has_unsaved_changes());
    // Undo brings the removed rows back in one step; applying again removes them again.
    harness.get_by_label("Undo").click_accesskit();
    harness.step();
    assert_eq!(harness.state().data_rows(), before.as_slice());
    harness.get_by_label("Count rows to remove").click_accesskit();
    harness.step();
    wait_idle(&mut harness, "the filter counts");
    harness.get_by_label("Remove exact duplicates").click_accesskit();
    harness.step();
    assert_eq!(harness.state().data_rows(), expected.as_slice());

    // (3) Edit row 2's answer, delete row 3, undo the delete, save.
    harness.get_by_label("2").click_accesskit();
    harness.step();
    assert_eq!(harness.state().data_selected_row(), Some(1));
    harness.get_by_label("Assistant").focus();
    harness.step();
    harness.get_by_label("Assistant").type_text(" EDITED");
    harness.step();
    harness.get_by_label("Apply edit").click_accesskit();
    harness.step();
    let edited = answer(&harness.state().data_rows()[1]);
    assert!(edited.contains("EDITED") && edited.contains("Answer two"), "{edited}");
    harness.get_by_label("3").click_accesskit();
    harness.step();
    harness.get_by_label("Delete row").click_accesskit();
    harness.step();
    assert_eq!(harness.state().data_rows().len(), 5);
    harness.get_by_label("Undo").click_accesskit();
    harness.step();
    assert_eq!(harness.state().data_rows().len(), 6);
    assert_eq!(
        answer(&harness.state().data_rows()[1]),
        edited,
        "undoing the delete keeps the edit"
    );
    let rows_now = harness.state().data_rows().to_vec();
    harness.get_by_label("Save").click_accesskit();
    harness.step();
    wait_idle(&mut harness, "the save");
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());
    assert!(!harness.state().data_has_unsaved_changes());
    assert!(
        harness.state().data_status().starts_with("Saved 6 rows"),
        "{}",
        harness.state().data_status()
    );
    let saved = load_file(&file, &LoadOptions::default()).unwrap();
    assert!(saved.rejected.is_empty(), "{:?}", saved.rejected);
    let saved_rows: Vec<Example> = saved.examples().cloned().collect();
    assert_eq!(saved_rows, rows_now, "the file holds exactly the rows on screen");
    assert_eq!(answer(&saved_rows[1]), edited);

    // (4) The split writes <stem>.train.jsonl and <stem>.val.jsonl next to the file.
    harness.get_by_label("Write split").click_accesskit();
    harness.step();
    wait_idle(&mut harness, "the split");
    let dir = file.parent().unwrap();
    let train = load_file(&dir.join("mixed.train.jsonl"), &LoadOptions::default()).unwrap();
    let val = load_file(&dir.join("mixed.val.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(train.rows.len() + val.rows.len(), 6);
    assert!(!train.rows.is_empty() && !val.rows.is_empty());
    let mut all: Vec<Example> = train.examples().chain(val.examples()).cloned().collect();
    let mut want = rows_now.clone();
    let key = |e: &Example| serde_json::to_string(e).unwrap();
    all.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(all, want, "the two files partition the rows");
    harness.get_by_label_contains("mixed.val.jsonl");
}

#[test]
fn histogram_and_inspector_with_the_tiny_model() {
    let fx = fixture(1);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_tiny_model(&mut harness, &fx.model);
    open_through_field(&mut harness, &fx.data);
    step_until(
        &mut harness,
        "token lengths and the inspector",
        Duration::from_secs(120),
        |app| app.data_histogram_lengths().is_some() && app.data_inspector_pieces().is_some(),
    );
    assert!(harness.state().errors().is_empty(), "{:?}", harness.state().errors());

    // (2) One length per row, each the length the trainer's encoder gives.
    let files = finch::model::ModelFiles::open(fx.model.to_str().unwrap()).unwrap();
    let template = files.chat_template().unwrap().expect("ChatML template");
    let rows = harness.state().data_rows().to_vec();
    assert_eq!(rows.len(), 24);
    let lengths = harness.state().data_histogram_lengths().unwrap();
    let expected: Vec<usize> = rows
        .iter()
        .map(|ex| {
            encode_example(ex, &template, &files.tokenizer, LossOn::Assistant, usize::MAX)
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(lengths, expected);
    let seq_len = fx.settings.train.seq_len;
    let over = expected.iter().filter(|&&n| n > seq_len).count();
    harness.get_by_label(&format!(
        "{over} rows longer than seq_len = {seq_len} would be truncated"
    ));

    // The inspector shows row 1: trained, masked and end-of-turn pieces that together are the
    // rendered conversation (cut after the last trained turn, as training sees it).
    let pieces = harness.state().data_inspector_pieces().unwrap().to_vec();
    let Example::Chat { messages, .. } = &rows[0] else {
        panic!("Alpaca rows load as conversations")
    };
    let rendered = assistant_spans(messages, &template, LossOn::Assistant)
        .unwrap()
        .rendered;
    let joined: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(joined, rendered);
    let trained_text: String = pieces
        .iter()
        .filter(|p| p.trained && !p.end_of_turn)
        .map(|p| p.text.as_str())
        .collect();
    assert_eq!(trained_text, "1", "row 1's answer is the only trained text");
    let last = pieces.last().unwrap();
    assert!(last.end_of_turn && last.trained && last.text == "<|im_end|>");
    assert!(
        pieces.iter().any(|p| p.end_of_turn && !p.trained),
        "the user turn's marker is masked"
    );
    assert!(pieces.iter().any(|p| !p.trained && p.text.contains("Add 0 and 1.")));
    for legend in ["trained", "masked", "end of turn"] {
        harness.get_by_label(legend);
    }

    // Selecting another row re-renders the inspector for it.
    harness.get_by_label("4").click_accesskit();
    harness.step();
    harness.step();
    assert_eq!(harness.state().data_selected_row(), Some(3));
    let pieces = harness.state().data_inspector_pieces().unwrap();
    let trained_text: String = pieces
        .iter()
        .filter(|p| p.trained && !p.end_of_turn)
        .map(|p| p.text.as_str())
        .collect();
    assert_eq!(trained_text, "7");
}

#[test]
fn a_100k_row_table_lays_out_only_visible_rows() {
    let fx = fixture(1);
    let big = fx.data.with_file_name("big.jsonl");
    write_data(&big, 100_000);
    let mut harness = harness(App::with_settings(fx.settings.clone(), StartOptions::default()));
    harness.step();
    open_through_field(&mut harness, &big);
    // (6) Loaded on the background thread while the window keeps drawing frames.
    step_until(&mut harness, "100k rows", Duration::from_secs(300), |app| {
        app.data_rows().len() == 100_000 && !app.data_is_busy()
    });
    harness.get_by_label_contains("100.0K rows");

    let first = row_widgets(&harness);
    assert!(first.contains(&1) && !first.is_empty(), "{first:?}");
    assert!(first.len() < 100, "{} row widgets before scrolling", first.len());

    // Jump to row 50 000 and select it.
    harness.get_by_label("Go to row").set_value_accesskit(50_000.0);
    for _ in 0..10 {
        harness.step();
    }
    assert_eq!(harness.state().data_selected_row(), Some(49_999));
    let jumped = row_widgets(&harness);
    assert!(jumped.contains(&50_000), "{jumped:?}");
    assert!(
        jumped.len() < 1000 && jumped.len() < 100,
        "{} row widgets",
        jumped.len()
    );
    // The selected row is in the editor panel.
    harness.get_by_label("Row 50000"); // Scroll the table down, 100 points at a time, as a scroll wheel or screen reader does.
    for _ in 0..30 {
        let visible = row_widgets(&harness);
        let last = *visible.iter().max().unwrap();
        let label = last.to_string();
        if let Some(node) = harness.query_all_by_role_and_label(AkRole::Button, &label).next() {
            node.scroll_down();
        }
        harness.step();
    }
    let scrolled = row_widgets(&harness);
    assert!(!scrolled.contains(&50_000), "the table scrolled: {scrolled:?}");
    assert!(scrolled.iter().any(|&n| n > 50_060), "{scrolled:?}");
    assert!(scrolled.len() < 100, "{} row widgets after scrolling", scrolled.len());
}
