#!/usr/bin/env bash
# The method comparison on the built-in miniature (docs/evidence.md: "Comparing the methods on the built-in world").
# Every method with its paper's recipe (fixed before any method was run on the miniature), the same budget
# (search_spaces/compare.yaml: pretrained small_cnn, 400 steps of 3 x 32 images, Adam 3e-3 cosine, evaluation
# every 50 steps), every held-out domain, seeds 0-2, two trials at a time on a 2-core machine. Then one table.
#
#   bash docs/evidence/compare/run.sh [STORAGE]          # default ./distill_runs; resumable: rerun after a kill
#   bash docs/evidence/compare/run.sh [STORAGE] --lodo   # the same with leave-one-domain-out runs, seed 0 only
#                                                        # (each trial trains 1 + 3 models): compare-lodo-<method>
#   bash docs/evidence/compare/run.sh [STORAGE] --baselines
#       # DomainBed's baselines and MIRO (issue 20) beside ERM, the same protocol, each at its registry defaults
#       # (fixed before any run): erm coral mmd groupdro irm mixup sagnet miro miro_teacher, trials inline
#       # (the same weights as a TorchTrainer's, tests/test_train.py); table in docs/evidence/compare-baselines/;
#       # a sweep kept under <table dir>/sweeps/ (committed rows, docs/evidence/sweeps.py) is not run again
set -euo pipefail
cd "$(dirname "$0")/../../.."
STORAGE=${1:-./distill_runs}
LODO=${2:-}

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
    coral|mmd|groupdro|irm|mixup|sagnet) ;;                               # no teacher; DomainBed's defaults
    miro) echo "student.freeze_bn=true" ;;                                # MIRO's featurizer freezes BatchNorm
    miro_teacher) echo "student.freeze_bn=true" ;;                        # (its oracle: the teacher's embeddings)
  esac
}

prefix=compare; out=docs/evidence/compare; methods="erm kd rise scmd vl2v li"; extra=()
if [ "$LODO" = "--lodo" ]; then prefix=compare-lodo; out=docs/evidence/compare-lodo; fi
if [ "$LODO" = "--baselines" ]; then
  out=docs/evidence/compare-baselines; methods="erm coral mmd groupdro irm mixup sagnet miro miro_teacher"
  extra=(--set resources.launcher=inline)
fi
dirs=()
for m in $methods; do
  if [ -f "$out/sweeps/$prefix-$m/trials.jsonl" ]; then   # kept from an earlier session (committed): not run again
    dirs+=("$out/sweeps/$prefix-$m"); echo "$prefix-$m: kept"; continue
  fi
  dirs+=("$STORAGE/$prefix-$m")
  sets=(--set method.name=$m --set name=$prefix-$m)
  [ "$LODO" = "--lodo" ] && sets+=(--set "seeds=[0]" --set search.lodo=true)
  for s in $(recipe $m); do sets+=(--set "$s"); done
  resume=()
  [ -f "$STORAGE/$prefix-$m/sweep.json" ] && resume=(--resume)
  start=$(date +%s)
  python -m distill.tune --space search_spaces/compare.yaml --storage "$STORAGE" "${sets[@]}" "${extra[@]}" \
    "${resume[@]}"
  echo "$prefix-$m: $(( $(date +%s) - start )) s"
done
mkdir -p $out
python -m distill.report "${dirs[@]}" --out $out --latex
