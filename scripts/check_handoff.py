#!/usr/bin/env python3
"""Checks `finch export-run` hand-offs with the tools' own code, and `finch import-adapter` with
an adapter TRL trained.

Given a Finch run folder (written by `finch train`) and the run's base model as a Hugging Face
folder (for a GGUF-only model, convert it first, e.g. with gguf_to_hf_numpy.py), it writes the
three hand-offs with `finch export-run --base-model HF` and checks:

  trl          `SFTConfig(**sft)` and PEFT `LoraConfig(**lora)` accept trl_config.json; SFTTrainer
               itself (its own dataset preparation, `assistant_only_loss` with the exported
               chat_template.jinja) tokenizes every training row to Finch's token ids and loss
               mask (finch_tokens.jsonl); TRL may add untrained tokens after Finch's last one
  llamafactory LLaMA-Factory's `get_train_args` parses llamafactory.yaml once train_lf.py has
               registered the `finch` template; its `template.encode_multiturn` with the labels its
               supervised processor builds (the source masked, the target trained) gives Finch's
               ids and mask for every row
  axolotl      axolotl's own `AxolotlInputConfig` parses axolotl.yml (when importable: `pip install
               --no-deps axolotl pillow` suffices for its schemas), its fields are checked, and its
               inline chat template renders Finch's token ids, and its `chat_template` dataset
               strategy (roles_to_train, train_on_eos) gives Finch's ids and loss mask per row

With --train-steps N (> 0) it then trains N steps of TRL's SFTTrainer on CPU with the TRL
hand-off, imports the saved adapter with `finch import-adapter`, and compares greedy answers of
PEFT + transformers (f32) with `finch chat --adapter` on the imported run.

Needs: torch, transformers, peft, trl, datasets (and llamafactory for its checks; its optional
imports such as torchaudio are stubbed). Missing packages skip their checks with the reason.
Prints one JSON line per check and a summary; exits 1 when a check fails.

  PYTHONPATH=/tmp/handoff-py:/tmp/handoff-lf DISABLE_VERSION_CHECK=1 python3 scripts/check_handoff.py \\
      --finch target/debug/finch --run runs/pirate --hf-model /tmp/smollm2-hf --work /tmp/handoff-check
"""

import argparse
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

RESULTS = []


def report(check, ok, **info):
    RESULTS.append(ok)
    print(json.dumps({"check": check, "ok": ok, **info}), flush=True)


def skip(check, reason):
    print(json.dumps({"check": check, "skipped": reason}), flush=True)


def finch_reference(out):
    rows = []
    with open(out / "finch_tokens.jsonl") as f:
        for line in f:
            r = json.loads(line)
            rows.append((r["input_ids"], r["loss_mask"]))
    return rows


def compare(name, finch_rows, tool_rows, check_mask=True):
    """Each tool row must start with Finch's ids; its mask equal Finch's there and 0 after."""
    bad = []
    for i, ((ids, mask), (t_ids, t_mask)) in enumerate(zip(finch_rows, tool_rows)):
        n = len(ids)
        same = list(t_ids[:n]) == list(ids)
        if check_mask and same:
            same = [int(m) for m in t_mask[:n]] == list(mask) and not any(t_mask[n:])
        if not same:
            bad.append(i)
    report(
        name,
        not bad and len(finch_rows) == len(tool_rows),
        rows=len(tool_rows),
        finch_rows=len(finch_rows),
        differing_rows=bad[:5],
        extra_untrained_tokens=sum(len(t) - len(f) for (f, _), (t, _) in zip(finch_rows, tool_rows)),
    )


def stub_modules(names):
    """Empty modules for optional imports LLaMA-Factory makes at import time (torchaudio ...)."""

    class Stub(types.ModuleType):
        def __getattr__(self, k):
            if k.startswith("__"):
                raise AttributeError(k)
            return Stub(f"{self.__name__}.{k}")

        def __call__(self, *a, **k):
            return None

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in names:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Stub(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, m):
            pass

    sys.meta_path.insert(0, Finder())


