//! `finch data generate` end to end with a tiny random model: the real pipeline (model loading,
//! chat template, sampling, filters, the output file) through the CLI. The rules themselves
//! are tested on scripted replies in src/data/generate/tests.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::process::{Command, Output};

use finch::model::tiny::TinySpec;
use finch::model::Family;

fn finch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch"))
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn stdout_json(o: &Output) -> serde_json::Value {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {out}\nstderr: {err}",
        o.status.code()
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let seeds = dir.path().join("seeds.jsonl");
    let mut text = String::new();
    for (i, s) in [
        "Write a haiku about the sea.",
        "List three uses of copper.",
        "Explain how rain forms.",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"instruction": s, "output": format!("Answer {i}.")})
        ));
    }
    std::fs::write(&seeds, text).unwrap();
    (dir, p(&model), p(&seeds))
}

#[test]
fn self_instruct_runs_on_a_tiny_model_and_resumes() {
    let (dir, model, seeds) = setup();
    let out = dir.path().join("gen.jsonl");
    let run = |count: &str| {
        finch()
            .args(["data", "generate", "--method", "self-instruct", "--seed-data", &seeds])
            .args(["--model", &model, "--out", &p(&out), "--count", count])
            .args([
                "--temperature",
                "1.0",
                "--seed",
                "3",
                "--max-new-tokens",
                "24",
                "--max-attempts",
                "12",
            ])
            .output()
            .unwrap()
    };
    let first = stdout_json(&run("2"));
    eprintln!("{first}");
    let written = rows(&out);
    assert_eq!(first["method"], "self-instruct");
    assert_eq!(first["rows"].as_u64().unwrap() as usize, written.len());
    assert!(first["attempts"].as_u64().unwrap() >= 1);
    for row in &written {
        assert_eq!(row["provenance"]["method"], "self-instruct");
        assert_eq!(row["provenance"]["model"], model.as_str());
        assert_eq!(row["provenance"]["settings"]["seed"], 3);
        assert!(row["instruction"].as_str().unwrap().split_whitespace().count() >= 3);
    }
    let before = std::fs::read_to_string(&out).unwrap_or_default();
    let second = stdout_json(&run("4"));
    eprintln!("{second}");
    assert_eq!(second["rows_before"].as_u64().unwrap() as usize, written.len());
    assert!(std::fs::read_to_string(&out).unwrap().starts_with(&before));
}

