"""A user's bad day, small enough for CI's 2 cores: planted pickles, a NaN trial, a failed preparation rerun plainly,
a DDP trial whose worker dies, a worker node killed mid-trial on a two-node cluster. (A driver SIGKILLed mid-sweep
and resumed: tests/test_tune.py.)"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from distill.config import build_config, trial_config

REPO = Path(__file__).resolve().parent.parent


class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_refused_and_paths_from_text_files_are_confined(tmp_path):
    from distill.trial.launch import read_checkpoint
    from distill.trial.loop import CHECKPOINT_FILE
    from distill.tune.runs import read_selected_checkpoint
    from distill.tune.trainable import checkpoint_history

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "train" / "run" / "checkpoint_0"
    ckpt.mkdir(parents=True)
    torch.save({"model": {}, "history": [Evil(marker)]}, ckpt / CHECKPOINT_FILE)   # torch.save pickles it
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(ckpt)                               # weights_only: tensors and plain data only
    assert checkpoint_history(str(tmp_path / "train"), {"checkpoint_path": str(ckpt)}) is None
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert checkpoint_history(str(tmp_path / "train"), {"checkpoint_path": str(outside)}) is None
    with pytest.raises(PermissionError, match="outside the sweep's Train runs"):
        read_selected_checkpoint(str(outside), str(tmp_path / "train"))
    with pytest.raises(PermissionError):                    # `..` does not get out either
        read_selected_checkpoint(str(tmp_path / "train" / ".." / "elsewhere"), str(tmp_path / "train"))
    with pytest.raises(pickle.UnpicklingError):
        read_selected_checkpoint(str(ckpt), str(tmp_path / "train"))
    assert not marker.exists()


def test_no_module_unpickles_files_except_tunes_own_resume():
    """Every torch.load is weights_only; the only pickle.load is the searcher's restore, which Tune calls on
    `--resume` alone (a fresh sweep and the report never read the searcher state back)."""
    offenders = []
    for path in (REPO / "distill").rglob("*.py"):
        text = path.read_text()
        if "weights_only=False" in text:
            offenders.append(f"{path}: weights_only=False")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line and not line.strip().startswith("#"):
                offenders.append(f"{path}: {line.strip()}")
            if "pickle.load(" in line and path.name != "searcher.py":
                offenders.append(f"{path}: {line.strip()}")
            if "restore_from_dir" in line:
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders, offenders


def _tiny(storage, **train):
    raw = {"name": "faults", "storage": str(storage), "dataset": {"world": {"per_class": 20}},
           "student": {"backbone": "small_cnn"}, "method": {"name": "erm"},
           "train": {"steps": 6, "batch_size": 8, "eval_every": 2, **train}}
    return raw


@pytest.mark.slow
def test_a_nan_trial_fails_once_even_with_retries_allowed(ray_session, session_storage, monkeypatch):
    """A non-finite loss is deterministic: the workers report it and end, so neither Train (max_failures 2) nor
    Tune retries it; the run says why."""
    import mlflow

    from distill.trial.launch import TrialFailed, run_trial

    uri = f"sqlite:///{session_storage / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = trial_config(build_config(_tiny(session_storage, lr=1e30, optimizer="sgd", max_failures=2)), "sketch")
    with pytest.raises(TrialFailed, match="non-finite loss at step"):
        run_trial(cfg, name="nan-once")
    run = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("faults").experiment_id],
        "tags.`distill.run_name` = 'nan-once'")[0]
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["distill.failure"]


@pytest.mark.slow
def test_a_failed_preparation_leaves_nothing_that_blocks_a_plain_rerun(ray_session, tmp_path, monkeypatch):
    from distill.data.images import UnreadableImageError
    from distill.tune import SWEEP_FILE, make_plan, run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "data"
    for d in ("a", "b", "c"):
        for c in ("cat", "dog"):
            (root / d / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), (40 * i, 120 if c == "cat" else 0, 60 * "abc".index(d))).save(
                    root / d / c / f"{i}.png")
    bad = root / "b" / "dog" / "0.png"
    bad.write_bytes(b"not an image")
    sweep = {"name": "prep", "storage": str(tmp_path / "runs"), "test_domains": ["a"], "seeds": [0],
             "dataset": {"name": "folder", "root": str(root), "image_size": 16},
             "teacher": {"fit_steps": 20, "prompts": "single"}, "student": {"backbone": "small_cnn"},
             "method": {"name": "erm"}, "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "max_failures": 0},
             "search": {"num_samples": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(UnreadableImageError, match="0.png"):
        run_sweep(make_plan(path))
    assert not (tmp_path / "runs" / "prep" / SWEEP_FILE).exists()   # nothing that would ask for --resume
    Image.new("RGB", (16, 16)).save(bad, format="PNG")              # the user fixes the image and reruns as is
    results = run_sweep(make_plan(path))
    assert results["counts"]["trials"] == 1 and not results["counts"]["failed"]


@pytest.mark.slow
def test_a_ddp_trial_whose_worker_dies_resumes_and_its_ranks_agree(ray_session, session_storage, tmp_path,
                                                                   monkeypatch):
    """resources.num_workers: 2 (DDP over gloo on CPU), rank 1's process killed mid-trial: the trial resumes from
    its last checkpoint and both ranks report the same value of every metric (evaluations all-reduced, loss terms
    averaged over the ranks)."""
    from distill.trial.launch import run_trial
    from distill.trial.prepare import prepare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{session_storage / 'mlflow.db'}")
    raw = _tiny(session_storage, steps=8, max_failures=1)
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 1}
    cfg = trial_config(build_config(raw), "sketch")
    logs = tmp_path / "reports"
    logs.mkdir()
    assets = {**prepare(cfg), "inject_fault": {"step": 5, "rank": 1, "marker": str(tmp_path / "killed")},
              "report_log": str(logs)}
    result = run_trial(cfg, assets=assets, name="ddp-kill")
    assert (tmp_path / "killed").exists() and result.metrics["step"] == 8
    ranks = [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [m["step"] for m in ranks[0]] == [m["step"] for m in ranks[1]]
    assert [m["step"] for m in ranks[0]][-3:] == [4, 6, 8]           # steps 2, 4 before the kill; 6, 8 after
    for a, b in zip(*ranks):
        for key in a:
            if key == "steps_per_s":
                continue
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
            else:
                assert a[key] == b[key], key


NODE_KILL = textwrap.dedent("""
    import os, sys, threading, time, json
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from distill.config import build_config, trial_config
    from distill.trial.launch import run_trial
    from distill.trial.prepare import prepare

    storage = Path(sys.argv[1])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{storage / 'mlflow.db'}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    raw = {"name": "nodes", "storage": str(storage), "dataset": {"world": {"per_class": 20}},
           "student": {"backbone": "small_cnn"}, "method": {"name": "erm"},
           "train": {"steps": 600, "batch_size": 8, "eval_every": 100, "max_failures": 2}}
    cfg = trial_config(build_config(raw), "sketch")
    assets = prepare(cfg)
    events, out = [], {}

    def trial():
        out["result"] = run_trial(cfg, assets=assets, name="node-kill")

    runner = threading.Thread(target=trial)
    runner.start()
    run_dir = storage / "train" / "node-kill"
    while not list(run_dir.glob("checkpoint_*")) and runner.is_alive():
        time.sleep(0.2)
    cluster.remove_node(node)                  # the worker node dies mid-trial ...
    events.append("killed")
    cluster.add_node(num_cpus=1)               # ... and a new one joins, as an autoscaler would bring
    events.append("replaced")
    runner.join()
    result = out["result"]
    with result.checkpoint.as_directory() as d:
        import torch
        history = torch.load(Path(d) / "checkpoint.pt", weights_only=True)["history"]
    print("RESULT", json.dumps({"events": events, "step": result.metrics["step"],
                                "history": [h["step"] for h in history]}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_a_worker_node_killed_mid_trial_is_replaced_and_the_trial_resumes(tmp_path):
    """A two-node cluster on one machine (ray.cluster_utils): the node running the trial's worker is removed after
    its first checkpoint and a new node joins; the trial resumes there from its checkpoint and finishes with every
    evaluation."""
    script = tmp_path / "node_kill.py"
    script.write_text(NODE_KILL)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "storage")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    out = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert out is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out[len("RESULT "):])
    assert got["events"] == ["killed", "replaced"]
    assert got["step"] == 600 and got["history"] == [100, 200, 300, 400, 500, 600]
