#!/usr/bin/env python3
"""Parameter counts transformers gives for the released models' config.json files in
tests/fixtures/transformers/real_configs (no weights: the model is built on the meta device).
`tests/transformers_parity.rs` (`real_released_configs_read_and_count_as_transformers`) holds
the numbers this prints; run it again only if a fixture changes.

    python3 scripts/count_real_config_params.py
"""

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "transformers" / "real_configs"

print(f"transformers {transformers.__version__}, torch {torch.__version__}")
for path in sorted(HERE.glob("*.json")):
    raw = json.loads(path.read_text())
    raw.pop("auto_map", None)  # the Hub's remote-code pointers; transformers has Phi-3 built in
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # Tied weights are one tensor, counted once (as the Hub's model cards count them).
    n = sum(p.numel() for p in model.parameters())
    print(f"{path.name}: {type(model).__name__} {n:,} parameters")
