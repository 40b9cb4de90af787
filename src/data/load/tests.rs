use super::*;
use crate::data::export::write_examples;

fn chat(turns: &[(Role, &str)]) -> Example {
    Example::Chat {
        messages: turns.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
        tools: None,
    }
}

/// Examples each format can express, with awkward text (quotes, commas, newlines, unicode).
fn examples_for(format: Format) -> Vec<Example> {
    let single = vec![
        chat(&[
            (Role::User, "Say \"hi\", then stop."),
            (Role::Assistant, "hi,\nthere é😀"),
        ]),
        chat(&[
            (Role::System, "You are terse."),
            (Role::User, "2+2?"),
            (Role::Assistant, "4"),
        ]),
    ];
    let multi = chat(&[
        (Role::User, "a"),
        (Role::Assistant, "b"),
        (Role::User, "c"),
        (Role::Assistant, "d"),
    ]);
    match format {
        Format::Alpaca => single,
        Format::Text => vec![
            Example::Text {
                text: "plain, \"quoted\"\ntext".into(),
            },
            Example::Text { text: "second".into() },
        ],
        Format::Messages | Format::ShareGpt | Format::PromptCompletion => {
            let mut all = single;
            all.push(multi);
            all
        }
        Format::Preference => vec![
            // Plain strings (the votes.jsonl layout) with a system prompt.
            pair(
                &[(Role::System, "Be kind."), (Role::User, "Say \"hi\", then stop.")],
                "hi,\nthere é😀",
                "no",
            ),
            pair(&[(Role::User, "2+2?")], "4", "5"),
            // A multi-turn prompt: written as TRL's conversational lists.
            pair(
                &[(Role::User, "a"), (Role::Assistant, "b"), (Role::User, "c")],
                "d",
                "e",
            ),
        ],
    }
}

fn pair(prompt: &[(Role, &str)], chosen: &str, rejected: &str) -> Example {
    Example::Preference {
        prompt: prompt.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
        chosen: vec![Message::new(Role::Assistant, chosen)],
        rejected: vec![Message::new(Role::Assistant, rejected)],
        tools: None,
    }
}

#[test]
fn preference_rows_load_in_trl_llama_factory_and_votes_layouts() {
    let text = [
        // TRL, standard strings.
        r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#,
        // TRL, conversational with an explicit prompt.
        r#"{"prompt": [{"role": "user", "content": "2+3?"}], "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}"#,
        // TRL, implicit prompt: two whole conversations sharing their first messages.
        r#"{"chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+4?"}, {"role": "assistant", "content": "6"}], "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+4?"}, {"role": "assistant", "content": "7"}]}"#,
        // LLaMA-Factory: ShareGPT conversations and turn objects.
        r#"{"conversations": [{"from": "human", "value": "2+5?"}], "chosen": {"from": "gpt", "value": "7"}, "rejected": {"from": "gpt", "value": "8"}}"#,
        // Finch's votes.jsonl.
        r#"{"prompt": "2+6?", "chosen": "8", "rejected": "9", "chosen_model": "tuned", "rejected_model": "base", "system": "Be exact.", "time": "2026-11-21T17:37:04Z"}"#,
    ]
    .join("\n");
    let report = load_bytes(text.as_bytes(), FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(report.format, Format::Preference);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let got: Vec<Example> = report.examples().cloned().collect();
    assert_eq!(
        got,
        vec![
            pair(&[(Role::User, "2+2?")], "4", "5"),
            pair(&[(Role::User, "2+3?")], "5", "6"),
            pair(&[(Role::System, "S"), (Role::User, "2+4?")], "6", "7"),
            pair(&[(Role::User, "2+5?")], "7", "8"),
            pair(&[(Role::System, "Be exact."), (Role::User, "2+6?")], "8", "9"),
        ]
    );
}

#[test]
fn bad_preference_rows_are_reported_with_line_and_field() {
    let text = [
        r#"{"prompt": "ok?", "chosen": "yes", "rejected": "no"}"#,
        r#"{"prompt": "q", "chosen": "same", "rejected": "same"}"#,
        r#"{"prompt": "q", "chosen": "", "rejected": "no"}"#,
        r#"{"prompt": "q", "chosen": 3, "rejected": "no"}"#,
        r#"{"chosen": "yes", "rejected": "no"}"#,
        r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]}"#,
        r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "yes"}], "rejected": "no"}"#,
        r#"{"prompt": "q", "chosen": "yes"}"#,
        r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "yes", "rejected": "no"}"#,
    ]
    .join("\n");
    let options = LoadOptions {
        format: Some(Format::Preference),
        ..LoadOptions::default()
    };
    let report = load_bytes(text.as_bytes(), FileKind::Jsonl, &options).unwrap();
    assert_eq!(report.rows.len(), 1);
    let got: Vec<(usize, &str, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.line, r.field.as_str(), r.reason.as_str()))
        .collect();
    let expect: &[(usize, &str, &str)] = &[
        (2, "rejected", "a tie is not a preference"),
        (3, "chosen", "empty answer"),
        (4, "chosen", "expected a list of messages, found a number"),
        (5, "prompt", "missing field"),
        (6, "prompt", "missing field"),
        (7, "chosen[0].role", "roles out of order"),
        (8, "rejected", "missing field"),
        (9, "chosen[0].role", "roles out of order"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:?}");
    for ((line, field, reason), (el, ef, er)) in got.iter().zip(expect) {
        assert_eq!((line, field), (el, ef), "{reason}");
        assert!(reason.contains(er), "line {line}: {reason}");
    }
}

