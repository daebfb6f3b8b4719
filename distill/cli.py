"""The ``distill`` command: one entry point for every part (``python -m distill`` runs it too).

    distill tune    --space search_spaces/demo.yaml            a sweep (Ray Tune + Optuna over Ray Train trials)
    distill train   --config search_spaces/demo.yaml           one trial
    distill report  distill_runs/demo                          the DomainBed tables and plots of sweeps
    distill ui      distill_runs                               the MLflow UI, opened on each sweep's answer
    distill teacher fit --data distill_runs/data/synth         fit or measure a CLIP teacher
    distill student pretrain --backbone small_cnn              pretrain a student on the built-in photo corpus
    distill data    info distill_runs/data/synth               a dataset's domains, classes and counts

Each subcommand takes the options of its ``python -m distill.<part>`` form (``distill <part> --help``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module whose main(argv) runs it, one line on what it does)
COMMANDS = {
    "tune": ("distill.tune.cli", "run a hyperparameter sweep: Ray Tune + Optuna over Ray Train trials"),
    "train": ("distill.train", "run one trial (one held-out domain, one seed) on Ray Train"),
    "report": ("distill.report", "select models and build the DomainBed tables and plots of sweeps"),
    "ui": ("distill.ui", "serve a sweep's MLflow store on 127.0.0.1 and print the link to its selected models"),
    "teacher": ("distill.teacher", "fit a CLIP-architecture teacher, or measure a teacher's zero-shot accuracy"),
    "student": ("distill.student", "pretrain a student backbone on the built-in photo corpus"),
    "data": ("distill.data.__main__", "draw the built-in world, or list a dataset's domains, classes and counts"),
}


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("distill")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="distill", description="Distil CLIP teachers into small students that generalise to unseen domains, "
                                    "sweep their hyperparameters on Ray, and review them in MLflow.",
        epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()) +
               "\n\n'distill COMMAND --help' describes a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distill {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])   # --help, --version, or an unknown command (exits)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"distill {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
