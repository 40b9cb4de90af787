//! `finch export-run` / `finch import-adapter` on a run of a tiny model: each target's files hold
//! the run's settings and exactly the rows Finch trained on, the exported chat template and
//! LLaMA-Factory's segment layout reproduce Finch's token ids and loss masks, and an adapter
//! brought back becomes a run that answers like the original; bad adapter folders are one-line
//! errors naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use finch::data::tokenize::encode_example;
use finch::data::{LossOn, Message, Role, TokenizedExample};
use finch::export::handoff::{
    export_run, import_adapter, llamafactory, prepare, HandoffRequest, ImportRequest, Target,
};
use finch::generate::{generate, with_adapter, GenerateOptions, LoadedModel};
use finch::model::tiny::TinySpec;
use finch::model::Family;
use finch::template::ChatTemplate;
use finch::train::TrainConfig;
use serde_json::{json, Value};

fn rows(with_system_everywhere: bool) -> String {
    let mut text = String::new();
    for i in 0..16 {
        let sys = if with_system_everywhere || i % 3 == 0 {
            vec![json!({"role": "system", "content": "Answer in capitals."})]
        } else {
            vec![]
        };
        let mut msgs = sys;
        msgs.push(json!({"role": "user", "content": format!("word {i}")}));
        msgs.push(json!({"role": "assistant", "content": format!("WORD {i}")}));
        if i % 4 == 1 {
            msgs.push(json!({"role": "user", "content": "again"}));
            msgs.push(json!({"role": "assistant", "content": format!("AGAIN {i}!")}));
        }
        text += &json!({ "messages": msgs }).to_string();
        text.push('\n');
    }
    text
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: String,
    run: PathBuf,
}

/// A tiny model and a 2-step run on it (the `finch` binary, so the run folder is a real one).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = root.join("model");
    TinySpec::new(Family::Llama).write(&model).unwrap();
    std::fs::write(root.join("data.jsonl"), rows(false)).unwrap();
    std::fs::write(root.join("data_sys.jsonl"), rows(true)).unwrap();
    let run = root.join("runs/demo");
    let o = Command::new(env!("CARGO_BIN_EXE_finch"))
        .current_dir(&root)
        .args([
            "train",
            "--model",
            "model",
            "--data",
            "data.jsonl",
            "--out",
            "runs/demo",
        ])
        .args([
            "--steps", "2", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--batch", "2",
        ])
        .args([
            "--grad-accum",
            "2",
            "--seq-len",
            "256",
            "--eval-split",
            "0.25",
            "--eval-every",
            "1",
        ])
        .args([
            "--warmup",
            "1",
            "--schedule",
            "linear",
            "--seed",
            "7",
            "--targets",
            "q,v,down",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Fixture {
        model: std::fs::canonicalize(&model).unwrap().to_string_lossy().into_owned(),
        _dir: dir,
        root,
        run,
    }
}

/// Runs `f` with the working directory at `dir` (the run's relative paths resolve there).
/// Tests in this file that change directory take this lock.
fn in_dir<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir).unwrap();
    let out = f();
    std::env::set_current_dir(before).unwrap();
    out
}

/// Finch's tokenization of the run's training rows (same split, rows without trained tokens
/// skipped).
fn finch_tokens(cfg: &TrainConfig) -> Vec<TokenizedExample> {
    let (files, template) = finch::train::run::open_model(&cfg.model).unwrap();
    let rows = finch::train::run::load_rows(Path::new(&cfg.data), &mut |_| {}).unwrap();
    let split = finch::data::split::train_validation_split(rows.len(), cfg.eval_split as f32, cfg.seed).unwrap();
    let (train, _) = finch::data::split::apply_split(&rows, &split);
    train
        .iter()
        .map(|r| encode_example(&r.example, &template, &files.tokenizer, cfg.loss_on, cfg.seq_len).unwrap())
        .filter(|t| t.trained_tokens() > 0)
        .collect()
}

/// Token ids and loss mask of `text` whose trained character spans are `spans`, tokenized whole.
fn tokenize_with_spans(tok: &tokenizers::Tokenizer, text: &str, spans: &[(usize, usize)]) -> (Vec<u32>, Vec<bool>) {
    let enc = tok.encode(text, false).unwrap();
    let mask = enc
        .get_offsets()
        .iter()
        .map(|&(s, e)| {
            spans
                .iter()
                .any(|&(a, b)| if s == e { s > a && s <= b } else { s < b && e > a })
        })
        .collect();
    (enc.get_ids().to_vec(), mask)
}

