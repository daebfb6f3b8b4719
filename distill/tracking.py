"""MLflow helpers: one tracking URI everywhere (absolute sqlite by default), runs created by the driver, metrics
written by rank 0 of each trial, artifacts logged by the driver."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "distill.run_name"
STATUS_TAG = "distill.status"


SQLITE = "sqlite:///"


def sqlite_uri(path: str | os.PathLike) -> str:
    """A sqlite URI with an absolute path: a relative one would resolve against each process's working directory
    (inside Ray workers, a temp dir)."""
    return f"{SQLITE}{Path(path).resolve()}"


def tracking_uri(storage: str | os.PathLike) -> str:
    """`MLFLOW_TRACKING_URI` if set (a relative sqlite path in it is made absolute), else `<storage>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return sqlite_uri(Path(storage) / "mlflow.db")
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):  # relative; an absolute one stays as given
        return sqlite_uri(uri[len(SQLITE):])
    if "://" not in uri:  # a bare path: refuse the file store, which MLflow 3 rejects anyway
        return sqlite_uri(Path(uri) / "mlflow.db" if Path(uri).is_dir() else uri)
    return uri


UI_PORT = 5000


def sweep_link(experiment_id: str, base: str = f"http://127.0.0.1:{UI_PORT}") -> str:
    """The MLflow UI page that opens on a sweep's answer: the experiment in its "Model training" mode (MLflow 3
    opens GenAI views otherwise), the runs page listing the selected trials flat (`selected_val_acc`, logged only
    on them), best first."""
    from urllib.parse import quote

    query = {"workflowType": "machine_learning", "searchFilter": "metrics.selected_val_acc > 0",
             "orderByKey": "metrics.`selected_val_acc`", "orderByAsc": "false"}
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?" + "&".join(
        f"{k}={quote(v, safe='')}" for k, v in query.items())


def open_sweep(uri: str, storage: str, experiment_id: str) -> str:
    """How to open a sweep's answer: on a tracking server, its link; on a sqlite store, the `distill ui` that serves
    it (naming the store when it is not the storage's own) and the link."""
    if uri.startswith(("http://", "https://")):
        return sweep_link(experiment_id, uri)
    own = uri == sqlite_uri(Path(storage) / "mlflow.db")
    serve = f"distill ui {storage}" if own else f"MLFLOW_TRACKING_URI={uri} distill ui"
    return f"{serve}   then open {sweep_link(experiment_id)}"


def client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}   # MLflow 3 opens such an experiment on its runs


def experiment_id(uri: str, name: str) -> str:
    """Create the experiment once (in the driver, before any worker writes), as a model-training experiment (MLflow
    3 would otherwise open it on its GenAI views, traces and evaluations)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            for key, value in EXPERIMENT_KIND.items():
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if uri.startswith(SQLITE):  # artifacts beside the database, not in the current directory of each process
        location = (Path(uri[len(SQLITE):]).parent / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def context_tags() -> dict[str, str]:
    """MLflow's own context tags of this process (user, source name and type, git commit): the runs table's
    "Created by" and "Source" columns. Resolved in the driver and handed to the trials it starts."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # noqa: BLE001 - a missing context is no reason to stop a sweep
        return {}


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def find_or_create_run(uri: str, experiment: str, run_name: str, params: dict[str, Any] | None = None,
                       tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """The run tagged with this deterministic run name (so a resumed trial keeps its run), or a new one."""
    from mlflow.entities import Param

    c = client(uri)
    exp_id = experiment_id(uri, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {**context_tags(), RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])
    return run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for attempt in range(5):  # sqlite under concurrent trials: retry "database is locked"
        try:
            client(uri).log_batch(run_id, metrics=items)
            return
        except Exception as exc:  # noqa: BLE001
            if "locked" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


class MetricsLogger:
    """Logs metrics from a background thread, in order, so that a trial's loop never waits for the tracking store
    (a sqlite file several trials write, or a server) between evaluations. ``flush()`` waits for what is queued (the
    loop does before each report: Tune may stop a trial right after it); ``close()`` flushes and stops."""

    def __init__(self, uri: str, run_id: str):
        import queue
        import threading

        self.uri, self.run_id = uri, run_id
        self.queue: "queue.Queue" = queue.Queue()
        self.failed: str | None = None
        self.thread = threading.Thread(target=self._run, name="distill-mlflow", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.queue.put((dict(metrics), step))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                log_metrics(self.uri, self.run_id, *item)
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training; said once
                if self.failed is None:
                    self.failed = f"{type(exc).__name__}: {exc}"
                    print(f"[distill] MLflow logging failed ({self.failed}); training goes on", flush=True)
            finally:
                self.queue.task_done()

    def flush(self) -> None:
        """Wait until everything queued is logged (before a report after which the process may be stopped)."""
        self.queue.join()

    def close(self, timeout: float = 60.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


def _metric_key(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    c = client(uri)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)
