//! The generators' rules on scripted model replies (a fake [`TextModel`]); the real pipeline
//! with a tiny random model runs end to end in tests/data_generate.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use super::backtranslate::{parse_score, read_documents, segments, Document};
use super::self_instruct::parse_tasks;
use super::*;

/// Replies with `f(prompt, call seed)`.
struct Fake<F: FnMut(&str, u64) -> String> {
    f: F,
    calls: usize,
}

impl<F: FnMut(&str, u64) -> String> TextModel for Fake<F> {
    fn reply(&mut self, messages: &[Message], opts: &GenerateOptions, _cancel: &AtomicBool) -> Result<Reply> {
        self.calls += 1;
        let prompt = &messages.last().unwrap().content;
        let text = (self.f)(prompt, opts.sampling.seed);
        Ok(Reply {
            tokens: text.split_whitespace().count(),
            text,
            truncated: false,
            cancelled: false,
        })
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }

    fn label(&self) -> String {
        "fake".into()
    }
}

fn fake<F: FnMut(&str, u64) -> String>(f: F) -> Fake<F> {
    Fake { f, calls: 0 }
}

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "winter", "candle",
    "forest", "bridge", "engine", "pepper", "castle", "violet", "anchor", "desert", "mirror", "planet", "feather",
    "harbor", "jungle", "kettle", "ladder", "meadow", "needle", "orange", "pillow", "quartz", "saddle", "thunder",
    "velvet", "walnut", "yogurt", "zipper", "basket", "copper",
];

/// Seven words picked by `seed`: unrelated instructions for different seeds.
fn salad(seed: u64) -> String {
    let mut rng = crate::rng::Rng::new(seed);
    let words: Vec<&str> = (0..7).map(|_| WORDS[rng.below(WORDS.len())]).collect();
    format!("Describe {}", words.join(" "))
}

fn seeds() -> Vec<SourceRow> {
    [
        "Write a haiku about the sea.",
        "List three uses of copper wire.",
        "Explain how a rainbow forms in the sky.",
    ]
    .iter()
    .map(|i| SourceRow {
        instruction: i.to_string(),
        input: String::new(),
        output: "An answer.".into(),
    })
    .collect()
}

/// A Self-Instruct fake: every task prompt yields a fresh instruction, plus a copy of a seed
/// and a near-copy of the fresh one (both must be dropped); answers are plain sentences.
fn self_instruct_model() -> Fake<impl FnMut(&str, u64) -> String> {
    fake(|prompt, seed| {
        if prompt.starts_with("Come up with a series of tasks") {
            let fresh = salad(seed);
            format!("Task 4: {fresh}\nTask 5: Write a haiku about the sea!\nTask 6: {fresh} please\nInput: none")
        } else {
            format!(
                "Here is what you asked for, in a few words: {}.",
                salad(seed ^ 7).to_lowercase()
            )
        }
    })
}

fn settings(count: usize) -> GenSettings {
    GenSettings {
        count: Some(count),
        batch_size: 3,
        ..GenSettings::default()
    }
}

fn collect(
    model: &mut dyn TextModel,
    settings: &GenSettings,
    out: &std::path::Path,
    cancel: &AtomicBool,
    go: impl FnOnce(&mut Run) -> Result<GenSummary>,
) -> (Result<GenSummary>, Vec<GenEvent>) {
    let mut events = vec![];
    let mut on_event = |e: GenEvent| events.push(e);
    let mut run = Run {
        model,
        settings,
        out,
        cancel,
        on_event: &mut on_event,
    };
    let summary = go(&mut run);
    (summary, events)
}

