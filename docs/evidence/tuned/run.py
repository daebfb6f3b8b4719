"""The tuned comparison on the built-in miniature (issue 18): every method searched at one budget, then one table.

Each method gets one sweep over search_spaces/compare.yaml (the miniature's world, built-in teacher, pretrained
small_cnn, 400 steps per stage, evaluation every 50 steps) with its paper's recipe (the same --set lines as
docs/evidence/compare/run.sh) and its own space: the learning rate log-uniform over [1e-4, 1e-2] plus the method's
hyperparameters with the distributions its registry declares (``Method.search_space``, read here, at run time).

- Budget: 6 trials per (method, held-out domain, seed); every held-out domain; seeds 0-2: 72 trials per method.
- Sampler: random search (``search.sampler: random``, DomainBed's protocol), sampler seed 0. With 6 trials TPE would
  draw the same points (its first 10 trials are random start-up draws with the same seed). The same sampler seed in
  every search: each method's 6 draws are shared by its 12 searches. Every method's first learning rate is the same;
  the later ones differ, since a method's other hyperparameters draw from the same random stream (this line said
  "the same 6 learning rates" before the runs, which was wrong).
- No ASHA: every trial runs its full budget, except collapsed ones (``train.stop_collapsed: 2``: at chance, or one
  class predicted, after 2 evaluation rounds = 100 steps of the last stage).
- Selection by source-domain validation over all trials and evaluation steps (DomainBed's training-domain validation).
- ``erm-equal-steps``: ERM with 800 steps, VL2V's two stages together, so that no method wins by budget.
- Then DomainBed's baselines and MIRO (issue 20), each over its registry space, the same budget: coral, mmd,
  groupdro, irm, mixup, sagnet, miro, miro_teacher (rows added after the first two had finished; their recipes are
  docs/evidence/compare/run.sh --baselines', fixed before any of their runs).
- Two single-core trials at a time (2-core machine), ``resources.launcher: inline`` (no per-trial processes: half the
  wall time of a TorchTrainer per trial on this machine, docs performance page).

    python docs/evidence/tuned/run.py [--storage DIR] [--only erm,kd]   # resumable: run it again after a kill
    python docs/evidence/tuned/run.py --report                          # the table from what has finished
                                                                        # + fixed-vs-tuned.md (summary.py)

Each finished sweep's rows, plan, teacher and trial seconds are copied to docs/evidence/tuned/sweeps/<sweep>/
(committed; a later run skips it: docs/evidence/sweeps.py); the table, docs/evidence/tuned/{results.md,results.json,
...}, is built from them (distill.report, paired against tuned ERM); timings.json: each sweep's wall seconds and the
machine load at its start and end.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT.parent))
from sweeps import REPO, done, run  # noqa: E402  (docs/evidence/sweeps.py)

SPACE_FILE = REPO / "search_spaces" / "compare.yaml"
LR = {"loguniform": [1.0e-4, 1.0e-2]}
TRIALS = 6
# the paper's recipe of each method on top of compare.yaml (as docs/evidence/compare/run.sh, fixed before any run)
RECIPES = {
    "erm": [],
    "kd": ["teacher.online=true"],
    "rise": ["teacher.online=true", "teacher.prompts=rise"],
    "scmd": ["teacher.online=true", "teacher.prompts=scmd", "student.freeze_bn=true", "train.averaging=sma",
             "train.averaging_start=24"],
    "vl2v": ["teacher.online=true", "teacher.prompts=single", "student.freeze_bn=true", "train.averaging=swad"],
    "li": ["teacher.prompts=li"],
}
# issue 20's baselines, after the rows above (as docs/evidence/compare/run.sh --baselines): no teacher, or MIRO's
# featurizer with frozen BatchNorm (its oracle the initial backbone, or the teacher's image embedding)
BASELINES = {m: [] for m in ("coral", "mmd", "groupdro", "irm", "mixup", "sagnet")}
BASELINES.update(miro=["student.freeze_bn=true"], miro_teacher=["student.freeze_bn=true"])
# sweep name -> (method, extra --set lines): the rows of the table, in order
ROWS = {f"tuned-{m}": (m, []) for m in RECIPES}
ROWS["tuned-erm-equal-steps"] = ("erm", ["train.steps=800"])   # Align 400 + Distill 400 of VL2V
ROWS.update({f"tuned-{m}": (m, []) for m in BASELINES})
RECIPES.update(BASELINES)


def space(method: str) -> dict:
    from distill.methods import get_method

    return {"train.lr": LR, **{f"method.{k}": v for k, v in get_method(method).search_space.items()}}


def sets(sweep: str) -> list[str]:
    """The sweep's --set values."""
    method, extra = ROWS[sweep]
    import yaml

    flow = yaml.safe_dump(space(method), default_flow_style=True, width=10000, sort_keys=False).strip()
    return [f"name={sweep}", f"method.name={method}", f"search.num_samples={TRIALS}", "search.sampler=random",
            "search.sampler_seed=0", "search.scheduler=none", "search.max_concurrent=2",
            "resources.launcher=inline", "train.stop_collapsed=2", f"search.space={flow}", *RECIPES[method], *extra]


def report() -> None:
    dirs = [str(OUT / "sweeps" / s) for s in ROWS if done(OUT, s)]
    if not dirs:
        raise SystemExit("[tuned] no finished sweep yet")
    subprocess.check_call([sys.executable, "-m", "distill.report", *dirs, "--out", str(OUT), "--latex",
                           "--baseline", "erm [tuned-erm]" if len([d for d in dirs if "tuned-erm" in d]) > 1
                           else "erm"], cwd=REPO)
    import summary   # docs/evidence/tuned/summary.py: fixed-vs-tuned.{md,json}

    summary.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", default=str(REPO / "distill_runs"), help="where the sweeps run (resumable)")
    parser.add_argument("--only", help="comma-separated sweep names or methods (default: every row)")
    parser.add_argument("--report", action="store_true", help="only build the table from the finished sweeps")
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    names = list(ROWS)
    if args.only:
        wanted = set(args.only.split(","))
        names = [n for n in names if n in wanted or n.removeprefix("tuned-") in wanted]
    if not args.report:
        run(OUT, storage, SPACE_FILE, {n: sets(n) for n in names})
    report()


if __name__ == "__main__":
    main()
