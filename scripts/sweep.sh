#!/usr/bin/env bash
# A parameter sweep with DVC experiments: queue a grid, run it JOBS experiments at a time, wait, and
# show the swept params with the macro-F1 columns that changed (a Markdown table: a terminal-width
# table would cut columns).
#
#   scripts/sweep.sh JOBS -S section.key=v1,v2 [-S section.key=v1,v2 ...]
#   e.g. scripts/sweep.sh 2 -S distill_vanilla.temperature=2,4,8 -S distill_vanilla.alpha=0.5,0.9
#
# Comma lists build the grid (DVC's own -S syntax: 3 x 2 = 6 experiments). Each experiment runs
# `dvc repro` in its own workspace under .dvc/tmp/exps, starting from the last commit's dvc.lock and
# the DVC cache, so only the stages whose params change re-run. Stages track into MLflow through
# MLFLOW_TRACKING_URI (the Makefile exports an absolute one; unset, pipeline/tracking.py finds the
# project's mlflow.db from inside the experiment workspace). Apply a winner with `dvc exp apply NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 JOBS -S section.key=v1,v2 [-S ...]   e.g. $0 2 -S distill_vanilla.temperature=2,4,8" >&2
  exit 2
fi
jobs=$1
shift

# The swept keys (section.key), kept as columns of the table.
keys=()
for arg in "$@"; do
  [[ $arg == *=* ]] && keys+=("^${arg%%=*}\$")
done

queued=$(dvc exp run --queue "$@" | tee /dev/stderr |
  sed -n "s/^Queued experiment '\(.*\)' for future execution\.$/\1/p")
if [[ -z $queued ]]; then
  echo "error: sweep: dvc exp run --queue queued nothing (see its output above)" >&2
  exit 1
fi
echo "Running $(wc -l <<<"$queued") experiments, $jobs at a time"
dvc queue start -j "$jobs"

# This sweep's rows of `dvc queue status` (which also lists earlier experiments).
ours() { dvc queue status | grep -wF -f <(echo "$queued") || true; }
while ours | grep -qwE 'Queued|Running'; do
  sleep 10
done

failed=$(ours | grep -w Failed || true)
dvc exp show --no-pager --md --only-changed \
  --keep '^(Experiment|Created)$' $(printf -- "--keep %s " "${keys[@]}") \
  --drop '^(?!.*(validation|test)_macro_f1$)'
if [[ -n $failed ]]; then
  echo "error: sweep: these experiments failed (dvc queue logs NAME shows why):" >&2
  echo "$failed" >&2
  exit 1
fi
