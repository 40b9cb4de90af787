//! Data-side integration tests: chat-template parity with Hugging Face `transformers`, loss
//! masks under real-world templates, the broken-file corpus, the bundled demo datasets, and the
//! `finch data inspect` command.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::{Path, PathBuf};

use finch::data::load::{load_bytes, load_file, FileKind, LoadOptions};
use finch::data::tokenize::encode_example;
use finch::data::{Example, LossOn, Message, Role};
use finch::model::config::Family;
use finch::model::tiny::TinySpec;
use finch::template::ChatTemplate;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

struct Fixture {
    name: String,
    template: ChatTemplate,
    end_of_turn: String,
}

fn fixture_templates() -> Vec<Fixture> {
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("templates.json")).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let source = std::fs::read_to_string(fixtures().join(t["file"].as_str().unwrap())).unwrap();
            let token = |k: &str| t[k].as_str().map(String::from);
            let mut template = ChatTemplate::new(&source, token("bos_token"), token("eos_token"))
                .unwrap_or_else(|e| panic!("{}: {e}", t["name"]));
            // apply_chat_template keyword arguments (enable_thinking, date_string).
            for (name, value) in t["variables"].as_object().into_iter().flatten() {
                template = template.with_variable(name, value.clone()).unwrap();
            }
            // The moment `strftime_now` formats, pinned as generate_expected.py pins it (SmolLM3).
            if let Some(at) = t["strftime_now_at"].as_i64() {
                template = template.with_clock(at).unwrap();
            }
            Fixture {
                name: t["name"].as_str().unwrap().to_string(),
                template,
                end_of_turn: t["end_of_turn"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

fn messages_of(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            let mut message = Message::new(role, m["content"].as_str().unwrap());
            message.reasoning_content = m["reasoning_content"].as_str().map(String::from);
            message
        })
        .collect()
}

