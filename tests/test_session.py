"""The inline run (resources.launcher: inline): which checkpoints it keeps, which is best, what a retry resumes
from, and the config rules around it. Expected values worked out by hand from Ray Train's rule (keep the best
num_to_keep by score, the later of equal scores counting as better, and always the latest)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from distill import tune
from distill.config import ConfigError, build_config
from distill.trial import session
from distill.trial.session import INDEX_FILE, InlineResult, InlineRun
from distill.tune.trainable import last_checkpoint


def _report(run: InlineRun, tmp_path: Path, score: float, step: int) -> None:
    src = tmp_path / f"src{step}"
    src.mkdir()
    (src / "checkpoint.pt").write_text(str(step))
    run.report({"step": step, "checkpoint_score": score, "val_acc": score, "note": [1]}, str(src))
    assert not any(src.iterdir())   # moved into the run, not copied


def _kept(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))


def test_an_inline_run_keeps_trains_checkpoints_and_resumes_from_its_latest(tmp_path):
    run_dir = tmp_path / "train" / "run-a"
    run = InlineRun(run_dir, num_to_keep=2, score="checkpoint_score")
    for step, score in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        _report(run, tmp_path, score, step)
    assert _kept(run_dir) == ["checkpoint_000002", "checkpoint_000003"]   # 0.5 is the worst of three
    _report(run, tmp_path, 0.4, 4)   # the worst, but the latest: kept until a later one comes
    assert _kept(run_dir) == ["checkpoint_000002", "checkpoint_000003", "checkpoint_000004"]
    _report(run, tmp_path, 0.65, 5)   # of .7 .6 .4 .65 the two worst go: .4 and .6
    assert _kept(run_dir) == ["checkpoint_000002", "checkpoint_000005"]
    assert (run_dir / "checkpoint_000005" / "checkpoint.pt").read_text() == "5"
    index = json.loads((run_dir / INDEX_FILE).read_text())
    assert index["count"] == 5 and "note" not in index["checkpoints"][0]["metrics"]   # plain values only

    result = InlineResult(run_dir)
    assert Path(result.checkpoint.path).name == "checkpoint_000005" and result.metrics["step"] == 5
    assert Path(result.get_best_checkpoint("checkpoint_score", "max").path).name == "checkpoint_000002"
    assert Path(result.get_best_checkpoint("val_acc", "min").path).name == "checkpoint_000005"
    assert result.get_best_checkpoint("test_acc", "max") is None
    # what a replayed trial reports to Tune: the run's latest checkpoint
    assert last_checkpoint(str(tmp_path / "train"), "run-a") == {"checkpoint_path": str(run_dir / "checkpoint_000005")}
    assert last_checkpoint(str(tmp_path / "train"), "no-such-run") == {}

    # reopened (a retry, a resumed sweep): resumes from the latest, numbering goes on
    again = InlineRun(run_dir, num_to_keep=2, score="checkpoint_score")
    assert Path(again.latest().path).name == "checkpoint_000005"
    _report(again, tmp_path, 0.1, 6)
    assert _kept(run_dir) == ["checkpoint_000002", "checkpoint_000005", "checkpoint_000006"]


def test_equal_scores_keep_the_later_and_the_best_is_the_earlier_kept(tmp_path):
    run = InlineRun(tmp_path / "r", num_to_keep=1, score="checkpoint_score")
    _report(run, tmp_path, 0.5, 1)
    _report(run, tmp_path, 0.5, 2)
    assert _kept(tmp_path / "r") == ["checkpoint_000002"]
    _report(run, tmp_path, float("nan"), 3)   # a failed or non-selectable evaluation: no score, kept as the latest
    assert _kept(tmp_path / "r") == ["checkpoint_000002", "checkpoint_000003"]
    run2 = InlineRun(tmp_path / "r2", num_to_keep=3, score="checkpoint_score")
    (tmp_path / "src-r2").mkdir()
    for step in (1, 2, 3):
        _report(run2, tmp_path / "src-r2", 0.8, step)
    assert Path(InlineResult(tmp_path / "r2").get_best_checkpoint("checkpoint_score").path).name == \
        "checkpoint_000001"


def test_fit_retries_from_the_latest_checkpoint_then_gives_up(tmp_path):
    seen = []

    def train_fn(config):
        ckpt = session.get_checkpoint()
        seen.append(None if ckpt is None else Path(ckpt.path).name)
        assert session.inline() and session.world() == (0, 1)
        src = tempfile.mkdtemp(dir=tmp_path)
        session.report({"step": len(seen), "checkpoint_score": 0.1 * len(seen)}, src)
        if len(seen) < config["fail_times"] + 1:
            raise RuntimeError("node lost")

    result = session.fit(train_fn, {"fail_times": 2}, tmp_path / "run", num_to_keep=None, score="checkpoint_score",
                         max_failures=2)
    assert seen == [None, "checkpoint_000001", "checkpoint_000002"]
    assert result.metrics["step"] == 3 and not session.inline()
    seen.clear()
    with pytest.raises(RuntimeError, match="node lost"):
        session.fit(train_fn, {"fail_times": 5}, tmp_path / "run2", num_to_keep=None, score="checkpoint_score",
                    max_failures=1)
    assert len(seen) == 2 and not session.inline()


def _raw(tmp_path, **resources) -> dict:
    return {"name": "x", "storage": str(tmp_path), "dataset": {"world": {"per_class": 20}}, "method": {"name": "erm"},
            "resources": resources}


def test_the_launcher_is_checked(tmp_path):
    assert build_config(_raw(tmp_path))["resources"]["launcher"] == "train"
    with pytest.raises(ConfigError) as err:
        build_config(_raw(tmp_path, launcher="inline", num_workers=2))
    assert "num_workers 2 needs launcher train" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config(_raw(tmp_path, launcher="local"))
    assert "resources.launcher: 'local' is not one of ['train', 'inline']" in str(err.value)


def test_an_inline_sweep_holds_the_workers_resources_and_starts_nothing_ahead(tmp_path):
    data = {**_raw(tmp_path, launcher="inline", gpus_per_worker=0.5, cpus_per_worker=2), "seeds": [0],
            "test_domains": ["sketch"], "search": {"num_samples": 2}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = tune.make_plan(path)
    assert plan.to_dict()["resources_per_trial"]["trial_function"] == {"CPU": 2, "GPU": 0.5}
    n, why = tune.start_ahead(plan, 2)
    assert n == 0 and "launcher inline" in why
    data["search"]["start_ahead"] = 1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        tune.make_plan(path)
    assert "search.start_ahead: 1 with resources.launcher inline" in str(err.value)
    with pytest.raises(ConfigError) as err:   # Tune/Train results on a URI: inline runs write to a directory
        tune.make_plan(path, storage="s3://bucket/sweeps")
    assert "resources.launcher inline writes a trial's checkpoints to a directory" in str(err.value)
    # the launcher is part of what a --resume must keep
    data["search"]["start_ahead"] = None
    path.write_text(yaml.safe_dump(data))
    train = tune.make_plan(path, ["resources.launcher=train"])
    assert train.fingerprint() != plan.fingerprint()
    assert train.to_dict()["resources_per_trial"]["trial_function"] == {"CPU": 0, "memory": 256 * 1024 ** 2}
