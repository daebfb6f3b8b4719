"""Where a trial's loop reports to: Ray Train (a TorchTrainer's worker) or an inline run.

``resources.launcher: inline`` runs a single-worker trial in the process that launched it (a sweep's Tune trial
function, which Tune reuses for the next trial) instead of a TorchTrainer's four new processes (controller,
placement-group cleaner, synchronisation actor, worker: ~14 s of CPU per trial, docs/sweeps.md "Launchers"). The loop
calls this module instead of ``ray.train`` directly; an inline run gives it what Train would: its rank and device,
the checkpoint to resume from, and reports that persist checkpoints under the same run directory
(``<train storage>/<run name>/checkpoint_NNNNNN``, best ``train.num_checkpoints`` by score kept, plus the latest)
and reach Tune with their ``checkpoint_path``, as TuneReportCallback sends them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

INDEX_FILE = "distill_inline_run.json"   # an inline run's checkpoints and their metrics (plain JSON)
CHECKPOINT_KEY = "checkpoint_path"       # what Tune hears a checkpoint as (TuneReportCallback's key)

_active: "InlineRun | None" = None   # the inline run of this process, while its loop runs


def inline() -> bool:
    return _active is not None


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    if _active is not None:
        return 0, 1
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def device(cfg: dict):
    """The trial's torch device: Train's for its worker; inline, the first GPU Ray gave this process when the
    trial asks for GPUs (Ray sets CUDA_VISIBLE_DEVICES to them), else the CPU."""
    import torch

    if _active is None:
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg["resources"]["gpus_per_worker"] > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def get_checkpoint():
    """The checkpoint to resume from (the run's latest), or None."""
    if _active is not None:
        return _active.latest()
    import ray.train

    return ray.train.get_checkpoint()


def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    """One evaluation's metrics, with the directory of its checkpoint (Train uploads a copy; an inline run moves
    its files into the run directory: either way the caller may delete the directory after)."""
    if _active is not None:
        _active.report(metrics, checkpoint_dir)
        return
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                     if checkpoint_dir is not None else None)


class InlineRun:
    """The checkpoints and last metrics of one inline trial run, in its run directory. Reopening the directory
    (a retry, a resumed sweep, the same trial run again) continues it: the loop resumes from the latest checkpoint."""

    def __init__(self, run_dir: str | os.PathLike, num_to_keep: int | None, score: str, tune: bool = False):
        self.dir = Path(run_dir)
        self.num_to_keep, self.score, self.tune = num_to_keep, score, tune
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = read_index(self.dir)
        self.metrics: dict | None = None

    def latest(self):
        return _latest(self.dir, self.state)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        out = dict(metrics)
        if checkpoint_dir is not None:
            self.state["count"] += 1
            name = f"checkpoint_{self.state['count']:06d}"
            tmp = self.dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for entry in Path(checkpoint_dir).iterdir():   # a rename on the same filesystem, else a copy
                shutil.move(str(entry), str(tmp / entry.name))
            tmp.replace(self.dir / name)
            self.state["checkpoints"].append({"dir": name, "metrics": _plain(metrics)})
            dropped = self._prune()
            self._write()
            for entry in dropped:
                shutil.rmtree(self.dir / entry["dir"], ignore_errors=True)
            out[CHECKPOINT_KEY] = str(self.dir / name)
        self.metrics = dict(metrics)
        if self.tune:
            from ray import tune

            tune.report(out)

    def _prune(self) -> list[dict]:
        """Train's rule: keep the best num_to_keep by score (ties: the later is better) and always the latest."""
        entries = self.state["checkpoints"]
        if not self.num_to_keep or len(entries) <= self.num_to_keep:
            return []
        ranked = sorted(range(len(entries)), key=lambda i: (_score(entries[i], self.score), i))
        worst = set(ranked[:len(entries) - self.num_to_keep]) - {len(entries) - 1}
        self.state["checkpoints"] = [e for i, e in enumerate(entries) if i not in worst]
        return [entries[i] for i in sorted(worst)]

    def _write(self) -> None:
        tmp = self.dir / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.dir / INDEX_FILE)


def read_index(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / INDEX_FILE
    if not path.is_file():
        return {"count": 0, "checkpoints": []}
    state = json.loads(path.read_text())
    state["checkpoints"] = [e for e in state["checkpoints"] if (Path(run_dir) / e["dir"]).is_dir()]
    return state


def is_inline_run(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / INDEX_FILE).is_file()


class InlineResult:
    """What run_trial reads of a finished inline run, as of a ray.train.Result: the last metrics, the latest
    checkpoint, the best kept one by a metric, the run's path."""

    def __init__(self, run_dir: str | os.PathLike, metrics: dict | None = None):
        self.path = str(run_dir)
        self._state = read_index(run_dir)
        entries = self._state["checkpoints"]
        self.metrics = metrics if metrics is not None else (dict(entries[-1]["metrics"]) if entries else None)
        self.checkpoint = _latest(run_dir, self._state)

    def get_best_checkpoint(self, metric: str, mode: str = "max"):
        """The kept checkpoint with the best `metric` (ties: the earlier, as Ray's Result)."""
        entries = [e for e in self._state["checkpoints"] if isinstance(e["metrics"].get(metric), (int, float))]
        if not entries:
            return None
        pick = (max if mode == "max" else min)(entries, key=lambda e: e["metrics"][metric])
        return _checkpoint(Path(self.path) / pick["dir"])


def fit(train_fn, config: dict, run_dir: str | os.PathLike, *, num_to_keep: int | None, score: str,
        max_failures: int, tune: bool = False) -> InlineResult:
    """Run `train_fn(config)` here, as one worker of rank 0; an exception is retried from the latest checkpoint
    up to `max_failures` times (train.max_failures, as Train's FailureConfig). Not re-entrant: one at a time."""
    global _active
    if _active is not None:
        raise RuntimeError("an inline trial is already running in this process")
    failures = 0
    while True:
        _active = InlineRun(run_dir, num_to_keep, score, tune)
        try:
            train_fn(config)
            return InlineResult(run_dir, _active.metrics)
        except Exception as exc:  # noqa: BLE001 - retried as Train retries a failed worker group
            failures += 1
            if max_failures >= 0 and failures > max_failures:
                raise
            print(f"[distill] inline trial failed ({type(exc).__name__}: {exc}); retry {failures} of "
                  f"{max_failures} from its latest checkpoint", flush=True)
            time.sleep(1)
        finally:
            _active = None
            _release_gpu_cache()


def _release_gpu_cache() -> None:
    """The trial's cached GPU blocks back to the driver: another process sharing the GPU (fractional
    gpus_per_worker) can use them, and the next trial in this process allocates afresh."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _latest(run_dir: str | os.PathLike, state: dict):
    """The latest kept checkpoint of a run (its index `state`), or None."""
    entries = state["checkpoints"]
    return _checkpoint(Path(run_dir) / entries[-1]["dir"]) if entries else None


def _checkpoint(path: Path):
    import ray.train

    return ray.train.Checkpoint.from_directory(str(path))


def _score(entry: dict, key: str) -> float:
    v = entry["metrics"].get(key)
    return float(v) if isinstance(v, (int, float)) and v == v else float("-inf")


def _plain(metrics: dict) -> dict:
    """The JSON-able metrics (numbers, strings, booleans, None) of a report."""
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))}
