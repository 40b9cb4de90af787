#!/usr/bin/env python3
"""Writes tests/fixtures/transformers/<case>/: tiny random models saved by transformers itself
(config.json in the layout the installed transformers writes, model.safetensors) and
expected.json with the logits transformers' own modeling code gives for fixed input ids.
tests/transformers_parity.rs checks that Finch reads each config and gives the same logits.

Run it in a throwaway venv: python3 -m venv /tmp/tf && /tmp/tf/bin/pip install torch transformers
safetensors && /tmp/tf/bin/python scripts/make_transformers_fixtures.py
"""
import json
import os
import sys

import torch
import transformers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config,
                          Qwen3Config, SmolLM3Config)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "transformers")
SHAPES = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
IDS = [[1, 5, 17, 33, 2, 60, 61, 62, 8, 95, 40, 3]]

CASES = {
    # transformers 5.x writes the rotary base into rope_parameters (no top-level rope_theta).
    "llama_rope_parameters": LlamaConfig(**SHAPES, rope_theta=50000.0, tie_word_embeddings=True),
    # Llama 3.x rope scaling, also inside rope_parameters.
    "llama3_scaling": LlamaConfig(**SHAPES, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": Qwen2Config(**SHAPES, rope_theta=1000000.0, tie_word_embeddings=False),
    # Qwen3: per-head q/k RMS norms before rotary, head_dim from the config (not hidden/heads).
    "qwen3": Qwen3Config(**SHAPES, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
    # Gemma 3 text: (1 + w) RMS norms, four per block, GELU-tanh MLP, embeddings scaled by
    # sqrt(hidden), query_pre_attn_scalar, q/k norms, sliding layers (window 4 < the 12 ids, so
    # the local mask matters) with their own rope base beside full layers with linear scaling.
    "gemma3": Gemma3TextConfig(
        **{**SHAPES, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        attn_implementation="eager"),
    # SmolLM3: Llama with NoPE layers (no rotary where no_rope_layers is 0).
    "smollm3": SmolLM3Config(**{**SHAPES, "num_hidden_layers": 4}, no_rope_layers=[1, 0, 1, 0],
                             rope_theta=2000000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2),
    # Phi-3 (Phi-3-mini-4k's layout): fused qkv_proj and gate_up_proj, default rotary, a sliding
    # window (5) shorter than the 12 ids, separate output head.
    "phi3": Phi3Config(**{**SHAPES, "hidden_size": 64}, sliding_window=5, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager"),
    # Phi-4-mini's layout: rotary on 3/4 of each 16-wide head (12 dims, 6 frequencies), LongRoPE
    # with an 8-token pretraining context in a 64-token model (attention factor sqrt(1 + ln 8 /
    # ln 8) = sqrt 2), tied embeddings. The 12 ids take the long factors, their first 6 the short.
    "phi4_mini": Phi3Config(**{**SHAPES, "hidden_size": 64, "max_position_embeddings": 64},
                            original_max_position_embeddings=8, partial_rotary_factor=0.75,
                            rope_scaling={"type": "longrope",
                                          "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                                          "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 11.0]},
                            tie_word_embeddings=True, sliding_window=None, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, attn_implementation="eager"),
}
# Cases whose expected.json also holds transformers' greedy continuation of IDS (or of the
# first GREEDY_PROMPT_LEN ids).
GREEDY_NEW_TOKENS = {"gemma3": 12, "smollm3": 8, "phi3": 8, "phi4_mini": 8}
# phi4_mini: a 6-id prompt whose decoding crosses the 8-token pretraining context, where
# transformers switches LongRoPE to the long factors for the new positions (the cached keys keep
# the short ones).
GREEDY_PROMPT_LEN = {"phi4_mini": 6}
# Cases whose expected.json also holds the logits of the first SHORT_LEN ids (LongRoPE's short
# factors).
SHORT_LEN = {"phi4_mini": 6}


def main():
    """With case names as arguments, writes only those (the others keep their committed files)."""
    torch.manual_seed(0)
    wanted = sys.argv[1:] or list(CASES)
    for name, cfg in CASES.items():
        if name not in wanted:
            continue
        model = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():  # larger weights than the init so the logits differ clearly
                p.normal_(0.0, 0.2)
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        with torch.no_grad():
            logits = model(torch.tensor(IDS)).logits[0]
        expected = {"transformers_version": transformers.__version__, "input_ids": IDS[0],
                    "logits": [[round(x, 6) for x in row] for row in logits.tolist()]}
        if name in SHORT_LEN:
            with torch.no_grad():
                short = model(torch.tensor([IDS[0][:SHORT_LEN[name]]])).logits[0]
            expected["short_input_ids"] = IDS[0][:SHORT_LEN[name]]
            expected["short_logits"] = [[round(x, 6) for x in row] for row in short.tolist()]
        if name in GREEDY_NEW_TOKENS:
            prompt = [IDS[0][:GREEDY_PROMPT_LEN.get(name, len(IDS[0]))]]
            with torch.no_grad():
                out = model.generate(torch.tensor(prompt), max_new_tokens=GREEDY_NEW_TOKENS[name], do_sample=False,
                                     eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                                     output_logits=True)
            # Tokens and the logits of every step, computed through transformers' KV cache
            # (a sliding-window cache for the local layers).
            expected["greedy_input_ids"] = prompt[0]
            expected["greedy_tokens"] = out.sequences[0, len(prompt[0]):].tolist()
            expected["greedy_logits"] = [[round(x, 6) for x in step[0].tolist()] for step in out.logits]
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(expected, f)
        for extra in ("generation_config.json",):
            p = os.path.join(d, extra)
            if os.path.exists(p):
                os.remove(p)
        print(name, "written", file=sys.stderr)


if __name__ == "__main__":
    main()
