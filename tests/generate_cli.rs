//! End-to-end: `finch train` writes a run folder; `finch chat`, `compare`, `eval` and `export`
//! take it (or its adapter folder), and exported models answer like the adapted model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use finch::model::tiny::TinySpec;
use finch::model::Family;

fn finch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch"))
}

fn ok(o: Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {out}\nstderr: {err}",
        o.status.code()
    );
    out.into_owned()
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A tiny model, a JSONL file whose answers all look like `REPEAT n!`, and a trained run.
fn setup() -> (tempfile::TempDir, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let data = dir.path().join("data.jsonl");
    let mut text = String::new();
    for i in 0..12 {
        let row =
            serde_json::json!({"instruction": format!("Repeat {i}"), "input": "", "output": format!("REPEAT {i}!")});
        text.push_str(&format!("{row}\n"));
    }
    std::fs::write(&data, text).unwrap();
    let run = dir.path().join("run");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    ok(finch()
        .args(["train", "--model", &p(&model), "--data", &p(&data), "--out", &p(&run)])
        .args([
            "--steps", "120", "--rank", "8", "--alpha", "16", "--lr", "1e-2", "--batch", "4",
        ])
        .args(["--seq-len", "64", "--eval-split", "0"])
        .output()
        .unwrap());
    (dir, p(&model), p(&data), p(&run))
}

