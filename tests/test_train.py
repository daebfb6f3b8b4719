"""One trial end to end: real Ray Train (local, 2 CPUs), real MLflow (sqlite in a temp dir), real torchvision and
open_clip models at tiny sizes, on a small built-in world."""
import json
import os
import subprocess
import sys
import textwrap
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
    # every trial's phase breakdown (printed by run_trial, logged as phase/*): where its fixed cost went
    phases = {k[len("phase/"):]: v for k, v in run.data.metrics.items() if k.startswith("phase/")}
    assert {"prepare", "workers_start", "data", "teacher_outputs", "training", "slot_wait", "fixed", "total"} <= \
        set(phases) and phases == pytest.approx(result.phases, abs=1e-6)
    assert 0 < phases["fixed"] < phases["total"] and phases["slot_wait"] < 1.0   # nothing else ran: no wait
    # the trial's actors: Train's own, less the Ray Data manager a run without Ray Datasets does not need
    from ray.util.state import list_actors

    started = {a.class_name for a in list_actors(limit=10000)}
    assert {"TrainController", "RayTrainWorker"} <= started and "DatasetManager" not in started
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(h.step for h in history) == [3, 6]
    assert run.data.params["method.name"] == "kd" and run.data.params["test_domain"] == "sketch"
    assert run.data.params["git_sha"] and run.data.params["split_hash"] == run.data.tags["distill.split_hash"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "best_checkpoint"} <= artifacts
    state = torch.load(client.download_artifacts(run.info.run_id, "model/model.pt"), weights_only=True)
    assert state["step"] == 6 and any(k.startswith("student.") for k in state["model"])
    # the exact prompts the trial embedded: {set: {class: [prompts]}}, over the source domains only
    prompts = json.loads(Path(client.download_artifacts(run.info.run_id, "prompts.json")).read_text())
    assert prompts["classes"]["circle"] == ["a photo of a circle.", "a cartoon of a circle.", "a painting of a circle."]
    assert not any("sketch" in p for rows in prompts.values() for row in rows.values() for p in row)
    # teacher_logit_scale: auto -> the fitted teacher's own learned scale, read here from its checkpoint file
    teacher = torch.load(run.data.params["teacher.resolved_checkpoint"], weights_only=True)
    scale = float(teacher["logit_scale"].exp())
    assert run.data.params["method.teacher_logit_scale"] == "auto"
    assert float(run.data.params["method.teacher_logit_scale.resolved"]) == pytest.approx(scale, rel=1e-6)
    assert float(run.data.params["teacher.logit_scale"]) == pytest.approx(scale, rel=1e-6)


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
    assert result.metrics["step"] == 12   # Align then Distill, train.steps each


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


