"""One trial end to end: real Ray Train (local, 2 CPUs), real MLflow (sqlite in a temp dir), real torchvision and
open_clip models at tiny sizes, on a small built-in world."""
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from distill import tracking
from distill.config import build_config, trial_config
from distill.train import prepare, run_trial

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def tiny(storage, **over):
    raw = {
        "name": "t",
        "storage": str(storage),
        "dataset": {"world": {"per_class": 20}},
        "teacher": {"fit_steps": 60},
        "method": {"name": "kd"},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3},
    }
    for key, value in over.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return trial_config(build_config(raw), "sketch")


@pytest.fixture
def mlflow_uri(session_storage, monkeypatch):
    uri = f"sqlite:///{session_storage / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_trial_writes_mlflow_run_with_per_domain_accuracies(ray_session, session_storage, mlflow_uri):
    cfg = tiny(session_storage)
    result = run_trial(cfg)
    m = result.metrics
    assert m["step"] == 6
    assert set(k for k in m if k.startswith("val_acc/")) == {"val_acc/photo", "val_acc/cartoon", "val_acc/painting"}
    assert m["val_acc"] == pytest.approx(sum(m[f"val_acc/{d}"] for d in ("photo", "cartoon", "painting")) / 3)
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("val_acc", "val_acc/photo", "test_acc", "test_out_acc", "loss", "loss/kd", "loss/ce"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(h.step for h in history) == [3, 6]
    assert run.data.params["method.name"] == "kd" and run.data.params["test_domain"] == "sketch"
    assert run.data.params["git_sha"] and run.data.params["split_hash"] == run.data.tags["distill.split_hash"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "best_checkpoint"} <= artifacts
    state = torch.load(client.download_artifacts(run.info.run_id, "model/model.pt"), weights_only=False)
    assert state["step"] == 6 and any(k.startswith("student.") for k in state["model"])


def test_rerunning_a_finished_trial_resumes_it(ray_session, session_storage, mlflow_uri):
    cfg = tiny(session_storage, **{"method.name": "erm"})
    first = run_trial(cfg)
    t0 = time.time()
    second = run_trial(cfg)  # same deterministic run name: resumes at the last step, re-evaluates, no training
    assert second.mlflow_run_id == first.mlflow_run_id
    assert second.metrics["step"] == 6
    assert second.metrics["val_acc"] == pytest.approx(first.metrics["val_acc"])
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(first.mlflow_run_id, "loss")
    assert len({h.step for h in history}) == len(history)  # no step was trained twice
    assert time.time() - t0 < 120


def test_black_box_method_never_loads_teacher_weights_in_workers(ray_session, session_storage, mlflow_uri):
    cfg = tiny(session_storage, **{"method.name": "vl2v"})
    assets = prepare(cfg)  # the driver fills the caches
    ckpt = Path(assets["teacher"]["checkpoint"])
    hidden = ckpt.with_suffix(".hidden")
    ckpt.rename(hidden)  # the teacher's weights are gone: any attempt to load them fails loudly
    try:
        result = run_trial(cfg, assets=assets)
    finally:
        hidden.rename(ckpt)
    assert result.metrics["step"] == 6


@pytest.mark.parametrize("method, terms", [
    ("rise", {"kd", "ce", "ad", "rd"}),
    ("scmd", {"ce", "kd", "cm", "selected"}),
    ("li", {"cls", "vlalign", "mse", "imcst"}),
])  # erm, kd and vl2v run end to end in the tests above
def test_each_method_runs_a_trial_end_to_end(ray_session, session_storage, mlflow_uri, method, terms):
    result = run_trial(tiny(session_storage, **{"method.name": method}))
    m = result.metrics
    assert m["step"] == 6 and 0.0 <= m["val_acc"] <= 1.0
    for term in terms:
        assert f"loss/{term}" in m and m[f"loss/{term}"] == m[f"loss/{term}"], term  # reported, not NaN
    run = mlflow.MlflowClient(mlflow_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == method
    if method == "scmd":  # 6 steps, k=0.25: steps 0-3 keep floor(0.2*24)=4 of 24 samples, steps 4-5 all 24;
        assert m["loss/selected"] == pytest.approx((4 + 24 + 24) / 3)  # the last report averages steps 3, 4, 5


def test_nan_loss_fails_the_trial_with_a_reason(ray_session, session_storage, mlflow_uri):
    cfg = tiny(session_storage, **{"method.name": "erm", "train.lr": 1e30, "train.steps": 4, "train.eval_every": 4,
                                   "train.max_failures": 0, "train.optimizer": "sgd"})
    with pytest.raises(Exception) as err:
        run_trial(cfg)
    assert "non-finite loss" in str(err.value)
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                              filter_string="attributes.status = 'FAILED'")
    assert any("non-finite loss" in r.data.tags.get("distill.failure", "") for r in runs)


def test_cli_rejects_a_bad_config_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: rise, temprature: 3}\ntrain: {steps: -1}\nstudent: {backbone: vgg}\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "distill.train", "--config", str(bad)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2
    for needle in ("method.temprature", "train.steps", "student.backbone: unknown backbone 'vgg'"):
        assert needle in proc.stderr, proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # nothing was started
    assert not (tmp_path / "distill_runs").exists()
    assert time.time() - t0 < 60


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{Path('rel/m.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert tracking.tracking_uri(tmp_path) == "http://head:5000"
