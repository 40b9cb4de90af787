//! axolotl: `train.jsonl` / `eval.jsonl` of OpenAI `messages`, and `axolotl.yml` with a
//! `type: chat_template` dataset that trains the assistant turns and each turn's end-of-turn
//! token (`roles_to_train: [assistant]`, `train_on_eos: turn`), the run's chat template given
//! inline (`chat_template: jinja`), and the run's LoRA and optimizer settings.
//!
//! axolotl's own code was not run on these files (it does not install without a GPU stack);
//! the Python check parses the YAML and checks its fields, and the template renders Finch's text.

use serde_json::json;

use super::{duration_fields, messages_json, scheduler_name, yaml_lines, yaml_value, PreparedRun, Written};
use crate::data::{LossOn, Message, Role};
use crate::error::Result;
use crate::train::Precision;

fn rows_jsonl(rows: &[Vec<Message>], loss_on: LossOn) -> Vec<u8> {
    let mut out = String::new();
    for m in rows {
        let mut msgs = messages_json(m);
        if loss_on == LossOn::LastTurn {
            // Per-message training flags (`message_field_training`): only the last answer.
            let last = m.iter().rposition(|x| x.role == Role::Assistant);
            if let Some(items) = msgs.as_array_mut() {
                for (i, item) in items.iter_mut().enumerate() {
                    item["training"] = json!(Some(i) == last);
                }
            }
        }
        out += &json!({ "messages": msgs }).to_string();
        out.push('\n');
    }
    out.into_bytes()
}

fn dataset_block(path: &str, loss_on: LossOn, split: bool) -> String {
    let roles = if loss_on == LossOn::All {
        json!(["system", "user", "assistant"])
    } else {
        json!(["assistant"])
    };
    let mut s = format!(
        "  - path: {}\n    ds_type: json\n    type: chat_template\n    field_messages: messages\n    \
         message_property_mappings: {{\"role\": \"role\", \"content\": \"content\"}}\n    roles_to_train: {}\n    \
         train_on_eos: {}\n",
        yaml_value(&json!(path)),
        yaml_value(&roles),
        if loss_on == LossOn::All { "all" } else { "turn" },
    );
    if loss_on == LossOn::LastTurn {
        s += "    message_field_training: training\n";
    }
    if split {
        s += "    split: train\n";
    }
    s
}

pub fn write(p: &mut PreparedRun) -> Result<Written> {
    let cfg = p.cfg.clone();
    let (steps, epochs) = duration_fields(&cfg);
    let mut e: Vec<(&str, serde_json::Value)> = vec![
        ("# model", json!(null)),
        ("base_model", json!(p.base_model)),
        ("chat_template", json!("jinja")),
        ("chat_template_jinja", json!(p.turns.jinja(LossOn::Assistant, false))),
        ("eot_tokens", json!(p.stop_words)),
        ("# LoRA", json!(null)),
        ("adapter", json!("lora")),
        ("lora_r", json!(cfg.lora.r)),
        ("lora_alpha", json!(cfg.lora.alpha)),
        ("lora_dropout", json!(cfg.lora.dropout)),
        (
            "lora_target_modules",
            json!(cfg.lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>()),
        ),
        ("peft_use_rslora", json!(cfg.lora.use_rslora)),
        ("# data", json!(null)),
        ("sequence_len", json!(cfg.seq_len)),
        ("sample_packing", json!(false)),
        ("pad_to_sequence_len", json!(false)),
        ("dataset_prepared_path", json!("./prepared")),
        ("# training", json!(null)),
        ("output_dir", json!("./output")),
        ("micro_batch_size", json!(cfg.batch_size)),
        ("gradient_accumulation_steps", json!(cfg.grad_accum)),
        ("learning_rate", json!(cfg.lr)),
        ("lr_scheduler", json!(scheduler_name(cfg.schedule, cfg.warmup_steps))),
        ("warmup_steps", json!(cfg.warmup_steps)),
        ("optimizer", json!("adamw_torch")),
        ("weight_decay", json!(cfg.weight_decay)),
        ("adam_beta1", json!(cfg.beta1)),
        ("adam_beta2", json!(cfg.beta2)),
        ("adam_epsilon", json!(cfg.eps)),
        ("max_grad_norm", json!(cfg.max_grad_norm)),
        ("seed", json!(cfg.seed)),
        ("logging_steps", json!(1)),
        ("bf16", json!(cfg.precision == Precision::Bf16)),
        ("fp16", json!(cfg.precision == Precision::F16)),
        ("tf32", json!(false)),
        ("deepspeed", json!("ds_z2_config.json")),
    ];
    if steps > 0 {
        e.push(("max_steps", json!(steps)));
    } else {
        e.push(("num_epochs", json!(epochs)));
    }
    if cfg.save_every > 0 {
        e.push(("save_steps", json!(cfg.save_every)));
        e.push(("save_total_limit", json!(cfg.keep_checkpoints.max(1))));
    }
    let has_eval = !p.eval.is_empty();
    if has_eval && cfg.eval_every > 0 {
        e.push(("eval_steps", json!(cfg.eval_every)));
    }
    let mut yaml = format!(
        "# axolotl config written by `finch export-run` from {}\n{}\n# datasets\ndatasets:\n{}",
        p.run.display(),
        yaml_lines(&e),
        dataset_block("train.jsonl", cfg.loss_on, false)
    );
    if has_eval {
        yaml += &format!("test_datasets:\n{}", dataset_block("eval.jsonl", cfg.loss_on, true));
    }
    p.note(
        "axolotl was not run on this export (it needs a GPU stack): the YAML's fields and the template text are \
         checked, axolotl's own masking code is not",
    );
    p.note("axolotl drops rows longer than sequence_len where Finch truncates them (none here unless noted above)");
    let mut files = vec![
        ("axolotl.yml".to_string(), yaml.into_bytes()),
        ("train.jsonl".to_string(), rows_jsonl(&p.train, cfg.loss_on)),
    ];
    if has_eval {
        files.push(("eval.jsonl".to_string(), rows_jsonl(&p.eval, cfg.loss_on)));
    }
    let command = "accelerate launch --num_processes $N -m axolotl.cli.train axolotl.yml".to_string();
    let launch = format!(
        "```sh\npip install axolotl deepspeed\nN=8   # GPUs on this machine\n{command}\n```\n\n\
         The adapter lands in `output/`.\n"
    );
    Ok(Written { files, command, launch })
}
