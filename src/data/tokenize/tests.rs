use super::*;
use crate::model::config::Family;
use crate::model::tiny::TinySpec;
use crate::template::BuiltinTemplate;

/// The tiny model's tokenizer and template, written into a temp dir.
fn tiny() -> (Tokenizer, ChatTemplate, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(Family::Llama).write(dir.path()).unwrap();
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_tokenizer_config(dir.path()).unwrap().unwrap();
    (tok, template, dir)
}

/// SmolLM2's real tokenizer and template, when FINCH_REAL_MODEL points at the model folder.
fn real() -> Option<(Tokenizer, ChatTemplate)> {
    let Ok(dir) = std::env::var("FINCH_REAL_MODEL") else {
        eprintln!("skipping the real-tokenizer half: FINCH_REAL_MODEL is not set");
        return None;
    };
    let dir = std::path::PathBuf::from(dir);
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_tokenizer_config(&dir).unwrap().unwrap();
    Some((tok, template))
}

fn chat(turns: &[(Role, &str)]) -> Example {
    Example::Chat {
        messages: turns.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
        tools: None,
    }
}

fn trained_text(tok: &Tokenizer, ex: &TokenizedExample) -> String {
    let ids: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, m)| **m)
        .map(|(id, _)| *id)
        .collect();
    tok.decode(&ids, false).unwrap()
}

