#!/usr/bin/env bash
# The method comparison on the built-in miniature (README: "Comparing the methods on the built-in world").
# Every method with its paper's recipe (fixed before any method was run on the miniature), the same budget
# (search_spaces/compare.yaml: pretrained small_cnn, 400 steps of 3 x 32 images, Adam 3e-3 cosine, evaluation
# every 50 steps), every held-out domain, seeds 0-2, two trials at a time on a 2-core machine. Then one table.
#
#   bash docs/evidence/compare/run.sh [STORAGE]        # default ./distill_runs; resumable: rerun after a kill
set -euo pipefail
cd "$(dirname "$0")/../../.."
STORAGE=${1:-./distill_runs}

recipe() {   # the paper's recipe of each method, on top of compare.yaml
  case "$1" in
    erm)  ;;
    kd)   echo "teacher.online=true" ;;                                   # Hinton KD: the teacher on the student's views
    rise) echo "teacher.online=true teacher.prompts=rise" ;;              # train_rise.py
    scmd) echo "teacher.online=true teacher.prompts=scmd student.freeze_bn=true train.averaging=sma
                train.averaging_start=24" ;;                              # SMA from 300 of 5,001 steps -> 24 of 400
    vl2v) echo "teacher.online=true teacher.prompts=single student.freeze_bn=true train.averaging=swad" ;;
                                                                          # Align 400 + Distill 400 steps (two runs)
    li)   echo "teacher.prompts=li" ;;                                    # centre views, cached (precomputed)
  esac
}

for m in erm kd rise scmd vl2v li; do
  sets=(--set method.name=$m --set name=compare-$m)
  for s in $(recipe $m); do sets+=(--set "$s"); done
  resume=()
  [ -f "$STORAGE/compare-$m/sweep.json" ] && resume=(--resume)
  start=$(date +%s)
  python -m distill.tune --space search_spaces/compare.yaml --storage "$STORAGE" "${sets[@]}" "${resume[@]}"
  echo "compare-$m: $(( $(date +%s) - start )) s"
done
python -m distill.report "$STORAGE"/compare-{erm,kd,rise,scmd,vl2v,li} --out docs/evidence/compare --latex
