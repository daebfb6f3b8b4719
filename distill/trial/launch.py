"""Launching one trial on Ray Train: prepare in the driver, run a ``TorchTrainer`` of ``loop.train_loop`` workers
(or the loop here: ``resources.launcher: inline``, ``session``), track it in MLflow (parameters, the exact prompts
embedded, metrics, the final and best models)."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import tracking
from . import session
from ..config import config_hash, flatten, trial_config
from .loop import CHECKPOINT_FILE, SCORE_METRIC, SELECTION_METRIC, train_loop
from .prepare import method_hparams, prepare


# Ray Train settings for short trials (each can be overridden in the environment): the controller polls its workers
# every 0.2 s instead of 2 s (a trial's start and end each waited up to a poll: ~3 s of every trial here), and no
# preemption-watcher actor per trial (it polls a cloud's drain notices every 5 s; a spot node's loss is recovered
# from the last checkpoint anyway: train.max_failures), and each worker line printed once.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
             # a worker's print() once (Ray forwards it), not a second time through Train's logger
             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
             # a trial started ahead of a free slot (search.start_ahead) waits for its workers' resources as long as
             # the trials before it run, not 60 s before Train tears its request down and queues it again
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400"}


@functools.cache
def _trainer_class():
    """TorchTrainer, less the Ray Data manager it starts for every run (an actor process, ~2 s of CPU and ~200 MB)
    when the run has no Ray Datasets: a trial's workers read the shared image cache instead. Where Ray's (private)
    hook differs, the plain TorchTrainer."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if getattr(self, "datasets", None):
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

    return Trainer if hasattr(TorchTrainer, "_create_default_callbacks") else TorchTrainer


class TrialFailed(RuntimeError):
    """A trial that failed deterministically in its workers (running it again gives the same error)."""


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        kwargs = {"num_cpus": num_cpus} if num_cpus and not os.environ.get("RAY_ADDRESS") else {}
        # a new local cluster gets token authentication (Ray's default, as it should: nothing listens
        # unauthenticated), which Ray announces with a warning on every start; that one line is dropped (a warning
        # that authentication is DISABLED still shows; RAY_AUTH_MODE in the environment still decides)
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_log.addFilter(_drop_token_auth_enabled)
        try:
            ray.init(**kwargs, log_to_driver=True)
        finally:
            auth_log.removeFilter(_drop_token_auth_enabled)


