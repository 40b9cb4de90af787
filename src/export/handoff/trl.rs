//! TRL: `train.jsonl` / `eval.jsonl` of conversational `messages` rows, `chat_template.jinja`
//! (the run's template with `{% generation %}` around each trained span, so SFTTrainer's
//! `assistant_only_loss` masks exactly Finch's tokens), `trl_config.json` (the keyword arguments of
//! `SFTConfig` and PEFT's `LoraConfig`), `train_trl.py` (SFTTrainer on them) and accelerate
//! configs for DeepSpeed ZeRO-2 and FSDP.

use serde_json::json;

use super::{duration_fields, messages_json, scheduler_name, PreparedRun, Written};
use crate::data::{LossOn, Message};
use crate::error::Result;
use crate::train::Precision;

fn rows_jsonl(rows: &[Vec<Message>]) -> Vec<u8> {
    let mut out = String::new();
    for m in rows {
        out += &json!({ "messages": messages_json(m) }).to_string();
        out.push('\n');
    }
    out.into_bytes()
}

/// `trl_config.json`: `{"model", "sft": SFTConfig kwargs, "lora": LoraConfig kwargs}`.
pub fn config_json(p: &PreparedRun) -> serde_json::Value {
    let cfg = &p.cfg;
    let (steps, epochs) = duration_fields(cfg);
    let has_eval = !p.eval.is_empty();
    let mut sft = json!({
        "output_dir": "output",
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.lr,
        "lr_scheduler_type": scheduler_name(cfg.schedule, cfg.warmup_steps),
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "adam_beta1": cfg.beta1,
        "adam_beta2": cfg.beta2,
        "adam_epsilon": cfg.eps,
        "max_grad_norm": cfg.max_grad_norm,
        "optim": "adamw_torch",
        "seed": cfg.seed,
        "max_length": cfg.seq_len,
        "packing": false,
        "assistant_only_loss": cfg.loss_on != LossOn::All,
        "completion_only_loss": false,
        "chat_template_path": "chat_template.jinja",
        "logging_steps": 1,
        "report_to": "none",
        "bf16": cfg.precision == Precision::Bf16,
        "fp16": cfg.precision == Precision::F16,
        "eval_strategy": if has_eval && cfg.eval_every > 0 { "steps" } else { "no" },
    });
    if steps > 0 {
        sft["max_steps"] = json!(steps);
    } else {
        sft["num_train_epochs"] = json!(epochs);
    }
    if has_eval && cfg.eval_every > 0 {
        sft["eval_steps"] = json!(cfg.eval_every);
    }
    if cfg.save_every > 0 {
        sft["save_steps"] = json!(cfg.save_every);
        sft["save_total_limit"] = json!(cfg.keep_checkpoints.max(1));
    }
    json!({
        "model": p.base_model,
        "sft": sft,
        "lora": {
            "r": cfg.lora.r,
            "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout,
            "target_modules": cfg.lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
            "use_rslora": cfg.lora.use_rslora,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        },
    })
}

const SCRIPT: &str = r#""""TRL SFTTrainer on a Finch run's data and settings (written by `finch export-run --to trl`).

Usage: accelerate launch --num_processes N train_trl.py
       accelerate launch --config_file accelerate_zero2.yaml --num_processes N train_trl.py
"""
import json
from pathlib import Path

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

HERE = Path(__file__).resolve().parent


def main():
    cfg = json.loads((HERE / "trl_config.json").read_text())
    sft = dict(cfg["sft"])
    sft["output_dir"] = str(HERE / sft["output_dir"])
    sft["chat_template_path"] = str(HERE / sft["chat_template_path"])
    files = {"train": str(HERE / "train.jsonl")}
    if (HERE / "eval.jsonl").is_file():
        files["eval"] = str(HERE / "eval.jsonl")
    data = load_dataset("json", data_files=files)
    trainer = SFTTrainer(
        model=cfg["model"],
        args=SFTConfig(**sft),
        train_dataset=data["train"],
        eval_dataset=data["eval"] if "eval" in data else None,
        peft_config=LoraConfig(**cfg["lora"]),
    )
    trainer.train()
    trainer.save_model(sft["output_dir"])


if __name__ == "__main__":
    main()
"#;

const ACCELERATE_ZERO2: &str = "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n\
deepspeed_config:\n  deepspeed_config_file: ds_z2_config.json\n  zero3_init_flag: false\n\
machine_rank: 0\nnum_machines: 1\nnum_processes: 8\nmain_training_function: main\nuse_cpu: false\n";

const ACCELERATE_FSDP: &str = "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  \
fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_cpu_ram_efficient_loading: true\n  \
fsdp_offload_params: false\n  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n\
machine_rank: 0\nnum_machines: 1\nnum_processes: 8\nmain_training_function: main\nmixed_precision: \"no\"\nuse_cpu: false\n";

pub fn write(p: &mut PreparedRun) -> Result<Written> {
    let cfg = p.cfg.clone();
    let config = config_json(p);
    if cfg.eval_every == 0 && !p.eval.is_empty() {
        p.note("Finch evaluated only at the end; the export sets eval_strategy \"no\": call trainer.evaluate() after training");
    }
    let mut files = vec![
        ("train.jsonl".to_string(), rows_jsonl(&p.train)),
        (
            "chat_template.jinja".to_string(),
            p.turns.jinja(cfg.loss_on, true).into_bytes(),
        ),
        (
            "trl_config.json".to_string(),
            serde_json::to_string_pretty(&config).unwrap_or_default().into_bytes(),
        ),
        ("train_trl.py".to_string(), SCRIPT.as_bytes().to_vec()),
        (
            "accelerate_zero2.yaml".to_string(),
            ACCELERATE_ZERO2.as_bytes().to_vec(),
        ),
        ("accelerate_fsdp.yaml".to_string(), ACCELERATE_FSDP.as_bytes().to_vec()),
    ];
    if !p.eval.is_empty() {
        files.push(("eval.jsonl".to_string(), rows_jsonl(&p.eval)));
    }
    let command = "accelerate launch --config_file accelerate_zero2.yaml --num_processes $N train_trl.py".to_string();
    let launch = format!(
        "```sh\npip install trl peft deepspeed\nN=8   # GPUs on this machine\n{command}\n```\n\n\
         Without DeepSpeed: `accelerate launch --num_processes $N train_trl.py`; with FSDP: \
         `accelerate launch --config_file accelerate_fsdp.yaml --num_processes $N train_trl.py`. \
         `chat_template.jinja` is the run's chat template with `{{% generation %}}` around each answer and its \
         end-of-turn marker, so `assistant_only_loss` trains exactly Finch's tokens. The adapter lands in `output/`.\n"
    );
    Ok(Written { files, command, launch })
}