#[test]
fn bad_documents_stop_back_translation_before_anything_is_written() {
    let (dir, model, seeds) = setup();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "A fine paragraph of text about rivers and stones.").unwrap();
    std::fs::write(docs.join("b.txt"), b"\x00\x01binary").unwrap();
    let out = dir.path().join("bt.jsonl");
    let o = finch()
        .args([
            "data",
            "generate",
            "--method",
            "back-translation",
            "--documents",
            &p(&docs),
        ])
        .args(["--model", &model, "--out", &p(&out)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("b.txt") && err.contains("binary"), "{err}");
    assert!(!out.exists());
    // The input flag must match the method.
    let o = finch()
        .args(["data", "generate", "--method", "evol-instruct", "--seed-data", &seeds])
        .args(["--model", &model, "--out", &p(&out)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--seed-data is for --method self-instruct"),
        "{err}"
    );
}

/// Rows actually kept through the CLI: a tiny model whose weights make it answer every prompt
/// with one fixed text ([`write_fixed_reply_model`]). Back-translation asks it for each
/// document's instruction and then for a 1-5 rating; its one reply, "Summarize this text in two
/// sentences. Score: 5", is a valid instruction and a rating of 5, so the first document's
/// pair is kept (the document as the answer), and the others, whose instruction is the same,
/// are dropped as duplicates. The same run with a model that rates 3 keeps nothing (LowScore);
/// a Self-Instruct run keeps the two tasks of a two-task reply. The kept rows load as a
/// dataset with their provenance.
#[test]
fn rows_are_kept_end_to_end_by_a_model_with_a_known_reply() {
    use finch::data::load::{load_file, LoadOptions};
    use finch::model::tiny::write_fixed_reply_model;
    let (dir, _, seeds) = setup();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let texts = [
        "Rivers carve valleys over thousands of years, carrying sand and stones towards the sea.",
        "Bees visit flowers to collect nectar, and carry pollen from one plant to the next.",
        "A lighthouse warns ships at night with a bright lamp turning at the top of its tower.",
    ];
    for (i, t) in texts.iter().enumerate() {
        std::fs::write(docs.join(format!("{i}.txt")), t).unwrap();
    }
    let rater = |score: u8| {
        let model = dir.path().join(format!("rates-{score}"));
        write_fixed_reply_model(
            &model,
            &["Summarize this text in two sentences.", &format!(" Score: {score}")],
        )
        .unwrap();
        p(&model)
    };
    let back_translate = |model: &str, out: &Path| {
        finch()
            .args([
                "data",
                "generate",
                "--method",
                "back-translation",
                "--documents",
                &p(&docs),
            ])
            .args(["--model", model, "--out", &p(out), "--min-score", "4", "--seed", "5"])
            .output()
            .unwrap()
    };

    let out = dir.path().join("pairs.jsonl");
    let summary = stdout_json(&back_translate(&rater(5), &out));
    assert_eq!(summary["kept"], 1, "{summary}");
    assert_eq!(summary["attempts"], 3);
    assert_eq!(summary["rejected"], serde_json::json!({"duplicate": 2}));
    // Instruction and rating for the first document, the instruction alone for the others.
    assert_eq!(summary["model_calls"], 4);
    assert!(summary["generated_tokens"].as_u64().unwrap() >= 8, "{summary}");
    let written = rows(&out);
    assert_eq!(written.len(), 1);
    let row = &written[0];
    assert_eq!(row["instruction"], "Summarize this text in two sentences. Score: 5");
    assert_eq!(row["output"], texts[0]);
    let provenance = &row["provenance"];
    assert_eq!(provenance["method"], "back-translation");
    assert_eq!(provenance["score"], 5);
    assert_eq!(provenance["segment"], 0);
    assert!(provenance["document"].as_str().unwrap().ends_with("0.txt"));
    assert_eq!(provenance["settings"]["seed"], 5);
    // The file is a dataset Finch trains on, and loading keeps each row's provenance.
    let report = load_file(&out, &LoadOptions::default()).unwrap();
    assert_eq!(report.rows.len(), 1);
    let loaded = report.rows[0].meta.provenance.as_ref().unwrap();
    assert_eq!(loaded.score, Some(5));
    assert_eq!(loaded.model, rater(5));

    // Rated 3 against a minimum of 4: nothing kept, every pair dropped for its score.
    let low = dir.path().join("low.jsonl");
    let summary = stdout_json(&back_translate(&rater(3), &low));
    assert_eq!(summary["kept"], 0, "{summary}");
    assert_eq!(summary["rejected"], serde_json::json!({"low-score": 3}));
    assert!(rows(&low).is_empty());

    // Self-Instruct: a reply listing two new tasks; each is kept with its answer (the same reply).
    let tasks = dir.path().join("tasks");
    let pieces = [
        "Task 4: Describe how bread rises.",
        "\nTask 5: Name two metals that conduct heat.",
    ];
    write_fixed_reply_model(&tasks, &pieces).unwrap();
    let out = dir.path().join("self.jsonl");
    let summary = stdout_json(
        &finch()
            .args(["data", "generate", "--method", "self-instruct", "--seed-data", &seeds])
            .args(["--model", &p(&tasks), "--out", &p(&out), "--count", "2"])
            .output()
            .unwrap(),
    );
    assert_eq!(summary["kept"], 2, "{summary}");
    assert_eq!(summary["attempts"], 1);
    let written = rows(&out);
    let instructions: Vec<&str> = written.iter().map(|r| r["instruction"].as_str().unwrap()).collect();
    assert_eq!(
        instructions,
        ["Describe how bread rises.", "Name two metals that conduct heat."]
    );
    for row in &written {
        assert_eq!(row["output"], pieces.concat().as_str());
        assert_eq!(row["provenance"]["seed_rows"].as_array().unwrap().len(), 3);
    }
    assert_eq!(load_file(&out, &LoadOptions::default()).unwrap().rows.len(), 2);
}

/// The one real-model check (FINCH_REAL_MODEL=/path/to/SmolLM2-135M-Instruct): an answer
/// unrelated to its question gets IFD >= 1 (the question does not help), a matching one < 1.
#[test]
fn ifd_separates_matched_from_unrelated_answers_on_a_real_model() {
    let Ok(model) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipped: set FINCH_REAL_MODEL to a chat model folder (e.g. SmolLM2-135M-Instruct)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ifd.jsonl");
    let rows = [
        ("What is the capital of France?", "The capital of France is Paris."),
        (
            "What is the capital of France?",
            "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
        ),
        ("Translate 'good morning' into Spanish.", "Buenos días."),
        (
            "Translate 'good morning' into Spanish.",
            "The Pacific Ocean is the largest ocean on Earth.",
        ),
    ];
    let text: String = rows
        .iter()
        .map(|(i, o)| format!("{}\n", serde_json::json!({"instruction": i, "output": o})))
        .collect();
    std::fs::write(&data, text).unwrap();
    let details = dir.path().join("details.jsonl");
    let kept = dir.path().join("kept.jsonl");
    let summary = stdout_json(
        &finch()
            .args([
                "data",
                "score",
                &p(&data),
                "--model",
                &model,
                "--by",
                "ifd",
                "--keep",
                "top",
            ])
            .args(["--fraction", "1", "--out", &p(&kept), "--details", &p(&details)])
            .output()
            .unwrap(),
    );
    let scores: Vec<f64> = std::fs::read_to_string(&details)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["ifd"]
                .as_f64()
                .unwrap()
        })
        .collect();
    eprintln!("IFD matched / unrelated: {scores:?}");
    assert!(scores[0] < 1.0 && scores[2] < 1.0, "{scores:?}");
    assert!(scores[1] >= 1.0 && scores[3] >= 1.0, "{scores:?}");
    assert_eq!(summary["ifd"]["at_least_1"], 2);
    // Keeping by IFD never keeps a row whose instruction does not help.
    assert_eq!(summary["kept"], 2);
}

