"""CLIP teachers: any open_clip model (pretrained tag or local checkpoint) behind one small interface.

Importing this module registers the built-in architectures in ``distill/models/configs`` with open_clip, so
``open_clip.create_model("distill-tiny-rn", pretrained="/path/to/fitted.pt")`` works like any other model.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..console import verbose

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BUILTIN_ARCHS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))  # fitted locally (distill.models.fit)
PREPROCESS = ("clip", "imagenet")
FIT = "fit"   # config value of teacher.checkpoint meaning: fit the built-in teacher on the dataset (fit.ensure_teacher)
CLIP_MEAN, CLIP_STD = tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
ZERO_SHOT_SCALE = 100.0


def _register_builtin_configs() -> None:
    from open_clip import factory

    from . import configs  # noqa: F401 - registers the built-in teacher's image tower (timm) in every process

    if not any(Path(p).resolve() == CONFIG_DIR for p in factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(CONFIG_DIR)


_register_builtin_configs()


class TeacherError(RuntimeError):
    """A teacher cannot be built from the given arch / pretrained / checkpoint."""


class UnknownArchError(TeacherError, ValueError):
    """The arch is not an open_clip (or distill built-in) model name."""


class TeacherUnavailableError(TeacherError):
    """The teacher's pretrained weights are not on this machine and could not be downloaded."""


# --------------------------------------------------------------------------------------------------------------
# names, ids, validation (none of these build a model or touch the network)


def normalize_arch(arch: str) -> str:
    """open_clip's spelling of an arch name ("ViT-B/32" -> "ViT-B-32"); schema names pass through."""
    if arch.startswith(("hf-hub:", "local-dir:")):
        return arch
    return arch.replace("/", "-")


def known_arch(arch: str) -> bool:
    arch = normalize_arch(arch)
    return arch.startswith(("hf-hub:", "local-dir:")) or arch in open_clip.list_models()


def arch_suggestions(arch: str, n: int = 5) -> list[str]:
    """Close matches of an unknown arch among open_clip's models (case-insensitive)."""
    models = open_clip.list_models()
    lower = {m.lower(): m for m in models}
    hits = difflib.get_close_matches(normalize_arch(arch).lower(), list(lower), n=n, cutoff=0.5)
    return [lower[h] for h in hits]


def _unknown_arch_message(arch: str) -> str:
    close = arch_suggestions(arch)
    hint = f"close matches: {', '.join(close)}" if close else "see open_clip.list_models()"
    return f"unknown teacher arch {arch!r} ({hint}; distill built-ins: {', '.join(BUILTIN_ARCHS)})"


def pretrained_tags(arch: str) -> list[str]:
    return list(open_clip.list_pretrained_tags_by_model(normalize_arch(arch)))


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def teacher_id(arch: str, pretrained: str | None = None, checkpoint: str | os.PathLike | None = None) -> str | None:
    """Stable id for cache keys without building the model: ``arch/tag`` or ``arch@sha1:<digest>`` of the
    checkpoint file. None for a randomly initialised model (its id needs the weights: see ``Teacher.id``)."""
    arch = normalize_arch(arch)
    if checkpoint is None and pretrained is not None and os.path.isfile(str(pretrained)):
        checkpoint, pretrained = pretrained, None
    if checkpoint is not None:
        return f"{arch}@sha1:{file_sha1(checkpoint)[:20]}"
    if pretrained:
        return f"{arch}/{pretrained}"
    if arch.startswith(("hf-hub:", "local-dir:")):
        return arch
    return None


def arch_image_size(arch: str) -> int | None:
    """The model's input size from its open_clip config (no model built), or None if unknown."""
    cfg = open_clip.get_model_config(normalize_arch(arch)) if not arch.startswith("hf-hub:") else None
    if not cfg:
        return None
    size = cfg.get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def arch_embed_dim(arch: str) -> int | None:
    """The embedding width from the open_clip config (no model built), or None if unknown."""
    cfg = open_clip.get_model_config(normalize_arch(arch)) if not arch.startswith("hf-hub:") else None
    return int(cfg["embed_dim"]) if cfg and cfg.get("embed_dim") else None