#[test]
fn every_format_round_trips_through_every_writable_file_type() {
    let fields = FieldMap::default();
    for format in Format::ALL {
        for kind in [FileKind::Jsonl, FileKind::Json, FileKind::Csv] {
            let examples = examples_for(format);
            let bytes = write_examples(&examples, format, kind, &fields).unwrap();
            // Detected, not told.
            let report = load_bytes(&bytes, kind, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{format:?} as {kind:?}: {e}"));
            assert_eq!(report.format, format, "{kind:?}");
            assert!(report.rejected.is_empty(), "{format:?} {kind:?}: {:?}", report.rejected);
            let loaded: Vec<Example> = report.examples().cloned().collect();
            assert_eq!(loaded, examples, "{format:?} as {kind:?}");
        }
    }
}

#[test]
fn alpaca_input_and_system_become_turns() {
    let text = br#"{"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be exact."}
{"instruction": "Count", "input": "", "output": "3"}"#;
    let report = load_bytes(text, FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(report.format, Format::Alpaca);
    assert_eq!(
        report.rows[0].example,
        chat(&[
            (Role::System, "Be exact."),
            (Role::User, "Translate\n\nchat"),
            (Role::Assistant, "cat")
        ])
    );
    assert_eq!(
        report.rows[1].example,
        chat(&[(Role::User, "Count"), (Role::Assistant, "3")])
    );
}

#[test]
fn every_kind_of_bad_row_is_reported_with_line_field_and_reason() {
    let text = [
        r#"{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}"#,
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}"#,
        r#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}"#,
        r#"{"messages": [{"role": "user", "content": "q"}]}"#,
        r#"{"messages": "not a list"}"#,
        r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}"#,
        r#"{"messages": [{"role": "narrator", "content": "q"}]}"#,
        r#"{"messages": [{"content": "q"}]}"#,
        r#"{"other": 1}"#,
        r#"[1, 2]"#,
        r#"{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}"#,
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}"#,
        r#"{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}],"#,
    ]
    .join("\n");
    let report = load_bytes(text.as_bytes(), FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.summary(), "1 rows ok, 12 rejected");
    assert_eq!(report.duplicates, 1);
    let got: Vec<(usize, &str, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.line, r.field.as_str(), r.reason.as_str()))
        .collect();
    let expect: &[(usize, &str, &str)] = &[
        (2, "messages[1].content", "empty assistant turn"),
        (3, "messages[0].role", "roles out of order"),
        (4, "messages", "does not end with an assistant turn"),
        (5, "messages", "expected a list of messages"),
        (6, "messages[0].content", "expected a string, found a number"),
        (7, "messages[0].role", "unsupported role `narrator`"),
        (8, "messages[0].role", "missing field"),
        (9, "messages", "missing field"),
        (10, "", "expected an object with fields, found a list"),
        (11, "", "duplicate of line 1"),
        (12, "messages[1].role", "system message after the start"),
        (13, "", "truncated JSON"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for ((line, field, reason), (eline, efield, ereason)) in got.iter().zip(expect) {
        assert_eq!((line, field), (eline, efield), "{reason}");
        assert!(reason.contains(ereason), "line {line}: `{reason}` lacks `{ereason}`");
    }
    let kept = load_bytes(
        text.as_bytes(),
        FileKind::Jsonl,
        &LoadOptions {
            keep_duplicates: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!((kept.rows.len(), kept.duplicates), (2, 1));
}

#[test]
fn sharegpt_and_field_mapping() {
    let text = br#"[{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]"#;
    let report = load_bytes(text, FileKind::Json, &LoadOptions::default()).unwrap();
    assert_eq!(report.format, Format::ShareGpt);
    assert_eq!(
        report.rows[0].example,
        chat(&[(Role::System, "s"), (Role::User, "q"), (Role::Assistant, "a")])
    );
    // CSV with other column names, mapped.
    let csv = b"question,answer\nWhat?,This.\n";
    let mut options = LoadOptions::default();
    assert!(load_bytes(csv, FileKind::Csv, &options)
        .unwrap_err()
        .to_string()
        .contains("fields [answer, question]"));
    options.fields.set_pair("instruction=question").unwrap();
    options.fields.set_pair("output = answer").unwrap();
    let report = load_bytes(csv, FileKind::Csv, &options).unwrap();
    assert_eq!(
        report.rows[0].example,
        chat(&[(Role::User, "What?"), (Role::Assistant, "This.")])
    );
    assert!(options.fields.set_pair("nonsense=x").is_err());
    assert!(options.fields.set_pair("output").is_err());
}

#[test]
fn explicit_format_overrides_detection() {
    // Has both `text` and `messages`: detection picks messages, the user can force text.
    let text =
        br#"{"text": "raw", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let detected = load_bytes(text, FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(detected.format, Format::Messages);
    let forced = load_bytes(
        text,
        FileKind::Jsonl,
        &LoadOptions {
            format: Some(Format::Text),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(forced.rows[0].example, Example::Text { text: "raw".into() });
}

#[test]
fn openai_content_parts_and_prompt_completion_lists() {
    let text = br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}]}
{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "c"}]}"#;
    let report = load_bytes(text, FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(
        report.rows[0].example,
        chat(&[(Role::User, "ab"), (Role::Assistant, "c")])
    );
    assert_eq!(report.rejected[0].field, "messages[0].content");
    let pc = br#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
{"prompt": "q", "completion": ""}"#;
    let report = load_bytes(pc, FileKind::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(
        report.rows[0].example,
        chat(&[(Role::System, "s"), (Role::User, "q"), (Role::Assistant, "a")])
    );
    assert_eq!(
        (report.rejected[0].field.as_str(), report.rejected[0].reason.as_str()),
        ("completion[0].content", "empty assistant turn")
    );
}

#[test]
fn empty_and_wholly_invalid_files_are_errors_that_say_why() {
    for empty in [&b""[..], b"\n\n  \n", b"\xEF\xBB\xBF"] {
        let err = load_bytes(empty, FileKind::Jsonl, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
    let err = load_bytes(b"{\"x\": 1}\n{\"y\": 2}\n", FileKind::Jsonl, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("cannot detect the dataset format"), "{err}");
    let err = load_bytes(
        b"{\"text\": \"\"}\n{\"text\": 3}\n",
        FileKind::Jsonl,
        &LoadOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("all 2 records were rejected"), "{msg}");
    assert!(msg.contains("line 1, field text: empty text"), "{msg}");
    assert!(
        msg.contains("line 2, field text: expected a string, found a number"),
        "{msg}"
    );
    let err = load_bytes(b"not json at all\n", FileKind::Jsonl, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("line 1: invalid JSON"), "{err}");
}

#[test]
fn load_file_names_the_path_and_picks_the_kind_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.csv");
    std::fs::write(&path, "text\nhello\n").unwrap();
    let report = load_file(&path, &LoadOptions::default()).unwrap();
    assert_eq!((report.file_kind, report.format), (FileKind::Csv, Format::Text));
    assert_eq!(report.rows[0].line, 2);
    // .txt and .md are raw text now; other extensions are still unknown.
    let text = dir.path().join("d.txt");
    std::fs::write(&text, "x").unwrap();
    let report = load_file(&text, &LoadOptions::default()).unwrap();
    assert_eq!((report.file_kind, report.format), (FileKind::Text, Format::Text));
    let bad = dir.path().join("d.docx");
    std::fs::write(&bad, "x").unwrap();
    let err = load_file(&bad, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("d.docx") && err.contains("unknown file type"), "{err}");
    // A text file cannot be read as another format.
    let err = load_file(
        &text,
        &LoadOptions {
            format: Some(Format::Messages),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("d.txt") && err.contains("can only be `text`"), "{err}");
    let empty = dir.path().join("e.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = load_file(&empty, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("e.jsonl") && err.contains("empty"), "{err}");
    let missing = load_file(&dir.path().join("nope.jsonl"), &LoadOptions::default()).unwrap_err();
    assert!(missing.to_string().contains("nope.jsonl"));
}
