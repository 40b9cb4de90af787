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
    assert!(o.status.success(), "exit {:?}\nstdout: {out}\nstderr: {err}", o.status.code());
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
    for (i, s) in ["Write a haiku about the sea.", "List three uses of copper.", "Explain how rain forms."]
        .iter()
        .enumerate()
    {
        text.push_str(&format!("{}\n", serde_json::json!({"instruction": s, "output": format!("Answer {i}.")})));
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
            .args(["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "24", "--max-attempts", "12"])
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
