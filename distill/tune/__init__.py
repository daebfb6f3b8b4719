"""Hyperparameter sweeps: ``python -m distill.tune --space FILE.yaml [--storage DIR_OR_URI] [--set key=value ...]
[--resume] [--dry-run]``.

The YAML is the single-trial schema (``distill.config``) plus the sweep sections ``seeds`` and ``search``
(``plan``: validated completely before anything starts; ``space``: the define-by-run search space). Every search
(held-out domain x seed) has its own Optuna study (TPE); all searches share one Ray Tune experiment, so the cluster's
trial slots are filled from whichever search has trials left (``driver``). Each Tune trial is a function that runs one
``distill.trial.launch.run_trial`` (a Ray Train ``TorchTrainer`` reporting through ``TuneReportCallback``;
``trainable``). Optuna and ASHA only ever see ``val_acc_best`` (source-domain validation); the test domain's
accuracies are logged and reported, never optimised. Every evaluation row is appended to
``<storage>/<sweep>/trials.jsonl``, from which ``distill.report`` selects models; ``runs`` keeps MLflow in step.
"""
from .cli import main
from .driver import concurrency, run_sweep, start_ahead, warm_caches
from .plan import (PLAN_FILE, ROWS_FILE, SEARCH_DEFAULTS, SWEEP_FILE, Plan, describe, make_plan, search_name,
                   train_run_name, trial_cfg, trial_raw)
from .space import METRIC, MODE, Param, SearchSpace, parse_space
from .trainable import FinishingASHA, SweepTrial, TrialLog, error_reason, finished_metrics
from .runs import finish, reconcile_runs, register_selected

__all__ = ["FinishingASHA", "METRIC", "MODE", "PLAN_FILE", "Param", "Plan", "ROWS_FILE", "SEARCH_DEFAULTS",
           "SWEEP_FILE", "SearchSpace", "SweepTrial", "TrialLog", "concurrency", "describe", "error_reason",
           "finish", "finished_metrics", "main", "make_plan", "parse_space", "reconcile_runs", "register_selected",
           "run_sweep", "search_name", "start_ahead", "train_run_name", "trial_cfg", "trial_raw", "warm_caches"]
