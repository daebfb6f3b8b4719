"""The search's own efficiency (issue 18): TPE against random search, and TPE with ASHA, searching SCMD on the
built-in miniature at the same trial budget.

SCMD: 6 hyperparameters (the learning rate log-uniform over [1e-4, 1e-2], the registry's five), the method that
collapsed at a borrowed learning rate; its paper's recipe on search_spaces/compare.yaml (as the tuned comparison,
docs/evidence/tuned/run.py). One held-out domain, sketch (the hard one of PACS, the headline domain of DG papers;
chosen before any run), data seed 0, 16 trials per search, each variant repeated with sampler seeds 0, 1 and 2:

- random: Optuna's RandomSampler;
- tpe: Optuna's TPE as distill ships it (multivariate, grouped). Its first 10 trials are random start-up draws: with
  the same sampler seed they are exactly random search's first 10, so the two differ only in trials 11-16;
- tpe-asha: TPE with ASHA (grace period 2 evaluation rounds = 100 steps, reduction factor 2).

Every variant stops collapsed trials after 2 evaluation rounds (train.stop_collapsed: 2). Two single-core trials at a
time, resources.launcher inline. Then analyse.py draws the figure and writes results.json.

    python docs/evidence/search/run.py [--storage DIR]      # resumable: run it again after a kill
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT.parent))
sys.path.insert(0, str(OUT.parent / "tuned"))
from sweeps import REPO, run  # noqa: E402  (docs/evidence/sweeps.py)
from run import SPACE_FILE, sets as tuned_sets  # noqa: E402  (docs/evidence/tuned/run.py: SCMD's recipe and space)

TRIALS = 16
SAMPLER_SEEDS = (0, 1, 2)
VARIANTS = {
    "random": ["search.sampler=random", "search.scheduler=none"],
    "tpe": ["search.sampler=tpe", "search.scheduler=none"],
    "tpe-asha": ["search.sampler=tpe", "search.scheduler=asha", "search.asha={grace_period: 2, reduction_factor: 2}"],
}


def sweeps() -> dict[str, list[str]]:
    base = [v for v in tuned_sets("tuned-scmd") if not v.startswith(("name=", "search.num_samples=", "search.sampler",
                                                                    "search.scheduler="))]
    out = {}
    for variant, values in VARIANTS.items():
        for seed in SAMPLER_SEEDS:
            name = f"search-scmd-{variant}-s{seed}"
            out[name] = [f"name={name}", *base, f"search.num_samples={TRIALS}", f"search.sampler_seed={seed}",
                         "test_domains=[sketch]", "seeds=[0]", *values]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", default=str(REPO / "distill_runs"), help="where the sweeps run (resumable)")
    args = parser.parse_args()
    # the variants interleaved by sampler seed: an interrupted run leaves comparable, paired parts
    names = sorted(sweeps(), key=lambda n: (n[-1], list(VARIANTS).index(n.split("-", 2)[2].rsplit("-", 1)[0])))
    run(OUT, Path(args.storage).resolve(), SPACE_FILE, {n: sweeps()[n] for n in names})
    subprocess.check_call([sys.executable, str(OUT / "analyse.py")], cwd=REPO)


if __name__ == "__main__":
    main()
