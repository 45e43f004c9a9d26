#!/bin/bash
# Runs the pause matrix of issue #6 (1/8/64 threads, busy/sleeping/blocked, 1/100
# functions, patch and unpatch) and prints one markdown table. Blocked rows: THREADS idle
# workers blocked in the kernel plus one spinning observer (the only thread measured);
# their "fenced" column is how many threads the commit left in their syscalls.
# Usage: scripts/bench-matrix.sh [CYCLES] [OUTDIR]   (release build, run on a quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-20}
OUT=${2:-/tmp/livecare-bench-matrix}
mkdir -p "$OUT"
cargo build --release -q -p livecare
R=target/release/livecare
for f in 1 100; do for m in busy sleeping blocked; do for t in 1 8 64; do
  c=$CYCLES; [ "$t" = 64 ] && [ "$m" = busy ] && c=$(( (CYCLES + 1) / 2 ))
  $R bench pause --threads $t --$m --functions $f --cycles $c --json > "$OUT/pause-$t-$m-$f.json" \
    || { echo "pause $t $m $f failed" >&2; rm -f "$OUT/pause-$t-$m-$f.json"; }
done; done; done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
print("| threads | mode | functions | op | observed pause med / p99 µs | tool med / p99 µs | entry / exit med µs | window gap med / p99 µs | baseline gap med µs | wall ms med | attempts | fenced med | loadavg before |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in (1, 100):
    for m in ("busy", "sleeping", "blocked"):
        for t in (1, 8, 64):
            p = os.path.join(out, f"pause-{t}-{m}-{f}.json")
            if not os.path.exists(p):
                continue
            d = json.load(open(p))
            for op in ("patch", "unpatch"):
                x = d[op]
                print(f"| {t} | {m} | {f} | {op} | {x['pause_us_median']:.0f} / {x['pause_us_p99']:.0f} | "
                      f"{x['tool_pause_us_median']:.0f} / {x['tool_pause_us_p99']:.0f} | "
                      f"{x.get('entry_us_median', 0):.0f} / {x.get('exit_us_median', 0):.0f} | "
                      f"{x['window_gap_us_median']:.0f} / {x['window_gap_us_p99']:.0f} | {x['baseline_gap_us_median']:.0f} | "
                      f"{x['wall_ms_median']:.1f} | {x['attempts_mean']} | {x.get('threads_fenced_median', 0):.0f} | {d['loadavg_before']} |")
PY
