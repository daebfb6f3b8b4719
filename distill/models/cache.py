"""Teacher outputs computed once and kept under ``<storage>/cache``: class-text embeddings per prompt set, the
teacher's own logit scale, per-image embeddings of the centre (un-augmented) views, and, with ``views=K``, the
embeddings of K augmented views per image stored with each view's augmentation parameters (as Fast Knowledge
Distillation stores crop coordinates with soft labels), so that the training loop can render exactly the view the
teacher saw. The teacher is built only when something is missing.

Files: ``teacher-txt-<hash>.pt`` per (teacher id, prompt strings, ensemble), ``teacher-meta-<hash>.pt`` per teacher
id, ``teacher-img-<hash>.pt`` per (teacher id, image fingerprint, preprocessing, teacher image size) and
``teacher-views-<hash>.pt`` per (teacher id, image fingerprint, preprocessing, student view size, K, view seed,
augmentation version); written atomically (temp file + ``os.replace``), read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..console import say
from ..data.images import save_atomic
from .prompts import as_prompt_set

if TYPE_CHECKING:
    from .teachers import Teacher

log = logging.getLogger(__name__)
CACHE_VERSION = 1
VIEW_SEED = 0   # the stored views are one fixed set per (dataset, teacher, K): drawn with this seed, for every trial


@dataclass
class TeacherViews:
    """K augmented views per image: row ``params[i, k]`` (``distill.data.augment.PARAM_NAMES``) renders view k of
    image i at the student's input size; ``emb[i, k]`` is the teacher's embedding of exactly that rendering."""

    params: torch.Tensor                     # [N, K, P] float32
    emb: torch.Tensor                        # [N, K, D] float16, L2-normalised
    size: int                                # the student's input size the views were rendered at

    @property
    def k(self) -> int:
        return int(self.params.shape[1])


@dataclass
class TeacherOutputs:
    text: dict[str, torch.Tensor]            # prompt-set name -> [R, D] float32, L2-normalised
    image_emb: torch.Tensor | None           # [N, D] float16, L2-normalised, rows in ImageSet order
    teacher_id: str
    embed_dim: int
    logit_scale: float | None = None         # the teacher's own learned exp(logit_scale)
    views: TeacherViews | None = None        # with views=K
    computed: list[str] = field(default_factory=list)   # what this call computed ("images", "text:<name>")
    reused: list[str] = field(default_factory=list)     # what it read from the cache


class TeacherCacheMiss(RuntimeError):
    """A worker found no cached teacher outputs and may not load the teacher."""


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def text_key(tid: str, rows: list[list[str]], ensemble: str = "normalized") -> str:
    spec = {"v": CACHE_VERSION, "kind": "text", "teacher": tid, "rows": [list(r) for r in rows]}
    if ensemble != "normalized":   # the key of a normalized set is unchanged from earlier versions
        spec["ensemble"] = ensemble
    return _key(spec)


def meta_key(tid: str) -> str:
    return _key({"v": CACHE_VERSION, "kind": "meta", "teacher": tid})


def views_key(tid: str, fingerprint: str, preprocess: str, size: int, k: int) -> str:
    from ..data.augment import PARAM_NAMES, RENDER_VERSION

    return _key({"v": CACHE_VERSION, "kind": "views", "teacher": tid, "images": fingerprint, "preprocess": preprocess,
                 "size": size, "k": k, "seed": VIEW_SEED, "params": list(PARAM_NAMES), "render": RENDER_VERSION})


def image_key(tid: str, fingerprint: str, preprocess: str, image_size: int | None) -> str:
    return _key({"v": CACHE_VERSION, "kind": "images", "teacher": tid, "images": fingerprint,
                 "preprocess": preprocess, "image_size": image_size})


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file is recomputed, not fatal
        log.warning("teacher cache: ignoring unreadable %s (%s)", path, e)
        return None


def teacher_outputs(teacher_spec: dict, images, prompt_sets: dict, storage: str | os.PathLike,
                    need_images: bool, device: str = "cpu", batch_size: int = 256,
                    log_fn: Callable[[str], None] | None = say, teacher_id_: str | None = None,
                    allow_load: bool = True, views: int = 0, view_size: int | None = None) -> TeacherOutputs:
    """Text embeddings of every prompt set (rows, or a ``PromptSet`` with its ensemble rule), the teacher's logit
    scale, per-image embeddings when ``need_images``, and ``views`` augmented views per image rendered at
    ``view_size`` (the student's input size), from the cache or computed with the teacher of ``teacher_spec``
    ({arch, pretrained, checkpoint, preprocess}).

    Black-box use (training workers): pass the driver's ``teacher_id_`` and ``allow_load=False``; then the teacher's
    weights are never read, and a cache miss is an error instead of a silent load."""
    from ..data.augment import center

    # `.teachers` (open_clip, torchvision: ~4 s of imports) only where a teacher or its config is needed: a trial's
    # worker reading the driver's cache gets the image size and width from the driver's spec
    say = log_fn or (lambda s: None)
    arch = teacher_spec["arch"]
    pretrained, checkpoint = teacher_spec.get("pretrained"), teacher_spec.get("checkpoint")
    preprocess = teacher_spec.get("preprocess") or "clip"
    cache = Path(storage).expanduser() / "cache"
    teacher: Teacher | None = None

    def get_teacher() -> Teacher:
        nonlocal teacher
        if teacher is None:
            if not allow_load:
                raise TeacherCacheMiss(
                    f"the teacher-output cache under {cache} lacks what this trial needs, and this process may not "
                    f"load the teacher's weights (black-box mode): the driver computes the cache before the trial; "
                    f"is the storage directory shared by every node?")
            teacher = _teachers().load_teacher(arch, pretrained=pretrained, checkpoint=checkpoint,
                                               preprocess=preprocess, device=device)
            say(f"teacher cache: loaded teacher {teacher.id} ({preprocess} preprocessing)")
        return teacher

    tid = teacher_id_ or _teachers().teacher_id(arch, pretrained, checkpoint)
    if tid is None:  # random init: the id needs the weights
        tid = get_teacher().id
    computed, reused = [], []
    embed_dim = None

    path = cache / f"teacher-meta-{meta_key(tid)}.pt"
    blob = _load(path) if path.is_file() else None
    if blob is not None and blob.get("teacher_id") == tid:
        logit_scale = float(blob["logit_scale"])
        reused.append("logit_scale")
    else:
        logit_scale = get_teacher().logit_scale
        save_atomic({"teacher_id": tid, "logit_scale": logit_scale}, path)
        computed.append("logit_scale")

    text = {}
    for name, value in prompt_sets.items():
        pset = as_prompt_set(value)
        rows = pset.lists()
        path = cache / f"teacher-txt-{text_key(tid, rows, pset.ensemble)}.pt"
        blob = _load(path) if path.is_file() else None
        if blob is not None and blob.get("rows") == rows and blob.get("ensemble", "normalized") == pset.ensemble:
            text[name] = blob["text"].float()
            reused.append(f"text:{name}")
        else:
            emb = get_teacher().class_text(rows, ensemble=pset.ensemble).float().cpu()
            save_atomic({"text": emb, "rows": rows, "ensemble": pset.ensemble, "teacher_id": tid}, path)
            text[name] = emb
            computed.append(f"text:{name}")
        embed_dim = text[name].shape[1]

    image_emb = None
    if need_images:
        size = teacher_spec["image_size"] if "image_size" in teacher_spec else _teachers().arch_image_size(arch)
        path = cache / f"teacher-img-{image_key(tid, images.fingerprint, preprocess, size)}.pt"
        blob = _load(path) if path.is_file() else None
        if blob is not None and blob.get("paths") == list(images.paths):
            image_emb = blob["emb"]
            reused.append("images")
        else:
            t = get_teacher()
            out = []
            for i in range(0, len(images.images), batch_size):
                x01 = center(images.images[i:i + batch_size], t.image_size)
                out.append(t.encode_images(x01, batch_size=batch_size).cpu())
            image_emb = F.normalize(torch.cat(out).float(), dim=-1).half()
            save_atomic({"emb": image_emb, "paths": list(images.paths), "teacher_id": tid,
                          "fingerprint": images.fingerprint, "preprocess": preprocess, "image_size": t.image_size},
                         path)
            computed.append("images")
        embed_dim = image_emb.shape[1]

    stored_views = None
    if views:
        if not view_size:
            raise ValueError("teacher_outputs: views need view_size (the student's input size)")
        path = cache / f"teacher-views-{views_key(tid, images.fingerprint, preprocess, view_size, views)}.pt"
        blob = _load(path) if path.is_file() else None
        if blob is not None and blob.get("paths") == list(images.paths):
            stored_views = TeacherViews(blob["params"], blob["emb"], int(blob["size"]))
            reused.append(f"views:{views}")
        else:
            stored_views = _compute_views(get_teacher(), images.images, views, view_size, batch_size, say)
            save_atomic({"params": stored_views.params, "emb": stored_views.emb, "size": view_size,
                         "paths": list(images.paths), "teacher_id": tid, "fingerprint": images.fingerprint,
                         "preprocess": preprocess}, path)
            computed.append(f"views:{views}")
        embed_dim = stored_views.emb.shape[-1]

    if embed_dim is None:
        embed_dim = (teacher_spec.get("embed_dim") or _teachers().arch_embed_dim(arch)) or get_teacher().embed_dim
    if computed:
        say(f"teacher cache: computed {', '.join(computed)}" + (f"; reused {', '.join(reused)}" if reused else ""))
    elif reused:
        say(f"teacher cache: reused {', '.join(reused)} (teacher not loaded)")
    return TeacherOutputs(text=text, image_emb=image_emb, teacher_id=tid, embed_dim=int(embed_dim),
                          logit_scale=logit_scale, views=stored_views, computed=computed, reused=reused)


def _teachers():
    """distill.models.teachers, imported where a teacher or its config is needed (it imports open_clip)."""
    from . import teachers

    return teachers


def _compute_views(teacher: Teacher, images: torch.Tensor, k: int, size: int, batch_size: int,
                   say: Callable[[str], None]) -> TeacherViews:
    """K views per image: parameters drawn with VIEW_SEED (row i*K + j is view j of image i), each view rendered at
    ``size`` exactly as the training loop renders it, then encoded by the teacher (its own preprocessing)."""
    from ..data.augment import render, sample_params

    n, s = images.shape[0], images.shape[-1]
    t0 = time.time()
    params = sample_params(n * k, s, s, generator=torch.Generator().manual_seed(VIEW_SEED))
    emb = []
    per = max(1, batch_size // k)
    amp = torch.bfloat16 if teacher.device.type == "cuda" else None
    for i in range(0, n, per):
        x = images[i:i + per].to(teacher.device).repeat_interleave(k, dim=0)
        p = params[i * k:(i + per) * k].to(teacher.device)
        emb.append(teacher.encode_images(render(x, p, size), batch_size=len(x), amp_dtype=amp).cpu())
    emb = F.normalize(torch.cat(emb).float(), dim=-1).half()
    seconds = time.time() - t0
    say(f"teacher cache: {k} augmented views of {n} images ({n * k} teacher forwards at {size}px) in {seconds:.1f}s "
        f"({n * k / max(seconds, 1e-9):.0f} views/s)")
    return TeacherViews(params.view(n, k, -1), emb.view(n, k, -1), size)