fn read_rows(path: &std::path::Path) -> Vec<GeneratedRow> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn self_instruct_keeps_no_two_instructions_over_the_rouge_bound_and_records_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.jsonl");
    let mut model = self_instruct_model();
    let cancel = AtomicBool::new(false);
    let seeds = seeds();
    let (summary, events) = collect(&mut model, &settings(6), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    });
    let summary = summary.unwrap();
    assert_eq!(summary.rows, 6);
    assert!(summary.rejected["duplicate"] >= 6, "{:?}", summary.rejected);
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 6);
    let mut all: Vec<String> = seeds.iter().map(|s| s.instruction.clone()).collect();
    for row in &rows {
        for other in &all {
            assert!(rouge_l(&row.instruction, other) < 0.7, "{} vs {other}", row.instruction);
        }
        all.push(row.instruction.clone());
        let p = &row.provenance;
        assert_eq!(p.method, Method::SelfInstruct);
        assert_eq!(p.model, "fake");
        assert!(!p.seed_rows.is_empty() && p.seed_rows.len() <= 5);
        assert!(p.seed_rows.iter().any(|s| seeds.iter().any(|x| &x.instruction == s)));
        assert_eq!(p.settings.temperature, 0.7);
        assert!(row.output.starts_with("Here is what you asked for"));
    }
    let kept_events = events.iter().filter(|e| matches!(e, GenEvent::Row { .. })).count();
    assert_eq!(kept_events, 6);
    assert!(events.iter().any(|e| matches!(
        e,
        GenEvent::Progress {
            kept: 6,
            target: Some(6),
            ..
        }
    )));
    // Same seed, same rows.
    let out2 = dir.path().join("again.jsonl");
    let mut model = self_instruct_model();
    collect(&mut model, &settings(6), &out2, &cancel, |r| {
        self_instruct::run(&seeds, r)
    })
    .0
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn self_instruct_needs_three_seeds_and_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.jsonl");
    let cancel = AtomicBool::new(false);
    let mut model = self_instruct_model();
    let two = &seeds()[..2];
    let err = collect(&mut model, &settings(3), &out, &cancel, |r| self_instruct::run(two, r))
        .0
        .unwrap_err();
    assert!(err.to_string().contains("at least 3"), "{err}");
    let no_count = GenSettings::default();
    let s = seeds();
    let err = collect(&mut model, &no_count, &out, &cancel, |r| self_instruct::run(&s, r))
        .0
        .unwrap_err();
    assert!(err.to_string().contains("count"), "{err}");
}

#[test]
fn resume_appends_to_the_count_and_keeps_the_first_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.jsonl");
    let cancel = AtomicBool::new(false);
    let seeds = seeds();
    let mut model = self_instruct_model();
    collect(&mut model, &settings(3), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    })
    .0
    .unwrap();
    let first = std::fs::read_to_string(&out).unwrap();
    assert_eq!(first.lines().count(), 3);
    let mut model = self_instruct_model();
    let (summary, _) = collect(&mut model, &settings(5), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    });
    let summary = summary.unwrap();
    assert_eq!((summary.rows_before, summary.kept, summary.rows), (3, 2, 5));
    let second = std::fs::read_to_string(&out).unwrap();
    assert!(second.starts_with(&first));
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 5);
    for (i, a) in rows.iter().enumerate() {
        for b in &rows[i + 1..] {
            assert!(rouge_l(&a.instruction, &b.instruction) < 0.7);
        }
    }
    assert!(rows[3].provenance.attempt > rows[2].provenance.attempt);
    // A run already at its count makes nothing.
    let mut model = self_instruct_model();
    let (summary, _) = collect(&mut model, &settings(5), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    });
    assert_eq!(summary.unwrap().kept, 0);
    assert_eq!(model.calls, 0);
}