#[test]
fn chat_compare_eval_and_export_use_a_trained_run() {
    let (dir, model, data, run) = setup();
    let adapter = format!("{run}/adapter");
    let chat = |model: &str, adapter: Option<&str>| -> serde_json::Value {
        let mut c = finch();
        c.args([
            "chat",
            "--model",
            model,
            "--prompt",
            "Repeat 3",
            "--json",
            "--max-new-tokens",
            "12",
        ]);
        if let Some(a) = adapter {
            c.args(["--adapter", a]);
        }
        json_lines(&ok(c.output().unwrap())).remove(0)
    };
    let base = chat(&model, None);
    let tuned = chat(&model, Some(&run));
    for answer in [&base, &tuned] {
        assert!(answer["text"].is_string());
        assert!(answer["tokens"].as_u64().unwrap() <= 12);
        assert!(["eos", "stop", "length"].contains(&answer["finish_reason"].as_str().unwrap()));
    }
    // The tuned side answers in the trained format; the base side does not.
    assert!(tuned["text"].as_str().unwrap().contains("REPEAT"), "{tuned}");
    assert!(!base["text"].as_str().unwrap().contains("REPEAT"), "{base}");
    assert_eq!(
        chat(&model, Some(&adapter))["text"],
        tuned["text"],
        "run folder and adapter folder are the same adapter"
    );
    let merged = json_lines(&ok(finch()
        .args([
            "chat",
            "--model",
            &model,
            "--adapter",
            &run,
            "--merge",
            "--prompt",
            "Repeat 3",
        ])
        .args(["--json", "--max-new-tokens", "12"])
        .output()
        .unwrap()))
    .remove(0);
    assert_eq!(merged["text"], tuned["text"], "--merge folds the same adapter in");
    assert!(merged["model"].as_str().unwrap().ends_with("(merged)"), "{merged}");
    let bench = json_lines(&ok(finch()
        .args([
            "bench",
            "generate",
            "--model",
            &model,
            "--adapter",
            &run,
            "--new-tokens",
            "4",
        ])
        .output()
        .unwrap()))
    .remove(0);
    assert!(bench["decode_tokens_per_sec"].as_f64().unwrap() > 0.0, "{bench}");
    assert!(bench["model"].as_str().unwrap().ends_with("(unmerged)"), "{bench}");

    let cmp = ok(finch()
        .args(["compare", "--model", &model, "--adapter", &run, "--adapter", &adapter])
        .args(["--prompt", "Repeat 3", "--json", "--max-new-tokens", "12"])
        .output()
        .unwrap());
    let cmp = json_lines(&cmp).remove(0);
    let answers = cmp["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0]["model"], "base");
    assert_eq!(answers[0]["text"], base["text"]);
    assert_eq!(answers[1]["text"], tuned["text"]);
    assert_eq!(answers[2]["text"], tuned["text"]);
    // Without --json in a pipe: one section per model.
    let plain = ok(finch()
        .args(["compare", "--model", &model, "--adapter", &run, "--prompt", "Repeat 3"])
        .args(["--max-new-tokens", "12"])
        .output()
        .unwrap());
    assert!(
        plain.contains("=== base [") && plain.contains(&format!("=== {run} [")),
        "{plain}"
    );

    // Held-out metrics improve with the adapter; details has one line per row.
    let details = dir.path().join("details.jsonl");
    let eval = |adapter: Option<&str>| -> serde_json::Value {
        let mut c = finch();
        c.args([
            "eval",
            "--model",
            &model,
            "--data",
            &data,
            "--metric",
            "loss,exact,rouge-l",
        ])
        .args(["--max-new-tokens", "12", "--details"])
        .arg(&details);
        if let Some(a) = adapter {
            c.args(["--adapter", a]);
        }
        json_lines(&ok(c.output().unwrap())).remove(0)
    };
    let e_base = eval(None);
    let e_tuned = eval(Some(&run));
    assert_eq!(e_tuned["rows"], 12);
    assert_eq!(std::fs::read_to_string(&details).unwrap().lines().count(), 12);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert!(f(&e_tuned, "loss") < f(&e_base, "loss"), "{e_base} vs {e_tuned}");
    assert!((f(&e_tuned, "perplexity") - f(&e_tuned, "loss").exp()).abs() < 1e-6 * f(&e_tuned, "perplexity"));
    assert!(f(&e_tuned, "rouge_l") > f(&e_base, "rouge_l"), "{e_base} vs {e_tuned}");
    assert!((0.0..=1.0).contains(&f(&e_tuned, "exact_match")));

    // Exports: the merged folder and the f16 GGUF answer like the adapted model.
    let out = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    for format in ["merged", "gguf", "peft"] {
        ok(finch()
            .args([
                "export",
                "--model",
                &model,
                "--adapter",
                &run,
                "--format",
                format,
                "--out",
                &out(format),
            ])
            .output()
            .unwrap());
    }
    assert_eq!(chat(&out("merged"), None)["text"], tuned["text"]);
    assert_eq!(
        chat(&format!("{}/model-f16.gguf", out("gguf")), None)["text"],
        tuned["text"]
    );
    assert_eq!(chat(&model, Some(&out("peft")))["text"], tuned["text"]);
    let modelfile = std::fs::read_to_string(format!("{}/Modelfile", out("gguf"))).unwrap();
    assert!(modelfile.contains("PARAMETER stop \"<|im_end|>\""), "{modelfile}");
}

#[test]
fn chat_reads_stdin_and_reports_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(Family::Qwen2).write(dir.path()).unwrap();
    let model = dir.path().to_string_lossy().into_owned();
    let mut child = finch()
        .args([
            "chat",
            "--model",
            &model,
            "--json",
            "--max-new-tokens",
            "4",
            "--system",
            "Be brief.",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\n\nsecond question\n")
        .unwrap();
    let lines = json_lines(&ok(child.wait_with_output().unwrap()));
    assert_eq!(lines.len(), 2, "one answer per non-empty line");
    assert!(
        lines[1]["prompt_tokens"].as_u64() > lines[0]["prompt_tokens"].as_u64(),
        "history is kept"
    );

    let o = finch()
        .args(["chat", "--model", &model, "--prompt", "hi", "--adapter"])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("adapter_config.json") && !err.contains("panicked"),
        "{err}"
    );
    let o = finch()
        .args(["chat", "--model", &model, "--prompt", "hi", "--top-p", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn real_model_tuned_answers_follow_the_training_format() {
    let Ok(model) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipped: FINCH_REAL_MODEL is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rows = |range: std::ops::Range<usize>| -> String {
        range
            .map(|i| {
                let row = serde_json::json!({"instruction": format!("Name a colour number {i}"), "input": "",
                    "output": format!("COLOUR: blue #{i}")});
                format!("{row}\n")
            })
            .collect()
    };
    let (train, held_out) = (dir.path().join("train.jsonl"), dir.path().join("held_out.jsonl"));
    std::fs::write(&train, rows(0..20)).unwrap();
    std::fs::write(&held_out, rows(40..46)).unwrap();
    let run = dir.path().join("run").to_string_lossy().into_owned();
    ok(finch()
        .args([
            "train",
            "--model",
            &model,
            "--data",
            train.to_str().unwrap(),
            "--out",
            &run,
        ])
        .args([
            "--steps", "20", "--rank", "8", "--alpha", "16", "--lr", "2e-3", "--batch", "2",
        ])
        .args(["--seq-len", "64", "--eval-split", "0"])
        .output()
        .unwrap());
    let cmp = ok(finch()
        .args([
            "compare",
            "--model",
            &model,
            "--adapter",
            &run,
            "--json",
            "--max-new-tokens",
            "20",
        ])
        .args(["--prompt", "Name a colour number 25"])
        .output()
        .unwrap());
    let cmp = json_lines(&cmp).remove(0);
    let (base, tuned) = (&cmp["answers"][0]["text"], &cmp["answers"][1]["text"]);
    assert!(tuned.as_str().unwrap().contains("COLOUR:"), "{cmp}");
    assert!(!base.as_str().unwrap().contains("COLOUR:"), "{cmp}");
    // `compare --quantized` swaps the adapter on one quantized model: the same two answers.
    let qcmp = json_lines(&ok(finch()
        .args(["compare", "--model", &model, "--adapter", &run, "--quantized", "--json"])
        .args(["--max-new-tokens", "20", "--prompt", "Name a colour number 25"])
        .output()
        .unwrap()))
    .remove(0);
    assert_eq!(&qcmp["answers"][0]["text"], base, "{qcmp}");
    assert_eq!(&qcmp["answers"][1]["text"], tuned, "{qcmp}");
    // The quantized path applies the same adapter unmerged and answers the same.
    let quantized = json_lines(&ok(finch()
        .args(["chat", "--model", &model, "--adapter", &run, "--quantized", "--json"])
        .args(["--max-new-tokens", "20", "--prompt", "Name a colour number 25"])
        .output()
        .unwrap()))
    .remove(0);
    assert_eq!(&quantized["text"], tuned, "{quantized}");
    let exact = |adapter: Option<&str>| -> f64 {
        let mut c = finch();
        c.args(["eval", "--model", &model, "--data", held_out.to_str().unwrap()])
            .args(["--metric", "exact", "--max-new-tokens", "20"]);
        if let Some(a) = adapter {
            c.args(["--adapter", a]);
        }
        json_lines(&ok(c.output().unwrap()))[0]["exact_match"].as_f64().unwrap()
    };
    let (e_base, e_tuned) = (exact(None), exact(Some(&run)));
    assert!(e_tuned > e_base, "exact match {e_base} -> {e_tuned}");
}
