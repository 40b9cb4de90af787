#!/usr/bin/env bash
# Counts the system files (/proc, /sys) a Finch command opens, with strace, to prove that no
# per-token or per-step path reads them (each should be opened a handful of times at start-up,
# however many tokens or steps run). Needs strace (apt-get install strace).
#
#   scripts/count-system-file-opens.sh [finch binary] [finch arguments…]
#   default: target/release/finch bench generate --new-tokens 16
#
# Prints one line per opened path (count, path), then the total; run it with --new-tokens 16
# and 64 (or --steps 2 and 6 for bench train): the totals must be the same.
set -euo pipefail
bin=${1:-target/release/finch}
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(bench generate --new-tokens 16)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
strace -f -qq -e trace=openat -o "$log" "$bin" "${args[@]}" >/dev/null
grep -oE '"/(proc|sys)/[^"]*"' "$log" | tr -d '"' | sort | uniq -c | sort -rn
echo "total $(grep -cE '"/(proc|sys)/' "$log") opens of /proc and /sys files"
