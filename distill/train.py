"""One trial: ``python -m distill.train --config FILE.yaml [--set dotted.key=value ...] [--fresh]``.

The trial itself lives in ``distill.trial``: ``prepare`` (driver: world, images, splits, teacher, teacher-output
caches), ``loop`` (workers: augmented DomainBed batches, method loss, optimiser, evaluations, weight averaging) and
``launch`` (the Ray Train TorchTrainer and MLflow). This module is the command line.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import tracking
from .config import ConfigError, load_config, trial_config
from .trial.launch import ensure_ray, run_name, run_trial, summarize  # noqa: F401 - the public entry points
from .trial.loop import BEST_METRIC, CHECKPOINT_FILE, SELECTION_METRIC, train_loop  # noqa: F401
from .trial.prepare import prepare  # noqa: F401


def main(argv: list[str] | None = None, prog: str = "python -m distill.train") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run one trial (one held-out domain, one seed) as a Ray Train TorchTrainer, tracked in "
                               "MLflow; running the same trial again resumes it.",
        epilog="examples:\n  distill train --config search_spaces/demo.yaml\n"
               "  distill train --config search_spaces/demo.yaml --set method.name=kd --set test_domain=sketch",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="trial YAML (see search_spaces/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.name=kd --set test_domain=sketch")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run of the same trial")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    test_domain = None
    for item in list(overrides):  # `test_domain` picks the held-out domain of a single trial
        if item.startswith("test_domain="):
            test_domain = item.split("=", 1)[1].strip()
            overrides.remove(item)
    try:
        cfg = load_config(args.config, overrides)
        if test_domain and test_domain not in cfg["test_domains"]:
            from .data.registry import get_spec

            domains = get_spec(cfg["dataset"]["name"], None if cfg["dataset"]["name"] == "synth"
                               else cfg["dataset"]["root"]).domains
            if test_domain not in domains:
                raise ConfigError([f"test_domain: unknown domain {test_domain!r}; the dataset has {list(domains)}"],
                                  args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = trial_config(cfg, test_domain)
    t0 = time.time()
    if cfg["resources"]["launcher"] != "inline":   # inline: the trial runs in this process, without Ray
        ensure_ray()
    result = run_trial(cfg, fresh=args.fresh)
    print(summarize(result))
    print(f"[distill] trial finished in {time.time() - t0:.0f}s; MLflow run {result.mlflow_run_id} "
          f"(tracking URI {tracking.tracking_uri(cfg['storage'])})")
    return 0


if __name__ == "__main__":
    # run through the package module, so Ray pickles `train_loop` by reference, not as a __main__ function
    from distill.train import main as _main

    sys.exit(_main())