/// Renders `messages` with a chat template holding `{% generation %}` markers: the text, and the
/// spans inside the markers.
fn render_marked(template_src: &str, messages: &[Message]) -> (String, Vec<(usize, usize)>) {
    let src = template_src
        .replace("{% generation %}", "{{ '\u{E000}' }}")
        .replace("{% endgeneration %}", "{{ '\u{E001}' }}");
    let marked = ChatTemplate::new(&src, None, None)
        .unwrap()
        .render(messages, false)
        .unwrap();
    let (mut text, mut spans, mut start) = (String::new(), vec![], 0);
    for c in marked.chars() {
        match c {
            '\u{E000}' => start = text.len(),
            '\u{E001}' => spans.push((start, text.len())),
            c => text.push(c),
        }
    }
    (text, spans)
}

fn messages_of(v: &Value) -> Vec<Message> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The top-level `key: value` pairs of a YAML file written by the export (JSON scalars).
fn yaml_map(path: &Path) -> serde_json::Map<String, Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(": "))
        .filter_map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            serde_json::from_str(v).ok().map(|v| (k.to_string(), v))
        })
        .collect()
}

fn export(f: &Fixture, run: &Path, target: Target) -> finch::export::handoff::Handoff {
    in_dir(&f.root, || {
        export_run(&HandoffRequest {
            run: run.to_path_buf(),
            target,
            out: f.root.join(format!(
                "out-{}-{}",
                run.file_name().unwrap().to_string_lossy(),
                target.name()
            )),
            base_model: None,
        })
        .unwrap()
    })
}

