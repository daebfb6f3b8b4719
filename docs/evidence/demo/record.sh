#!/usr/bin/env bash
# The demo as a user runs it: the README's first command in a fresh clone of this repository (a new venv, an empty
# storage), timed; then its results.md and accuracy plot copied here, for the README's table and figure
# (tests/test_docs.py checks the README against them). Run it alone on the machine.
#
#   bash docs/evidence/demo/record.sh [CLONE_DIR]       # default /tmp/distill-demo-clone; log: CLONE_DIR.log
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
CLONE="${1:-/tmp/distill-demo-clone}"
LOG="$CLONE.log"
rm -rf "$CLONE" && git clone -q "$REPO" "$CLONE" && cd "$CLONE"
echo "clone of $(git -C "$REPO" rev-parse --short HEAD) in $CLONE; log: $LOG"
python3 -m venv .venv && . .venv/bin/activate && pip install -q -c constraints.txt -e . > "$CLONE.install.log" 2>&1
unset MLFLOW_TRACKING_URI
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" > "$LOG"
start=$(date +%s)
distill tune --space search_spaces/demo.yaml >> "$LOG" 2>&1
echo "exit 0 in $(( $(date +%s) - start )) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
grep -n "Warning\|WARNING\|could not\|Error\|Traceback" "$LOG" && echo "^ lines a user would read as problems" || echo "no warning or error line"
cp distill_runs/demo/results.md "$HERE/results.md"
cp distill_runs/demo/plots/accuracy.png "$HERE/accuracy.png"
echo "copied results.md and accuracy.png to $HERE"