def _drop_token_auth_enabled(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def ray_address_for_trainers():
    """Ray Train's PlacementGroupCleaner (it frees a trial's workers if its driver dies) finds its cluster through
    RAY_ADDRESS, else by looking for Ray processes on the machine, which fails where several Ray instances run ("Found
    multiple active Ray instances"): the dead trial's placement group then leaks. While a trainer starts, this
    cluster's address is in the environment Ray Train hands to its controller (and so to the cleaner)."""
    import ray

    before = os.environ.get("RAY_ADDRESS")
    try:
        from ray.train.v2._internal import constants

        constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except (ImportError, AttributeError) as exc:  # a Ray without this hook: the cleaner looks for itself
        print(f"[distill] note: could not pass RAY_ADDRESS to Ray Train ({exc})", flush=True)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


def run_name(cfg: dict) -> str:
    """Deterministic from the trial's config: re-running the same trial resumes it instead of starting over."""
    return f"{cfg['name']}-{cfg['method']['name']}-{cfg['test_domain']}-s{cfg['seed']}-{config_hash(cfg, 8)}"


def trial_params(cfg: dict, assets: dict) -> dict:
    """The MLflow parameters of a trial: every config value, plus what the driver resolved."""
    params = flatten({k: v for k, v in cfg.items() if k not in ("storage",)})
    hp = method_hparams(cfg, assets.get("teacher_logit_scale"))
    params.update({"teacher.resolved_checkpoint": assets["teacher"].get("checkpoint"),
                   "teacher.id": assets["teacher_id"], "teacher.logit_scale": assets.get("teacher_logit_scale"),
                   "split_hash": assets["split_hash"], "images_fingerprint": assets["images_fingerprint"],
                   "stages": ", ".join(f"{n}:{s}" for n, s in assets["stages"]), "git_sha": tracking.git_sha()})
    if "teacher_logit_scale" in hp:
        params["method.teacher_logit_scale.resolved"] = hp["teacher_logit_scale"]
    return params


def run_trial(cfg: dict, *, tune: bool = False, parent_run_id: str | None = None, name: str | None = None,
              train_storage: str | None = None, experiment: str | None = None, fresh: bool = False,
              assets: dict | None = None, tags: dict | None = None, verbose: bool = False):
    """Run one trial (one test domain, one seed) as a Ray Train TorchTrainer, or here with `resources.launcher:
    inline`; returns the ray.train.Result (an InlineResult inline). `assets`: the result of `prepare(cfg)` when the
    caller already prepared this trial; `tags`: extra MLflow tags of its run."""
    t = {"start": time.time()}
    if "test_domain" not in cfg:
        cfg = trial_config(cfg)
    name = name or run_name(cfg)
    train_storage = train_storage or str(Path(cfg["storage"]) / "train")
    if fresh:
        shutil.rmtree(Path(train_storage) / name, ignore_errors=True)
    assets = assets or prepare(cfg)
    t["prepared"] = time.time()
    uri = tracking.tracking_uri(cfg["storage"])
    params = trial_params(cfg, assets)
    extra_tags = tags
    tags = {"distill.method": cfg["method"]["name"], "distill.test_domain": cfg["test_domain"],
            "distill.seed": str(cfg["seed"]), "distill.split_hash": assets["split_hash"],
            "distill.git_sha": params["git_sha"]}
    if cfg.get("lodo_domain"):
        tags["distill.lodo_domain"] = cfg["lodo_domain"]
    tags.update(extra_tags or {})   # e.g. the sweep driver's user and source
    run_id = tracking.find_or_create_run(uri, experiment or cfg["name"], name, params=params,
                                         parent_run_id=parent_run_id, tags=tags)
    _clear_failure(uri, run_id)   # a run of this trial that failed before: this attempt starts clean
    _log_prompts(uri, run_id, assets["prompts"])
    if assets["skipped_images"]:
        tracking.set_tags(uri, run_id, {"distill.skipped_images": len(assets["skipped_images"])})
        print(f"[distill] skipped {len(assets['skipped_images'])} unreadable image(s), e.g. "
              f"{assets['skipped_images'][:3]}", flush=True)
    t["tracked"] = time.time()
    res = cfg["resources"]
    config = {"cfg": cfg, "assets": assets, "mlflow": {"uri": uri, "run_id": run_id}, "name": name,
              "verbose": verbose, "quiet": tune}   # quiet: a sweep's trial prints its steps with --verbose only
    t["fit"] = time.time()
    try:
        if res["launcher"] == "inline":
            result = session.fit(train_loop, config, Path(train_storage) / name,
                                 num_to_keep=cfg["train"]["num_checkpoints"], score=SCORE_METRIC,
                                 max_failures=cfg["train"]["max_failures"], tune=tune)
        else:
            with ray_address_for_trainers():
                result = _trainer(cfg, config, name, train_storage, tune).fit()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        tracking.set_tags(uri, run_id, {tracking.STATUS_TAG: "failed", "distill.failure": reason[:4000]})
        tracking.end_run(uri, run_id, "FAILED")
        raise
    t["fitted"] = time.time()
    failure = tracking.client(uri).get_run(run_id).data.tags.get("distill.failure")
    if failure:   # failed deterministically in the workers (a non-finite loss...): once, not retried
        tracking.end_run(uri, run_id, "FAILED")
        raise TrialFailed(failure)
    _log_models(uri, run_id, result)
    tracking.set_tags(uri, run_id, {tracking.STATUS_TAG: "finished",
                                    "distill.train_run": str(Path(train_storage) / name),
                                    **({"distill.collapsed": "true"} if (result.metrics or {}).get("collapsed")
                                       else {})})
    t["done"] = time.time()
    result.phases = phase_breakdown(t, result.metrics or {})  # type: ignore[attr-defined]
    if verbose or not tune:
        print(f"[distill] {name}: {format_phases(result.phases)}", flush=True)
    tracking.log_metrics(uri, run_id, {f"phase/{k}": v for k, v in result.phases.items()}, 0)
    tracking.end_run(uri, run_id, "FINISHED")
    result.mlflow_run_id = run_id  # type: ignore[attr-defined]
    return result


def _trainer(cfg: dict, config: dict, name: str, train_storage: str, tune: bool):
    """The TorchTrainer of a trial: `resources.num_workers` workers running train_loop(config)."""
    import ray.train

    for key, value in TRAIN_ENV.items():   # Ray propagates these to the trial's controller and workers
        os.environ.setdefault(key, value)
    res = cfg["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    callbacks = []
    if tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return _trainer_class()(
        train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=res["num_workers"], use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=train_storage, callbacks=callbacks,
            # the controller's per-run lines ("Requesting resources ...", "Attempting to start training worker
            # group ..."): with --verbose only, as the worker's
            logging_config=ray.train.LoggingConfig(log_level="INFO" if config.get("verbose") else "WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg["train"]["num_checkpoints"],
                                                         checkpoint_score_attribute=SCORE_METRIC,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg["train"]["max_failures"])))


# the phases of a trial, in order: (name, start point, end point); points of the driver ("start", "prepared",
# "tracked", "fit", "fitted", "done") and of the worker (metrics "time/*": wall-clock, the same machine's or NTP's)
PHASES = [("prepare", "start", "prepared"), ("mlflow_run", "prepared", "tracked"),
          ("workers_start", "fit", "worker_entered"), ("worker_imports", "worker_entered", "worker_imported"),
          ("data", "worker_imported", "data_loaded"), ("teacher_outputs", "data_loaded", "teacher_outputs_loaded"),
          ("student_build", "teacher_outputs_loaded", "ready"), ("training", "ready", "reported"),
          ("shutdown", "reported", "fitted"), ("models_logged", "fitted", "done")]
LOOP_PHASES = ("training",)


def phase_breakdown(driver: dict, metrics: dict) -> dict:
    """Seconds per phase of a trial, plus `slot_wait` (its workers waiting for free resources, taken out of
    `workers_start`: a trial started ahead of a free slot), `fixed` (everything but the training loop's own time,
    evaluations and the slot wait excluded) and `total`. A finished trial run again has no worker phases."""
    points = {**driver, **{k[len("time/"):]: v for k, v in metrics.items() if k.startswith("time/")
                           and isinstance(v, (int, float))}}
    out = {}
    for name, a, b in PHASES:
        if a in points and b in points:
            out[name] = round(max(0.0, points[b] - points[a]), 2)
    wait = min(float(metrics.get("time/slot_wait_seconds", 0.0)), out.get("workers_start", 0.0))
    if "workers_start" in out:
        out["workers_start"] = round(out["workers_start"] - wait, 2)
    total = driver["done"] - driver["start"]
    loop = out.get("training", 0.0) - float(metrics.get("time/eval_seconds", 0.0))
    out.update({"slot_wait": round(wait, 2), "evaluations": round(float(metrics.get("time/eval_seconds", 0.0)), 2),
                "total": round(total, 2), "fixed": round(total - max(0.0, loop) - wait, 2)})
    return out


def format_phases(phases: dict) -> str:
    parts = [f"{k} {v:.1f}" for k, v in phases.items() if k not in ("total", "fixed")]
    return f"trial phases (s): {', '.join(parts)}; fixed cost {phases['fixed']:.1f}s of {phases['total']:.1f}s"


def _clear_failure(uri: str, run_id: str) -> None:
    c = tracking.client(uri)
    if "distill.failure" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, "distill.failure")


