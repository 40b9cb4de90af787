#!/usr/bin/env python3
"""Mixed-length chat data for packing measurements: the pirate persona's single-turn rows
chained into conversations of 1 to 8 turns (a fixed cycle of turn counts, so the file is the
same every time), as most chat datasets mix short exchanges with long ones.

    python3 scripts/mixed_turns.py assets/datasets/pirate_persona/train.jsonl > mixed.jsonl
"""
import json
import sys

TURNS = [1, 1, 2, 1, 4, 1, 8, 2, 1, 3, 1, 6]

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
at, i = 0, 0
while at < len(rows):
    n = TURNS[i % len(TURNS)]
    messages = [m for row in rows[at : at + n] for m in row["messages"]]
    print(json.dumps({"messages": messages}))
    at, i = at + n, i + 1