def check_trl(out, hf_model, train_steps=0):
    try:
        from datasets import load_dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        return skip("trl", f"not installed: {e}")
    cfg = json.loads((out / "trl_config.json").read_text())
    sft = dict(cfg["sft"])
    sft["output_dir"] = str(out / "output")
    sft["chat_template_path"] = str(out / sft["chat_template_path"])
    sft["use_cpu"] = True
    if train_steps > 0:
        sft.update(max_steps=train_steps, logging_steps=1, save_strategy="no", eval_strategy="no")
    args = SFTConfig(**sft)
    lora = LoraConfig(**cfg["lora"])
    report("trl SFTConfig + LoraConfig parse", True, max_steps=args.max_steps, lr=args.learning_rate,
           r=lora.r, alpha=lora.lora_alpha, targets=sorted(lora.target_modules))
    files = {"train": str(out / "train.jsonl")}
    if (out / "eval.jsonl").is_file():
        files["eval"] = str(out / "eval.jsonl")
    data = load_dataset("json", data_files=files)
    trainer = SFTTrainer(model=hf_model, args=args, train_dataset=data["train"],
                         eval_dataset=data["eval"] if "eval" in data else None, peft_config=lora)
    ds = trainer.train_dataset
    # TRL folds `assistant_masks` into `labels` (-100: not trained).
    rows = [(r["input_ids"], [int(lab != -100) for lab in r["labels"]]) for r in ds]
    compare("trl SFTTrainer tokenization == Finch ids + mask", finch_reference(out), rows)
    return trainer


def check_llamafactory(out, hf_model):
    stub_modules({"torchaudio", "av", "librosa"})
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    try:
        import runpy

        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.hparams import get_train_args
    except ImportError as e:
        return skip("llamafactory", f"not importable: {e}")
    runpy.run_path(str(out / "train_lf.py"), run_name="finch_register")
    import yaml

    cfg = yaml.safe_load((out / "llamafactory.yaml").read_text())
    cfg["model_name_or_path"] = hf_model
    cfg["output_dir"] = str(out / "output")
    cfg["dataset_dir"] = str(out)
    cfg.pop("deepspeed", None)  # DeepSpeed is not installed here; the JSON is checked below
    cfg["plot_loss"] = False  # needs matplotlib, which only draws the curve
    json.loads((out / "ds_z2_config.json").read_text())
    try:
        model_args, data_args, training_args, finetuning_args, _ = get_train_args(cfg)
    except Exception as e:  # noqa: BLE001 - report the tool's own complaint
        report("llamafactory get_train_args", False, error=str(e)[:300])
        return
    report("llamafactory get_train_args parses", True, template=data_args.template,
           cutoff_len=data_args.cutoff_len, lora_rank=finetuning_args.lora_rank,
           lora_target=finetuning_args.lora_target, lr=training_args.learning_rate,
           max_steps=training_args.max_steps)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_model)
    template = get_template_and_fix_tokenizer(tok, data_args)
    rows = []
    for r in json.loads((out / "train.json").read_text()):
        msgs = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                for m in r["conversations"]]
        ids, mask = [], []
        for src, tgt in template.encode_multiturn(tok, msgs, r.get("system")):
            ids += src + tgt
            mask += [0] * len(src) + [1] * len(tgt)
        rows.append((ids, mask))
    compare("llamafactory template encode_multiturn == Finch ids + mask", finch_reference(out), rows)


def check_axolotl(out, hf_model):
    import yaml
    from transformers import AutoTokenizer

    cfg = yaml.safe_load((out / "axolotl.yml").read_text())
    ds = cfg["datasets"][0]
    expected = {"type": "chat_template", "field_messages": "messages", "ds_type": "json"}
    ok = all(ds.get(k) == v for k, v in expected.items()) and ds.get("train_on_eos") in ("turn", "all", "last")
    ok = ok and cfg["adapter"] == "lora" and cfg["chat_template"] == "jinja" and cfg["sample_packing"] is False
    report("axolotl yaml fields (structural)", ok,
           roles_to_train=ds.get("roles_to_train"), lora_r=cfg["lora_r"], sequence_len=cfg["sequence_len"])
    # axolotl's own config model (pydantic), when importable: `pip install --no-deps --target DIR
    # axolotl pillow` is enough for its schemas next to transformers/peft (checked 2026-11-29 with
    # axolotl 0.19.0: the exported YAML parses).
    try:
        from axolotl.utils.schemas.config import AxolotlInputConfig
    except ImportError as e:
        skip("axolotl AxolotlInputConfig parses axolotl.yml", f"axolotl not importable: {e}")
    else:
        try:
            parsed = AxolotlInputConfig(**cfg)
            report("axolotl AxolotlInputConfig parses axolotl.yml", True, lora_r=parsed.lora_r)
        except Exception as e:  # noqa: BLE001 - the loader's own message is the result
            report("axolotl AxolotlInputConfig parses axolotl.yml", False, error=str(e)[:400])
    tok = AutoTokenizer.from_pretrained(hf_model)
    with open(out / "train.jsonl") as f:
        examples = [json.loads(line) for line in f]
    rows = []
    for ex in examples:
        ids = tok.apply_chat_template(ex["messages"], chat_template=cfg["chat_template_jinja"], tokenize=True,
                                      return_dict=True)["input_ids"]
        rows.append((ids, [0] * len(ids)))
    compare("axolotl inline template renders Finch ids (mask not checked)", finch_reference(out), rows,
            check_mask=False)
    # axolotl's own dataset strategy (`type: chat_template`: roles_to_train, train_on_eos) builds
    # the labels; with `pip install --no-deps` of axolotl, pillow, datasets, multiprocess, pandas,
    # python-dateutil, pytz, tzdata, dill, xxhash, pyarrow, colorama, addict it imports on CPU
    # (2026-11-29, axolotl 0.19.0: all 173 rows of the pirate run equal Finch's ids and mask).
    try:
        from axolotl.prompt_strategies.chat_template import load
        from axolotl.utils.dict import DictDefault
    except ImportError as e:
        skip("axolotl ChatTemplateStrategy ids + labels == Finch ids + mask", f"not importable: {e}")
        return
    strategy = load(tok, DictDefault(cfg), DictDefault(cfg["datasets"][0]))
    rows = []
    for ex in examples:
        t = strategy.tokenize_prompt(ex)
        rows.append((t["input_ids"], [int(label != -100) for label in t["labels"]]))
    compare("axolotl ChatTemplateStrategy ids + labels == Finch ids + mask", finch_reference(out), rows)


