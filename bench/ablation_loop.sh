#!/usr/bin/env bash
# The full M0 -> M3 loop for the best settings of the one-iteration ablation (bench/ablation.py; issue 13, item 2),
# beside run.sh's default: does a one-iteration difference hold over three iterations?
#
#   for s in 0 1 2; do SEED=$s bash run.sh; done     # the default, both objectives: runs/seed<S>
#   bash bench/ablation_loop.sh                      # STEP_AGGREGATION=sum and BETA=0.05, seeds 0 1 2 (about 4 min per run)
#   SEEDS="0" SETTINGS="W_STEP=2" bash bench/ablation_loop.sh
#
# Each setting is one run.sh setting (NAME=VALUE) and gets its own runs folder, $OUT/NAME=VALUE, where run.sh runs
# Step-KTO (OBJECTIVES=step-kto) for each seed. A seed starts from the default run's files that the setting does not
# change, copied in: data, M0, M0's evaluation and Step-KTO's iteration-1 samples and labels (run.sh would make the
# same files again: same M0, same sampling seed). Training starts at iteration 1. Resumable like run.sh: a rerun skips
# what is complete. At the end, report.py's table for the default and for each setting.
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT=${DEFAULT:-runs}                  # run.sh's default runs (RUNS): seed<S>/{data,M0,eval,step-kto/iter1}
OUT=${OUT:-runs_loop}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=${SETTINGS:-STEP_AGGREGATION=sum BETA=0.05}
PY=${PYTHON:-.venv/bin/python}

for setting in $SETTINGS; do
    case $setting in *=*) ;; *) echo "error: SETTINGS: $setting: must be NAME=VALUE (a run.sh setting)" >&2; exit 2 ;; esac
done
for s in $SEEDS; do
    src=$DEFAULT/seed$s
    for f in data M0 eval/M0/result.json step-kto/iter1/labels.jsonl; do
        [ -e "$src/$f" ] || { echo "error: $src/$f missing: run SEED=$s RUNS=$DEFAULT bash run.sh first" >&2; exit 2; }
    done
    for setting in $SETTINGS; do
        dst=$OUT/$setting/seed$s
        if [ ! -d "$dst/step-kto/iter1" ]; then  # copied whole, then renamed: a crash leaves no half copy
            rm -rf "$dst.tmp" && mkdir -p "$dst.tmp/step-kto/iter1"
            cp -r "$src/data" "$src/M0" "$src/eval" "$dst.tmp/"
            cp "$src/step-kto/iter1/samples.jsonl" "$src/step-kto/iter1/labels.jsonl" "$dst.tmp/step-kto/iter1/"
            mv "$dst.tmp" "$dst"
        fi
        echo "== seed $s: $setting"
        env "$setting" SEED="$s" OBJECTIVES=step-kto RUNS="$OUT/$setting" PYTHON="$PY" bash run.sh
    done
done
echo "== default ($DEFAULT)"
$PY report.py --runs "$DEFAULT"
for setting in $SETTINGS; do
    echo "== $setting ($OUT/$setting)"
    $PY report.py --runs "$OUT/$setting"
done
