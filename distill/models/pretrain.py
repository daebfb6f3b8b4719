"""The built-in pretrained students (``student.pretrained: builtin``): every backbone of ``students.BACKBONES``
pretrained once, supervised, on the photo-style-only student corpus (``distill.data.synth.corpus.STUDENT_CORPUS``:
25 shapes, the world's 5 among them, at the task's image size), as torchvision's backbones were on ImageNet.

``ensure_student(storage, backbone, image_size)`` returns ``<storage>/students/<backbone>-<recipe hash>.pt`` (the
backbone's float32 state_dict, loaded with ``torch.load(weights_only=True)``): the package's shipped weights when
their recipe hash is the current one, otherwise pretrained there on first use (under a file lock, so concurrent
drivers pretrain once; written atomically; progress printed). The workers never pretrain: the driver resolves the
path and ``build_student(..., pretrained="builtin", weights_path=...)`` loads it.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import recipe_hash, torch_threads  # noqa: F401  (recipe_hash: part of this module's API)

PRETRAIN_VERSION = 1    # bump when the recipe's code changes: the hash, hence every cached file's name, changes
# per backbone: optimiser steps, batch, peak lr (AdamW, 5% warm-up then cosine), weight decay; the steps sized to
# about 7-8 minutes on one busy CPU core at 32 px (measured s/step at load ~4.5 on the 2-core machine: small_cnn
# 0.09, resnet18 0.49, resnet34 0.85, resnet50 1.41, mobilenet_v3_small 0.39, mobilenet_v3_large 0.79,
# efficientnet_b0 1.11); small_cnn and resnet18 measured end to end: 287 s and 443 s
RECIPES = {
    "small_cnn": {"steps": 3000, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4},
    "resnet18": {"steps": 900, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4},
    "resnet34": {"steps": 500, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4},
    "resnet50": {"steps": 300, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4},
    "mobilenet_v3_small": {"steps": 1100, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4},
    "mobilenet_v3_large": {"steps": 550, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4},
    "efficientnet_b0": {"steps": 400, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4},
}
VAL_EVERY = 20          # every 20th corpus image is held out of pretraining (its accuracy is reported)


def recipe(backbone: str, image_size: int = 32, seed: int = 0, steps: int | None = None,
           batch_size: int | None = None, lr: float | None = None, weight_decay: float | None = None,
           per_class: int | None = None) -> dict:
    """Everything the pretrained weights are a function of (its hash names the file)."""
    from ..data.synth.corpus import STUDENT_CORPUS, corpus_params

    if backbone not in RECIPES:
        raise ValueError(f"unknown student backbone {backbone!r}; known: {sorted(RECIPES)}")
    r = dict(RECIPES[backbone])
    for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}.items():
        if v is not None:
            r[k] = type(r[k])(v)
    return {"backbone": backbone, "image_size": int(image_size), "seed": int(seed), **r, "optimizer": "adamw",
            "schedule": "warmup 5% + cosine", "augment": "domainbed", "normalize": "imagenet",
            "corpus": corpus_params(STUDENT_CORPUS, size=image_size, per_class=per_class),
            "version": PRETRAIN_VERSION}


def shipped_name(backbone: str, image_size: int) -> str:
    return f"student-{backbone}-{image_size}px"


class _Classifier(nn.Module):
    def __init__(self, backbone: str, classes: int):
        super().__init__()
        from .students import BACKBONES

        self.backbone, dim = BACKBONES[backbone][0](None)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, batch: int = 500) -> float:
    from ..data.augment import center, normalize

    model.eval()
    hits = 0
    for i in range(0, len(images), batch):
        hits += int((model(normalize(center(images[i:i + batch], size))).argmax(1) == labels[i:i + batch]).sum())
    return hits / max(1, len(images))


def pretrain(rec: dict, corpus_dir: str | os.PathLike, log: Callable[[str], None] | None = print,
             log_every: int = 100) -> tuple[dict, dict]:
    """Supervised pretraining on the corpus with the recipe ``rec``: (backbone state_dict, summary). Deterministic
    for a given recipe and torch thread count."""
    from ..data.augment import augment, normalize
    from ..data.synth.corpus import load_corpus

    corpus = load_corpus(corpus_dir)
    images = torch.from_numpy(np.array(corpus.images))
    labels = torch.from_numpy(corpus.labels.astype(np.int64))
    held = torch.arange(len(labels)) % VAL_EVERY == VAL_EVERY - 1
    train_idx, val_idx = (~held).nonzero().flatten(), held.nonzero().flatten()
    size, steps, bs = rec["image_size"], rec["steps"], min(rec["batch_size"], len(train_idx))
    torch.manual_seed(rec["seed"])
    model = _Classifier(rec["backbone"], len(corpus.classes))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": rec["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=rec["lr"])
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm
                                              else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(rec["seed"])
    perm, pos = train_idx[torch.randperm(len(train_idx), generator=gen)], 0
    t0, loss_avg, acc_avg = time.time(), None, None
    model.train()
    for step in range(1, steps + 1):
        if pos + bs > len(perm):
            perm, pos = train_idx[torch.randperm(len(train_idx), generator=gen)], 0
        idx = perm[pos:pos + bs]
        pos += bs
        logits = model(normalize(augment(images[idx], size, generator=gen)))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = float((logits.argmax(1) == labels[idx]).float().mean())
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        acc_avg = acc if acc_avg is None else 0.9 * acc_avg + 0.1 * acc
        if log and (step % log_every == 0 or step in (1, steps)):
            log(f"pretrain {rec['backbone']} step {step}/{steps}  loss {loss_avg:.3f}  acc {acc_avg:.3f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  elapsed {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    val = _accuracy(model, images[val_idx], labels[val_idx], size)
    if log:
        log(f"pretrained {rec['backbone']} in {seconds:.0f}s: accuracy on {len(val_idx)} held-out corpus images "
            f"{100 * val:.1f}% ({len(corpus.classes)} classes, chance {100 / len(corpus.classes):.1f}%)")
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    return state, {"seconds": round(seconds, 1), "val_acc": round(val, 4), "train_acc": round(acc_avg, 4),
                   "classes": corpus.classes, "images": len(train_idx)}


def ensure_student(storage: str | os.PathLike, backbone: str, image_size: int = 32,
                   log: Callable[[str], None] | None = print, use_shipped: bool = True, threads: int | None = 1,
                   **overrides) -> Path:
    """The pretrained backbone weights for (backbone, image size, recipe): ``<storage>/students/<backbone>-<recipe
    hash>.pt`` (its summary in ``<...>.pt.json``), from the package's shipped file or pretrained on first use."""
    from ..data.synth.corpus import ensure_corpus
    from .weights import atomic_save, ensure_file, materialise, write_json

    rec = recipe(backbone, image_size, **overrides)
    key = recipe_hash(rec)
    storage = Path(storage).expanduser().absolute()
    path = storage / "students" / f"{backbone}-{key}.pt"

    def produce() -> None:
        shipped = materialise(shipped_name(backbone, image_size), key, path) if use_shipped else None
        if shipped is not None:
            write_json({"recipe": rec, "recipe_hash": key, "source": "shipped", **{
                k: shipped[k] for k in ("sha256", "command", "summary") if k in shipped}},
                path.with_name(path.name + ".json"))
            if log:
                log(f"student: {backbone} weights from the package (recipe {key}) -> {path}")
            return
        corpus = ensure_corpus(storage / "corpora", rec["corpus"], log=log)
        if log:
            log(f"student: pretraining {backbone} at {image_size} px on {corpus} (recipe {key}; "
                f"{rec['steps']} steps of {rec['batch_size']})")
        with torch_threads(threads):
            state, summary = pretrain(rec, corpus, log=log)
        atomic_save(state, path)
        write_json({"recipe": rec, "recipe_hash": key, "source": "pretrained", "summary": summary},
                   path.with_name(path.name + ".json"))

    return ensure_file(path, produce, f"student: reusing pretrained {path}", log)