#[test]
fn a_partial_last_line_is_reported_and_cut_off_and_a_bad_line_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.jsonl");
    let cancel = AtomicBool::new(false);
    let seeds = seeds();
    let mut model = self_instruct_model();
    collect(&mut model, &settings(2), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    })
    .0
    .unwrap();
    let good = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, format!("{good}{{\"instruction\": \"half a ro")).unwrap();
    let mut model = self_instruct_model();
    let (summary, events) = collect(&mut model, &settings(3), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    });
    assert_eq!(summary.unwrap().rows, 3);
    let warning = events
        .iter()
        .find_map(|e| match e {
            GenEvent::Warning { message } => Some(message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(warning.contains("line 3") && warning.contains("partial"), "{warning}");
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 3);
    assert!(std::fs::read_to_string(&out).unwrap().starts_with(&good));

    std::fs::write(&out, format!("{good}not json\n")).unwrap();
    let err = collect(&mut model, &settings(5), &out, &cancel, |r| {
        self_instruct::run(&seeds, r)
    })
    .0
    .unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
    // Another method's file is not continued.
    let err = collect(&mut model, &settings(5), &out, &cancel, |r| evol::run(&seeds, r))
        .0
        .unwrap_err();
    assert!(err.to_string().contains("line"), "{err}");
    std::fs::write(&out, &good).unwrap();
    let err = collect(&mut model, &settings(5), &out, &cancel, |r| evol::run(&seeds, r))
        .0
        .unwrap_err();
    assert!(err.to_string().contains("self-instruct"), "{err}");
}

#[test]
fn cancel_stops_between_calls_and_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.jsonl");
    let cancel = AtomicBool::new(false);
    let seeds = seeds();
    let mut model = self_instruct_model();
    let settings = settings(10);
    let mut rows_seen = 0;
    let mut on_event = |e: GenEvent| {
        if matches!(e, GenEvent::Row { .. }) {
            rows_seen += 1;
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let mut run = Run {
        model: &mut model,
        settings: &settings,
        out: &out,
        cancel: &cancel,
        on_event: &mut on_event,
    };
    let summary = self_instruct::run(&seeds, &mut run).unwrap();
    assert!(summary.cancelled);
    assert_eq!((summary.rows, rows_seen), (1, 1));
    assert_eq!(read_rows(&out).len(), 1);
}

#[test]
fn parse_tasks_reads_labelled_lists_inputs_and_bare_replies() {
    let t = parse_tasks("Task 4: Sort these numbers.\nInput: 3, 1, 2\nOutput: 1, 2, 3\n\n**Task 5:** Name a colour.\n");
    assert_eq!(t.len(), 2);
    assert_eq!(
        (t[0].instruction.as_str(), t[0].input.as_str()),
        ("Sort these numbers.", "3, 1, 2")
    );
    assert_eq!(t[1].instruction, "Name a colour.");
    let t = parse_tasks("1. First thing to do\n2) Second thing to do");
    assert_eq!(t.len(), 2);
    let t = parse_tasks("Just one instruction here\nand more text");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].instruction, "Just one instruction here");
    assert!(parse_tasks("  \n").is_empty());
}

#[test]
fn answer_and_instruction_rules() {
    let r = |text: &str, truncated| Reply {
        text: text.into(),
        truncated,
        cancelled: false,
        tokens: 0,
    };
    let reason = |text: &str, truncated| answer_problem(&r(text, truncated), "Name three fruits please").map(|p| p.0);
    assert_eq!(reason("  ", false), Some(RejectReason::EmptyAnswer));
    assert_eq!(reason("...", false), Some(RejectReason::EmptyAnswer));
    assert_eq!(
        reason("Apples, pears and plums", true),
        Some(RejectReason::OverlongAnswer)
    );
    assert_eq!(
        reason(&"the cat sat ".repeat(10), false),
        Some(RejectReason::RepetitiveAnswer)
    );
    assert_eq!(reason(&"abab".repeat(20), false), Some(RejectReason::RepetitiveAnswer));
    assert_eq!(
        reason("Name three fruits please.", false),
        Some(RejectReason::CopiedAnswer)
    );
    assert_eq!(
        reason("Sorry, I cannot help with that.", false),
        Some(RejectReason::UnusableAnswer)
    );
    assert_eq!(reason("Apples, pears and plums.", false), None);
    // A verbatim run of a longer prompt's words is a copy even when ROUGE-L against the whole
    // prompt is low; a short answer that shares a few words is not.
    let copied = |text: &str, prompt: &str| answer_problem(&r(text, false), prompt).map(|p| p.0);
    let prompt = "Rewrite this in the past tense, keeping its meaning and its tone for a young \
                  reader: The rain is coming. It is a beautiful day.";
    assert_eq!(
        copied("The rain is coming. It is a beautiful day.", prompt),
        Some(RejectReason::CopiedAnswer)
    );
    assert_eq!(copied("The rain came. It was a beautiful day.", prompt), None);
    assert_eq!(copied("The rain is coming.", "Say: the rain"), None);
    let reason = |text: &str| instruction_problem(text).map(|p| p.0);
    assert_eq!(reason(""), Some(RejectReason::NoInstruction));
    assert_eq!(reason("Hi there"), Some(RejectReason::BadInstruction));
    assert_eq!(reason("- List three things"), Some(RejectReason::BadInstruction));
    assert_eq!(reason("Draw a picture of a cat"), Some(RejectReason::UnsupportedTask));
    assert_eq!(
        reason("Summarize this audio clip for me"),
        Some(RejectReason::UnsupportedTask)
    );
    assert_eq!(reason("List three kinds of profiles"), None);
}

