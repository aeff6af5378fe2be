#!/usr/bin/env bash
# Every goal of issue 16, before and after, in one sitting (docs/benchmarks.md, "Issue 16: the final
# sitting"). Usage: bench/issue16_sitting.sh BEFORE_CHECKOUT [OUT_DIR]
#   git worktree add --detach ../before 3565ec2 && bench/issue16_sitting.sh ../before
# Runs from this checkout (the "after" side) with its .venv; each command's output goes to OUT_DIR
# (default: a new temporary directory), a summary to OUT_DIR/log. About 15 minutes on 2 vCPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
before=$(realpath "${1:?usage: bench/issue16_sitting.sh BEFORE_CHECKOUT [OUT_DIR]}")
out=${2:-$(mktemp -d /tmp/issue16-sitting.XXXXXX)}
mkdir -p "$out"
py=$PWD/.venv/bin/python
run() {
  local name=$1
  shift
  echo "=== $name $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$out/log"
  "$@" >"$out/$name.txt" 2>&1
  echo "    exit $? $(date -u +%H:%M:%S)" | tee -a "$out/log"
  tail -12 "$out/$name.txt" >>"$out/log"
}
run s5-before-1 "$py" -m bench --scenarios 5 --no-fetchmail --connector-root "$before"
run s5-after-1 "$py" -m bench --scenarios 5 --no-fetchmail
run s5-before-2 "$py" -m bench --scenarios 5 --no-fetchmail --connector-root "$before"
run s5-after-2 "$py" -m bench --scenarios 5 --no-fetchmail
run s6 "$py" -m bench.big_compare before="$before" after="$PWD" --rounds 8
run listing-before env PYTHONPATH="$before" "$py" bench/listing.py
run listing-after env PYTHONPATH="$PWD" "$py" bench/listing.py
run schedule "$py" -m bench.schedule --accounts 1000 --interval 30 --intervals 3 --code before="$before" --code after=.
run schedule-now "$py" -m bench.schedule --accounts 400 --interval 30 --intervals 0.4 --now \
  --code before="$before" --code after=.
run startup "$py" -m bench.startup --repo "$before" --repo . --runs 5 --imports 3
run s7 "$py" -m bench --scenarios 7 --no-fetchmail
run metrics-after "$py" -m bench.metrics --accounts 100000
run dist-before "$py" -m bench.distributed --scale 100000 --workers 1 --window 60 --warmup 15 --due-rate 40 \
  --tree "$before"
run dist-after "$py" -m bench.distributed --scale 100000 --workers 1 --window 60 --warmup 15 --due-rate 40
echo "results in $out"