/// The real model's Self-Instruct (FINCH_REAL_MODEL=/path/to/SmolLM2-135M-Instruct-Q4_1): a
/// short run yields rows that load as a dataset, every instruction under the ROUGE-L bound
/// against every other one and against the seeds. Run on the quantized path (Q4_1 as is), the
/// quicker one in a debug build; the IFD check above covers the f32 path.
#[test]
fn self_instruct_on_a_real_model_keeps_distinct_rows_that_load() {
    use finch::data::generate::rouge_l;
    use finch::data::load::{load_file, LoadOptions};
    let Ok(model) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipped: set FINCH_REAL_MODEL to a chat model (e.g. SmolLM2-135M-Instruct)");
        return;
    };
    let (dir, _, seeds) = setup();
    let out = dir.path().join("real.jsonl");
    let summary = stdout_json(
        &finch()
            .args(["data", "generate", "--method", "self-instruct", "--seed-data", &seeds])
            .args(["--model", &model, "--out", &p(&out), "--count", "3", "--seed", "1"])
            .args(["--max-new-tokens", "128", "--max-attempts", "10", "--quantized"])
            .output()
            .unwrap(),
    );
    eprintln!("{summary}");
    let report = load_file(&out, &LoadOptions::default()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.rows.len() as u64, summary["rows"].as_u64().unwrap());
    assert!(!report.rows.is_empty(), "{summary}");
    let written = rows(&out);
    let instructions: Vec<&str> = written.iter().map(|r| r["instruction"].as_str().unwrap()).collect();
    let seed_instructions = [
        "Write a haiku about the sea.",
        "List three uses of copper.",
        "Explain how rain forms.",
    ];
    for (i, a) in instructions.iter().enumerate() {
        for b in instructions[i + 1..].iter().chain(&seed_instructions) {
            assert!(rouge_l(a, b) < 0.7, "`{a}` / `{b}`: {}", rouge_l(a, b));
        }
    }
    for r in &written {
        assert!(r["provenance"]["seed_rows"].as_array().is_some_and(|s| !s.is_empty()));
        assert!(!r["output"].as_str().unwrap().trim().is_empty());
    }
}