def _final_weights(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("over, kills", [
    ({"method.name": "vl2v", "train.averaging": "swad", "method.align_steps": 6, "method.distill_steps": 6,
      "train.eval_every": 2}, (5, 9)),                 # a kill mid-averaging in Align, then one in Distill
    ({"method.name": "scmd", "train.averaging": "sma", "train.averaging_start": 2, "train.steps": 8,
      "train.eval_every": 3}, (5,)),                   # a kill mid-averaging
])
def test_a_worker_killed_mid_averaging_or_mid_stage_resumes_to_the_same_model(ray_session, session_storage,
                                                                              mlflow_uri, tmp_path, over, kills):
    """The worker process dies (as a killed node's would); Ray Train restarts it from the last checkpoint, and the
    trial ends with exactly the weights (and evaluations) of an uninterrupted run: the averager's state, the stage
    hand-off and the data stream travel with the checkpoint."""
    cfg = tiny(session_storage, **{"student.backbone": "small_cnn", "train.max_failures": 1, **over})
    assets = prepare(cfg)
    clean = run_trial(cfg, assets=assets, name=f"clean-{cfg['method']['name']}")
    killed = None
    for i, step in enumerate(kills):   # one kill per run, so that each resume starts where the kill was
        faulty = {**assets, "inject_fault": {"step": step, "marker": str(tmp_path / f"killed-{i}")}}
        killed = run_trial(cfg, assets=faulty, name=f"killed-{cfg['method']['name']}-{i}")
        assert (tmp_path / f"killed-{i}").exists()   # the worker did die
        a, b = _final_weights(clean), _final_weights(killed)
        assert a["step"] == b["step"] and a["metrics"]["eval_model"] == b["metrics"]["eval_model"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]


def test_an_inline_trial_trains_the_torchtrainers_model_and_starts_no_train_actor(ray_session, session_storage,
                                                                                mlflow_uri, tmp_path):
    """resources.launcher inline: the same loop in this process. It ends with exactly the weights and evaluations
    of the TorchTrainer run of the same trial (here after a fault mid-averaging, retried from its last checkpoint),
    and starts no Ray Train actor."""
    from ray.util.state import list_actors

    over = {"method.name": "scmd", "train.averaging": "sma", "train.averaging_start": 2, "train.steps": 8,
            "train.eval_every": 3}
    cfg = tiny(session_storage, **{"student.backbone": "small_cnn", "train.max_failures": 1, **over})
    clean = run_trial(cfg, name="clean-scmd")   # the parametrized test's clean run (or the same run, fresh)
    trainers = sum(a.class_name == "TrainController" for a in list_actors(limit=10000))
    inline_cfg = tiny(session_storage, **{"student.backbone": "small_cnn", "train.max_failures": 1,
                                          "resources.launcher": "inline", **over})
    faulty = {**prepare(inline_cfg), "inject_fault": {"step": 5, "marker": str(tmp_path / "fault")}}
    inline = run_trial(inline_cfg, assets=faulty, name="inline-scmd", fresh=True)
    assert (tmp_path / "fault").read_text() == "5"   # the fault did happen
    a, b = _final_weights(clean), _final_weights(inline)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert sum(a.class_name == "TrainController" for a in list_actors(limit=10000)) == trainers
    assert inline.phases["slot_wait"] == 0.0   # (workers_start: here up to the retry's start)
    run = mlflow.MlflowClient(mlflow_uri).get_run(inline.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["resources.launcher"] == "inline"
    assert run.data.metrics["phase/workers_start"] == inline.phases["workers_start"]
    best = inline.get_best_checkpoint("checkpoint_score", "max")
    assert Path(best.path).parent == session_storage / "train" / "inline-scmd"

    # the inline run's own process dies mid-averaging (a Tune trial actor lost with its node): running the trial
    # again (Tune's retry does) resumes from its latest checkpoint, to the same weights
    marker = tmp_path / "died"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        from test_train import tiny
        from distill.train import prepare, run_trial
        cfg = tiny({str(session_storage)!r}, **{json.dumps({"student.backbone": "small_cnn", "train.max_failures": 1,
                                                           "resources.launcher": "inline", **over})})
        faulty = {{**prepare(cfg), "inject_fault": {{"step": 5, "marker": {str(marker)!r}, "process": True}}}}
        run_trial(cfg, assets=faulty, name="inline-died", fresh=True)
    """)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert died.returncode == 1 and marker.read_text() == "5", died.stderr[-2000:]
    again = run_trial(inline_cfg, name="inline-died")
    c = _final_weights(again)
    assert c["step"] == 8 and all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in c["history"]]


@pytest.mark.parametrize("launcher", ["train", "inline"])
def test_equal_scores_keep_the_checkpoint_that_validation_selects(ray_session, session_storage, mlflow_uri, launcher):
    """A trial whose evaluations score the same source validation at every step (frozen BatchNorm, a learning rate
    that moves no prediction): validation selection picks the earliest of equal scores, and with one checkpoint kept
    that step's weights are still there (Train's keep rule alone prefers the later of equal scores and kept only the
    last); the selected weights read back through the sweep's own reader."""
    from distill.selection import select
    from distill.tune.runs import read_selected_checkpoint

    cfg = tiny(session_storage, **{"student.backbone": "small_cnn", "student.freeze_bn": True, "train.lr": 1e-20,
                                   "train.steps": 6, "train.eval_every": 2, "train.num_checkpoints": 1,
                                   "resources.launcher": launcher})
    name = f"ties-{launcher}"
    result = run_trial(cfg, name=name, fresh=True)
    history = _final_weights(result)["history"]
    assert [r["step"] for r in history] == [2, 4, 6]
    assert len({r["val_acc"] for r in history}) == 1   # the tie this test is about
    chosen = select(history)
    assert chosen["step"] == 2
    kept = sorted(p.name for p in (session_storage / "train" / name).glob("checkpoint_*")
                  if (p / "checkpoint.pt").is_file())
    assert len(kept) == 2   # the selected one and the latest (always kept)
    steps = {}
    for p in kept:
        state = read_selected_checkpoint(str(session_storage / "train" / name / p), str(session_storage / "train"))
        steps[state["step"]] = state
    assert sorted(steps) == [2, 6]
    best = result.get_best_checkpoint("checkpoint_score", "max")
    with best.as_directory() as d:
        assert torch.load(Path(d) / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_collapsed_trial_stops_after_its_rounds_at_chance(ray_session, session_storage, mlflow_uri):
    """train.stop_collapsed = 1: a student that predicts one class (from scratch, Adam at lr 10) stops after its
    first evaluation round instead of running its 12 steps, its last report says `collapsed`, its MLflow run is
    tagged so; with 0 (the default) the same trial runs to the end."""
    over = {"student.backbone": "small_cnn", "student.pretrained": "none", "student.freeze_bn": True,
            "train.lr": 10.0, "train.steps": 12, "train.eval_every": 2, "resources.launcher": "inline"}
    full = run_trial(tiny(session_storage, **over), name="collapse-off", fresh=True)
    history = _final_weights(full)["history"]
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10, 12] and not full.metrics.get("collapsed")
    # the precondition: at its first evaluation this student predicts one class for >= 95% of the images
    assert history[0]["val_top_share"] >= 0.95

    stopped = run_trial(tiny(session_storage, **over, **{"train.stop_collapsed": 1}), name="collapse-on", fresh=True)
    history = _final_weights(stopped)["history"]
    assert [r["step"] for r in history] == [2]
    assert stopped.metrics["collapsed"] is True and stopped.metrics["final"] is True
    tags = mlflow.MlflowClient(mlflow_uri).get_run(stopped.mlflow_run_id).data.tags
    assert tags["distill.collapsed"] == "true" and tags["distill.status"] == "finished"

    # a pretrained student that learns is not collapsed: it runs its 12 steps with the rule on
    fine = run_trial(tiny(session_storage, **{**over, "student.pretrained": "builtin", "student.freeze_bn": False,
                                              "train.lr": 3e-3, "train.eval_every": 6, "train.stop_collapsed": 1}),
                     name="collapse-fine", fresh=True)
    assert fine.metrics["step"] == 12 and not fine.metrics.get("collapsed")