def validate_teacher(cfg_teacher: dict) -> list[str]:
    """Cheap problems of a config's teacher section ({arch, pretrained, checkpoint, preprocess}); no downloads.

    ``checkpoint: fit`` (or neither pretrained nor checkpoint) is valid only for a distill built-in arch: it is
    fitted on the dataset by ``distill.models.fit.ensure_teacher``."""
    problems: list[str] = []
    if not isinstance(cfg_teacher, dict):
        return [f"teacher: expected a mapping, got {type(cfg_teacher).__name__}"]
    arch = cfg_teacher.get("arch")
    pretrained = cfg_teacher.get("pretrained")
    checkpoint = cfg_teacher.get("checkpoint")
    preprocess = cfg_teacher.get("preprocess", "clip")
    if not arch or not isinstance(arch, str):
        problems.append("teacher.arch: missing (an open_clip model name such as ViT-B-16, or distill-tiny-rn)")
    elif not known_arch(arch):
        problems.append(f"teacher.arch: {_unknown_arch_message(arch)}")
    if preprocess not in PREPROCESS:
        problems.append(f"teacher.preprocess: {preprocess!r} is not one of {', '.join(PREPROCESS)}")
    if pretrained and checkpoint:
        problems.append("teacher: set either pretrained (an open_clip tag) or checkpoint (a file, or `fit`), "
                        "not both")
    fit = checkpoint == FIT
    if fit:
        checkpoint = None
        if isinstance(arch, str) and known_arch(arch) and normalize_arch(arch) not in BUILTIN_ARCHS:
            problems.append(f"teacher.checkpoint: `fit` fits the built-in architectures ({', '.join(BUILTIN_ARCHS)}) "
                            f"only; fit {arch} with `python -m distill.teacher fit --arch {arch} ...` and give "
                            f"its checkpoint path, or set teacher.pretrained")
    if checkpoint and not os.path.isfile(os.path.expanduser(str(checkpoint))):
        problems.append(f"teacher.checkpoint: file not found: {checkpoint}")
    if pretrained and isinstance(arch, str) and known_arch(arch) and not arch.startswith(("hf-hub:", "local-dir:")):
        tags = pretrained_tags(arch)
        if pretrained not in tags and not os.path.isfile(os.path.expanduser(str(pretrained))):
            known = ", ".join(tags) if tags else f"none: {arch} has no pretrained tags, use teacher.checkpoint"
            problems.append(f"teacher.pretrained: {pretrained!r} is not a tag of {arch} (tags: {known})")
    if (not pretrained and not checkpoint and not fit and isinstance(arch, str) and known_arch(arch)
            and normalize_arch(arch) not in BUILTIN_ARCHS and not arch.startswith(("hf-hub:", "local-dir:"))):
        tags = pretrained_tags(arch)
        problems.append(f"teacher: {arch} needs pretrained (tags: {', '.join(tags) or 'none'}) or checkpoint; "
                        f"only the built-ins ({', '.join(BUILTIN_ARCHS)}) are fitted when neither is given")
    return problems


# --------------------------------------------------------------------------------------------------------------
# the teacher