#[test]
fn evol_applies_the_elimination_rules_and_records_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("evol.jsonl");
    let cancel = AtomicBool::new(false);
    let rows = seeds();
    // Attempt 0 copies the prompt's words, 1 gains nothing, 2 gets a "sorry" answer, then good.
    let mut calls = 0;
    let mut model = fake(move |prompt, seed| {
        calls += 1;
        if prompt.contains("#Rewritten Prompt#") || prompt.contains("#Created Prompt#") {
            let original = prompt
                .split("#The Given Prompt#:\n")
                .nth(1)
                .or_else(|| prompt.split("#Given Prompt#:\n").nth(1))
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string();
            match calls {
                1 => format!("#Rewritten Prompt#: {original}"),
                2 => original,
                _ => format!("{} and also {}", original, salad(seed)),
            }
        } else if calls == 4 {
            "Sorry, I can't do that.".into()
        } else {
            format!("A proper answer mentioning {}.", salad(seed).to_lowercase())
        }
    });
    let settings = GenSettings {
        count: None,
        ..GenSettings::default()
    };
    let (summary, events) = collect(&mut model, &settings, &out, &cancel, |r| evol::run(&rows, r));
    let summary = summary.unwrap();
    assert_eq!(summary.rows, 3, "{summary:?}");
    assert_eq!(summary.rejected["prompt-copied"], 1);
    assert_eq!(summary.rejected["no-gain"], 1);
    assert_eq!(summary.rejected["unusable-answer"], 1);
    assert!(events.iter().any(|e| matches!(
        e,
        GenEvent::Rejected {
            reason: RejectReason::NoGain,
            ..
        }
    )));
    for row in read_rows(&out) {
        let p = &row.provenance;
        assert_eq!(p.method, Method::EvolInstruct);
        let original = p.original.as_ref().unwrap();
        assert!(row.instruction.starts_with(&original.instruction));
        assert!(evol::evolutions().contains(&p.evolution.as_deref().unwrap()));
    }
}

#[test]
fn evol_prompts_are_the_wizardlm_templates() {
    let p = evol::evol_prompt("add-constraints", "Sort a list.");
    assert!(p.contains("Prompt Rewriter") && p.contains("add one more constraints") && p.contains("Sort a list."));
    let p = evol::evol_prompt("breadth", "Sort a list.");
    assert!(p.contains("Prompt Creator") && p.ends_with("#Created Prompt#:\n"));
}

#[test]
fn parse_score_reads_ratings_robustly() {
    assert_eq!(parse_score("The answer is clear.\nScore: 4"), Some(4));
    assert_eq!(parse_score("Score: **5**"), Some(5));
    assert_eq!(parse_score("score=3/5"), Some(3));
    assert_eq!(parse_score("First score: 2. Revised.\nScore: 5"), Some(5));
    assert_eq!(parse_score("4"), Some(4));
    assert_eq!(parse_score("4/5"), Some(4));
    assert_eq!(parse_score("Score: 10"), None);
    assert_eq!(parse_score("Score: 4.5"), None);
    assert_eq!(parse_score("It is good."), None);
    assert_eq!(parse_score("Score: 0"), None);
}

#[test]
fn segments_keep_paragraphs_within_the_budget() {
    let words = |t: &str| Ok(t.split_whitespace().count());
    let text = "one two three\nfour\n\nfive six\n\n\nseven eight nine ten eleven twelve thirteen";
    let s = segments(text, 6, &words).unwrap();
    assert_eq!(
        s,
        vec![
            "one two three\nfour\n\nfive six",
            "seven eight nine ten eleven twelve",
            "thirteen"
        ]
    );
    for seg in &s {
        assert!(seg.split_whitespace().count() <= 6);
    }
}

