//! Finch's exports checked with the Python tools people take them to (transformers, PEFT,
//! llama.cpp's `gguf` reader): `scripts/check_with_transformers.py` trains a short run on the
//! real model, exports it as PEFT, merged and GGUF, and compares greedy chat answers of Finch
//! and of transformers on each (plus the base model, also through `--quantized`).
//!
//! Needs `FINCH_REAL_MODEL` and `FINCH_PYTHON`, a Python with torch, transformers, peft and
//! gguf (about 5 GB, so `.ci/run` does not install it); skipped with a printed reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::process::Command;

#[test]
fn exports_load_in_transformers_and_peft_with_the_same_answers() {
    let (Ok(model), Ok(python)) = (std::env::var("FINCH_REAL_MODEL"), std::env::var("FINCH_PYTHON")) else {
        eprintln!("skipped: needs FINCH_REAL_MODEL and FINCH_PYTHON (a Python with torch, transformers, peft, gguf)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_with_transformers.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--finch", env!("CARGO_BIN_EXE_finch"), "--model", &model, "--work"])
        .arg(work.path().join("check"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .unwrap_or_else(|| panic!("no summary line; stderr:\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("\"failures\": []"), "{summary}");
    // Every comparison line matched (base ×2, Python-made adapter, peft, merged, f16, q8_0 ×2; 3 prompts each).
    let matched = stdout.lines().filter(|l| l.contains("\"same_text\": true")).count();
    assert_eq!(matched, 24, "{stdout}");
}
