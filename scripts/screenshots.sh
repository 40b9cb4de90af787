#!/usr/bin/env bash
# Screenshots of every studio page, taken from the real release binary under Xvfb.
#
#   scripts/screenshots.sh            # writes docs/screenshots/{models,data,train,chat,export,settings}.png
#   FINCH_SCREENSHOT_PROFILE=debug scripts/screenshots.sh   # with a debug build
#
# Uses the model in FINCH_REAL_MODEL (default: ../shared/models/SmolLM2-135M-Instruct-Q4_1 when it
# exists). With a model, a short run is trained first with `finch train` so the Train page shows
# real curves and a run in the history. Installs xvfb, libgl1-mesa-dri and imagemagick if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v Xvfb >/dev/null || missing+=(xvfb)
command -v import >/dev/null || missing+=(imagemagick)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || missing+=(libgl1-mesa-dri)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# FINCH_SCREENSHOT_PROFILE=debug uses a debug build (minutes instead of a long release build).
profile="${FINCH_SCREENSHOT_PROFILE:-release}"
if [ "$profile" = release ]; then
    cargo build --release
else
    # Same feature set as `cargo test`, so a tree already built for the tests is reused.
    cargo build --tests
    profile=debug
fi
finch="$PWD/target/$profile/finch"
out="$PWD/docs/screenshots"
mkdir -p "$out"

model="${FINCH_REAL_MODEL:-}"
if [ -z "$model" ] && [ -d ../shared/models/SmolLM2-135M-Instruct-Q4_1 ]; then
    model="$(cd ../shared/models/SmolLM2-135M-Instruct-Q4_1 && pwd)"
fi

# A fresh home: no saved window state, runs under $home/Finch/runs.
home="$(mktemp -d)"
display=":${FINCH_SCREENSHOT_DISPLAY:-97}"
xvfb_pid=""
cleanup() {
    [ -n "$xvfb_pid" ] && kill "$xvfb_pid" 2>/dev/null || true
    rm -rf "$home"
}
trap cleanup EXIT
Xvfb "$display" -screen 0 1280x820x24 -nolisten tcp >/dev/null 2>&1 &
xvfb_pid=$!
sleep 2

data="$home/capitals.jsonl"
python3 - "$data" <<'PY'
import json, sys
pairs = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
         ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Chile", "Santiago"),
         ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
         ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Mali", "Bamako")]
with open(sys.argv[1], "w") as f:
    for country, capital in pairs:
        f.write(json.dumps({"instruction": f"What is the capital of {country}?", "input": "",
                            "output": f"The capital of {country} is {capital}."}) + "\n")
PY

run=""
if [ -n "$model" ]; then
    run="$home/Finch/runs/capitals-demo"
    HOME="$home" "$finch" train --model "$model" --data "$data" --out "$run" --steps 24 --rank 8 --alpha 16 \
        --batch 2 --seq-len 64 --lr 1e-3 --eval-split 0.2 --eval-every 4 >/dev/null
fi

shot() { # page file
    HOME="$home" DISPLAY="$display" FINCH_UI_PAGE="$1" FINCH_UI_MODEL="$model" FINCH_UI_DATA="$data" \
        FINCH_UI_RUN="$run" "$finch" >/dev/null 2>&1 &
    local pid=$!
    sleep "${FINCH_SCREENSHOT_WAIT:-6}"
    DISPLAY="$display" import -window root "$out/$2"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "wrote $out/$2"
}
shot models models.png
shot data data.png
shot train train.png
shot chat chat.png
shot export export.png
shot settings settings.png