#[test]
fn every_target_carries_the_runs_rows_settings_and_token_masks() {
    let f = fixture();
    let cfg = TrainConfig::from_toml_file(&f.run.join("config.toml")).unwrap();
    let (files, _) = finch::train::run::open_model(&f.model).unwrap();
    let finch = in_dir(&f.root, || finch_tokens(&cfg));
    assert!(finch.len() >= 10, "{} rows", finch.len());

    // TRL: config values, rows, and the exported template's generation spans == Finch's mask.
    let h = export(&f, &f.run, Target::Trl);
    for name in [
        "train.jsonl",
        "eval.jsonl",
        "chat_template.jinja",
        "trl_config.json",
        "train_trl.py",
        "accelerate_zero2.yaml",
        "accelerate_fsdp.yaml",
        "ds_z2_config.json",
        "README.md",
        "finch_tokens.jsonl",
    ] {
        assert!(h.files.contains(&name.to_string()), "{name} missing: {:?}", h.files);
    }
    let c: Value = serde_json::from_str(&std::fs::read_to_string(h.out.join("trl_config.json")).unwrap()).unwrap();
    let sft = &c["sft"];
    assert_eq!(c["model"], json!(f.model));
    assert_eq!(
        (
            sft["learning_rate"].as_f64(),
            sft["max_steps"].as_u64(),
            sft["warmup_steps"].as_u64()
        ),
        (Some(5e-3), Some(2), Some(1))
    );
    assert_eq!(
        (
            sft["per_device_train_batch_size"].as_u64(),
            sft["gradient_accumulation_steps"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!((sft["max_length"].as_u64(), sft["seed"].as_u64()), (Some(256), Some(7)));
    assert_eq!(sft["lr_scheduler_type"], "linear");
    assert_eq!(
        (sft["assistant_only_loss"].as_bool(), sft["packing"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        (c["lora"]["r"].as_u64(), c["lora"]["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    assert_eq!(c["lora"]["target_modules"], json!(["q_proj", "v_proj", "down_proj"]));
    let template = std::fs::read_to_string(h.out.join("chat_template.jinja")).unwrap();
    let exported = jsonl(&h.out.join("train.jsonl"));
    assert_eq!(exported.len(), finch.len());
    assert_eq!(h.train_rows, finch.len());
    assert!(h.eval_rows > 0);
    for (row, want) in exported.iter().zip(&finch) {
        let (text, spans) = render_marked(&template, &messages_of(row));
        let (ids, mask) = tokenize_with_spans(&files.tokenizer, &text, &spans);
        let n = want.input_ids.len();
        assert_eq!(ids[..n], want.input_ids[..], "{text:?}");
        assert_eq!(mask[..n], want.loss_mask[..], "{text:?}");
        assert!(
            mask[n..].iter().all(|m| !m),
            "nothing after Finch's last token is trained"
        );
    }
    let reference = jsonl(&h.out.join("finch_tokens.jsonl"));
    assert_eq!(reference[0]["input_ids"], json!(finch[0].input_ids));
    assert!(h.warnings.iter().any(|w| w.contains("warm-up")), "{:?}", h.warnings);
    let readme = std::fs::read_to_string(h.out.join("README.md")).unwrap();
    assert!(
        readme.contains("## Not carried over") && readme.contains("accelerate launch"),
        "{readme}"
    );

    // axolotl: the same rows and settings in its fields.
    let h = export(&f, &f.run, Target::Axolotl);
    let y = yaml_map(&h.out.join("axolotl.yml"));
    assert_eq!(
        (
            y["lora_r"].as_u64(),
            y["lora_alpha"].as_f64(),
            y["sequence_len"].as_u64()
        ),
        (Some(4), Some(8.0), Some(256))
    );
    assert_eq!(
        (
            y["micro_batch_size"].as_u64(),
            y["gradient_accumulation_steps"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(
        (y["learning_rate"].as_f64(), y["max_steps"].as_u64(), y["seed"].as_u64()),
        (Some(5e-3), Some(2), Some(7))
    );
    assert_eq!(y["lora_target_modules"], json!(["q_proj", "v_proj", "down_proj"]));
    assert_eq!(y["sample_packing"], json!(false));
    let yml = std::fs::read_to_string(h.out.join("axolotl.yml")).unwrap();
    assert!(
        yml.contains("type: chat_template")
            && yml.contains("roles_to_train: [\"assistant\"]")
            && yml.contains("train_on_eos: turn"),
        "{yml}"
    );
    let ax_rows = jsonl(&h.out.join("train.jsonl"));
    assert_eq!(ax_rows, exported, "axolotl and TRL rows are the same conversations");
    let inline = y["chat_template_jinja"].as_str().unwrap();
    let plain = ChatTemplate::new(inline, None, None).unwrap();
    for (row, want) in ax_rows.iter().zip(&finch) {
        let text = plain.render(&messages_of(row), false).unwrap();
        let ids = files.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids[..want.input_ids.len()], want.input_ids[..]);
    }

    // LLaMA-Factory on rows without a system message: the built-in layout, and a loud warning.
    let h = export(&f, &f.run, Target::LlamaFactory);
    assert!(
        h.warnings.iter().any(|w| w.contains("LLaMA-Factory also trains")),
        "{:?}",
        h.warnings
    );
    let y = yaml_map(&h.out.join("llamafactory.yaml"));
    assert_eq!(
        (
            y["lora_rank"].as_u64(),
            y["lora_alpha"].as_f64(),
            y["cutoff_len"].as_u64()
        ),
        (Some(4), Some(8.0), Some(256))
    );
    assert_eq!(
        (
            y["learning_rate"].as_f64(),
            y["max_steps"].as_u64(),
            y["warmup_steps"].as_u64()
        ),
        (Some(5e-3), Some(2), Some(1))
    );
    assert_eq!(
        (
            y["per_device_train_batch_size"].as_u64(),
            y["gradient_accumulation_steps"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(y["lora_target"], json!("q_proj,v_proj,down_proj"));
    assert_eq!(
        (y["template"].as_str(), y["stage"].as_str()),
        (Some("finch"), Some("sft"))
    );
    let info: Value = serde_json::from_str(&std::fs::read_to_string(h.out.join("dataset_info.json")).unwrap()).unwrap();
    assert_eq!(info["finch_train"]["formatting"], "sharegpt");
}

/// LLaMA-Factory encodes each turn pair as a prompt segment (masked) and an answer segment
/// (trained), tokenized one by one; with the `finch` template's slots that equals Finch's ids
/// and mask when every row has a system message.
#[test]
fn llamafactory_segments_reproduce_finch_ids_and_mask() {
    let f = fixture();
    // A second run folder: the same settings on data where every row has a system message.
    let run = f.root.join("runs/sys");
    std::fs::create_dir_all(&run).unwrap();
    let mut cfg = TrainConfig::from_toml_file(&f.run.join("config.toml")).unwrap();
    cfg.data = "data_sys.jsonl".into();
    std::fs::write(run.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
    let (files, _) = finch::train::run::open_model(&f.model).unwrap();
    let finch = in_dir(&f.root, || finch_tokens(&cfg));
    let p = in_dir(&f.root, || prepare(&run, None).unwrap());
    let (prefix, system, user, assistant, exact) = llamafactory::template_slots(&p);
    assert!(exact);
    let h = export(&f, &run, Target::LlamaFactory);
    assert!(
        !h.warnings.iter().any(|w| w.contains("LLaMA-Factory also trains")),
        "{:?}",
        h.warnings
    );
    let script = std::fs::read_to_string(h.out.join("train_lf.py")).unwrap();
    assert!(script.contains("register_template") && script.contains(&serde_json::to_string(&assistant).unwrap()));
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(h.out.join("train.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), finch.len());
    let enc = |s: &str| files.tokenizer.encode(s, false).unwrap().get_ids().to_vec();
    for (row, want) in rows.iter().zip(&finch) {
        let conv = row["conversations"].as_array().unwrap();
        let (mut ids, mut mask) = (vec![], vec![]);
        for (i, pair) in conv.chunks(2).enumerate() {
            let mut source = String::new();
            if i == 0 {
                source += &prefix;
                source += &system.replace("{{content}}", row["system"].as_str().unwrap());
            }
            source += &user.replace("{{content}}", pair[0]["value"].as_str().unwrap());
            let target = assistant.replace("{{content}}", pair[1]["value"].as_str().unwrap());
            let (s, t) = (enc(&source), enc(&target));
            mask.extend(std::iter::repeat_n(false, s.len()).chain(std::iter::repeat_n(true, t.len())));
            ids.extend(s.into_iter().chain(t));
        }
        assert_eq!(ids, want.input_ids);
        assert_eq!(mask, want.loss_mask);
    }
    // LossOn::LastTurn maps to mask_history; rows Finch truncated are a loud warning.
    let mut last = cfg.clone();
    last.loss_on = LossOn::LastTurn;
    last.seq_len = 58;
    let run2 = f.root.join("runs/last");
    std::fs::create_dir_all(&run2).unwrap();
    std::fs::write(run2.join("config.toml"), last.to_toml().unwrap()).unwrap();
    let h = export(&f, &run2, Target::LlamaFactory);
    assert_eq!(yaml_map(&h.out.join("llamafactory.yaml"))["mask_history"], json!(true));
    assert!(
        h.warnings.iter().any(|w| w.contains("longer than seq_len = 58")),
        "{:?}",
        h.warnings
    );
}

fn greedy(model: &finch::model::Transformer, loaded: &LoadedModel) -> Vec<u32> {
    let prompt = loaded
        .format
        .encode_prompt(&[Message::new(Role::User, "word 3")])
        .unwrap();
    let opts = GenerateOptions {
        sampling: finch::generate::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_new_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    generate(
        model,
        &loaded.format,
        &prompt,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap()
    .token_ids
}

#[test]
fn an_exported_adapter_imports_as_a_run_with_the_same_answers_and_bad_folders_name_the_field() {
    let f = fixture();
    let peft = f.root.join("peft");
    finch::export::export_peft(&f.run.join("adapter"), &peft).unwrap();
    std::fs::write(
        peft.join("trainer_state.json"),
        json!({"max_steps": 2, "log_history": [{"step": 1, "loss": 3.5, "learning_rate": 0.005},
                                               {"step": 2, "loss": 3.0, "learning_rate": 0.0025}]})
        .to_string(),
    )
    .unwrap();
    let runs = f.root.join("runs");
    let imported = in_dir(&f.root, || {
        import_adapter(&ImportRequest {
            dir: peft.clone(),
            name: Some("back".into()),
            runs_dir: runs.clone(),
            model: None,
            fallback_model: None,
        })
        .unwrap()
    });
    assert_eq!((imported.rank, imported.logged_steps), (4, 2));
    let history = finch::train::history::RunHistory::read(&imported.run).unwrap();
    assert_eq!(history.loss, vec![[1.0, 3.5], [2.0, 3.0]]);
    assert!(history.has_adapter());
    assert!(finch::train::history::RunHistory::scan(&runs)
        .iter()
        .any(|r| r.name == "back"));
    let loaded = LoadedModel::open(&f.model).unwrap();
    let original = greedy(&with_adapter(&loaded.model, &f.run).unwrap(), &loaded);
    let back = greedy(&with_adapter(&loaded.model, &imported.run).unwrap(), &loaded);
    assert_eq!(original, back);
    assert_eq!(original.len(), 12);

    // Bad folders: one line naming the field.
    let bad = |edit: &dyn Fn(&mut Value), name: &str| -> String {
        let dir = f.root.join(format!("bad-{name}"));
        finch::export::export_peft(&peft, &dir).unwrap();
        let p = dir.join("adapter_config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
        let err = in_dir(&f.root, || {
            import_adapter(&ImportRequest {
                dir: dir.clone(),
                name: Some(name.into()),
                runs_dir: runs.clone(),
                model: None,
                fallback_model: None,
            })
            .unwrap_err()
            .to_string()
        });
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!runs.join(name).exists(), "a failed import writes no run");
        err
    };
    assert!(bad(&|v| v["use_dora"] = json!(true), "dora").contains("field `use_dora`"));
    assert!(bad(&|v| v["modules_to_save"] = json!(["lm_head"]), "mts").contains("field `modules_to_save`"));
    assert!(bad(&|v| v["rank_pattern"] = json!({"q_proj": 2}), "rp").contains("field `rank_pattern`"));
    assert!(bad(&|v| v["r"] = json!(8), "rank").contains("field `r`"));
    assert!(bad(
        &|v| v["target_modules"] = json!(["q_proj", "v_proj", "down_proj", "k_proj"]),
        "tm"
    )
    .contains("k_proj"));
    let err = bad(&|v| v["base_model_name_or_path"] = json!("/nowhere/model"), "base");
    assert!(
        err.contains("field `base_model_name_or_path`") && err.contains("--model"),
        "{err}"
    );
}
