#!/usr/bin/env python3
"""Checks Finch's exports with the Python tools people take them to.

Trains a short LoRA run with `finch train` on a real model (a folder holding a GGUF file and
its tokenizer files, e.g. ../shared/models/SmolLM2-135M-Instruct-Q4_1), exports it in every
format with `finch export`, and then, for a few chat prompts, compares greedy answers:

  base       transformers loading the model's GGUF (gguf_file=)        vs `finch chat` and
             `finch chat --quantized` (Finch's integer kernels on the GGUF's own blocks)
  python     an adapter made by Python PEFT on that model              vs `finch chat --adapter` on it
  peft       that model + PEFT loading the exported adapter folder      vs `finch chat --adapter`
  merged     transformers loading the exported merged folder            vs `finch chat --adapter`
  gguf f16   transformers loading the exported f16 GGUF (gguf_file=)    vs `finch chat --model it`
  gguf q8_0  the same for the q8_0 GGUF (also with `--quantized`)

It also checks the chat template and end-of-turn tokens that the exports carry (prompt token
counts equal Finch's, generation stops on the template's end-of-turn token), and the GGUF
metadata with the `gguf` package (llama.cpp's own reader).

Needs: torch, transformers, peft, gguf, numpy. Prints one JSON line per comparison and a
summary line; exits 1 when an answer or a check differs.

  python3 scripts/check_with_transformers.py --finch target/release/finch \
      --model ../shared/models/SmolLM2-135M-Instruct-Q4_1 --work /tmp/finch-py-check

With --adapters WORK instead, it checks one family's adapters on a tiny model (no real Qwen3,
Gemma 3, SmolLM3 or Phi-3 is on these machines): WORK holds what tests/python_interop.rs wrote
with Finch (the base model folder, an adapter in PEFT's layout on every projection the family
has, e.g. Phi-3's fused qkv_proj / gate_up_proj, the merged folder, Finch's logits for fixed ids,
and expect.json naming the family and the adapter's target_modules). PEFT must load the adapter
onto transformers' model with Finch's logits, transformers must load the merged folder with them,
and an adapter made by Python PEFT on the same modules is saved with its logits for Finch to load
and compare.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "What is 7 plus 5?",
    "Give me one tip for learning to sail.",
]
MAX_NEW = 40


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    return out.stdout


def finch_answer(finch, model, prompt, adapter=None, quantized=False):
    cmd = [finch, "chat", "--model", str(model), "--prompt", prompt, "--json", "--max-new-tokens", str(MAX_NEW)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    if quantized:
        cmd += ["--quantized"]
    return json.loads(run(cmd).strip().splitlines()[-1])


def hf_answer(model, tok, prompt):
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, attention_mask=torch.ones_like(ids))
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    finish = "eos" if new and new[-1] in eos else "length"
    text = tok.decode(new, skip_special_tokens=True).strip()
    return {"text": text, "tokens": len(new), "finish_reason": finish, "prompt_tokens": ids.shape[1]}


def check_adapters(work):
    """The --adapters mode (see the module docstring). Prints one JSON line per check."""
    import torch
    import peft
    from transformers import AutoModelForCausalLM

    work = Path(work)
    finch = json.loads((work / "finch_logits.json").read_text())
    expect = json.loads((work / "expect.json").read_text())
    family, want_targets = expect["family"], sorted(expect["target_modules"])
    ids = torch.tensor([finch["input_ids"]])
    failures = []

    def check(name, logits, want):
        diff = float((logits - torch.tensor(want)).abs().max())
        ok = diff < 1e-4
        print(json.dumps({"check": name, "max_abs_diff": diff, "ok": ok}), flush=True)
        if not ok:
            failures.append(name)

    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()
    tuned = peft.PeftModel.from_pretrained(base, work / "adapter").eval()
    targets = sorted(tuned.peft_config["default"].target_modules)
    print(json.dumps({"check": f"{family} adapter target_modules", "target_modules": targets,
                      "architecture": type(base).__name__}), flush=True)
    if targets != want_targets:
        failures.append("target_modules")
    with torch.no_grad():
        check(f"{family} adapter in PEFT", tuned(ids).logits[0], finch["adapter_logits"])
    base = tuned.unload()
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        check(f"{family} merged folder in transformers", merged(ids).logits[0], finch["adapter_logits"])
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=want_targets)
    py = peft.get_peft_model(base, cfg).eval()
    py.save_pretrained(work / "python_peft")
    with torch.no_grad():
        logits = py(ids).logits[0]
    (work / "python_logits.json").write_text(json.dumps({"logits": logits.tolist()}))
    print(json.dumps({"summary": f"check_with_transformers --adapters ({family})", "failures": failures,
                      "torch": torch.__version__, "peft": peft.__version__}), flush=True)
    sys.exit(1 if failures else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finch")
    ap.add_argument("--model", help="folder with a .gguf file and tokenizer files")
    ap.add_argument("--work")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="f32",
                    help="the training run's base precision (f32, q8_0, q4_1): the exports of a run over a quantized base must load the same")
    ap.add_argument("--adapters", help="folder tests/python_interop.rs prepared (see above)")
    args = ap.parse_args()
    if args.adapters:
        check_adapters(args.adapters)
        return
    if not (args.finch and args.model and args.work):
        ap.error("--finch, --model and --work are required (or --adapters WORK)")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import peft
    import gguf

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    finch = str(Path(args.finch).resolve())
    model_dir = Path(args.model).resolve()
    gguf_name = next(p.name for p in sorted(model_dir.glob("*.gguf")))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = Path(__file__).resolve().parent.parent / "assets/datasets/pirate_persona/train.jsonl"
    run_dir = work / "run"
    run([finch, "train", "--model", str(model_dir), "--data", str(data), "--steps", str(args.steps),
         "--precision", args.precision, "--out", str(run_dir)])
    for fmt in ["peft", "merged", "gguf"]:
        run([finch, "export", "--model", str(model_dir), "--adapter", str(run_dir), "--format", fmt, "--out", str(work / fmt)])
    gguf_files = sorted((work / "gguf").glob("*.gguf"))

    failures = []

    def compare(name, ours, theirs):
        same = ours["text"] == theirs["text"]
        # Prompt tokens are compared when both sides rendered the same chat template.
        same_prompt = ours.get("prompt_tokens") == theirs.get("prompt_tokens")
        stops = theirs["finish_reason"] == ours["finish_reason"]
        line = {
            "check": name,
            "same_text": same,
            "same_prompt_tokens": same_prompt,
            "same_finish": stops,
            "finch": ours["text"],
            "python": theirs["text"],
            "finch_finish": ours["finish_reason"],
            "python_finish": theirs["finish_reason"],
        }
        print(json.dumps(line, ensure_ascii=False), flush=True)
        if not (same and same_prompt and stops):
            failures.append(name)

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name, dtype=torch.float32)
    base.generation_config = transformers.GenerationConfig.from_pretrained(model_dir)
    for p in PROMPTS:
        theirs = hf_answer(base, tok, p)
        compare(f"base: {p}", finch_answer(finch, model_dir, p), theirs)
        compare(f"base, finch --quantized: {p}", finch_answer(finch, model_dir, p, quantized=True), theirs)

    # An adapter made by Python PEFT (random A and B, rsLoRA scaling, every projection) loads
    # in Finch with the same answers.
    py_cfg = peft.LoraConfig(
        r=8,
        lora_alpha=2,
        use_rslora=True,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    py_model = peft.get_peft_model(base, py_cfg)
    py_model.eval()
    py_model.save_pretrained(work / "python_peft")
    for p in PROMPTS:
        compare(f"adapter made by Python PEFT: {p}", finch_answer(finch, model_dir, p, adapter=work / "python_peft"),
                hf_answer(py_model, tok, p))
    base = py_model.unload()  # the base model without the Python adapter's layers

    tuned_finch = {p: finch_answer(finch, model_dir, p, adapter=run_dir) for p in PROMPTS}
    with_peft = peft.PeftModel.from_pretrained(base, work / "peft")
    with_peft.eval()
    for p in PROMPTS:
        compare(f"peft: {p}", tuned_finch[p], hf_answer(with_peft, tok, p))
    del with_peft, base

    merged_tok = AutoTokenizer.from_pretrained(work / "merged")
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32)
    for p in PROMPTS:
        compare(f"merged: {p}", tuned_finch[p], hf_answer(merged, merged_tok, p))
    del merged

    for path in gguf_files:
        reader = gguf.GGUFReader(str(path))
        fields = reader.fields

        def field(key):
            f = fields.get(key)
            if f is None:
                return None
            v = f.parts[f.data[0]]
            return bytes(v).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else v.tolist()

        types = sorted({t.tensor_type.name for t in reader.tensors})
        meta = {
            "check": f"gguf metadata: {path.name}",
            "architecture": field("general.architecture"),
            "tensor_types": types,
            "has_chat_template": field("tokenizer.chat_template") is not None,
            "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "tokenizer_model": field("tokenizer.ggml.model"),
        }
        ok = meta["has_chat_template"] and meta["eos_token_id"] is not None and meta["tokenizer_model"] == "gpt2"
        meta["ok"] = bool(ok)
        print(json.dumps(meta), flush=True)
        if not ok:
            failures.append(meta["check"])
        g = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        g_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for p in PROMPTS:
            theirs = hf_answer(g, g_tok, p)
            compare(f"{path.name}: {p}", finch_answer(finch, path, p), theirs)
            if "q8_0" in path.name:
                compare(f"{path.name}, finch --quantized: {p}", finch_answer(finch, path, p, quantized=True), theirs)
        del g

    print(json.dumps({"summary": "check_with_transformers", "failures": failures, "torch": torch.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__}), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
