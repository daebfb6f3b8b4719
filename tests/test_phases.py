"""A trial's phase breakdown (what its fixed cost is made of) and how many trials a sweep starts ahead of a free slot:
pinned with hand-computed values."""
from __future__ import annotations

import pytest
import yaml

from distill import tune
from distill.trial.launch import format_phases, phase_breakdown


def test_phase_breakdown_takes_the_slot_wait_out_of_the_fixed_cost():
    driver = {"start": 100.0, "prepared": 101.0, "tracked": 101.5, "fit": 102.0, "fitted": 150.0, "done": 151.0}
    worker = {"time/worker_entered": 120.0, "time/worker_imported": 120.5, "time/data_loaded": 121.0,
              "time/teacher_outputs_loaded": 122.0, "time/ready": 123.0, "time/reported": 148.0,
              "time/eval_seconds": 3.0, "time/slot_wait_seconds": 12.0, "val_acc": 0.5}
    p = phase_breakdown(driver, worker)
    assert p == {"prepare": 1.0, "mlflow_run": 0.5, "workers_start": 6.0,   # 18 s from fit() to the worker, 12 queued
                 "worker_imports": 0.5, "data": 0.5, "teacher_outputs": 1.0, "student_build": 1.0, "training": 25.0,
                 "shutdown": 2.0, "models_logged": 1.0, "slot_wait": 12.0, "evaluations": 3.0, "total": 51.0,
                 "fixed": 17.0}   # 51 - (25 - 3 of evaluations) - 12 waiting for a slot
    line = format_phases(p)
    assert "workers_start 6.0" in line and "slot_wait 12.0" in line and line.endswith("fixed cost 17.0s of 51.0s")
    # a trial that did not wait (or a Ray without placement-group stats): the whole start counts
    alone = phase_breakdown(driver, {k: v for k, v in worker.items() if k != "time/slot_wait_seconds"})
    assert alone["workers_start"] == 18.0 and alone["slot_wait"] == 0.0 and alone["fixed"] == 29.0
    # a finished trial run again reports no worker phases: its whole time is fixed cost
    again = phase_breakdown(driver, {})
    assert again["fixed"] == again["total"] == 51.0 and "workers_start" not in again


@pytest.mark.parametrize("given, gpus, running, samples, searches, expected", [
    (None, 0.5, 2, 4, 4, 2),     # default for GPU trials: one per running trial
    (None, 1, 16, 20, 4, 8),     # ... at most 8
    (None, 1, 2, 1, 3, 1),       # never more than the trials left once the first ones run
    (None, 0, 2, 4, 4, 0),       # default for CPU trials: none (their start-up would take the running trials' CPU)
    (0, 1, 2, 4, 4, 0),          # 0: a trial starts only when a slot is free
    (5, 0, 2, 4, 4, 5),
])
def test_start_ahead(tmp_path, given, gpus, running, samples, searches, expected):
    domains = ["photo", "cartoon", "painting", "sketch"][:searches]
    data = {"name": "ahead", "storage": str(tmp_path), "test_domains": domains, "dataset": {"world": {"per_class": 20}},
            "method": {"name": "erm"}, "seeds": [0], "resources": {"gpus_per_worker": gpus},
            "search": {"num_samples": samples, "start_ahead": given}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = tune.make_plan(path)
    n, why = tune.start_ahead(plan, running)
    assert n == expected
    assert ("waiting for a slot" in why) == (expected > 0)
    # the number may change between a sweep and its --resume, as max_concurrent may
    other = tune.make_plan(path, [f"search.start_ahead={expected + 1}"])
    assert other.fingerprint() == plan.fingerprint()
