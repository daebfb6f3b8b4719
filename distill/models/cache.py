"""Teacher outputs computed once and kept under ``<storage>/cache``: class-text embeddings per prompt set and
per-image embeddings of the centre (un-augmented) views. The teacher is built only when something is missing.

Files: ``teacher-txt-<hash>.pt`` per (teacher id, prompt strings) and ``teacher-img-<hash>.pt`` per (teacher id,
image fingerprint, preprocessing, teacher image size); written atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.images import save_atomic
from .teachers import Teacher, arch_embed_dim, arch_image_size, load_teacher, normalize_arch, teacher_id

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class TeacherOutputs:
    text: dict[str, torch.Tensor]            # prompt-set name -> [R, D] float32, L2-normalised
    image_emb: torch.Tensor | None           # [N, D] float16, L2-normalised, rows in ImageSet order
    teacher_id: str
    embed_dim: int
    computed: list[str] = field(default_factory=list)   # what this call computed ("images", "text:<name>")
    reused: list[str] = field(default_factory=list)     # what it read from the cache


class TeacherCacheMiss(RuntimeError):
    """A worker found no cached teacher outputs and may not load the teacher."""


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def text_key(tid: str, rows: list[list[str]]) -> str:
    return _key({"v": CACHE_VERSION, "kind": "text", "teacher": tid, "rows": [list(r) for r in rows]})


def image_key(tid: str, fingerprint: str, preprocess: str, image_size: int | None) -> str:
    return _key({"v": CACHE_VERSION, "kind": "images", "teacher": tid, "images": fingerprint,
                 "preprocess": preprocess, "image_size": image_size})


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file is recomputed, not fatal
        log.warning("teacher cache: ignoring unreadable %s (%s)", path, e)
        return None


def teacher_outputs(teacher_spec: dict, images, prompt_sets: dict[str, list[list[str]]], storage: str | os.PathLike,
                    need_images: bool, device: str = "cpu", batch_size: int = 256,
                    log_fn: Callable[[str], None] | None = print, teacher_id_: str | None = None,
                    allow_load: bool = True) -> TeacherOutputs:
    """Text embeddings of every prompt set (and per-image embeddings when ``need_images``), from the cache or
    computed with the teacher of ``teacher_spec`` ({arch, pretrained, checkpoint, preprocess}).

    Black-box use (training workers): pass the driver's ``teacher_id_`` and ``allow_load=False``; then the teacher's
    weights are never read, and a cache miss is an error instead of a silent load."""
    from ..data.augment import center

    say = log_fn or (lambda s: None)
    arch = normalize_arch(teacher_spec["arch"])
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
            teacher = load_teacher(arch, pretrained=pretrained, checkpoint=checkpoint, preprocess=preprocess,
                                   device=device)
            say(f"teacher cache: loaded teacher {teacher.id} ({preprocess} preprocessing)")
        return teacher

    tid = teacher_id_ or teacher_id(arch, pretrained, checkpoint)
    if tid is None:  # random init: the id needs the weights
        tid = get_teacher().id
    computed, reused = [], []
    embed_dim = None

    text = {}
    for name, rows in prompt_sets.items():
        path = cache / f"teacher-txt-{text_key(tid, rows)}.pt"
        blob = _load(path) if path.is_file() else None
        if blob is not None and blob.get("rows") == [list(r) for r in rows]:
            text[name] = blob["text"].float()
            reused.append(f"text:{name}")
        else:
            emb = get_teacher().class_text(rows).float().cpu()
            save_atomic({"text": emb, "rows": [list(r) for r in rows], "teacher_id": tid}, path)
            text[name] = emb
            computed.append(f"text:{name}")
        embed_dim = text[name].shape[1]

    image_emb = None
    if need_images:
        size = arch_image_size(arch)
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

    if embed_dim is None:
        embed_dim = arch_embed_dim(arch) or get_teacher().embed_dim
    if computed:
        say(f"teacher cache: computed {', '.join(computed)}" + (f"; reused {', '.join(reused)}" if reused else ""))
    elif reused:
        say(f"teacher cache: reused {', '.join(reused)} (teacher not loaded)")
    return TeacherOutputs(text=text, image_emb=image_emb, teacher_id=tid, embed_dim=int(embed_dim),
                          computed=computed, reused=reused)