#[test]
fn back_translation_curates_by_score_and_counts_unparseable_ratings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bt.jsonl");
    let cancel = AtomicBool::new(false);
    let docs = vec![Document {
        name: "doc.md".into(),
        text: (0..4)
            .map(|i| format!("Paragraph {i} says {} at length.", salad(i)))
            .collect::<Vec<_>>()
            .join("\n\n"),
    }];
    let mut n = 0;
    let mut model = fake(move |prompt, seed| {
        if prompt.starts_with("Below is a text") {
            format!("Instruction: \"{}\"", salad(seed))
        } else {
            n += 1;
            match n {
                1 => "Reasoning: fine.\nScore: 5".into(),
                2 => "Score: 2".into(),
                3 => "It looks great to me!".into(),
                _ => "**Score:** 4".into(),
            }
        }
    });
    let settings = GenSettings {
        segment_tokens: 16,
        ..GenSettings::default()
    };
    let (summary, _) = collect(&mut model, &settings, &out, &cancel, |r| backtranslate::run(&docs, r));
    let summary = summary.unwrap();
    assert_eq!(summary.rows, 2);
    assert_eq!(summary.rejected["low-score"], 1);
    assert_eq!(summary.rejected["unparseable-score"], 1);
    let rows = read_rows(&out);
    assert_eq!(rows[0].provenance.score, Some(5));
    assert_eq!(rows[0].provenance.segment, Some(0));
    assert_eq!(rows[1].provenance.segment, Some(3));
    assert_eq!(rows[0].provenance.document.as_deref(), Some("doc.md"));
    assert!(rows[0].output.starts_with("Paragraph 0"));
    assert!(!rows[0].instruction.starts_with("Instruction") && !rows[0].instruction.contains('"'));
}

#[test]
fn bad_documents_are_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, bytes: &[u8], want: &str| {
        let sub = dir.path().join(name.replace('.', "_"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("good.txt"), "Some good text here.").unwrap();
        let path = sub.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = read_documents(&sub).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(want) && !err.contains('\n'), "{err}");
    };
    check("blob.txt", b"abc\0\x01\x02", "binary");
    check("latin.md", b"caf\xe9 au lait", "UTF-8");
    check("empty.txt", b"  \n\n", "empty");
    check("paper.pdf", b"%PDF-1.4", ".txt, .md or .jsonl");
    check("rows.jsonl", b"{\"text\": \"ok\"}\n{\"body\": \"no\"}\n", "line 2");
    let huge = dir.path().join("huge");
    std::fs::create_dir_all(&huge).unwrap();
    let f = std::fs::File::create(huge.join("big.txt")).unwrap();
    f.set_len(backtranslate::MAX_DOCUMENT_BYTES + 1).unwrap();
    let err = read_documents(&huge).unwrap_err().to_string();
    assert!(err.contains("big.txt") && err.contains("limit"), "{err}");
    let docs = read_documents(&dir.path().join("blob_txt").join("good.txt")).unwrap();
    assert_eq!(docs.len(), 1);
}

#[test]
fn a_fixed_reply_model_answers_every_prompt_with_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let pieces = [
        "Task 4: Describe how bread rises.",
        "\nTask 5: Name two metals that conduct heat.",
    ];
    crate::model::tiny::write_fixed_reply_model(dir.path(), &pieces).unwrap();
    let mut model = LocalModel::open(&dir.path().display().to_string(), None, false).unwrap();
    let never = AtomicBool::new(false);
    for (prompt, temperature) in [
        ("Come up with a series of tasks:", 0.0),
        ("Describe how bread rises.", 1.0),
    ] {
        let settings = GenSettings {
            temperature,
            ..GenSettings::default()
        };
        let reply = model
            .reply(&[Message::new(Role::User, prompt)], &settings.options(7), &never)
            .unwrap();
        assert_eq!(reply.text, pieces.concat(), "{prompt}");
        assert!(!reply.truncated && !reply.cancelled);
    }
    assert!(crate::model::tiny::write_fixed_reply_model(dir.path(), &[]).is_err());
}
