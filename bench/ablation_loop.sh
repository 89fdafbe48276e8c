#!/usr/bin/env bash
# The full M0 -> M3 loop under other run.sh settings, beside run.sh's default runs of the same seeds: does a
# one-iteration difference of the ablation (bench/ablation.py) hold over three iterations, and
# how do the two objectives compare when feedback is scarcer (README "Where step feedback pays in Pass@1")?
#
#   for s in 0 1 2; do SEED=$s bash run.sh; done     # the default, both objectives: runs/seed<S>
#   bash bench/ablation_loop.sh                      # STEP_AGGREGATION=sum and BETA=0.05, seeds 0 1 2 (about 4 min per run)
#   SEEDS="0" SETTINGS="W_STEP=2" bash bench/ablation_loop.sh
#   TASK=hard OBJECTIVES="step-kto kto" SETTINGS="SAMPLES=2 SAMPLES=1 MAX_PROBLEMS=250" bash bench/ablation_loop.sh
#                                                    # both objectives on the hard task's runs (runs_hard), less feedback
#
# Each setting is one run.sh setting (NAME=VALUE) and gets its own runs folder, $OUT/NAME=VALUE, where run.sh runs
# OBJECTIVES (Step-KTO alone unless set) for each seed. A seed starts from a copy of the default run's data, M0,
# M0's evaluation and Step-KTO's iteration-1 samples and labels, with their provenance records, and run.sh runs with
# ON_CHANGE=redo: what the setting changes (the samples under SAMPLES=1, M0 under NUM_SFT=...) is made again, the
# rest is reused. Resumable like run.sh: a rerun skips what is complete. At the end, stepkto/report.py's table for the
# default and for each setting. Other run.sh settings in the environment (TASK, ITERATIONS, ...) reach every run.
set -euo pipefail
cd "$(dirname "$0")/.."
HARD=$([ "${TASK:-default}" = hard ] && echo _hard || true)
DEFAULT=${DEFAULT:-runs$HARD}             # run.sh's default runs (RUNS): seed<S>/{data,M0,eval,step-kto/iter1}
OUT=${OUT:-runs${HARD}_loop}
OBJECTIVES=${OBJECTIVES:-step-kto}
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
        if [ ! -d "$dst" ]; then  # copied whole, then renamed: a crash leaves no half copy
            rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
            cp -r "$src/data" "$src/M0" "$src/eval" "$dst.tmp/"
            mkdir -p "$dst.tmp/step-kto" && cp -r "$src/step-kto/iter1" "$dst.tmp/step-kto/"
            mv "$dst.tmp" "$dst"
        fi
        echo "== seed $s: $setting"
        env "$setting" SEED="$s" OBJECTIVES="$OBJECTIVES" RUNS="$OUT/$setting" PYTHON="$PY" ON_CHANGE=redo bash run.sh
    done
done
echo "== default ($DEFAULT)"
$PY -m stepkto.report --runs "$DEFAULT"
for setting in $SETTINGS; do
    echo "== $setting ($OUT/$setting)"
    $PY -m stepkto.report --runs "$OUT/$setting"
done
