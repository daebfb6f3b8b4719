"""One trial: ``python -m distill.train --config FILE.yaml [--set dotted.key=value ...]``.

build (driver: world, images, splits, teacher, teacher-output cache) -> step (workers: augmented DomainBed batches,
method loss, optimiser) -> evaluate (source-domain validation, test domain) -> report/checkpoint (Ray Train) and MLflow.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import tracking
from .config import FIT, ConfigError, config_hash, flatten, load_config, trial_config

CHECKPOINT_FILE = "checkpoint.pt"
SELECTION_METRIC = "val_acc"  # mean source-domain validation accuracy: the only metric selection may use
BEST_METRIC = "val_acc_best"  # best val_acc so far in the trial: what Optuna and ASHA see (never the test domain)


# ------------------------------------------------------------------------------------------------- driver: prepare
def data_root(cfg: dict) -> str:
    """The dataset root, generating the built-in world there on first use."""
    ds = cfg["dataset"]
    if ds["name"] == "synth":
        from .data.synth import ensure_world

        ensure_world(ds["root"], **ds["world"])
    return ds["root"]


def load_task(cfg: dict):
    """Decoded images (cached under storage) and the leave-one-domain-out splits of this trial."""
    from .data.images import load_images
    from .data.registry import get_spec
    from .data.splits import make_splits

    ds = cfg["dataset"]
    spec = get_spec(ds["name"], ds["root"])
    images = load_images(ds["root"], spec, ds["store_size"], skip_unreadable=ds["skip_unreadable"],
                         cache_dir=Path(cfg["storage"]) / "cache")
    splits = make_splits(images, cfg["test_domain"], ds["holdout_fraction"], cfg["seed"])
    return spec, images, splits


def method_context(cfg: dict, spec, splits, embed_dim: int):
    from .methods import MethodContext
    from .models.prompts import class_prompts

    names = dict(zip(spec.domains, spec.domain_names))
    descriptions = None
    if spec.descriptions:
        descriptions = {name: spec.descriptions.get(folder, "") for folder, name in zip(spec.classes,
                                                                                        spec.class_names)}
    return MethodContext(
        class_names=list(spec.class_names), domain_names=list(spec.domain_names),
        source_domains=[names[d] for d in splits.source_domains], total_steps=cfg["train"]["steps"],
        num_classes=len(spec.classes), embed_dim=embed_dim,
        class_prompts=class_prompts(spec.class_names, cfg["teacher"]["prompts"], spec.domain_names),
        style_domains=spec.style_domains, descriptions=descriptions)


def teacher_spec(cfg: dict) -> dict:
    """The teacher section with `checkpoint: fit` replaced by the fitted checkpoint's path (fitting it if needed)."""
    spec = dict(cfg["teacher"])
    if spec["checkpoint"] == FIT:
        from .models.fit import ensure_teacher

        kwargs = {"steps": spec["fit_steps"]} if spec["fit_steps"] else {}
        spec["checkpoint"] = str(ensure_teacher(cfg["storage"], cfg["dataset"]["root"], dataset=cfg["dataset"]["name"],
                                                arch=spec["arch"], **kwargs))
    return spec


def teacher_outputs(cfg: dict, images, ctx, teacher: dict, teacher_id: str | None = None):
    """The method's text embeddings (and per-image teacher embeddings) from the cache. With `teacher_id` (workers)
    the teacher's weights are never loaded: a cache miss is an error."""
    from .methods import get_method
    from .models.cache import teacher_outputs as compute

    method = get_method(cfg["method"]["name"])
    prompts = method.prompt_sets({k: v for k, v in cfg["method"].items() if k != "name"}, ctx)
    need_images = method.needs_image_embeddings and not cfg["teacher"]["online"]
    device = "cuda" if teacher_id is None and torch.cuda.is_available() else "cpu"
    return compute(teacher, images, prompts, Path(cfg["storage"]), need_images=need_images, device=device,
                   teacher_id_=teacher_id, allow_load=teacher_id is None)


