#!/bin/bash
# The real-model data-generation run reported in the README ("What the 135M model makes"):
# each generator on SmolLM2-135M-Instruct, f32 and --quantized, then IFD scoring of the rows.
#   scripts/real_generate/run.sh MODEL [OUT_DIR]
# MODEL: a folder with the SmolLM2-135M-Instruct Q4_1 GGUF and its tokenizer.json. Set
# FINCH=path/to/finch (default target/release/finch) and WRAP="/tmp/quiet.sh" to run each
# generation under a wrapper. Outputs: OUT_DIR/{si,evol,bt}-{f32,q}.jsonl, their summaries
# (*.summary.json), event logs (*.events.jsonl) and scores (*.scores.json, *.details.jsonl).
set -euo pipefail
M=${1:?usage: run.sh MODEL [OUT_DIR]}
OUT=${2:-/tmp/finch-real-generate}
FINCH=${FINCH:-target/release/finch}
D=$(dirname "$0")
mkdir -p "$OUT"
gen() { # name, then the method's flags
  local name=$1; shift
  for q in f32 q; do
    local flags=(); [ $q = q ] && flags=(--quantized)
    rm -f "$OUT/$name-$q.jsonl"
    ${WRAP:-} "$FINCH" data generate --model "$M" "${flags[@]}" --out "$OUT/$name-$q.jsonl" --seed 1 --events "$@" \
      >"$OUT/$name-$q.summary.json" 2>"$OUT/$name-$q.events.jsonl"
    cat "$OUT/$name-$q.summary.json"
  done
}
gen si --method self-instruct --seed-data "$D/seeds.jsonl" --count 20 --max-attempts 40
gen evol --method evol-instruct --input "$D/evol.jsonl" --max-attempts 20
gen bt --method back-translation --documents "$D/documents" --segment-tokens 96
for f in "$OUT"/{si,evol,bt}-{f32,q}.jsonl; do
  [ -s "$f" ] || continue
  "$FINCH" data score "$f" --model "$M" --ifd --details "${f%.jsonl}.details.jsonl" >"${f%.jsonl}.scores.json"
  cat "${f%.jsonl}.scores.json"
done