/// Expected strings were produced once by `transformers`' `apply_chat_template` with
/// tests/fixtures/templates/generate_expected.py; our rendering must be byte-identical, and a
/// conversation the template refuses must fail with the template's own message.
#[test]
fn template_parity_with_transformers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let templates = fixture_templates();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 5 * 6, "too few parity cases");
    let mut failures = vec![];
    for case in cases {
        if case.get("tool_conversation").is_some() {
            continue; // tool_template_parity_with_transformers
        }
        let name = case["template"].as_str().unwrap();
        let fixture = templates.iter().find(|t| t.name == name).unwrap();
        let conversation = case["conversation"].as_str().unwrap();
        let messages = messages_of(&expected["conversations"][conversation]);
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let ours = fixture.template.render(&messages, add_generation_prompt);
        match (case.get("output").and_then(Value::as_str), ours) {
            (Some(want), Ok(got)) if want == got => {}
            (Some(want), Ok(got)) => failures.push(format!(
                "{name}/{conversation}/{add_generation_prompt}:\n  want {want:?}\n  got  {got:?}"
            )),
            (Some(_), Err(e)) => failures.push(format!("{name}/{conversation}: unexpected error {e}")),
            (None, Ok(got)) => failures.push(format!("{name}/{conversation}: expected an error, got {got:?}")),
            (None, Err(e)) => {
                let want = case["error"].as_str().unwrap();
                if !e.to_string().contains(want) {
                    failures.push(format!("{name}/{conversation}: error `{e}` lacks `{want}`"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Tool-calling conversations: transformers rendered `apply_chat_template(messages, tools=tools)`
/// with dict arguments (generate_expected.py); Finch reads the same conversation from the dataset
/// line a file would hold (`finch_row`: tools and arguments as JSON text) through its own loader,
/// and must render byte-identical text, or fail with the template's own message (Llama 3.1
/// refuses parallel calls).
#[test]
fn tool_template_parity_with_transformers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let templates = fixture_templates();
    let mut checked = 0;
    let mut failures = vec![];
    for case in expected["cases"].as_array().unwrap() {
        let Some(conversation) = case.get("tool_conversation").and_then(Value::as_str) else {
            continue;
        };
        let name = case["template"].as_str().unwrap();
        let fixture = templates.iter().find(|t| t.name == name).unwrap();
        let row = expected["tool_conversations"][conversation]["finch_row"]
            .as_str()
            .unwrap();
        let report = load_bytes(row.as_bytes(), FileKind::Jsonl, &LoadOptions::default()).unwrap();
        let Example::Chat { messages, tools } = &report.rows[0].example else {
            panic!("{conversation}: not a conversation")
        };
        assert!(tools.is_some(), "{conversation}: tools were not read");
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let ours = fixture
            .template
            .render_with_tools(messages, tools.as_deref(), add_generation_prompt);
        checked += 1;
        match (case.get("output").and_then(Value::as_str), ours) {
            (Some(want), Ok(got)) if want == got => {}
            (Some(want), Ok(got)) => failures.push(format!(
                "{name}/{conversation}/{add_generation_prompt}:\n  want {want:?}\n  got  {got:?}"
            )),
            (Some(_), Err(e)) => failures.push(format!("{name}/{conversation}: unexpected error {e}")),
            (None, Ok(got)) => failures.push(format!("{name}/{conversation}: expected an error, got {got:?}")),
            (None, Err(e)) => {
                let want = case["error"].as_str().unwrap();
                if !e.to_string().contains(want) {
                    failures.push(format!("{name}/{conversation}: error `{e}` lacks `{want}`"));
                }
            }
        }
    }
    assert_eq!(checked, 4 * 4 * 2, "tool cases missing from expected.json");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn end_of_turn_markers_of_real_templates() {
    for f in fixture_templates() {
        assert_eq!(
            f.template.end_of_turn().as_deref(),
            Some(f.end_of_turn.as_str()),
            "{}",
            f.name
        );
    }
}

fn tiny_tokenizer() -> (tokenizers::Tokenizer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(Family::Llama).write(dir.path()).unwrap();
    (
        tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap(),
        dir,
    )
}

/// Under every real template, each assistant turn's trained tokens decode to its content (as the
/// template writes it, which may trim it or add an empty think block) followed by the template's
/// end-of-turn marker, and nothing else is trained.
#[test]
fn masks_follow_every_real_template() {
    let (tok, _dir) = tiny_tokenizer();
    let conversations: Vec<Vec<Message>> = vec![
        vec![
            Message::new(Role::User, "Hello!"),
            Message::new(Role::Assistant, " Hi there. "),
        ],
        vec![
            Message::new(Role::User, "Add 2 and 3."),
            Message::new(Role::Assistant, "5"),
            Message::new(Role::User, "Times 4?"),
            Message::new(Role::Assistant, "20"),
        ],
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Sky?"),
            Message::new(Role::Assistant, "Blue"),
        ],
    ];
    for f in fixture_templates() {
        for messages in &conversations {
            if f.template.render(messages, false).is_err() {
                continue; // e.g. Gemma 2 with a system message: the template refuses it
            }
            let ex = Example::Chat {
                messages: messages.clone(),
                tools: None,
            };
            let out = encode_example(&ex, &f.template, &tok, LossOn::Assistant, 4096)
                .unwrap_or_else(|e| panic!("{}: {e}", f.name));
            let mut runs: Vec<String> = vec![];
            let mut current: Vec<u32> = vec![];
            for (id, m) in out.input_ids.iter().zip(&out.loss_mask) {
                if *m {
                    current.push(*id);
                } else if !current.is_empty() {
                    runs.push(tok.decode(&current, false).unwrap());
                    current.clear();
                }
            }
            if !current.is_empty() {
                runs.push(tok.decode(&current, false).unwrap());
            }
            let answers: Vec<&Message> = messages.iter().filter(|m| m.role == Role::Assistant).collect();
            assert_eq!(runs.len(), answers.len(), "{}: {runs:?}", f.name);
            for (run, answer) in runs.iter().zip(answers) {
                assert!(run.ends_with(&f.end_of_turn), "{}: {run:?}", f.name);
                let body = run.strip_suffix(&f.end_of_turn).unwrap();
                // Qwen3's empty think block ends with two newlines, SmolLM3's with one.
                let body = body
                    .strip_prefix("<think>\n\n</think>\n\n")
                    .or_else(|| body.strip_prefix("<think>\n\n</think>\n"))
                    .unwrap_or(body);
                assert!(
                    body == answer.content
                        || body == answer.content.trim()
                        || body == format!(" {}", answer.content.trim()),
                    "{}: trained {body:?} for answer {:?}",
                    f.name,
                    answer.content
                );
            }
            // The sequence ends with the last trained marker.
            assert!(*out.loss_mask.last().unwrap(), "{}", f.name);
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

const GOOD: &str = r#"{"instruction": "Say hi", "output": "hi"}"#;

#[test]
fn broken_file_corpus_is_reported_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoadOptions::default();

    // Truncated JSON array: complete records survive, the cut one is named.
    let p = write(
        dir.path(),
        "truncated.json",
        format!("[\n{GOOD},\n{{\"instruction\": \"x\", \"output\": \"y\"}},\n{{\"instruction\": \"cut").as_bytes(),
    );
    let r = load_file(&p, &opts).unwrap();
    assert_eq!(r.rows.len(), 2);
    assert_eq!(
        (r.rejected[0].line, r.rejected[0].reason.contains("truncated")),
        (4, true)
    );

    // Truncated JSONL: the last line is cut mid-record.
    let p = write(
        dir.path(),
        "truncated.jsonl",
        format!("{GOOD}\n{{\"instruction\": \"a\", \"outp").as_bytes(),
    );
    let r = load_file(&p, &opts).unwrap();
    assert_eq!(r.summary(), "1 rows ok, 1 rejected");
    assert!(r.rejected[0].reason.starts_with("truncated JSON"), "{:?}", r.rejected);

    // Wrong types, each named by field.
    let p = write(
        dir.path(),
        "types.jsonl",
        format!("{GOOD}\n{{\"instruction\": 1, \"output\": \"x\"}}\n{{\"instruction\": \"a\", \"output\": [\"x\"]}}\n{{\"instruction\": \"a\", \"output\": \"b\", \"input\": {{}}}}\n")
            .as_bytes(),
    );
    let r = load_file(&p, &opts).unwrap();
    let got: Vec<(usize, &str, &str)> = r
        .rejected
        .iter()
        .map(|x| (x.line, x.field.as_str(), x.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "instruction", "expected a string, found a number"),
            (3, "output", "expected a string, found a list"),
            (4, "input", "expected a string, found an object")
        ]
    );

    // Binary garbage: an error that says why, never a panic.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for name in ["garbage.jsonl", "garbage.json", "garbage.csv", "garbage.parquet"] {
        let p = write(dir.path(), name, &garbage);
        let err = load_file(&p, &opts).unwrap_err().to_string();
        assert!(
            err.contains(name) && (err.contains("no usable rows") || err.contains("cannot detect")),
            "{name}: {err}"
        );
    }

    // A 10 MB single line is rejected by size without being parsed; the rest loads.
    let huge = format!("{{\"instruction\": \"{}\", \"output\": \"x\"}}", "a".repeat(10 << 20));
    let p = write(dir.path(), "huge.jsonl", format!("{GOOD}\n{huge}\n").as_bytes());
    let r = load_file(&p, &opts).unwrap();
    assert_eq!((r.rows.len(), r.rejected[0].line), (1, 2));
    assert!(
        r.rejected[0].reason.contains("longer than the limit"),
        "{:?}",
        r.rejected
    );

    // Empty files.
    for name in ["empty.jsonl", "empty.json", "empty.csv"] {
        let p = write(dir.path(), name, b"");
        let err = load_file(&p, &opts).unwrap_err().to_string();
        assert!(err.contains("empty"), "{name}: {err}");
    }

    // BOM and CRLF are invisible.
    let p = write(
        dir.path(),
        "bom_crlf.jsonl",
        format!("\u{feff}{GOOD}\r\n{{\"instruction\": \"b\", \"output\": \"c\"}}\r\n").as_bytes(),
    );
    let r = load_file(&p, &opts).unwrap();
    assert_eq!(r.summary(), "2 rows ok, 0 rejected");
    let p = write(
        dir.path(),
        "bom_crlf.csv",
        "\u{feff}instruction,output\r\nSay hi,\"hi\r\nthere\"\r\n".as_bytes(),
    );
    let r = load_file(&p, &opts).unwrap();
    assert_eq!(r.summary(), "1 rows ok, 0 rejected");
    assert_eq!(
        r.rows[0].example,
        Example::Chat {
            messages: vec![
                Message::new(Role::User, "Say hi"),
                Message::new(Role::Assistant, "hi\r\nthere")
            ],
            tools: None,
        }
    );
    let p = write(dir.path(), "bom.json", format!("\u{feff}[{GOOD}]").as_bytes());
    assert_eq!(load_file(&p, &opts).unwrap().rows.len(), 1);
}

fn demo(name: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/datasets")
        .join(name)
        .join(file)
}

#[test]
fn demo_datasets_load_cleanly_with_disjoint_held_out_rows() {
    for name in ["json_extract", "pirate_persona", "numbered_list"] {
        let train = load_file(&demo(name, "train.jsonl"), &LoadOptions::default()).unwrap();
        let heldout = load_file(&demo(name, "heldout.jsonl"), &LoadOptions::default()).unwrap();
        assert!(train.rejected.is_empty() && heldout.rejected.is_empty(), "{name}");
        assert!(train.rows.len() >= 150, "{name}: {} rows", train.rows.len());
        assert!(heldout.rows.len() >= 30, "{name}");
        let prompts = |r: &finch::data::load::LoadReport| -> Vec<String> {
            r.examples()
                .map(|e| match e {
                    Example::Chat { messages, .. } => messages[messages.len() - 2].content.clone(),
                    Example::Text { text } => text.clone(),
                    Example::Preference { prompt, .. } => prompt[prompt.len() - 1].content.clone(),
                })
                .collect()
        };
        let train_prompts = prompts(&train);
        assert!(
            prompts(&heldout).iter().all(|p| !train_prompts.contains(p)),
            "{name}: a held-out prompt occurs in training"
        );
    }
}

fn finch(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finch"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn data_inspect_prints_one_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    let data = write(
        dir.path(),
        "d.jsonl",
        format!("{GOOD}\n{GOOD}\n{{\"instruction\": \"q\"}}\n{{\"instruction\": \"Longer question\", \"output\": \"Longer answer\"}}\n")
            .as_bytes(),
    );
    let (code, stdout, stderr) = finch(&[
        "data",
        "inspect",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--seq-len",
        "40",
        "--show",
        "1",
        "--color",
        "never",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["format"], "alpaca");
    assert_eq!(
        (
            v["rows_ok"].as_u64(),
            v["rows_rejected"].as_u64(),
            v["duplicates"].as_u64()
        ),
        (Some(2), Some(2), Some(1))
    );
    assert_eq!(
        v["rejected"][0],
        serde_json::json!({"line": 2, "field": "", "reason": "duplicate of line 1"})
    );
    assert_eq!(v["rejected"][1]["field"], "output");
    // "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>": 4 specials + 24 bytes.
    assert_eq!(v["token_lengths"]["min"], 28);
    assert_eq!(v["over_seq_len"], 1);
    assert_eq!(
        v["show"]["marked"],
        "⟦<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n⟧hi<|im_end|>"
    );
    assert!(stderr.contains("2 rows ok, 2 rejected"), "{stderr}");

    // Format override and a field mapping, without a model.
    let csv = write(dir.path(), "d.csv", b"q,a\nHello,World\n");
    let (code, stdout, _) = finch(&[
        "data",
        "inspect",
        csv.to_str().unwrap(),
        "--field",
        "instruction=q",
        "--field",
        "output=a",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((v["format"].as_str(), v["rows_ok"].as_u64()), (Some("alpaca"), Some(1)));
    assert!(v.get("token_lengths").is_none());

    // An empty file is an error exit with the reason on stderr and nothing on stdout.
    let empty = write(dir.path(), "e.jsonl", b"");
    let (code, stdout, stderr) = finch(&["data", "inspect", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty() && stderr.contains("the file is empty"), "{stderr}");
}

/// Property tests for the loaders and the template renderer: no input makes them panic or
/// hang, no record is silently dropped, and every writable format round-trips. Case counts are
/// fixed so the whole module runs in a few seconds in CI (raise them with PROPTEST_CASES).
mod properties {
    use finch::data::export::write_examples;
    use finch::data::load::{load_bytes, FieldMap, FileKind, Format, LoadOptions};
    use finch::data::tokenize::encode_example;
    use finch::data::{Example, LossOn, Message, Role};
    use finch::template::{BuiltinTemplate, ChatTemplate};
    use proptest::prelude::*;

    /// 96 cases per property unless PROPTEST_CASES says otherwise (`with_cases` alone would
    /// ignore the variable).
    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(96);
        ProptestConfig::with_cases(cases)
    }

    const KINDS: [FileKind; 4] = [FileKind::Jsonl, FileKind::Json, FileKind::Csv, FileKind::Parquet];

    /// Message text: anything printable (any script, quotes, brackets, commas, newlines), never
    /// blank, and without the tiny tokenizer's special-token spellings.
    fn content() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]\\PC{0,40}(\n\\PC{0,20})?".prop_filter("no special tokens", |s| !s.contains("<|"))
    }

    /// A valid conversation: optional system prompt, then 1-3 user/assistant exchanges.
    fn conversation() -> impl Strategy<Value = Vec<Message>> {
        (
            proptest::option::of(content()),
            proptest::collection::vec((content(), content()), 1..4),
        )
            .prop_map(|(system, turns)| {
                let mut messages = vec![];
                if let Some(s) = system {
                    messages.push(Message::new(Role::System, s));
                }
                for (q, a) in turns {
                    messages.push(Message::new(Role::User, q));
                    messages.push(Message::new(Role::Assistant, a));
                }
                messages
            })
    }

    /// Records a little like real ones, then damaged: cut short, with bytes flipped or inserted.
    fn damaged_jsonl() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(conversation(), 1..6),
            any::<usize>(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        )
            .prop_map(|(convs, cut, edits)| {
                let examples: Vec<Example> = convs.into_iter().map(Example::chat).collect();
                let mut bytes =
                    write_examples(&examples, Format::Messages, FileKind::Jsonl, &FieldMap::default()).unwrap();
                for (at, b) in edits {
                    let at = at % (bytes.len() + 1);
                    bytes.insert(at, b);
                }
                bytes.truncate(cut % (bytes.len() + 1));
                bytes
            })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn loaders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for kind in KINDS {
                let _ = load_bytes(&bytes, kind, &LoadOptions::default());
            }
        }

        #[test]
        fn every_jsonl_line_is_a_row_or_a_rejection(bytes in damaged_jsonl()) {
            for kind in [FileKind::Jsonl, FileKind::Json] {
                if let Ok(report) = load_bytes(&bytes, kind, &LoadOptions::default()) {
                    prop_assert!(!report.rows.is_empty());
                    if kind == FileKind::Jsonl {
                        let lines = bytes
                            .split(|b| *b == b'\n')
                            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                            .count();
                        prop_assert_eq!(report.rows.len() + report.rejected.len(), lines);
                    }
                    for r in &report.rejected {
                        prop_assert!(r.line >= 1 && !r.reason.is_empty());
                    }
                }
            }
        }

        #[test]
        fn conversations_round_trip_through_every_format_and_file_type(
            convs in proptest::collection::vec(conversation(), 1..5)
        ) {
            let examples: Vec<Example> = convs.into_iter().map(Example::chat).collect();
            for format in [Format::Messages, Format::ShareGpt, Format::PromptCompletion] {
                for kind in [FileKind::Jsonl, FileKind::Json, FileKind::Csv] {
                    let bytes = write_examples(&examples, format, kind, &FieldMap::default()).unwrap();
                    let options = LoadOptions { format: Some(format), keep_duplicates: true, ..LoadOptions::default() };
                    let report = load_bytes(&bytes, kind, &options).unwrap();
                    prop_assert!(report.rejected.is_empty(), "{:?} {:?}: {:?}", format, kind, report.rejected);
                    let loaded: Vec<Example> = report.examples().cloned().collect();
                    prop_assert_eq!(&loaded, &examples, "{:?} {:?}", format, kind);
                }
            }
        }

        #[test]
        fn masks_train_exactly_each_answer_and_its_end_marker(messages in conversation()) {
            let (tok, _dir) = super::tiny_tokenizer();
            let template = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
            let answers: Vec<String> = messages
                .iter()
                .filter(|m| m.role == Role::Assistant)
                .map(|m| format!("{}<|im_end|>", m.content))
                .collect();
            let out = encode_example(&Example::chat(messages), &template, &tok, LossOn::Assistant, 1 << 20).unwrap();
            let mut runs: Vec<String> = vec![];
            let mut current: Vec<u32> = vec![];
            for (id, m) in out.input_ids.iter().zip(&out.loss_mask) {
                if *m {
                    current.push(*id);
                } else if !current.is_empty() {
                    runs.push(tok.decode(&current, false).unwrap());
                    current.clear();
                }
            }
            if !current.is_empty() {
                runs.push(tok.decode(&current, false).unwrap());
            }
            prop_assert_eq!(runs, answers);
        }

        #[test]
        fn template_renderer_never_panics_or_hangs(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("{% for m in messages %}"), Just("{% endfor %}"), Just("{% if m.role == 'user' %}"),
                    Just("{% elif loop.last %}"), Just("{% else %}"), Just("{% endif %}"), Just("{{ m.content }}"),
                    Just("{{ m['content'] | trim | upper }}"), Just("{% set x = messages | length %}"),
                    Just("{{ raise_exception('no') }}"), Just("{{ bos_token }}"), Just("{{ x * 3 }}"),
                    Just("{{ messages[1:] | tojson }}"), Just("{% break %}"), Just("{{ m.content.split(' ')[0] }}"),
                    Just("{% for i in range(1000) %}{% for j in range(1000) %}"), Just("{{"), Just("}}"),
                    Just("{%"), Just("text\n"), Just("{# c #}"), Just("{{ strftime_now('%Y') }}"),
                ],
                0..12,
            ),
            messages in conversation(),
        ) {
            let source: String = pieces.concat();
            if let Ok(template) = ChatTemplate::new(&source, Some("<s>".into()), Some("</s>".into())) {
                let _ = template.render(&messages, true);
                let _ = template.end_of_turn();
            }
        }
    }
}

#[test]
fn data_filter_and_split_write_jsonl_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn";
    let rows = [
        serde_json::json!({"instruction": "Describe the scene.", "output": base}),
        serde_json::json!({"instruction": "describe the scene", "output": base.to_uppercase()}),
        serde_json::json!({"instruction": "Describe the scene.", "output": base.replace("old red", "red")}),
        serde_json::json!({"instruction": "Say yes.", "output": "Yes"}),
        serde_json::json!({"instruction": "Count to three.", "output": "One, two, three."}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let data = write(dir.path(), "d.jsonl", text.as_bytes());
    let out = dir.path().join("kept.jsonl");
    let (code, stdout, stderr) = finch(&[
        "data",
        "filter",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--near-threshold",
        "0.7",
        "--min-response-chars",
        "4",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["kept"], 2, "{v}");
    assert_eq!(
        v["removed"],
        serde_json::json!({"exact_duplicates": 1, "near_duplicates": 1, "too_short": 1, "too_long": 0})
    );
    assert_eq!(v["removed_rows"][0]["line"], 2);
    assert!(v["removed_rows"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("duplicate of line 1"));
    let kept = load_file(&out, &LoadOptions::default()).unwrap();
    assert_eq!(kept.summary(), "2 rows ok, 0 rejected");

    let split_dir = dir.path().join("split");
    let args = [
        "data",
        "split",
        data.to_str().unwrap(),
        "--validation-fraction",
        "0.4",
        "--seed",
        "3",
        "--out-dir",
        split_dir.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = finch(&args);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["train"]["rows"].as_u64(), v["validation"]["rows"].as_u64()),
        (Some(3), Some(2))
    );
    let train = load_file(&split_dir.join("train.jsonl"), &LoadOptions::default()).unwrap();
    let validation = load_file(&split_dir.join("validation.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!((train.rows.len(), validation.rows.len()), (3, 2));
    // Same seed, same split.
    let first = std::fs::read(split_dir.join("validation.jsonl")).unwrap();
    assert_eq!(finch(&args).0, 0);
    assert_eq!(std::fs::read(split_dir.join("validation.jsonl")).unwrap(), first);
}

fn data_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// (line, field, reason fragment) of every rejection, for comparing with an expected list.
fn rejections(report: &finch::data::load::LoadReport) -> Vec<(usize, String, String)> {
    report
        .rejected
        .iter()
        .map(|r| (r.line, r.field.clone(), r.reason.clone()))
        .collect()
}

fn assert_rejections(report: &finch::data::load::LoadReport, expect: &[(usize, &str, &str)]) {
    let got = rejections(report);
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for ((line, field, reason), (eline, efield, ereason)) in got.iter().zip(expect) {
        assert_eq!((line, field.as_str()), (eline, *efield), "{reason}");
        assert!(reason.contains(ereason), "line {line}: `{reason}` lacks `{ereason}`");
    }
}

/// A `.txt` file is one raw-text document; training cuts it into windows of `seq_len` tokens
/// that share `text_overlap` tokens, every token trained, nothing lost at the end.
#[test]
fn raw_text_file_is_chunked_by_tokens_with_overlap() {
    use finch::data::tokenize::encode_for_training;
    let report = load_file(&data_fixtures().join("notes.txt"), &LoadOptions::default()).unwrap();
    assert_eq!(report.format.name(), "text");
    assert_eq!(report.file_kind, FileKind::Text);
    assert_eq!((report.rows.len(), report.rejected.len()), (1, 0));
    let Example::Text { text } = &report.rows[0].example else {
        panic!("a .txt file loads as raw text")
    };
    assert!(text.starts_with("Finch field notes.\n\nThe chaffinch"));

    let (tok, dir) = tiny_tokenizer();
    let template = ChatTemplate::from_tokenizer_config(dir.path()).unwrap().unwrap();
    let whole = encode_example(&report.rows[0].example, &template, &tok, LossOn::Assistant, usize::MAX).unwrap();
    // The tiny tokenizer has one token per byte: 282 bytes of text, then the `<|im_end|>` EOS.
    assert_eq!(whole.len(), 283);

    // seq_len 64, overlap 16: windows start every 48 tokens, at 0, 48, 96, 144, 192 and 240.
    let windows = encode_for_training(&report.rows[0].example, &template, &tok, LossOn::Assistant, 64, 16).unwrap();
    let lengths: Vec<usize> = windows.iter().map(|w| w.len()).collect();
    assert_eq!(lengths, [64, 64, 64, 64, 64, 43]);
    for (k, w) in windows.iter().enumerate() {
        assert!(w.loss_mask.iter().all(|m| *m), "window {k}: loss on every token");
        assert!(!w.truncated);
        assert_eq!(w.input_ids[..], whole.input_ids[48 * k..48 * k + w.len()], "window {k}");
        if k > 0 {
            assert_eq!(
                w.input_ids[..16],
                windows[k - 1].input_ids[48..64],
                "window {k} overlap"
            );
        }
    }
    // Without overlap: back to back, ceil(283 / 64) = 5 windows that concatenate to the whole.
    let windows = encode_for_training(&report.rows[0].example, &template, &tok, LossOn::Assistant, 64, 0).unwrap();
    assert_eq!(windows.len(), 5);
    let joined: Vec<u32> = windows.iter().flat_map(|w| w.input_ids.clone()).collect();
    assert_eq!(joined, whole.input_ids);
    let err = encode_for_training(&report.rows[0].example, &template, &tok, LossOn::Assistant, 64, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_overlap"), "{err}");

    // `finch data inspect` counts the windows training will use.
    let ins = finch::data::inspect::inspect(&report, Some((&tok, &template)), LossOn::Assistant, 64, 16).unwrap();
    let tokens = ins.tokens.unwrap();
    assert_eq!((tokens.text_windows, tokens.over_seq_len), (6, 0));
    assert_eq!(tokens.trained_tokens, 5 * 63 + 42);
}

/// A folder is every .txt / .md file under it, in path order; an empty file is reported with its
/// name, other files are not documents; a folder without text files is an error naming it.
#[test]
fn folder_of_text_files_loads_each_document_and_reports_empty_ones() {
    let docs = data_fixtures().join("docs");
    let report = load_file(&docs, &LoadOptions::default()).unwrap();
    assert_eq!(report.format.name(), "text");
    let texts: Vec<(usize, String)> = report
        .rows
        .iter()
        .map(|r| match &r.example {
            Example::Text { text } => (r.line, text.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        texts,
        [
            (2, "Open a dataset, pick a model, press Start.\n".to_string()),
            (
                3,
                "# Finch handbook\n\nFinch tunes small language models on your own machine.\n".to_string()
            ),
        ]
    );
    assert_rejections(&report, &[(1, "empty.md", "empty file")]);
    // A copy of a document is a duplicate that names both files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "same words").unwrap();
    std::fs::write(dir.path().join("b.md"), "same words").unwrap();
    let report = load_file(dir.path(), &LoadOptions::default()).unwrap();
    assert_rejections(&report, &[(2, "b.md", "duplicate of line 1 (a.txt)")]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.jsonl"), GOOD).unwrap();
    let err = load_file(dir.path(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("no .txt or .md files"),
        "{err}"
    );
    // An empty single file is an error, not an empty dataset.
    let empty = write(dir.path(), "empty.txt", b"  \n");
    let err = load_file(&empty, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");
    // A folder of nothing but empty files says why no row is left.
    let only_empty = dir.path().join("only_empty");
    std::fs::create_dir(&only_empty).unwrap();
    std::fs::write(only_empty.join("a.md"), "").unwrap();
    let err = load_file(&only_empty, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("a.md") && err.contains("empty file"), "{err}");
}

#[test]
fn content_parts_with_value_are_text() {
    let text = [
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi "}, {"type": "text", "text": "there"}]}, {"role": "assistant", "content": [{"type": "text", "value": "Hello"}]}]}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "value": "x.png"}]}, {"role": "assistant", "content": "A cat"}]}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "value": 7}]}, {"role": "assistant", "content": "7"}]}"#,
    ]
    .join("\n");
    let report = load_bytes(text.as_bytes(), FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(
        report.rows[0].example,
        Example::chat(vec![
            Message::new(Role::User, "Hi there"),
            Message::new(Role::Assistant, "Hello")
        ])
    );
    assert_rejections(
        &report,
        &[
            (2, "messages[0].content", "only text content parts"),
            (3, "messages[0].content", "only text content parts"),
        ],
    );
}

/// LLaMA-Factory's ShareGPT tool layout: `function_call` becomes an assistant message carrying
/// the call, `observation` a tool message, `tools` (JSON text or a list) the definitions.
#[test]
fn sharegpt_tool_calls_load_and_bad_rows_are_reported() {
    let report = load_file(&data_fixtures().join("tools_sharegpt.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(report.format.name(), "sharegpt");
    let lines: Vec<usize> = report.rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, [1, 2, 7, 9]);
    assert_rejections(
        &report,
        &[
            (3, "conversations[1].value", "expected a tool call as JSON text"),
            (
                4,
                "conversations[1].role",
                "roles out of order: `tool` where `assistant` was expected",
            ),
            (5, "conversations[1].value.name", "missing field"),
            (6, "tools", "expected a list of tools, found an object"),
            (
                8,
                "conversations[2].role",
                "roles out of order: `assistant` where `tool` was expected",
            ),
        ],
    );
    let Example::Chat { messages, tools } = &report.rows[0].example else {
        panic!()
    };
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool, Role::Assistant]);
    assert_eq!(messages[1].content, "");
    assert_eq!(messages[1].tool_calls.len(), 1);
    assert_eq!(messages[1].tool_calls[0].name, "get_weather");
    // The call was JSON text with an object inside: the object is kept as compact JSON text.
    assert_eq!(messages[1].tool_calls[0].arguments, r#"{"city":"Oslo"}"#);
    assert_eq!(messages[2].content, r#"{"temperature": -3, "condition": "snow"}"#);
    assert!(tools.as_deref().unwrap().starts_with(r#"[{"name": "get_weather""#));
    // The `system` column is the system turn; a list of tools is kept as JSON text.
    let Example::Chat { messages, tools } = &report.rows[1].example else {
        panic!()
    };
    assert_eq!(
        messages[0],
        Message::new(Role::System, "You are a helpful assistant with tools.")
    );
    let tools: Value = serde_json::from_str(tools.as_deref().unwrap()).unwrap();
    assert_eq!(tools.as_array().unwrap().len(), 2);
    // Parallel calls: one assistant message with two calls, answered by two tool messages.
    let Example::Chat { messages, .. } = &report.rows[2].example else {
        panic!()
    };
    let names: Vec<&str> = messages[1].tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["get_weather", "get_weather"]);
    assert_eq!((messages[2].role, messages[3].role), (Role::Tool, Role::Tool));
    // An empty `tools` cell means no tools.
    assert!(matches!(&report.rows[3].example, Example::Chat { tools: None, .. }));
}

/// OpenAI layout: assistant `tool_calls` (arguments as an object or JSON text, content null) and
/// the `tool` role with its `tool_call_id`.
#[test]
fn openai_tool_calls_load_and_bad_rows_are_reported() {
    let report = load_file(&data_fixtures().join("tools_openai.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(report.format.name(), "messages");
    let lines: Vec<usize> = report.rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, [1, 2]);
    assert_rejections(
        &report,
        &[
            (3, "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
            (4, "messages[0].tool_calls", "only assistant messages call tools"),
            (
                5,
                "messages[1].role",
                "roles out of order: `tool` where `assistant` was expected",
            ),
            (6, "messages[1].tool_calls[0].type", "unsupported tool call type"),
            (7, "messages[1].content", "missing field"),
            (
                8,
                "messages[1].tool_calls[0].function.arguments",
                "expected JSON text of an object, found a list",
            ),
        ],
    );
    let Example::Chat { messages, tools } = &report.rows[0].example else {
        panic!()
    };
    assert_eq!(messages[1].tool_calls[0].id.as_deref(), Some("call_1"));
    assert_eq!(messages[1].tool_calls[0].arguments, r#"{"city": "Oslo"}"#);
    assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_1"));
    // Tool definitions written as objects keep their keys in the file's order (as Python's json
    // does), so templates print them as transformers would.
    assert!(
        tools
            .as_deref()
            .unwrap()
            .starts_with(r#"[{"type":"function","function":{"name":"get_weather","description":"#),
        "{tools:?}"
    );
    let Example::Chat { messages, .. } = &report.rows[1].example else {
        panic!()
    };
    assert_eq!(messages[2].content, "Checking.");
    assert_eq!(messages[2].tool_calls[0].name, "convert_currency");
    // A `value` content part in a tool message.
    assert_eq!(messages[3], Message::new(Role::Tool, "21.7"));
}

/// Under every template that supports tools, the assistant's tool call is trained (its whole
/// call and the end-of-turn marker), the tool's result is not, and the final answer is.
#[test]
fn tool_call_masks_train_the_call_and_mask_the_result() {
    let (tok, _dir) = tiny_tokenizer();
    let report = load_file(&data_fixtures().join("tools_sharegpt.jsonl"), &LoadOptions::default()).unwrap();
    let example = &report.rows[0].example;
    let want_first = [
        (
            "qwen2.5",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
        ),
        (
            "qwen3",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
        ),
        (
            "llama3.1",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|eot_id|>",
        ),
    ];
    let templates = fixture_templates();
    for (name, first) in want_first {
        let f = templates.iter().find(|t| t.name == name).unwrap();
        let out = encode_example(example, &f.template, &tok, LossOn::Assistant, 1 << 20)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut runs: Vec<String> = vec![];
        let mut current: Vec<u32> = vec![];
        for (id, m) in out.input_ids.iter().zip(&out.loss_mask) {
            if *m {
                current.push(*id);
            } else if !current.is_empty() {
                runs.push(tok.decode(&current, false).unwrap());
                current.clear();
            }
        }
        if !current.is_empty() {
            runs.push(tok.decode(&current, false).unwrap());
        }
        assert_eq!(runs.len(), 2, "{name}: {runs:?}");
        assert_eq!(runs[0], first, "{name}");
        let answer = runs[1].strip_prefix("<think>\n\n</think>\n\n").unwrap_or(&runs[1]);
        assert_eq!(
            answer,
            format!("It is -3 °C and snowing in Oslo.{}", f.end_of_turn),
            "{name}"
        );
        // The tool result is in the sequence, masked.
        let all = tok.decode(&out.input_ids, false).unwrap();
        // (Llama 3.1 prints a string result with `tojson`, so its quotes come escaped.)
        assert!(all.contains("condition"), "{name}");
        assert!(runs.iter().all(|r| !r.contains("condition")), "{name}");
    }
}

/// A template that never reads tools (the tiny model's ChatML, SmolLM2's) refuses tool rows, and
/// `finch data inspect` lists each of them by line; rows without tools still encode.
#[test]
fn templates_without_tool_support_report_tool_rows_by_line() {
    let (tok, dir) = tiny_tokenizer();
    let template = ChatTemplate::from_tokenizer_config(dir.path()).unwrap().unwrap();
    assert!(!template.supports_tools());
    let report = load_file(&data_fixtures().join("tools_sharegpt.jsonl"), &LoadOptions::default()).unwrap();
    let err = encode_example(&report.rows[0].example, &template, &tok, LossOn::Assistant, 4096)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not support tool calls"), "{err}");
    let ins = finch::data::inspect::inspect(&report, Some((&tok, &template)), LossOn::Assistant, 4096, 0).unwrap();
    let errors: Vec<usize> = ins.tokens.unwrap().encode_errors.iter().map(|e| e.line).collect();
    assert_eq!(errors, [1, 2, 7], "line 9 has no tools and encodes");
    let smollm2 = fixture_templates().into_iter().find(|t| t.name == "smollm2").unwrap();
    assert!(!smollm2.template.supports_tools());
}

/// Saving tool-calling rows (the Data page saves JSONL) and reading them back gives the same
/// examples: calls, arguments, tool results, `tool_call_id` and tool definitions survive.
#[test]
fn tool_rows_survive_a_save_and_reload() {
    use finch::data::export::write_examples;
    use finch::data::load::{FieldMap, Format};
    for (file, format) in [
        ("tools_openai.jsonl", Format::Messages),
        ("tools_sharegpt.jsonl", Format::ShareGpt),
        ("tools_sharegpt.jsonl", Format::Messages),
    ] {
        let report = load_file(&data_fixtures().join(file), &LoadOptions::default()).unwrap();
        let examples: Vec<Example> = report.examples().cloned().collect();
        let bytes = write_examples(&examples, format, FileKind::Jsonl, &FieldMap::default()).unwrap();
        let again = load_bytes(&bytes, FileKind::Jsonl, &LoadOptions::default()).unwrap();
        assert!(again.rejected.is_empty(), "{file}: {:?}", again.rejected);
        let again: Vec<Example> = again.examples().cloned().collect();
        assert_eq!(again, examples, "{file} as {}", format.name());
    }
}

/// Qwen3 with `reasoning_content`: the template drops the reasoning of turns before the last
/// user query and shows the last turn's in a `<think>` block; the loss mask follows the rendered
/// text, so the last answer's thinking is trained and the earlier (unrendered) one is not.
#[test]
fn qwen3_reasoning_content_is_trained_only_where_the_template_keeps_it() {
    let (tok, _dir) = tiny_tokenizer();
    let qwen3 = fixture_templates().into_iter().find(|f| f.name == "qwen3").unwrap();
    let mut first = Message::new(Role::Assistant, "42");
    first.reasoning_content = Some("six sevens".into());
    let mut last = Message::new(Role::Assistant, "48");
    last.reasoning_content = Some("six eights".into());
    let ex = Example::Chat {
        messages: vec![
            Message::new(Role::User, "What is 6*7?"),
            first,
            Message::new(Role::User, "And 6*8?"),
            last,
        ],
        tools: None,
    };
    let out = encode_example(&ex, &qwen3.template, &tok, LossOn::Assistant, 4096).unwrap();
    let mut runs: Vec<String> = vec![];
    let mut current = vec![];
    for (id, m) in out.input_ids.iter().zip(&out.loss_mask) {
        if *m {
            current.push(*id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&current, false).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    assert_eq!(runs, ["42<|im_end|>", "<think>\nsix eights\n</think>\n\n48<|im_end|>"]);
    let text = tok.decode(&out.input_ids, false).unwrap();
    assert!(!text.contains("six sevens"), "{text}");
}