class Teacher:
    """A frozen open_clip model in eval mode with its tokenizer and explicit image preprocessing."""

    def __init__(self, model: torch.nn.Module, tokenizer, arch: str, id: str, preprocess: str = "clip",
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.arch = arch
        self.id = id
        self.preprocess = preprocess
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = torch.device(device)
        size = getattr(model.visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(_embed_dim(model))

    def __repr__(self) -> str:
        return f"Teacher({self.id}, preprocess={self.preprocess}, image_size={self.image_size}, dim={self.embed_dim})"

    def prepare(self, x01: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], any size -> the model's input: shortest side resized, centre crop, normalised."""
        x = x01.to(self.device, torch.float32)
        if x.ndim == 3:
            x = x[None]
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, x01: torch.Tensor, batch_size: int = 256, amp_dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32) of float images in [0, 1], any size: the teacher's own
        preprocessing (resize, centre crop, its mean/std) is applied first. ``amp_dtype`` (e.g. torch.bfloat16) runs
        the image tower under autocast."""
        out = []
        for i in range(0, x01.shape[0], batch_size):
            x = self.prepare(x01[i:i + batch_size])
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                emb = self.model.encode_image(x)
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Text embeddings [len(texts), D] (float32), L2-normalised unless ``normalize`` is false."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            emb = self.model.encode_text(tokens).float()
            out.append(F.normalize(emb, dim=-1) if normalize else emb)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def class_text(self, rows: Sequence[Sequence[str]], ensemble: str = "normalized") -> torch.Tensor:
        """Prompt ensemble [R, D], normalised: per row, the mean of its prompts' normalised embeddings (``normalized``,
        CLIP's usual) or of their raw embeddings (``raw``, as RISE's code does), then renormalised."""
        if ensemble not in ("normalized", "raw"):
            raise ValueError(f"class_text: ensemble must be 'normalized' or 'raw', got {ensemble!r}")
        flat = [p for row in rows for p in row]
        if any(len(row) == 0 for row in rows):
            raise ValueError("class_text: every row needs at least one prompt")
        emb = self.encode_text(flat, normalize=ensemble == "normalized")
        out, i = [], 0
        for row in rows:
            out.append(emb[i:i + len(row)].mean(0))
            i += len(row)
        return F.normalize(torch.stack(out), dim=-1) if out else emb

    @property
    def logit_scale(self) -> float:
        """The model's own learned logit scale, exp(logit_scale) (100 for OpenAI's CLIP weights); 100 (CLIP's) for a
        model without one."""
        value = getattr(self.model, "logit_scale", None)
        if value is None:
            return ZERO_SHOT_SCALE
        return float(torch.as_tensor(value).detach().float().exp().item())

    @torch.no_grad()
    def zero_shot_logits(self, x01: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
        """100 * cos(image, class text): [N, R]."""
        img = self.encode_images(x01)
        return ZERO_SHOT_SCALE * img @ F.normalize(class_text.to(img.device).float(), dim=-1).t()


def _embed_dim(model) -> int:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim:
        return dim
    with torch.no_grad():  # towers without an output_dim attribute: ask the text tower
        ctx = getattr(model, "context_length", None) or 77
        tokens = torch.zeros(1, ctx, dtype=torch.long, device=next(model.parameters()).device)
        return model.encode_text(tokens).shape[-1]


@contextlib.contextmanager
def _hf_offline():
    """Temporarily force huggingface_hub into offline mode (resolve from the local cache only)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


@contextlib.contextmanager
def _quiet_logging(level: int = logging.CRITICAL):
    """Silence open_clip's (root logger) download errors for an attempt whose failure is handled."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def _hf_offline_requested() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(arch: str, tag: str | None, reason: str) -> TeacherUnavailableError:
    if tag is None:
        return TeacherUnavailableError(
            f"the weights of teacher {arch} could not be fetched: {reason}.\n"
            f"To supply them: on a machine with internet run\n"
            f"    python -c \"import open_clip; open_clip.create_model('{arch}')\"\n"
            f"which stores them in the Hugging Face cache (~/.cache/huggingface, or $HF_HOME); then copy that cache "
            f"here and set HF_HOME to it.")
    return TeacherUnavailableError(
        f"the pretrained weights of teacher {arch} (pretrained={tag!r}) could not be fetched: {reason}.\n"
        f"To supply them: on a machine with internet run\n"
        f"    python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"\n"
        f"which stores them in the Hugging Face cache (~/.cache/huggingface, or $HF_HOME); then either copy that "
        f"cache here and set HF_HOME to it, or copy the weights file (open_clip_pytorch_model.bin / "
        f"open_clip_model.safetensors) here and set `teacher.checkpoint: /path/to/file.bin` (with teacher.arch: "
        f"{arch}, no pretrained).")


def _create(arch: str, pretrained: str | None, device: str, cache_dir: str | None):
    return open_clip.create_model(arch, pretrained=pretrained, device=device, cache_dir=cache_dir)


def _create_from_tag(arch: str, tag: str | None, device: str, cache_dir: str | None):
    """open_clip model with downloadable weights (a pretrained tag, or an hf-hub: name with tag None)."""
    # 1) local caches only: never touches the network, fast when the weights are already there
    try:
        with _hf_offline(), _quiet_logging():
            return _create(arch, tag, device, cache_dir)
    except Exception as e:  # open_clip wraps every download problem in RuntimeError
        first = e
    if _hf_offline_requested():
        raise _unavailable(arch, tag, f"not in the local cache and HF_HUB_OFFLINE is set ({first})") from first
    if not _reachable("huggingface.co"):
        raise _unavailable(arch, tag, "not in the local cache and huggingface.co is unreachable (no internet?)") \
            from first
    # 2) online
    try:
        return _create(arch, tag, device, cache_dir)
    except Exception as e:
        raise _unavailable(arch, tag, str(e)) from e


def load_teacher(arch: str, pretrained: str | None = None, checkpoint: str | os.PathLike | None = None,
                 preprocess: str = "clip", device: str = "cpu", cache_dir: str | None = None) -> Teacher:
    """Build a frozen teacher from an open_clip arch plus a pretrained tag, or a local checkpoint file.

    ``preprocess="clip"`` normalises with the model's own (CLIP) mean/std, the correct default; ``"imagenet"``
    feeds ImageNet-normalised images, as RISE/SCMD/VL2V's official code did (for faithful reproductions).
    With neither pretrained nor checkpoint the model is randomly initialised (tests, smoke runs).

    open_clip's INFO lines on how it built the model (its root-logger "Parsing model identifier ...", "Loading
    full pretrained weights ...") print with --verbose only: in a Ray worker they would reach the sweep's console."""
    with contextlib.nullcontext() if verbose() else _quiet_logging(logging.INFO):
        return _load_teacher(arch, pretrained, checkpoint, preprocess, device, cache_dir)


def _load_teacher(arch: str, pretrained: str | None, checkpoint: str | os.PathLike | None, preprocess: str,
                  device: str, cache_dir: str | None) -> Teacher:
    if preprocess not in PREPROCESS:
        raise TeacherError(f"teacher preprocess {preprocess!r} is not one of {', '.join(PREPROCESS)}")
    if pretrained and checkpoint:
        raise TeacherError("teacher: give either pretrained (an open_clip tag) or checkpoint (a file), not both")
    arch = normalize_arch(arch)
    if not known_arch(arch):
        raise UnknownArchError(_unknown_arch_message(arch))
    if pretrained and os.path.isfile(os.path.expanduser(str(pretrained))):
        checkpoint, pretrained = pretrained, None
    schema = arch.startswith(("hf-hub:", "local-dir:"))

    if checkpoint is not None:
        checkpoint = os.path.expanduser(str(checkpoint))
        if not os.path.isfile(checkpoint):
            raise TeacherError(f"teacher checkpoint not found: {checkpoint}")
        try:
            model = _create(arch, checkpoint, device, cache_dir)
        except Exception as e:
            raise TeacherError(f"cannot load checkpoint {checkpoint} into {arch}: {e}") from e
        tid = teacher_id(arch, checkpoint=checkpoint)
    elif pretrained:
        if not schema:
            tags = pretrained_tags(arch)
            if pretrained not in tags:
                raise TeacherError(f"{pretrained!r} is not a pretrained tag of {arch} nor a file "
                                   f"(tags: {', '.join(tags) or 'none'})")
        model = _create_from_tag(arch, pretrained, device, cache_dir)
        tid = teacher_id(arch, pretrained=pretrained)
    else:
        if schema:   # hf-hub:org/repo or local-dir:/path: weights come with the name
            model = _create_from_tag(arch, None, device, cache_dir)
            tid = arch
        else:
            model = _create(arch, None, device, cache_dir)
            tid = f"{arch}/random:{_state_hash(model)}"

    if preprocess == "clip":
        cfg = open_clip.get_model_preprocess_cfg(model)
        mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    else:
        mean, std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    return Teacher(model, tokenizer, arch=arch, id=tid, preprocess=preprocess, mean=mean, std=std, device=device)


def load_teacher_spec(spec: dict, device: str = "cpu") -> Teacher:
    """``load_teacher`` from a config's teacher section {arch, pretrained, checkpoint, preprocess}."""
    return load_teacher(spec["arch"], pretrained=spec.get("pretrained"), checkpoint=spec.get("checkpoint"),
                        preprocess=spec.get("preprocess") or "clip", device=device)


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:20]
