//! LLaMA-Factory: `dataset_info.json` + ShareGPT files (`conversations` of `human` / `gpt`
//! turns, the system prompt in `system`), `llamafactory.yaml` (its `get_train_args` fields), and
//! `train_lf.py`, which registers the run's chat template as LLaMA-Factory template `finch` and
//! then runs LLaMA-Factory's own training entry point.
//!
//! Why a registered template rather than a built-in one: LLaMA-Factory trains everything its
//! assistant formatter writes, and its ChatML templates write `content<|im_end|>\n`, so the
//! newline after each end-of-turn marker would be trained, which Finch does not do. The `finch`
//! template moves that text to the start of the next user turn (where it is prompt, as in
//! Finch). That needs every turn before a user turn to end the same way, which holds when every
//! row starts with a system message (the template's default one is written into each row);
//! otherwise the built-in layout is used and the difference is reported.

use serde_json::json;

use super::{duration_fields, scheduler_name, yaml_lines, PreparedRun, Written};
use crate::data::{LossOn, Message, Role};
use crate::error::{Error, Result};
use crate::train::Precision;

/// The `finch` template's formatter slots: `(prefix, system, user, assistant)`, and whether the
/// layout trains exactly Finch's tokens.
pub fn template_slots(p: &PreparedRun) -> (String, String, String, String, bool) {
    let t = &p.turns;
    let all_have_system = p
        .train
        .iter()
        .chain(&p.eval)
        .all(|m| m.first().is_some_and(|m| m.role == Role::System));
    let ws = &t.after_eot;
    let shift = !ws.is_empty() && all_have_system && t.system.1.ends_with(ws.as_str());
    let user_tail = format!("{}{}", t.user.1, t.assistant_pre);
    if ws.is_empty() || shift {
        let sys_post = &t.system.1[..t.system.1.len() - ws.len()];
        (
            t.prefix.clone(),
            format!("{}{{{{content}}}}{}", t.system.0, sys_post),
            format!("{ws}{}{{{{content}}}}{user_tail}", t.user.0),
            format!("{{{{content}}}}{}", t.eot),
            true,
        )
    } else {
        (
            t.prefix.clone(),
            format!("{}{{{{content}}}}{}", t.system.0, t.system.1),
            format!("{}{{{{content}}}}{user_tail}", t.user.0),
            format!("{{{{content}}}}{}{ws}", t.eot),
            false,
        )
    }
}

fn sharegpt_row(messages: &[Message], line: usize) -> Result<serde_json::Value> {
    let (system, rest) = match messages.first() {
        Some(m) if m.role == Role::System => (Some(m.content.clone()), &messages[1..]),
        _ => (None, messages),
    };
    let mut conv = vec![];
    for (i, m) in rest.iter().enumerate() {
        let (want, tag) = if i % 2 == 0 {
            (Role::User, "human")
        } else {
            (Role::Assistant, "gpt")
        };
        if m.role != want {
            return Err(Error::Data(format!(
                "row {line}: LLaMA-Factory's ShareGPT layout needs user and assistant turns taking turns (message {} \
                 is {}); this run cannot be handed to LLaMA-Factory",
                i + 1,
                m.role.as_str()
            )));
        }
        conv.push(json!({"from": tag, "value": m.content}));
    }
    let mut row = json!({ "conversations": conv });
    if let Some(s) = system {
        row["system"] = json!(s);
    }
    Ok(row)
}

fn rows_json(rows: &[Vec<Message>]) -> Result<Vec<u8>> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .enumerate()
        .map(|(i, m)| sharegpt_row(m, i + 1))
        .collect::<Result<_>>()?;
    Ok(serde_json::to_string_pretty(&rows).unwrap_or_default().into_bytes())
}

fn py(s: &str) -> String {
    // A JSON string literal is a valid Python string literal.
    serde_json::to_string(s).unwrap_or_default()
}

