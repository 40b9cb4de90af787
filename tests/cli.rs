//! End-to-end: the `finch` binary trains a tiny model from a JSONL file, writes the run folder,
//! repeats a run from its config.toml, handles Ctrl-C with a checkpoint and `--resume`, answers
//! `--probe` prompts during the run, and times a run with `--preflight` without writing anything.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::Path;
use std::process::{Command, Stdio};

use finch::model::tiny::TinySpec;
use finch::model::Family;

fn finch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch"))
}

fn write_data(path: &Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let row = if i % 3 == 0 {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Answer in capitals."},
                {"role": "user", "content": format!("word {i}")},
                {"role": "assistant", "content": format!("WORD {i}")}]})
        } else {
            serde_json::json!({"instruction": format!("Repeat {i}"), "input": "", "output": format!("REPEAT {i}!")})
        };
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let data = dir.path().join("demo.jsonl");
    write_data(&data, 30);
    let (m, d) = (
        model.to_string_lossy().into_owned(),
        data.to_string_lossy().into_owned(),
    );
    (dir, m, d)
}

fn summary(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_else(|| panic!("no stdout: {text}"));
    serde_json::from_str(last).unwrap()
}

#[test]
fn train_writes_a_complete_run_folder_and_repeats_from_its_config() {
    let (dir, model, data) = setup();
    let out = dir.path().join("runs/demo");
    let o = finch()
        .args(["train", "--model", &model, "--data", &data, "--out"])
        .arg(&out)
        .args([
            "--steps",
            "12",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--lr",
            "5e-3",
            "--batch",
            "2",
            "--seq-len",
            "64",
        ])
        .args([
            "--eval-split",
            "0.2",
            "--eval-every",
            "4",
            "--save-every",
            "5",
            "--targets",
            "q,v,gate",
        ])
        .args([
            "--schedule",
            "linear",
            "--warmup",
            "2",
            "--grad-accum",
            "2",
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let s = summary(&o.stdout);
    assert_eq!(s["steps"], 12);
    assert!(
        s["loss_last"].as_f64().unwrap() < s["loss_first"].as_f64().unwrap(),
        "{s}"
    );
    assert!(stderr.contains("tok/s") && stderr.contains("ETA"), "{stderr}");

    for f in [
        "config.toml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    assert!(out.join("checkpoints/step-10").is_dir() && out.join("checkpoints/step-12").is_dir());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 12);
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "padded_tokens",
        "padding_fraction",
        "tokens_per_sec",
        "elapsed_secs",
    ] {
        assert!(train[0].get(key).is_some(), "metrics line lacks {key}");
    }
    // The summary's padding share is the logged steps' (rows of two lengths: some padding).
    let sum = |key: &str| train.iter().map(|l| l[key].as_u64().unwrap()).sum::<u64>() as f64;
    let share = 1.0 - sum("tokens") / sum("padded_tokens");
    assert!(share > 0.0, "{s}");
    assert!(
        (s["padding_fraction"].as_f64().unwrap() - share).abs() < 1e-9,
        "{s} vs {share}"
    );
    assert!(stderr.contains(&format!("padding {:.0}%", 100.0 * share)), "{stderr}");
    assert_eq!(lines.iter().filter(|l| l["kind"] == "eval").count(), 3);
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("seed = 7") && config.contains("\"q_proj\""), "{config}");

    // The same run again from its config.toml, into another folder: identical losses.
    let out2 = dir.path().join("runs/again");
    let o2 = finch()
        .args(["train", "--config"])
        .arg(out.join("config.toml"))
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    assert!(o2.status.success(), "{}", String::from_utf8_lossy(&o2.stderr));
    let s2 = summary(&o2.stdout);
    assert_eq!(s["loss_last"], s2["loss_last"]);

    // Refuses to overwrite a run without --resume.
    let o3 = finch()
        .args(["train", "--config"])
        .arg(out.join("config.toml"))
        .output()
        .unwrap();
    assert!(!o3.status.success());
    assert!(String::from_utf8_lossy(&o3.stderr).contains("--resume"));
}

#[test]
fn ctrl_c_checkpoints_and_resume_finishes_the_run() {
    let (dir, model, data) = setup();
    let out = dir.path().join("run");
    let child = finch()
        .args(["train", "--model", &model, "--data", &data, "--out"])
        .arg(&out)
        .args([
            "--steps",
            "100000",
            "--rank",
            "4",
            "--batch",
            "2",
            "--seq-len",
            "64",
            "--eval-split",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the metrics log has steps), then press Ctrl-C.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    let s = summary(&o.stdout);
    assert_eq!(s["stopped"], true);
    let stopped_at = s["steps"].as_u64().unwrap();
    let ckpt = out.join(format!("checkpoints/step-{stopped_at}"));
    assert!(ckpt.join("adapter_model.safetensors").is_file(), "{stderr}");

    // Resume with a shorter total: it continues from the checkpoint and finishes.
    let total = stopped_at + 3;
    let o = finch()
        .args(["train", "--resume", "--out"])
        .arg(&out)
        .args(["--steps", &total.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    let s = summary(&o.stdout);
    assert_eq!(s["steps"].as_u64().unwrap(), total);
    let metrics = std::fs::read_to_string(&metrics).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>());
}

#[test]
fn bad_inputs_are_reported_not_panicked() {
    let (dir, model, data) = setup();
    let out = dir.path().join("run");
    let run = |args: &[&str]| {
        let o = finch().args(args).output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let out_s = out.to_string_lossy().into_owned();
    let e = run(&[
        "train",
        "--model",
        "/nonexistent/model",
        "--data",
        &data,
        "--out",
        &out_s,
    ]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    let e = run(&[
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out_s,
        "--targets",
        "q,zz",
    ]);
    assert!(e.contains("zz"), "{e}");
    let e = run(&["train", "--model", &model, "--data", &data, "--out", &out_s, "--lr=-1"]);
    assert!(e.contains("lr"), "{e}");
    let e = run(&["train", "--model", &model, "--data", &data]);
    assert!(e.contains("--out"), "{e}");
    let e = run(&[
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out_s,
        "--seq-len",
        "64",
        "--text-overlap",
        "64",
    ]);
    assert!(e.contains("text_overlap") && e.contains("fewer than seq_len"), "{e}");
    // The tiny model's template never reads enable_thinking: setting it would change nothing.
    let e = run(&[
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out_s,
        "--enable-thinking",
        "false",
    ]);
    assert!(e.contains("enable_thinking") && e.contains("does not read"), "{e}");
    let e = run(&["train", "--resume", "--out", &out_s, "--model", &model, "--data", &data]);
    assert!(e.contains("checkpoint"), "{e}");
}

#[test]
fn model_given_as_hub_id_is_read_from_the_hub_cache() {
    let (dir, _model, data) = setup();
    // A cache in huggingface_hub's layout holding the tiny model as `finch-test/tiny`.
    let cache = dir.path().join("hf-cache");
    let repo = cache.join("models--finch-test--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    TinySpec::new(Family::Llama)
        .write(&repo.join("snapshots").join(commit))
        .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let out = dir.path().join("run");
    let o = finch()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args(["train", "--model", "finch-test/tiny", "--data", &data, "--out"])
        .arg(&out)
        .args(["--steps", "2", "--rank", "2", "--batch", "2", "--seq-len", "32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("model = \"finch-test/tiny\""), "{cfg}");
    let adapter = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
    assert!(adapter.contains("finch-test/tiny"), "{adapter}");

    // Not cached and offline: a clear message, no panic.
    let o = finch()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args(["train", "--model", "finch-test/absent", "--data", &data, "--out"])
        .arg(dir.path().join("run2"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("finch-test/absent") && !e.contains("panicked"), "{e}");
}

#[test]
fn preflight_prints_one_json_report_and_writes_nothing() {
    let (dir, model, data) = setup();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let out = dir.path().join("runs/never");
    let o = finch()
        .args(["train", "--model", &model, "--data", &data, "--out"])
        .arg(&out)
        .args(["--steps", "20", "--rank", "2", "--batch", "2", "--seq-len", "48"])
        .args([
            "--eval-split",
            "0.2",
            "--eval-every",
            "5",
            "--probe",
            "word 3",
            "--probe-max-tokens",
            "6",
        ])
        .args(["--preflight", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(r["steps_run"], 3);
    assert_eq!(r["total_steps"], 20);
    assert_eq!(r["eval_runs"], 4);
    assert_eq!(r["probe_rounds"], 5);
    for key in ["secs_per_step", "tokens_per_sec", "peak_rss_mb", "estimated_total_secs"] {
        let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(!out.exists() && !dir.path().join("runs").exists(), "nothing written");
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(before, after);

    // Without --out, and with the default number of steps.
    let o = finch()
        .args([
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--steps",
            "8",
            "--seq-len",
            "48",
            "--preflight",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(r["steps_run"], 5);
    assert_eq!(r["total_steps"], 8);
}

#[test]
fn probe_prompts_are_answered_on_stderr_and_logged() {
    let (dir, model, data) = setup();
    let out = dir.path().join("run");
    let o = finch()
        .args(["train", "--model", &model, "--data", &data, "--out"])
        .arg(&out)
        .args([
            "--steps",
            "4",
            "--rank",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "48",
            "--eval-every",
            "2",
        ])
        .args(["--probe", "word 3", "--probe", "Repeat 7", "--probe-max-tokens", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for step in [0, 2, 4] {
        for prompt in ["word 3", "Repeat 7"] {
            let line = format!("probe at step {step}: {prompt:?} -> ");
            assert!(stderr.contains(&line), "missing `{line}` in {stderr}");
        }
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let probe_steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "probe")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(probe_steps, [0, 2, 4]);
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains("probe_prompts = [") && config.contains("\"Repeat 7\""),
        "{config}"
    );

    // A fourth prompt is refused with the limit named.
    let o = finch()
        .args(["train", "--model", &model, "--data", &data, "--out"])
        .arg(dir.path().join("run2"))
        .args(["--probe", "a", "--probe", "b", "--probe", "c", "--probe", "d"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("at most 3") && !e.contains("panicked"), "{e}");
}

#[test]
fn a_truncated_gguf_is_one_clean_error_line_even_with_rust_backtrace_set() {
    // candle attaches a backtrace to its errors when RUST_BACKTRACE is set; the user must see the
    // message (which file, what went wrong) and nothing else.
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(Family::Llama);
    let config = finch::model::ModelConfig::from_json(&spec.config_json(), Path::new("config.json")).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let weights = spec.weights().unwrap();
    finch::model::gguf::write_gguf(&gguf, &config, &weights, None, candle_core::quantized::GgmlDType::F32).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    for (name, keep) in [("header.gguf", 200), ("tensors.gguf", bytes.len() - 100)] {
        let cut = dir.path().join(name);
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let o = finch()
            .args(["chat", "--model"])
            .arg(&cut)
            .args(["--prompt", "hi"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{stderr}");
        let error_lines: Vec<&str> = stderr.lines().skip_while(|l| !l.starts_with("error:")).collect();
        assert_eq!(error_lines.len(), 1, "expected one error line, got:\n{stderr}");
        assert!(error_lines[0].contains(name), "{stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

/// A run whose estimated peak memory exceeds what the machine can give (here a budget of 1 MB
/// set with `FINCH_MEMORY_BUDGET_MB`) is refused before anything loads, in one line naming both
/// numbers and what to try; `--ignore-memory-check` starts it anyway, and
/// `--checkpoint-activations` trains and is written to the run's config.toml.
#[test]
fn a_run_that_cannot_fit_is_refused_unless_the_check_is_ignored() {
    let (dir, model, data) = setup();
    let out = dir.path().join("runs/small");
    let args = |out: &Path| {
        let mut c = finch();
        c.env("FINCH_MEMORY_BUDGET_MB", "1")
            .args(["train", "--model", &model, "--data", &data, "--out"])
            .arg(out)
            .args(["--steps", "2", "--rank", "2", "--batch", "2", "--seq-len", "48"]);
        c
    };
    let o = args(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "refused: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("needs ~"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("0.0 GB are free"), "{line}");
    assert!(
        line.contains("--checkpoint-activations") && line.contains("--ignore-memory-check"),
        "{line}"
    );
    assert!(!out.exists(), "nothing written");

    let o = args(&out)
        .args(["--ignore-memory-check", "--checkpoint-activations"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(summary(&o.stdout)["steps"], 2);
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("checkpoint_activations = true"), "{config}");
    assert!(
        !config.contains("ignore_memory_check"),
        "a decision for one start is not saved"
    );
}
