"""``python -m distill.tune --space FILE.yaml [--storage DIR_OR_URI] [--set key=value ...] [--resume] [--dry-run]``."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from .driver import run_sweep
from .plan import describe, make_plan


def preparation_errors() -> tuple:
    """What a sweep's preparation raises for bad data or an unavailable teacher: a one-line error, exit 2."""
    from ..data.images import UnreadableImageError
    from ..data.registry import DatasetError
    from ..models.prompts import PromptError
    from ..models.teachers import TeacherError

    return (DatasetError, UnreadableImageError, TeacherError, PromptError, FileExistsError)


def main(argv: list[str] | None = None, prog: str = "python -m distill.tune") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a hyperparameter sweep: every (held-out domain, seed) search at once, Ray Tune + "
                               "Optuna over Ray Train trials, model selection and the DomainBed table, all in MLflow.",
        epilog="examples:\n  distill tune --space search_spaces/demo.yaml --dry-run\n"
               "  distill tune --space search_spaces/demo.yaml\n"
               "  distill tune --space search_spaces/scmd.yaml --set search.num_samples=8 --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, metavar="FILE.yaml",
                        help="sweep YAML: the trial schema plus `seeds` and `search` (see search_spaces/demo.yaml)")
    parser.add_argument("--storage", metavar="DIR_OR_URI",
                        help="overrides `storage:` (a directory); a URI (s3://, gs://) puts Tune/Train results there")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value, e.g. --set search.num_samples=8 --set train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep from its storage")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="also Ray's own status tables, Ray Train's per-report and checkpoint lines and its "
                             "controller's per-trial resource requests")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args.space, args.overrides, args.storage)
        if args.dry_run:
            print(describe(plan))
            return 0
        results = run_sweep(plan, resume=args.resume, verbose=args.verbose)
        if results.get("unregistered"):
            return 1   # a selected model is not in the registry: the sweep's answer is incomplete
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except preparation_errors() as exc:
        print(f"error: preparing the sweep failed, nothing was started ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
