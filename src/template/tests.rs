use super::*;
use crate::model::tiny::CHATML_TEMPLATE;

fn conversation() -> Vec<Message> {
    vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello!"),
        Message::new(Role::User, "Bye"),
    ]
}

#[test]
fn builtins_render_their_formats() {
    let msgs = conversation();
    assert_eq!(
        ChatTemplate::builtin(BuiltinTemplate::ChatMl).render(&msgs, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        ChatTemplate::builtin(BuiltinTemplate::Llama3)
            .render(&msgs[1..3], true)
            .unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let alpaca = ChatTemplate::builtin(BuiltinTemplate::Alpaca).with_special_tokens(None, Some("</s>".into()));
    assert_eq!(
        alpaca.render(&msgs[1..3], false).unwrap(),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\
         \n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
    );
    let raw = ChatTemplate::builtin(BuiltinTemplate::None);
    assert_eq!(raw.render(&msgs, false).unwrap(), "Be brief.\nHi\nHello!\nBye");
    assert_eq!(raw.render(&msgs, true).unwrap(), "Be brief.\nHi\nHello!\nBye\n");
}

#[test]
fn end_of_turn_is_detected_by_rendering() {
    assert_eq!(
        ChatTemplate::builtin(BuiltinTemplate::ChatMl).end_of_turn().as_deref(),
        Some("<|im_end|>")
    );
    assert_eq!(
        ChatTemplate::builtin(BuiltinTemplate::Llama3).end_of_turn().as_deref(),
        Some("<|eot_id|>")
    );
    // Alpaca ends a response with the model's EOS, so without one there is no marker.
    let alpaca = ChatTemplate::builtin(BuiltinTemplate::Alpaca);
    assert_eq!(alpaca.end_of_turn(), None);
    assert_eq!(
        alpaca
            .with_special_tokens(None, Some("</s>".into()))
            .end_of_turn()
            .as_deref(),
        Some("</s>")
    );
    let mistral = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}\
                   {{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}\
                   {% endif %}{% endfor %}";
    let t = ChatTemplate::new(mistral, Some("<s>".into()), Some("</s>".into())).unwrap();
    assert_eq!(t.end_of_turn().as_deref(), Some("</s>"));
    let tiny = ChatTemplate::new(CHATML_TEMPLATE, None, None).unwrap();
    assert_eq!(tiny.end_of_turn().as_deref(), Some("<|im_end|>"));
}

#[test]
fn compile_errors_name_the_line() {
    let source = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}";
    let err = ChatTemplate::new(source, None, None).unwrap_err().to_string();
    assert!(err.contains("line 3"), "{err}");
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not compile"), "{err}");
}

#[test]
fn raise_exception_surfaces_the_template_message() {
    let source = "{% if messages[0]['role'] == 'system' %}\n{{ raise_exception('System role not supported') }}\n\
                  {% endif %}ok";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let err = t.render(&conversation(), false).unwrap_err().to_string();
    assert!(err.contains("System role not supported"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert_eq!(t.render(&conversation()[1..], false).unwrap(), "ok");
}

#[test]
fn hostile_templates_are_stopped() {
    let msgs = conversation();
    // Endless work without output: the fuel budget stops it.
    let spin = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
    let err = ChatTemplate::new(spin, None, None)
        .unwrap()
        .render(&msgs, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fuel") || err.contains("ran too long"), "{err}");
    // Endless output: the size limit stops it long before memory runs out.
    let flood = "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}";
    let err = ChatTemplate::new(flood, None, None)
        .unwrap()
        .render(&msgs, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds"), "{err}");
    // Deep recursion.
    let recurse = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    assert!(ChatTemplate::new(recurse, None, None)
        .unwrap()
        .render(&msgs, false)
        .is_err());
    // No file access: include/import have no loader to read from.
    let include = "{% include '/etc/passwd' %}";
    assert!(ChatTemplate::new(include, None, None)
        .unwrap()
        .render(&msgs, false)
        .is_err());
}

#[test]
fn python_style_helpers_work() {
    let source = "{% for m in messages %}{{ m['content'].strip().upper() }}|{{ m.content.startswith('Be') }}|\
                  {% if loop.index0 == 1 %}{% break %}{% endif %}{% endfor %}{{ messages[0] | tojson }}\
                  {{ strftime_now('%Y') | length }}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let msgs = vec![
        Message::new(Role::System, "  Be brief. "),
        Message::new(Role::User, "x"),
        Message::new(Role::User, "y"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "BE BRIEF.|False|X|False|{\"role\": \"system\", \"content\": \"  Be brief. \"}4"
    );
}

/// `with_clock` pins the moment `strftime_now` formats (SmolLM3's "Today Date: " has no
/// `date_string` to set), keeps the variables and tokens, and can be set again.
#[test]
fn a_pinned_clock_fixes_strftime_now() {
    let source = "{{ bos_token }}{{ strftime_now('%d %B %Y') }}|{{ strftime_now('%d %b %Y %H:%M') }}|{{ x }}";
    let t = ChatTemplate::new(source, Some("<s>".into()), None)
        .unwrap()
        .with_variable("x", serde_json::json!(7))
        .unwrap();
    assert_eq!(t.clock(), None);
    // 2025-07-08 00:00 UTC, and a second later than 2024-02-29 23:59.
    let pinned = t.clone().with_clock(1_751_932_800).unwrap();
    assert_eq!(pinned.clock(), Some(1_751_932_800));
    assert_eq!(
        pinned.render(&[], false).unwrap(),
        "<s>08 July 2025|08 Jul 2025 00:00|7"
    );
    let again = pinned.with_clock(1_709_251_140).unwrap();
    assert_eq!(
        again.render(&[], false).unwrap(),
        "<s>29 February 2024|29 Feb 2024 23:59|7"
    );
    // Unpinned, the date is today's: not the pinned one (the test runs after 2025-07-08).
    assert!(!t.render(&[], false).unwrap().contains("08 July 2025"));
}

#[test]
fn trim_and_lstrip_blocks_match_jinja2_defaults_of_transformers() {
    // transformers renders with trim_blocks=True, lstrip_blocks=True.
    let source =
        "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(t.render(&conversation(), false).unwrap(), "U:Hi\nU:Bye\n");
}

#[test]
fn tokenizer_config_variants_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &path,
        r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_tokenizer_config(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&conversation(), false).unwrap(), "<s>D</s>");
    assert_eq!(t.bos_token(), Some("<s>"));

    std::fs::write(&path, r#"{"eos_token": "</s>"}"#).unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&path).unwrap().is_none());
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
    assert_eq!(t.render(&conversation(), false).unwrap(), "J</s>");

    std::fs::write(&path, r#"{"chat_template": 7}"#).unwrap();
    let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("found a number"),
        "{err}"
    );
    std::fs::write(&path, r#"{"chat_template": "{% if %}"}"#).unwrap();
    let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    std::fs::write(&path, "{not json").unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&path).is_err());
}

#[test]
fn values_print_like_python_jinja2() {
    // Expected output from Python: jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
    // lstrip_blocks=True).from_string(source).render(x=None)
    let source = "{{ none }}|{{ x }}|{{ 1.0 }}|{{ 2 }}|{{ true }}|{{ [1, \"a\", none] }}|{{ {\"k\": 1} }}|{{ 7 / 2 }}\
                  |{{ 7 // 2 }}|{{ \"ab\" * 2 }}|{{ 0.1 + 0.2 }}|{{ [\"it's\", \"\\n\"] }}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let msgs = conversation();
    let rendered = t.render(&msgs, false).unwrap();
    // `x` is undefined here (Python passed None): both print nothing for undefined, so the
    // second field is empty rather than "None".
    assert_eq!(
        rendered,
        "None||1.0|2|True|[1, 'a', None]|{'k': 1}|3.5|3|abab|0.30000000000000004|[\"it's\", '\\n']"
    );
}

#[test]
fn tools_reach_the_template_as_transformers_passes_them() {
    // Prints what the template receives, in the order it was written.
    let source = "{{ tools | tojson }}|{% for m in messages %}{{ m.role }}:{{ m.content }}\
                  {% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}\
                  {% if m.tool_call_id is defined %}#{{ m.tool_call_id }}{% endif %};{% endfor %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let mut tool = Message::new(Role::Tool, "sunny");
    tool.tool_call_id = Some("c1".into());
    let msgs = vec![
        Message::new(Role::User, "Weather?"),
        Message::tool_calls(
            "",
            vec![ToolCall {
                id: Some("c1".into()),
                name: "get_weather".into(),
                arguments: r#"{"z": 1, "a": [true, null, 2.5]}"#.into(),
            }],
        ),
        tool,
    ];
    let tools = r#"[{"type": "function", "function": {"name": "get_weather"}}]"#;
    assert_eq!(
        t.render_with_tools(&msgs, Some(tools), false).unwrap(),
        "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}]|user:Weather?;\
         assistant:[{\"id\": \"c1\", \"type\": \"function\", \"function\": {\"name\": \"get_weather\", \
         \"arguments\": {\"z\": 1, \"a\": [true, null, 2.5]}}}];tool:sunny#c1;"
    );
    // Without tools, `tools` is none (transformers passes tools=None), not undefined.
    assert_eq!(
        t.render_with_tools(&msgs[..1], None, false).unwrap(),
        "null|user:Weather?;"
    );
    // A template that never reads tools refuses a conversation that has them.
    let chatml = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
    assert!(!chatml.supports_tools());
    let err = chatml.render_with_tools(&msgs, None, false).unwrap_err().to_string();
    assert!(err.contains("does not support tool calls"), "{err}");
    let err = chatml
        .render_with_tools(&msgs[..1], Some(tools), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not support tool calls"), "{err}");
    // Broken JSON in the arguments is an error, not a silent empty object.
    let mut broken = msgs.clone();
    broken[1].tool_calls[0].arguments = "{oops".into();
    assert!(t.render_with_tools(&broken, Some(tools), false).is_err());
}
