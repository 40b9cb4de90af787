"""PyTorch+PEFT on the rows a real `finch train` run trained on: the short-row peer figure.

`finch bench train` and `../shared/peer-bench/train_lora.py` both time full 256-token rows of
packed text. A real run on a demo dataset is different: short chat rows of mixed length, padded
to the longest row of each batch, the loss on the answers only. This script trains PEFT LoRA the
way Finch's run did, on Finch's own token ids and loss masks (`finch_tokens.jsonl` from
`finch export-run RUN --to trl --out DIR`), so that the two tokens/s figures count the same work:

    finch train --model GGUF --data assets/datasets/pirate_persona/train.jsonl \
        --batch 4 --seq-len 128 --steps 40 --eval-every 0 --out /tmp/run
    finch export-run /tmp/run --to trl --out /tmp/handoff --base-model HF_FOLDER
    python scripts/peer_train_rows.py --model-dir HF_FOLDER --rows /tmp/handoff/finch_tokens.jsonl \
        --batch 4 --steps 40 --warmup 3

LoRA r=16, alpha=32, dropout 0 on the seven projections (Finch's defaults), AdamW lr 2e-4, f32,
batches of `--batch` rows in a seeded shuffled order (Finch's order differs, its padding share
is printed beside), right-padded to the longest row, `labels` -100 where the mask is 0.
`tokens_per_sec` counts non-padding tokens over the timed steps, as Finch's `metrics.jsonl`
`tokens` does. Prints one JSON line.
"""
import argparse
import json
import random
import resource
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_rows(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            ids = row.get("input_ids")
            mask = row.get("loss_mask", row.get("mask"))
            if ids is None or mask is None or len(ids) != len(mask):
                raise SystemExit(f"{path}:{n}: expected input_ids and loss_mask of equal length")
            rows.append((ids, mask))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rows", required=True, help="finch_tokens.jsonl from `finch export-run`")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="base weights (PEFT keeps the adapters in fp32), as `finch train --precision f32|bf16`")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rows = read_rows(a.rows)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=getattr(torch, a.dtype), attn_implementation="sdpa")
    model.config.use_cache = False
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    order, rng = [], random.Random(a.seed)

    def next_batch():
        while len(order) < a.batch:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order.extend(epoch)
        picked = [rows[order.pop(0)] for _ in range(a.batch)]
        longest = max(len(ids) for ids, _ in picked)
        ids = torch.full((a.batch, longest), pad, dtype=torch.long)
        att = torch.zeros((a.batch, longest), dtype=torch.long)
        labels = torch.full((a.batch, longest), -100, dtype=torch.long)
        for i, (r, m) in enumerate(picked):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            # PEFT/transformers shift labels by one inside the loss: label[t] is the token at t,
            # trained when the mask says the token at t is an answer token.
            labels[i, : len(r)] = torch.tensor([t if k else -100 for t, k in zip(r, m)])
        return ids, att, labels

    def step():
        ids, att, labels = next_batch()
        out = model(input_ids=ids, attention_mask=att, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(att.sum()), ids.numel(), float(out.loss.detach())

    for _ in range(a.warmup):
        step()
    tokens = padded = 0
    losses = []
    t0 = time.perf_counter()
    for _ in range(a.steps):
        t, p, loss = step()
        tokens, padded = tokens + t, padded + p
        losses.append(loss)
    secs = time.perf_counter() - t0
    print(json.dumps({
        "bench": "train_rows", "impl": "pytorch+peft", "dtype": a.dtype, "rows": len(rows), "batch": a.batch,
        "warmup": a.warmup, "steps": a.steps, "threads": a.threads,
        "tokens_per_sec": tokens / secs, "padded_tokens_per_sec": padded / secs,
        "padding_fraction": 1 - tokens / padded, "secs_per_step": secs / a.steps,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