def prepare(cfg: dict) -> dict:
    """Everything that needs the teacher's weights or the raw files, done once in the driver."""
    Path(cfg["storage"]).mkdir(parents=True, exist_ok=True)
    data_root(cfg)
    spec, images, splits = load_task(cfg)
    teacher = teacher_spec(cfg)
    ctx = method_context(cfg, spec, splits, embed_dim=0)
    out = teacher_outputs(cfg, images, ctx, teacher)
    return {"teacher": teacher, "embed_dim": int(out.embed_dim), "teacher_id": out.teacher_id,
            "split_hash": splits.split_hash, "images_fingerprint": images.fingerprint,
            "skipped_images": list(images.skipped), "source_domains": list(splits.source_domains),
            "sizes": {"train": {d: len(v) for d, v in splits.train.items()},
                      "val": {d: len(v) for d, v in splits.val.items()},
                      "test_in": len(splits.test_in), "test_out": len(splits.test_out)}}


# --------------------------------------------------------------------------------------------------- worker: loop
def _optimizer(params, tc: dict):
    if tc["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=tc["lr"], momentum=tc["momentum"], weight_decay=tc["weight_decay"])
    cls = torch.optim.AdamW if tc["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=tc["lr"], weight_decay=tc["weight_decay"])


def _schedule(optimizer, tc: dict):
    steps = tc["steps"]
    if tc["lr_schedule"] == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    elif tc["lr_schedule"] == "step":
        fn = lambda s: 0.1 if s >= int(0.8 * steps) else 1.0  # noqa: E731
    else:
        fn = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@torch.no_grad()
def evaluate(method, images, labels, index_sets: dict, size: int, device, rank: int = 0, world: int = 1,
             amp_dtype=None, batch_size: int = 512) -> dict[str, float]:
    """Accuracy on each named index set (centre views), split across ranks and all-reduced."""
    from .data.augment import IMAGENET_MEAN, IMAGENET_STD, center, normalize

    was_training = method.training
    method.eval()
    counts = torch.zeros(len(index_sets), 2, dtype=torch.float64)
    for row, idx in enumerate(index_sets.values()):
        part = idx[rank::world]
        for chunk in part.split(batch_size):
            x = normalize(center(images[chunk.to(images.device)].to(device), size), IMAGENET_MEAN, IMAGENET_STD)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = method.predict(x).argmax(dim=1)
            counts[row, 0] += (pred.cpu() == labels[chunk]).sum().item()
            counts[row, 1] += len(chunk)
    if world > 1:
        import torch.distributed as dist

        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    method.train(was_training)
    return {name: (counts[i, 0] / counts[i, 1]).item() if counts[i, 1] else float("nan")
            for i, name in enumerate(index_sets)}


def _amp_dtype(device, mode: str):
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train). `config`: {"cfg": trial config, "assets": prepare(), "mlflow": {...}}."""
    import ray.train
    import ray.train.torch

    from .data.augment import IMAGENET_MEAN, IMAGENET_STD, augment, center, normalize
    from .data.splits import DomainBatches
    from .methods import get_method
    from .models.students import build_student

    cfg, assets, ml = config["cfg"], config["assets"], config.get("mlflow") or {}
    tc, ds = cfg["train"], cfg["dataset"]
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = _amp_dtype(device, tc["amp"])
    torch.manual_seed(cfg["seed"])

    spec, images, splits = load_task(cfg)
    if splits.split_hash != assets["split_hash"]:
        raise RuntimeError("the data this worker sees differs from the driver's (split hash mismatch): "
                           "is the storage directory shared by every node?")
    ctx = method_context(cfg, spec, splits, assets["embed_dim"])
    outputs = teacher_outputs(cfg, images, ctx, assets["teacher"], teacher_id=assets["teacher_id"])
    method_cls = get_method(cfg["method"]["name"])
    student = build_student(cfg["student"]["backbone"], cfg["student"]["pretrained"], cfg["student"]["freeze_bn"],
                            embed_dim=assets["embed_dim"], num_classes=len(spec.classes))
    method = method_cls(student, {k: v for k, v in cfg["method"].items() if k != "name"}, ctx, outputs.text)
    method.to(device)
    online_teacher = None
    if method_cls.needs_image_embeddings and cfg["teacher"]["online"]:
        from .models.teachers import load_teacher

        t = assets["teacher"]
        online_teacher = load_teacher(t["arch"], t.get("pretrained"), t.get("checkpoint"), t["preprocess"],
                                      device=str(device))
    model = method
    if world > 1:
        model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = _optimizer([p for p in method.parameters() if p.requires_grad], tc)
    scheduler = _schedule(optimizer, tc)

    # data on the device: decoded uint8 images, labels, teacher embeddings (augmentation runs there too)
    images_dev = images.images.to(device)
    labels_dev = images.labels.to(device)
    image_emb = outputs.image_emb.to(device) if outputs.image_emb is not None else None
    dom_index = {d: i for i, d in enumerate(splits.source_domains)}
    batch_domains = torch.cat([torch.full((tc["batch_size"],), dom_index[d], dtype=torch.long)
                               for d in splits.source_domains]).to(device)
    batches = DomainBatches(splits, tc["batch_size"], seed=cfg["seed"], rank=rank)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"] * 1000 + rank)
    eval_sets = {**{f"val/{d}": splits.val[d] for d in splits.source_domains},
                 "test_in": splits.test_in, "test_out": splits.test_out}

    start, best = 0, [float("-inf")]  # best source-validation accuracy so far (what searchers see)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        gen.set_state(state["generator"].cpu())
        start = state["step"]
        best[0] = state["metrics"].get(BEST_METRIC, best[0])
        if rank == 0:
            print(f"[distill] resumed from the checkpoint at step {start}", flush=True)

    def log(metrics, step):
        if rank == 0 and ml.get("run_id"):
            tracking.log_metrics(ml["uri"], ml["run_id"], metrics, step)

    sums: dict[str, float] = {}
    n_sum, t0, last_t = 0, time.time(), time.time()
    steps = tc["steps"]
    evals = sorted({s for s in range(tc["eval_every"], steps + 1, tc["eval_every"])} | {steps})
    if start >= steps:  # a finished trial re-run: evaluate its final state again so it reports
        evals = [steps]
    for step in range(start, max(start, steps)):
        idx = next(batches).to(device)
        x_u8 = images_dev[idx]
        x01 = augment(x_u8, ds["image_size"], generator=gen) if tc["augment"] else center(x_u8, ds["image_size"])
        batch = {"x": normalize(x01, IMAGENET_MEAN, IMAGENET_STD), "y": labels_dev[idx], "domain": batch_domains,
                 "idx": idx}
        if method_cls.needs_image_embeddings:
            batch["image_emb"] = (online_teacher.encode_images(x01) if online_teacher is not None
                                  else image_emb[idx]).float()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, terms = model(batch, step)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step} ({detail}); "
                                     f"lower train.lr or check the method's hyperparameters")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(method.parameters(), tc["grad_clip"])
        optimizer.step()
        scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + float(loss)
        for k, v in terms.items():
            sums[f"loss/{k}"] = sums.get(f"loss/{k}", 0.0) + float(v)
        n_sum += 1
        if (step + 1) % max(1, min(50, tc["eval_every"])) == 0 and step + 1 not in evals:
            log({k: v / n_sum for k, v in sums.items()} | {"lr": scheduler.get_last_lr()[0]}, step + 1)
        if step + 1 in evals:
            _report(step + 1, method, images, splits, eval_sets, ds, device, rank, world, amp_dtype,
                    {k: v / max(n_sum, 1) for k, v in sums.items()}, optimizer, scheduler, batches, gen, log, best,
                    steps_per_s=n_sum / max(time.time() - last_t, 1e-9), elapsed=time.time() - t0)
            sums, n_sum, last_t = {}, 0, time.time()
    if start >= steps:
        _report(steps, method, images, splits, eval_sets, ds, device, rank, world, amp_dtype, {}, optimizer,
                scheduler, batches, gen, log, best, steps_per_s=0.0, elapsed=0.0)


def _report(step, method, images, splits, eval_sets, ds, device, rank, world, amp_dtype, train_terms, optimizer,
            scheduler, batches, gen, log, best, steps_per_s, elapsed):
    import ray.train

    acc = evaluate(method, images.images, images.labels, eval_sets, ds["image_size"], device, rank, world,
                   amp_dtype)
    val = {f"val_acc/{d}": acc[f"val/{d}"] for d in splits.source_domains}
    best[0] = max(best[0], sum(val.values()) / len(val))
    metrics = {"step": step, SELECTION_METRIC: sum(val.values()) / len(val), BEST_METRIC: best[0], **val,
               "test_acc": acc["test_in"], "test_out_acc": acc["test_out"], **train_terms,
               "steps_per_s": steps_per_s}
    log({k: v for k, v in metrics.items() if k != "step"}, step)
    if rank == 0:
        print(f"[distill] step {step}: loss {train_terms.get('loss', float('nan')):.4f}  "
              f"val_acc {metrics[SELECTION_METRIC]:.3f}  test_acc {metrics['test_acc']:.3f}  "
              f"({steps_per_s:.2f} steps/s, {elapsed:.0f}s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "batches": batches.state_dict(),
                        "generator": gen.get_state(), "step": step, "metrics": metrics},
                       Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


# --------------------------------------------------------------------------------------------------- driver: run
def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        kwargs = {"num_cpus": num_cpus} if num_cpus and not os.environ.get("RAY_ADDRESS") else {}
        ray.init(**kwargs, log_to_driver=True)


def run_name(cfg: dict) -> str:
    """Deterministic from the trial's config: re-running the same trial resumes it instead of starting over."""
    return f"{cfg['name']}-{cfg['method']['name']}-{cfg['test_domain']}-s{cfg['seed']}-{config_hash(cfg, 8)}"


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
    params = flatten({k: v for k, v in cfg.items() if k not in ("storage",)})
    params.update({"teacher.resolved_checkpoint": assets["teacher"].get("checkpoint"),
                   "teacher.id": assets["teacher_id"], "split_hash": assets["split_hash"],
                   "images_fingerprint": assets["images_fingerprint"], "git_sha": tracking.git_sha()})
    run_id = tracking.find_or_create_run(
        uri, experiment or cfg["name"], name, params=params, parent_run_id=parent_run_id,
        tags={"distill.method": cfg["method"]["name"], "distill.test_domain": cfg["test_domain"],
              "distill.seed": str(cfg["seed"]), "distill.split_hash": assets["split_hash"],
              "distill.git_sha": params["git_sha"]})
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
                                                         checkpoint_score_attribute=SELECTION_METRIC,
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
    tracking.set_tags(uri, run_id, {tracking.STATUS_TAG: "finished", "distill.train_run": str(Path(train_storage) / name)})
    tracking.end_run(uri, run_id, "FINISHED")
    result.mlflow_run_id = run_id  # type: ignore[attr-defined]
    return result


def _log_models(uri: str, run_id: str, result) -> None:
    """The final model and the best (source-validation) checkpoint as MLflow artifacts."""
    targets = [("model", result.checkpoint)]
    try:
        best = result.get_best_checkpoint(SELECTION_METRIC, "max")
    except Exception:  # noqa: BLE001
        best = None
    if best is not None:
        targets.append(("best_checkpoint", best))
    for artifact_path, ckpt in targets:
        if ckpt is None:
            continue
        with ckpt.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
            torch.save({"model": state["model"], "step": state["step"], "metrics": state["metrics"]},
                       Path(tmp) / "model.pt")
            (Path(tmp) / "metrics.json").write_text(json.dumps(state["metrics"], indent=2))
            tracking.log_artifact(uri, run_id, tmp, artifact_path)


def summarize(result) -> str:
    m = result.metrics or {}
    lines = [f"final step {m.get('step')}: source-val acc {m.get(SELECTION_METRIC, float('nan')):.3f}, "
             f"test-domain acc {m.get('test_acc', float('nan')):.3f}"]
    lines += [f"  val {k.split('/', 1)[1]}: {v:.3f}" for k, v in m.items() if k.startswith("val_acc/")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="trial YAML (see search_spaces/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.name=kd --set test_domain=sketch")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run of the same trial")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    test_domain = None
    for item in list(overrides):  # `test_domain` picks the held-out domain of a single trial
        if item.startswith("test_domain="):
            test_domain = item.split("=", 1)[1].strip()
            overrides.remove(item)
    try:
        cfg = load_config(args.config, overrides)
        if test_domain and test_domain not in cfg["test_domains"]:
            from .data.registry import get_spec

            domains = get_spec(cfg["dataset"]["name"], None if cfg["dataset"]["name"] == "synth"
                               else cfg["dataset"]["root"]).domains
            if test_domain not in domains:
                raise ConfigError([f"test_domain: unknown domain {test_domain!r}; the dataset has {list(domains)}"],
                                  args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = trial_config(cfg, test_domain)
    t0 = time.time()
    ensure_ray()
    result = run_trial(cfg, fresh=args.fresh)
    print(summarize(result))
    print(f"[distill] trial finished in {time.time() - t0:.0f}s; MLflow run {result.mlflow_run_id} "
          f"(tracking URI {tracking.tracking_uri(cfg['storage'])})")
    return 0


if __name__ == "__main__":
    # run through the package module, so Ray pickles `train_loop` by reference, not as a __main__ function
    from distill.train import main as _main

    sys.exit(_main())