pub fn write(p: &mut PreparedRun) -> Result<Written> {
    let cfg = p.cfg.clone();
    let (prefix, system, user, assistant, exact) = template_slots(p);
    if !exact {
        p.warn(format!(
            "LLaMA-Factory also trains the text after each end-of-turn marker ({:?}, one token per answer): the \
             `finch` template can only move it into the prompt when every row has a system message",
            p.turns.after_eot
        ));
    }
    let columns = json!({"messages": "conversations", "system": "system"});
    let mut info = json!({
        "finch_train": {"file_name": "train.json", "formatting": "sharegpt", "columns": columns},
    });
    let has_eval = !p.eval.is_empty();
    if has_eval {
        info["finch_eval"] = json!({"file_name": "eval.json", "formatting": "sharegpt", "columns": columns});
    }
    let (steps, epochs) = duration_fields(&cfg);
    let mut e: Vec<(&str, serde_json::Value)> = vec![
        ("# model", json!(null)),
        ("model_name_or_path", json!(p.base_model)),
        ("# method", json!(null)),
        ("stage", json!("sft")),
        ("do_train", json!(true)),
        ("finetuning_type", json!("lora")),
        ("lora_rank", json!(cfg.lora.r)),
        ("lora_alpha", json!(cfg.lora.alpha)),
        ("lora_dropout", json!(cfg.lora.dropout)),
        (
            "lora_target",
            json!(cfg
                .lora
                .targets
                .iter()
                .map(|t| t.peft_name())
                .collect::<Vec<_>>()
                .join(",")),
        ),
        ("use_rslora", json!(cfg.lora.use_rslora)),
        ("# dataset", json!(null)),
        ("dataset_dir", json!(".")),
        ("dataset", json!("finch_train")),
        ("template", json!("finch")),
        ("cutoff_len", json!(cfg.seq_len)),
        ("packing", json!(false)),
        ("mask_history", json!(cfg.loss_on == LossOn::LastTurn)),
        ("train_on_prompt", json!(cfg.loss_on == LossOn::All)),
        ("overwrite_cache", json!(true)),
        ("preprocessing_num_workers", json!(4)),
        ("# output", json!(null)),
        ("output_dir", json!("output")),
        ("logging_steps", json!(1)),
        ("plot_loss", json!(true)),
        ("overwrite_output_dir", json!(true)),
        ("report_to", json!("none")),
        ("# train", json!(null)),
        ("per_device_train_batch_size", json!(cfg.batch_size)),
        ("gradient_accumulation_steps", json!(cfg.grad_accum)),
        ("learning_rate", json!(cfg.lr)),
        (
            "lr_scheduler_type",
            json!(scheduler_name(cfg.schedule, cfg.warmup_steps)),
        ),
        ("warmup_steps", json!(cfg.warmup_steps)),
        ("weight_decay", json!(cfg.weight_decay)),
        ("adam_beta1", json!(cfg.beta1)),
        ("adam_beta2", json!(cfg.beta2)),
        ("adam_epsilon", json!(cfg.eps)),
        ("max_grad_norm", json!(cfg.max_grad_norm)),
        ("optim", json!("adamw_torch")),
        ("seed", json!(cfg.seed)),
        ("deepspeed", json!("ds_z2_config.json")),
    ];
    if steps > 0 {
        e.push(("max_steps", json!(steps)));
    } else {
        e.push(("num_train_epochs", json!(epochs)));
    }
    match cfg.precision {
        Precision::Bf16 => e.push(("bf16", json!(true))),
        Precision::F16 => e.push(("fp16", json!(true))),
        _ => {}
    }
    if cfg.save_every > 0 {
        e.push(("save_steps", json!(cfg.save_every)));
        e.push(("save_total_limit", json!(cfg.keep_checkpoints.max(1))));
    }
    if has_eval {
        e.push(("# eval", json!(null)));
        e.push(("eval_dataset", json!("finch_eval")));
        e.push(("per_device_eval_batch_size", json!(cfg.batch_size)));
        if cfg.eval_every > 0 {
            e.push(("eval_strategy", json!("steps")));
            e.push(("eval_steps", json!(cfg.eval_every)));
        } else {
            e.push(("eval_strategy", json!("no")));
            p.note("Finch evaluated only at the end; run `llamafactory-cli eval`-style evaluation after training (eval_strategy: no)");
        }
    }
    let yaml = format!(
        "# LLaMA-Factory config written by `finch export-run` from {}\n{}",
        p.run.display(),
        yaml_lines(&e)
    );
    let script = format!(
        "\"\"\"Registers the Finch run's chat template as LLaMA-Factory template `finch`, then trains.\n\n\
         Usage: torchrun --nproc_per_node N train_lf.py llamafactory.yaml\n\"\"\"\n\
         from llamafactory.data.formatter import EmptyFormatter, StringFormatter\n\
         from llamafactory.data.template import register_template\n\n\
         FINCH_TEMPLATE = dict(\n\
         \x20   name=\"finch\",\n\
         \x20   format_prefix=EmptyFormatter(slots=[{prefix}] if {prefix} else []),\n\
         \x20   format_system=StringFormatter(slots=[{system}]),\n\
         \x20   format_user=StringFormatter(slots=[{user}]),\n\
         \x20   format_assistant=StringFormatter(slots=[{assistant}]),\n\
         \x20   stop_words={stops},\n\
         \x20   replace_eos=True,\n\
         )\n\n\
         register_template(**FINCH_TEMPLATE)\n\n\
         if __name__ == \"__main__\":\n\
         \x20   from llamafactory.train.tuner import run_exp\n\n\
         \x20   run_exp()\n",
        prefix = py(&prefix),
        system = py(&system),
        user = py(&user),
        assistant = py(&assistant),
        stops = serde_json::to_string(&p.stop_words).unwrap_or_default(),
    );
    p.note("NEFTune, packing and LLaMA-Factory's other extras are off, as in Finch (which has none of them)");
    let mut files = vec![
        (
            "dataset_info.json".to_string(),
            serde_json::to_string_pretty(&info).unwrap_or_default().into_bytes(),
        ),
        ("train.json".to_string(), rows_json(&p.train)?),
        ("llamafactory.yaml".to_string(), yaml.into_bytes()),
        ("train_lf.py".to_string(), script.into_bytes()),
    ];
    if has_eval {
        files.push(("eval.json".to_string(), rows_json(&p.eval)?));
    }
    let command = "torchrun --nproc_per_node $N train_lf.py llamafactory.yaml".to_string();
    let launch = format!(
        "```sh\npip install llamafactory deepspeed\nN=8   # GPUs on this machine\n{command}\n```\n\n\
         `train_lf.py` registers the run's chat template as LLaMA-Factory template `finch` (LLaMA-Factory's own \
         ChatML templates would also train the newline after each `<|im_end|>`) and calls LLaMA-Factory's \
         `run_exp`, the function `llamafactory-cli train` runs (`FORCE_TORCHRUN=1 llamafactory-cli train` cannot \
         see a template registered outside LLaMA-Factory). The adapter lands in `output/`.\n"
    );
    Ok(Written { files, command, launch })
}
