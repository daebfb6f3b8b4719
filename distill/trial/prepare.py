"""The driver's side of a trial: everything that needs the raw files or the teacher's weights, done once before the
workers start (the world, decoded images, splits, the fitted teacher, the teacher-output caches), and the pieces both
sides rebuild from the config (the task, the method's context and hyperparameters).

The held-out domain is unknown to training: the method's context holds the source domains only, and every ``{d}``
template of the prompts expands over them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import AUTO, FIT


def data_root(cfg: dict) -> str:
    """The dataset root, generating the built-in world there on first use."""
    ds = cfg["dataset"]
    if ds["name"] == "synth":
        from ..data.synth import ensure_world

        ensure_world(ds["root"], **ds["world"])
    return ds["root"]


def load_task(cfg: dict):
    """Decoded images (cached under storage) and the leave-one-domain-out splits of this trial."""
    from ..data.images import load_images
    from ..data.registry import get_spec
    from ..data.splits import hold_out_source, make_splits

    ds = cfg["dataset"]
    spec = get_spec(ds["name"], ds["root"])
    images = load_images(ds["root"], spec, ds["store_size"], skip_unreadable=ds["skip_unreadable"],
                         cache_dir=Path(cfg["storage"]) / "cache")
    splits = make_splits(images, cfg["test_domain"], ds["holdout_fraction"], cfg["seed"])
    if cfg.get("lodo_domain"):
        splits = hold_out_source(splits, cfg["lodo_domain"])
    return spec, images, splits


def method_hparams(cfg: dict, teacher_logit_scale: float | None = None) -> dict:
    """The method's hyperparameters; ``teacher_logit_scale: auto`` becomes the teacher's own learned logit scale."""
    hp = {k: v for k, v in cfg["method"].items() if k != "name"}
    if hp.get("teacher_logit_scale") == AUTO and teacher_logit_scale is not None:
        hp["teacher_logit_scale"] = float(teacher_logit_scale)
    return hp


def trial_steps(cfg: dict) -> list[tuple[str, int]]:
    """The trial's stages, (name, steps): one stage of train.steps, or the method's own (VL2V: Align, Distill)."""
    from ..methods import get_method

    return get_method(cfg["method"]["name"]).stages(method_hparams(cfg), cfg["train"]["steps"])


def method_context(cfg: dict, spec, splits, embed_dim: int):
    """What the method may know: class names, the SOURCE domains (the held-out one is never named), prompts."""
    from ..methods import MethodContext
    from ..models.prompts import class_prompts

    names = dict(zip(spec.domains, spec.domain_names))
    sources = [names[d] for d in splits.source_domains]
    descriptions = None
    if spec.descriptions:
        descriptions = {name: spec.descriptions.get(folder, "") for folder, name in zip(spec.classes,
                                                                                        spec.class_names)}
    return MethodContext(
        class_names=list(spec.class_names), source_domains=sources,
        total_steps=sum(steps for _, steps in trial_steps(cfg)), num_classes=len(spec.classes), embed_dim=embed_dim,
        class_prompts=class_prompts(spec.class_names, cfg["teacher"]["prompts"], sources),
        style_domains=spec.style_domains, descriptions=descriptions,
        extra={"seed": cfg["seed"]})   # a method's own random draws differ by trial seed, as DomainBed's


def prompt_sets(cfg: dict, ctx) -> dict:
    """The prompt sets the method embeds with the teacher: name -> rows (or PromptSet)."""
    from ..methods import get_method

    return get_method(cfg["method"]["name"]).prompt_sets(method_hparams(cfg), ctx)


def prompts_record(cfg: dict, ctx) -> dict:
    """{prompt set: {row name: [prompts]}} of a trial, for the run's `prompts.json` (rows are classes, or for sets
    with more rows than classes, `class / anchor` rows in order)."""
    from ..models.prompts import as_prompt_set

    out = {}
    for name, value in prompt_sets(cfg, ctx).items():
        rows = as_prompt_set(value).lists()
        if len(rows) == len(ctx.class_names):
            keys = list(ctx.class_names)
        else:
            per = len(rows) // max(1, len(ctx.class_names))
            keys = [f"{ctx.class_names[i // per]} / {i % per}" if per else str(i) for i in range(len(rows))]
        out[name] = dict(zip(keys, rows))
    return out


def teacher_spec(cfg: dict) -> dict:
    """The teacher section with `checkpoint: fit` replaced by the fitted checkpoint's path (fitting it if needed),
    plus the arch's input size and embedding width from its config (`image_size`, `embed_dim`: None if unknown), so
    that a worker reading the cache never imports open_clip."""
    from ..models.teachers import arch_embed_dim, arch_image_size

    spec = dict(cfg["teacher"])
    spec["image_size"], spec["embed_dim"] = arch_image_size(spec["arch"]), arch_embed_dim(spec["arch"])
    if spec["checkpoint"] == FIT:
        from ..models.fit import ensure_teacher

        kwargs = {"steps": spec["fit_steps"]} if spec["fit_steps"] else {}
        spec["checkpoint"] = str(ensure_teacher(cfg["storage"], cfg["dataset"]["root"], dataset=cfg["dataset"]["name"],
                                                arch=spec["arch"], **kwargs))
    return spec


def teacher_outputs(cfg: dict, images, ctx, teacher: dict, teacher_id: str | None = None):
    """The method's text embeddings, the teacher's logit scale, and the per-image teacher embeddings the method
    needs (centre views, or K stored augmented views) from the cache. With `teacher_id` (workers) the teacher's
    weights are never loaded: a cache miss is an error."""
    from ..methods import get_method
    from ..models.cache import teacher_outputs as compute

    method = get_method(cfg["method"]["name"])
    tc = cfg["teacher"]
    wants = method.needs_image_embeddings and not tc["online"]
    views = tc["views"] if wants else 0
    device = "cuda" if teacher_id is None and torch.cuda.is_available() else "cpu"
    return compute(teacher, images, prompt_sets(cfg, ctx), Path(cfg["storage"]), need_images=wants and not views,
                   device=device, teacher_id_=teacher_id, allow_load=teacher_id is None, views=views,
                   view_size=cfg["dataset"]["image_size"])


def prepare(cfg: dict) -> dict:
    """Everything that needs the teacher's weights or the raw files, done once in the driver. The result (plain
    data) goes to every worker."""
    Path(cfg["storage"]).mkdir(parents=True, exist_ok=True)
    data_root(cfg)
    spec, images, splits = load_task(cfg)
    teacher = teacher_spec(cfg)
    ctx = method_context(cfg, spec, splits, embed_dim=0)
    out = teacher_outputs(cfg, images, ctx, teacher)
    student_weights = None
    if cfg["student"]["pretrained"] == "builtin":   # pretrained once on the built-in photo corpus (or shipped)
        from ..models.pretrain import ensure_student

        student_weights = str(ensure_student(cfg["storage"], cfg["student"]["backbone"], cfg["dataset"]["image_size"]))
    return {"teacher": teacher, "embed_dim": int(out.embed_dim), "teacher_id": out.teacher_id,
            "student_weights": student_weights,
            "teacher_logit_scale": out.logit_scale, "stages": trial_steps(cfg),
            "split_hash": splits.split_hash, "images_fingerprint": images.fingerprint,
            "skipped_images": list(images.skipped), "source_domains": list(splits.source_domains),
            "prompts": prompts_record(cfg, ctx),
            "sizes": {"train": {d: len(v) for d, v in splits.train.items()},
                      "val": {d: len(v) for d, v in splits.val.items()},
                      "test_in": len(splits.test_in), "test_out": len(splits.test_out)}}


def teacher_zero_shot(cfg: dict) -> dict:
    """The teacher's zero-shot accuracy on the held-out domain's in-split (the images `test_acc` measures), with the
    class prompts the methods use (`teacher.prompts`, `{d}` over the source domains): is the teacher worth
    distilling? {"accuracy", "teacher", "prompts" (the first class's), "classes"}."""
    from ..models.cache import teacher_outputs as compute

    spec, images, splits = load_task(cfg)
    teacher = teacher_spec(cfg)
    ctx = method_context(cfg, spec, splits, embed_dim=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = compute(teacher, images, {"classes": ctx.class_prompts}, Path(cfg["storage"]), need_images=True,
                  device=device, log_fn=None)
    idx = splits.test_in
    logits = out.image_emb[idx].float() @ out.text["classes"].float().t()
    accuracy = (logits.argmax(1) == images.labels[idx]).float().mean().item()
    return {"accuracy": accuracy, "teacher": out.teacher_id, "prompts": ctx.class_prompts[0],
            "classes": len(spec.classes)}
