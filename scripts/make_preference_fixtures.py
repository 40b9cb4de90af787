#!/usr/bin/env python3
"""Writes tests/fixtures/preference/: a PEFT LoRA adapter (random A and B, so the policy differs
from the base model) over the tiny Llama that scripts/make_transformers_fixtures.py saved in
tests/fixtures/transformers/llama_rope_parameters, and expected.json with the DPO and ORPO losses,
per-sequence log-probs and the gradients of every lora_A / lora_B for two fixed preference pairs
of token ids. tests/train.rs checks that Finch's preference losses give the same numbers.

The numbers come from TRL's own code where it is importable as a function:
`ORPOTrainer.get_batch_logps` (summed or mean log-probs of the completion tokens),
`ORPOTrainer.odds_ratio_loss` and `log1mexp`. The rest is copied from TRL 1.16:
- ORPO's NLL is `concatenated_forward.cross_entropy_loss` over every non-padding token of the
  chosen sequences ("orpo chosen nll loss is computed over the full prompt and response");
  loss = nll − mean(λ·log σ(log_odds)).
- DPO (DPOTrainer._compute_loss, loss_type "sigmoid", f_divergence "reverse_kl") with cDPO label
  smoothing ε as TRL's "aot"/older "sigmoid" writes it: Δ = (c − c_ref) − (r − r_ref),
  loss = mean(−(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)); the reference is the same model with the
  adapter disabled (`model.disable_adapter()`).
Everything runs in float64, so the stored numbers are the exact values Finch's f32 must approach.

Run: /path/to/venv/bin/pip install --target /tmp/dpo-py --no-deps trl
     PYTHONPATH=/tmp/dpo-py /path/to/venv/bin/python scripts/make_preference_fixtures.py
(the venv needs torch, transformers and peft; TRL's optional imports pandas, datasets, pyarrow and
rich are stubbed below because the functions used here do not touch them).
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for TRL imports the loss functions never use."""
    names = ("pandas", "datasets", "rich", "pyarrow")

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = lambda attr: type(attr, (), {})
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Stub())
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "transformers", "llama_rope_parameters")
OUT = os.path.join(ROOT, "preference")

# (prompt, chosen, rejected) token ids; the completion tokens are the answer (loss mask).
PAIRS = [
    ([1, 5, 17, 33], [40, 41, 42, 2], [50, 51, 2]),
    ([1, 7, 8, 9, 10, 11], [60, 2], [70, 71, 72, 73, 2]),
]
PAD = 0
CASES = [
    {"name": "dpo", "method": "dpo", "beta": 0.5, "label_smoothing": 0.1},
    {"name": "dpo_plain", "method": "dpo", "beta": 0.1, "label_smoothing": 0.0},
    {"name": "orpo", "method": "orpo", "orpo_lambda": 0.25},
]


def batch(side):
    """Right-padded ids, attention mask and labels (-100 outside the completion), chosen or rejected."""
    seqs = [(p + (c if side == "chosen" else r), len(p)) for p, c, r in PAIRS]
    t = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), t), PAD)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), -100)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n_prompt: len(s)] = torch.tensor(s[n_prompt:])
    return ids, mask, labels


def concatenated():
    """TRL's concatenation: chosen rows, then rejected rows, padded to one length."""
    parts = [batch("chosen"), batch("rejected")]
    t = max(p[0].shape[1] for p in parts)
    pad = lambda x, v: F.pad(x, (0, t - x.shape[1]), value=v)
    ids = torch.cat([pad(p[0], PAD) for p in parts])
    mask = torch.cat([pad(p[1], 0) for p in parts])
    labels = torch.cat([pad(p[2], -100) for p in parts])
    return ids, mask, labels


def cross_entropy_loss(logits, labels):
    """ORPOTrainer.concatenated_forward.cross_entropy_loss (decoder-only)."""
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous()
    return torch.nn.CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), labels.view(-1))


def round_all(x):
    """Nine significant digits (float64 noise is far below what f32 can check)."""
    return [round_all(v) for v in x] if isinstance(x, list) else float(f"{x:.9g}")


def run_case(model, case):
    model.zero_grad()
    ids, mask, labels = concatenated()
    n = len(PAIRS)
    logits = model(input_ids=ids, attention_mask=mask).logits
    out = {k: v for k, v in case.items()}
    if case["method"] == "dpo":
        logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
        with torch.no_grad(), model.disable_adapter():
            ref_logps = ORPOTrainer.get_batch_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        chosen, rejected = logps[:n], logps[n:]
        ref_chosen, ref_rejected = ref_logps[:n], ref_logps[n:]
        beta, eps = case["beta"], case["label_smoothing"]
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        loss = losses.mean()
        chosen_rewards = beta * (chosen - ref_chosen).detach()
        rejected_rewards = beta * (rejected - ref_rejected).detach()
        out["ref_chosen_logps"] = ref_chosen.tolist()
        out["ref_rejected_logps"] = ref_rejected.tolist()
    else:
        # ORPOTrainer.concatenated_forward: NLL over every non-padding token of the chosen rows.
        nll_labels = torch.where(mask == 1, ids, -100)
        nll = cross_entropy_loss(logits[:n], nll_labels[:n])
        logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        chosen, rejected = logps[:n], logps[n:]
        this = types.SimpleNamespace(beta=case["orpo_lambda"], accelerator=types.SimpleNamespace(device="cpu"))
        losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(this, chosen, rejected)
        loss = nll - losses.mean()
        out["nll"] = nll.item()
    loss.backward()
    out["loss"] = loss.item()
    out["chosen_logps"] = chosen.tolist()
    out["rejected_logps"] = rejected.tolist()
    out["reward_margin"] = (chosen_rewards - rejected_rewards).mean().item()
    out["reward_accuracy"] = (chosen_rewards > rejected_rewards).double().mean().item()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        which = "a" if ".lora_A." in name else "b"
        grads.setdefault(module, {})[which] = round_all(p.grad.tolist())
    out["grads"] = grads
    return out


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64).eval()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.15)
    os.makedirs(OUT, exist_ok=True)
    adapter_dir = os.path.join(OUT, "adapter")
    model.to(torch.float32).save_pretrained(adapter_dir)
    # No absolute path of this machine, no generated model card.
    os.remove(os.path.join(adapter_dir, "README.md"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = "tests/fixtures/transformers/llama_rope_parameters"
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    # The float32 adapter as saved, run in float64.
    model.to(torch.float64)
    expected = {
        "trl_version": trl.__version__,
        "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
        "cases": [run_case(model, case) for case in CASES],
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    for case in expected["cases"]:
        print(case["name"], case["loss"], case["reward_margin"])


if __name__ == "__main__":
    main()