def _log_prompts(uri: str, run_id: str, prompts: dict) -> None:
    """`prompts.json`: {prompt set: {class: [prompts]}}, exactly what the trial embedded with the teacher."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.json"
        path.write_text(json.dumps(prompts, indent=1))
        tracking.log_artifact(uri, run_id, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A trial checkpoint's contents (tensors and plain data only: never unpickles code)."""
    return torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def export_model(state: dict, out_dir: str | os.PathLike) -> None:
    """The evaluated model of a checkpoint (`model.pt`: weights, step, metrics) and its metrics (`metrics.json`)."""
    torch.save({"model": state["model"], "step": state["step"], "metrics": state["metrics"]},
               Path(out_dir) / "model.pt")
    (Path(out_dir) / "metrics.json").write_text(json.dumps(state["metrics"], indent=2, default=str))


def _log_models(uri: str, run_id: str, result) -> None:
    """The final model and the best selectable checkpoint as MLflow artifacts."""
    targets = [("model", result.checkpoint)]
    try:
        best = result.get_best_checkpoint(SCORE_METRIC, "max")
    except Exception:  # noqa: BLE001
        best = None
    if best is not None:
        targets.append(("best_checkpoint", best))
    for artifact_path, ckpt in targets:
        if ckpt is None:
            continue
        with ckpt.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
            export_model(read_checkpoint(d), tmp)
            tracking.log_artifact(uri, run_id, tmp, artifact_path)


def summarize(result) -> str:
    m = result.metrics or {}
    lines = [f"final step {m.get('step')}: source-val acc {m.get(SELECTION_METRIC, float('nan')):.3f}, "
             f"test-domain acc {m.get('test_acc', float('nan')):.3f}"
             + (f" ({m['eval_model']} model)" if m.get("eval_model") not in (None, "raw") else "")]
    lines += [f"  val {k.split('/', 1)[1]}: {v:.3f}" for k, v in m.items() if k.startswith("val_acc/")]
    return "\n".join(lines)