def export(finch, run, target, out, hf_model):
    if out.exists():
        shutil.rmtree(out)
    r = subprocess.run([finch, "export-run", str(run), "--to", target, "--out", str(out), "--base-model", hf_model],
                       capture_output=True, text=True)
    if r.returncode != 0:
        report(f"finch export-run --to {target}", False, stderr=r.stderr[-500:])
        return False
    return True


def round_trip(finch, trainer, work, hf_model, prompts):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer.train()
    adapter = work / "trl-adapter"
    trainer.save_model(str(adapter))
    state = Path(trainer.args.output_dir)
    trainer.state.save_to_json(str(adapter / "trainer_state.json"))
    runs = work / "runs"
    shutil.rmtree(runs / "from-trl", ignore_errors=True)
    r = subprocess.run([finch, "import-adapter", str(adapter), "--name", "from-trl", "--runs-dir", str(runs),
                        "--model", hf_model], capture_output=True, text=True)
    report("finch import-adapter of the TRL adapter", r.returncode == 0, stderr=r.stderr.strip()[-400:],
           stdout=r.stdout.strip()[-400:])
    if r.returncode != 0:
        return
    logged = sum(1 for line in open(runs / "from-trl" / "metrics.jsonl") if '"train"' in line)
    report("imported loss history", logged > 0, steps=logged, trainer_state=str(state))
    tok = AutoTokenizer.from_pretrained(hf_model)
    base = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=[eot, tok.eos_token_id])
        py_ids = gen[0, ids["input_ids"].shape[1]:].tolist()
        py_ids = [t for t in py_ids if t not in (eot, tok.eos_token_id)]
        r = subprocess.run([finch, "chat", "--model", hf_model, "--adapter", str(runs / "from-trl"), "--prompt", p,
                            "--json", "--max-new-tokens", "24"], capture_output=True, text=True)
        if r.returncode != 0:
            report("finch chat on the imported run", False, stderr=r.stderr[-400:])
            continue
        finch_text = json.loads(r.stdout.strip().splitlines()[-1])["text"]
        py_text = tok.decode(py_ids, skip_special_tokens=True)
        report("greedy answer: PEFT+transformers == finch chat (imported TRL adapter)", finch_text == py_text,
               prompt=p, finch=finch_text, python=py_text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finch", default="target/debug/finch")
    ap.add_argument("--run", required=True, help="a finch train run folder")
    ap.add_argument("--hf-model", required=True, help="the run's base model as a Hugging Face folder")
    ap.add_argument("--work", default="/tmp/finch-handoff-check")
    ap.add_argument("--train-steps", type=int, default=0)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        skip("all", f"transformers is not installed: {e}")
        return 0
    trainer = None
    for target in ("trl", "llamafactory", "axolotl"):
        out = work / f"handoff-{target}"
        if not export(a.finch, a.run, target, out, a.hf_model):
            continue
        if target == "trl":
            trainer = check_trl(out, a.hf_model, a.train_steps)
            if a.train_steps > 0 and trainer is not None:
                # Before LLaMA-Factory's checks, which reset accelerate's state.
                round_trip(a.finch, trainer, work, a.hf_model, ["What is 7 plus 5?", "Name a colour."])
        elif target == "llamafactory":
            check_llamafactory(out, a.hf_model)
        else:
            check_axolotl(out, a.hf_model)
    print(json.dumps({"summary": {"checks": len(RESULTS), "failed": RESULTS.count(False)}}))
    return 1 if False in RESULTS else 0


if __name__ == "__main__":
    sys.exit(main())
