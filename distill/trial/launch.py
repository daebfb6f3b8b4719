"""Launching one trial on Ray Train: prepare in the driver, run a ``TorchTrainer`` of ``loop.train_loop`` workers,
track it in MLflow (parameters, the exact prompts embedded, metrics, the final and best models)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import tracking
from ..config import config_hash, flatten, trial_config
from .loop import CHECKPOINT_FILE, SCORE_METRIC, SELECTION_METRIC, train_loop
from .prepare import method_hparams, prepare


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        kwargs = {"num_cpus": num_cpus} if num_cpus and not os.environ.get("RAY_ADDRESS") else {}
        ray.init(**kwargs, log_to_driver=True)


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
              assets: dict | None = None):
    """Run one trial (one test domain, one seed) as a Ray Train TorchTrainer; returns the ray.train.Result.
    `assets`: the result of `prepare(cfg)` when the caller already prepared this trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if "test_domain" not in cfg:
        cfg = trial_config(cfg)
    name = name or run_name(cfg)
    train_storage = train_storage or str(Path(cfg["storage"]) / "train")
    if fresh:
        shutil.rmtree(Path(train_storage) / name, ignore_errors=True)
    assets = assets or prepare(cfg)
    uri = tracking.tracking_uri(cfg["storage"])
    params = trial_params(cfg, assets)
    tags = {"distill.method": cfg["method"]["name"], "distill.test_domain": cfg["test_domain"],
            "distill.seed": str(cfg["seed"]), "distill.split_hash": assets["split_hash"],
            "distill.git_sha": params["git_sha"]}
    if cfg.get("lodo_domain"):
        tags["distill.lodo_domain"] = cfg["lodo_domain"]
    run_id = tracking.find_or_create_run(uri, experiment or cfg["name"], name, params=params,
                                         parent_run_id=parent_run_id, tags=tags)
    _log_prompts(uri, run_id, assets["prompts"])
    if assets["skipped_images"]:
        tracking.set_tags(uri, run_id, {"distill.skipped_images": len(assets["skipped_images"])})
        print(f"[distill] skipped {len(assets['skipped_images'])} unreadable image(s), e.g. "
              f"{assets['skipped_images'][:3]}", flush=True)
    res = cfg["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    callbacks = []
    if tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "assets": assets, "mlflow": {"uri": uri, "run_id": run_id}},
        scaling_config=ray.train.ScalingConfig(num_workers=res["num_workers"], use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=train_storage, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg["train"]["num_checkpoints"],
                                                         checkpoint_score_attribute=SCORE_METRIC,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg["train"]["max_failures"])))
    try:
        result = trainer.fit()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        tracking.set_tags(uri, run_id, {tracking.STATUS_TAG: "failed", "distill.failure": reason[:4000]})
        tracking.end_run(uri, run_id, "FAILED")
        raise
    _log_models(uri, run_id, result)
    tracking.set_tags(uri, run_id, {tracking.STATUS_TAG: "finished",
                                    "distill.train_run": str(Path(train_storage) / name)})
    tracking.end_run(uri, run_id, "FINISHED")
    result.mlflow_run_id = run_id  # type: ignore[attr-defined]
    return result


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