/// Trained tokens as maximal runs, decoded separately.
fn trained_runs(tok: &Tokenizer, ex: &TokenizedExample) -> Vec<String> {
    let mut runs = vec![];
    let mut current: Vec<u32> = vec![];
    for (id, m) in ex.input_ids.iter().zip(&ex.loss_mask) {
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
    runs
}

/// The invariants of a single-turn row: the masked tokens are exactly the prompt, the trained
/// tokens decode to the answer plus the end-of-turn marker, and that marker is the last token.
fn check_single_turn(tok: &Tokenizer, template: &ChatTemplate, eot: &str) {
    let answer = "Paris is the capital of France. It has 2,1 million people — née « Lutèce ».";
    let ex = chat(&[
        (Role::System, "You answer geography questions."),
        (Role::User, "What is the capital of France?"),
        (Role::Assistant, answer),
    ]);
    let Example::Chat { messages, .. } = &ex else {
        unreachable!()
    };
    let out = encode_example(&ex, template, tok, LossOn::Assistant, 4096).unwrap();
    let prompt = template.render(&messages[..2], true).unwrap();
    let prompt_tokens = tok.encode(prompt.as_str(), false).unwrap().get_ids().len();
    let masked = out.loss_mask.iter().filter(|m| !**m).count();
    assert_eq!(masked, prompt_tokens, "masked tokens must be exactly the prompt");
    assert!(out.loss_mask[..prompt_tokens].iter().all(|m| !m));
    assert!(out.loss_mask[prompt_tokens..].iter().all(|m| *m));
    let eot_id = tok.token_to_id(eot).unwrap();
    assert_eq!(out.input_ids.last(), Some(&eot_id));
    assert_eq!(trained_text(tok, &out), format!("{answer}{eot}"));
    assert!(!out.truncated);
    assert_eq!(out.input_ids.len(), out.loss_mask.len());
}

#[test]
fn single_turn_mask_is_the_answer_and_end_of_turn_tiny() {
    let (tok, template, _dir) = tiny();
    check_single_turn(&tok, &template, "<|im_end|>");
}

#[test]
fn single_turn_mask_is_the_answer_and_end_of_turn_real() {
    let Some((tok, template)) = real() else { return };
    check_single_turn(&tok, &template, "<|im_end|>");
    // SmolLM2 injects its default system prompt when there is none; the mask must follow it.
    let ex = chat(&[(Role::User, "Hi"), (Role::Assistant, "Hello! How can I help?")]);
    let out = encode_example(&ex, &template, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_text(&tok, &out), "Hello! How can I help?<|im_end|>");
    let full = tok.decode(&out.input_ids, false).unwrap();
    assert!(
        full.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{full}"
    );
}

fn check_multi_turn(tok: &Tokenizer, template: &ChatTemplate) {
    let ex = chat(&[
        (Role::User, "Add 2 and 3."),
        (Role::Assistant, "5"),
        (Role::User, "Now times 4."),
        (Role::Assistant, "20"),
    ]);
    let all_turns = encode_example(&ex, template, tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_runs(tok, &all_turns), vec!["5<|im_end|>", "20<|im_end|>"]);
    let last = encode_example(&ex, template, tok, LossOn::LastTurn, 4096).unwrap();
    assert_eq!(trained_runs(tok, &last), vec!["20<|im_end|>"]);
    assert_eq!(last.input_ids, all_turns.input_ids);
    let everything = encode_example(&ex, template, tok, LossOn::All, 4096).unwrap();
    assert!(everything.loss_mask.iter().all(|m| *m));
    // `All` keeps the template's trailing newline; the assistant modes cut after the last marker.
    let Example::Chat { messages, .. } = &ex else {
        unreachable!()
    };
    let full = template.render(messages, false).unwrap();
    assert_eq!(tok.decode(&everything.input_ids, false).unwrap(), full);
    assert_eq!(everything.len(), all_turns.len() + 1);
}

#[test]
fn multi_turn_masks_tiny() {
    let (tok, template, _dir) = tiny();
    check_multi_turn(&tok, &template);
}

#[test]
fn multi_turn_masks_real() {
    let Some((tok, template)) = real() else { return };
    check_multi_turn(&tok, &template);
}

#[test]
fn truncation_keeps_the_start_and_says_so() {
    let (tok, template, _dir) = tiny();
    let ex = chat(&[(Role::User, "question"), (Role::Assistant, "a long answer")]);
    let full = encode_example(&ex, &template, &tok, LossOn::Assistant, 4096).unwrap();
    let cut = encode_example(&ex, &template, &tok, LossOn::Assistant, 10).unwrap();
    assert!(cut.truncated && !full.truncated);
    assert_eq!(cut.input_ids, full.input_ids[..10]);
    assert_eq!(cut.loss_mask, full.loss_mask[..10]);
    assert!(encode_example(&ex, &template, &tok, LossOn::Assistant, 0).is_err());
}

#[test]
fn text_examples_train_everything_and_end_with_eos() {
    let (tok, template, _dir) = tiny();
    let ex = Example::Text {
        text: "Once upon a time".into(),
    };
    let out = encode_example(&ex, &template, &tok, LossOn::Assistant, 4096).unwrap();
    assert!(out.loss_mask.iter().all(|m| *m));
    assert_eq!(out.input_ids.last(), tok.token_to_id("<|im_end|>").as_ref());
    assert_eq!(tok.decode(&out.input_ids, false).unwrap(), "Once upon a time<|im_end|>");
    let raw = ChatTemplate::builtin(BuiltinTemplate::None);
    let out = encode_example(&ex, &raw, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(tok.decode(&out.input_ids, false).unwrap(), "Once upon a time");
}

#[test]
fn bos_is_added_once() {
    // A tokenizer whose post-processor prepends <|im_start|> (id 1) as a BOS, like Llama-3's.
    let (_, _, dir) = tiny();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    let tok = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(post_processor_prefix(&tok).unwrap(), vec![0]);
    let ex = chat(&[(Role::User, "q"), (Role::Assistant, "a")]);
    // A template that does not render the BOS gets it prepended (masked) ...
    let chatml = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
    let out = encode_example(&ex, &chatml, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(&out.input_ids[..2], &[0, 1]);
    assert!(!out.loss_mask[0]);
    assert_eq!(trained_text(&tok, &out), "a<|im_end|>");
    // ... and one that renders it does not get a second one.
    let with_bos = ChatTemplate::new(
        &format!("{{{{ bos_token }}}}{}", crate::model::tiny::CHATML_TEMPLATE),
        Some("<|endoftext|>".into()),
        Some("<|im_end|>".into()),
    )
    .unwrap();
    let out = encode_example(&ex, &with_bos, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(&out.input_ids[..2], &[0, 1]);
    assert_eq!(out.input_ids.iter().filter(|id| **id == 0).count(), 1);
}

#[test]
fn other_templates_train_their_own_markers() {
    let (tok, _, _dir) = tiny();
    let ex = chat(&[(Role::User, "q"), (Role::Assistant, "  the answer  ")]);
    // Llama-3 trims content; the trained text is the trimmed content and <|eot_id|>, which the
    // tiny tokenizer spells out byte by byte (it is not one of its specials).
    let llama = ChatTemplate::builtin(BuiltinTemplate::Llama3);
    let out = encode_example(&ex, &llama, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_text(&tok, &out), "the answer<|eot_id|>");
    let raw = ChatTemplate::builtin(BuiltinTemplate::None).with_special_tokens(None, Some("<|endoftext|>".into()));
    let out = encode_example(&ex, &raw, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_text(&tok, &out), "  the answer  <|endoftext|>");
    assert_eq!(
        tok.decode(&out.input_ids, false).unwrap(),
        "q\n  the answer  <|endoftext|>"
    );
}

#[test]
fn templates_that_rewrite_history_fall_back_to_search() {
    let (tok, _, _dir) = tiny();
    // Numbers each turn with the total count, so a shorter prefix never renders as a prefix.
    let source = "{% for m in messages %}<|im_start|>{{ m.role }} {{ loop.length }}\n{{ m.content }}<|im_end|>\n\
                  {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let ex = chat(&[
        (Role::User, "q1"),
        (Role::Assistant, "a1"),
        (Role::User, "q2"),
        (Role::Assistant, "a2"),
    ]);
    let out = encode_example(&ex, &t, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_runs(&tok, &out), vec!["a1<|im_end|>", "a2<|im_end|>"]);
    // A template that drops the assistant's words cannot be aligned: an error, not a bad mask.
    let lossy = "{% for m in messages %}{{ m.role }}<|im_end|>{% endfor %}";
    let t = ChatTemplate::new(lossy, None, None).unwrap();
    let err = encode_example(&ex, &t, &tok, LossOn::Assistant, 4096)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot align"), "{err}");
}

#[test]
fn conversations_without_assistant_are_errors_unless_training_everything() {
    let (tok, template, _dir) = tiny();
    let ex = chat(&[(Role::User, "only a question")]);
    let err = encode_example(&ex, &template, &tok, LossOn::Assistant, 4096)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no assistant message"), "{err}");
    let out = encode_example(&ex, &template, &tok, LossOn::All, 4096).unwrap();
    assert!(out.loss_mask.iter().all(|m| *m) && !out.is_empty());
    assert!(encode_example(&chat(&[]), &template, &tok, LossOn::All, 16).is_err());
}

#[test]
fn trimmed_offsets_of_space_tokens_stay_on_the_right_side_of_the_span() {
    // A byte-level post-processor with trim_offsets shrinks a lone space token to an empty range
    // at its end; spaces just before and just inside an answer must still land correctly.
    let (_, _, dir) = tiny();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap()).unwrap();
    json["post_processor"] =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tok = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
    let enc = tok.encode("a b", false).unwrap();
    assert_eq!(
        enc.get_offsets()[1],
        (2, 2),
        "the space token's range is trimmed to empty"
    );
    let source =
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}<|im_end|>{% endif %}\n\
                  {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let ex = chat(&[(Role::User, "q  q"), (Role::Assistant, " x  y ")]);
    let out = encode_example(&ex, &t, &tok, LossOn::Assistant, 4096).unwrap();
    assert_eq!(trained_text(&tok, &out), " x  y <|im_end|>");
    let Example::Chat { messages, .. } = &ex else {
        unreachable!()
    };
    let prompt = t.render(&messages[..1], true).unwrap();
    assert!(prompt.ends_with("assistant: "), "{prompt:?}");
    let prompt_tokens = tok.encode(prompt.as_str(), false).unwrap().get_ids().len();
    assert_eq!(out.loss_mask.iter().filter(|m| !**m).count(), prompt_tokens);
}

#[test]
fn chunk_ranges_cover_the_text_with_the_asked_overlap() {
    use super::chunk_ranges;
    assert_eq!(chunk_ranges(5, 8, 2).unwrap(), vec![0..5]);
    assert_eq!(chunk_ranges(8, 8, 2).unwrap(), vec![0..8]);
    assert_eq!(chunk_ranges(9, 8, 2).unwrap(), [0..8, 6..9]);
    assert_eq!(chunk_ranges(20, 8, 0).unwrap(), [0..8, 8..16, 16..20]);
    // 1 + ceil((100 - 10) / 7) = 14 windows, the last one ending at the end.
    let w = chunk_ranges(100, 10, 3).unwrap();
    assert_eq!(w.len(), 14);
    assert_eq!(w.last(), Some(&(91..100)));
    assert!(w.windows(2).all(|p| p[0].end - p[1].start == 3));
    assert!(chunk_ranges(10, 4, 4).is_err());
    assert!(chunk_ranges(10, 0, 0).is_err());
}

/// A preference pair renders `prompt + chosen` and `prompt + rejected` whole; only the answer
/// (content and end-of-turn marker) is trained, not the assistant turn inside the prompt; both
/// sequences share the prompt's tokens; the chosen side is what inspection shows.
fn check_preference(tok: &Tokenizer, template: &ChatTemplate) {
    let msg = |r: Role, c: &str| Message::new(r, c);
    let pair = Example::Preference {
        prompt: vec![
            msg(Role::User, "first question"),
            msg(Role::Assistant, "first answer"),
            msg(Role::User, "second question"),
        ],
        chosen: vec![msg(Role::Assistant, "good answer")],
        rejected: vec![msg(Role::Assistant, "bad reply here")],
        tools: None,
    };
    let (chosen, rejected) = encode_preference(&pair, template, tok, LossOn::Assistant, 4096).unwrap();
    let marker = template.end_of_turn().unwrap();
    assert_eq!(trained_runs(tok, &chosen), [format!("good answer{marker}")]);
    assert_eq!(trained_runs(tok, &rejected), [format!("bad reply here{marker}")]);
    let prompt_len = chosen.loss_mask.iter().position(|m| *m).unwrap();
    assert_eq!(prompt_len, rejected.loss_mask.iter().position(|m| *m).unwrap());
    assert_eq!(chosen.input_ids[..prompt_len], rejected.input_ids[..prompt_len]);
    assert_eq!(
        encode_example(&pair, template, tok, LossOn::Assistant, 4096).unwrap(),
        chosen
    );
    // Truncation cuts each side to seq_len.
    let (c, r) = encode_preference(&pair, template, tok, LossOn::Assistant, prompt_len + 1).unwrap();
    assert!(c.truncated && r.truncated && c.len() == prompt_len + 1);
    // A supervised row is not a pair.
    let err = encode_preference(
        &chat(&[(Role::User, "q"), (Role::Assistant, "a")]),
        template,
        tok,
        LossOn::Assistant,
        64,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a preference pair"), "{err}");
}

#[test]
fn preference_pairs_train_only_their_answers_tiny() {
    let (tok, template, _dir) = tiny();
    check_preference(&tok, &template);
}

#[test]
fn preference_pairs_train_only_their_answers_real() {
    let Some((tok, template)) = real() else { return };
    check_preference(&tok, &template);
}
