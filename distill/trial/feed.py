"""The training batches of a trial, on the worker's device: DomainBed minibatches (``batch_size`` images from every
source domain), augmented there, with the teacher's embedding of the view the method needs.

What the teacher sees (``teacher_view``):

- ``online`` (``teacher.online: true``): the teacher encodes exactly the student's augmented views, here in the
  worker (no grad, bf16 on a GPU), with its own preprocessing (resize to its input size, its mean/std) applied to
  those pixels: RISE, SCMD and VL2V's recipe.
- ``views`` (``teacher.views: K``): the driver cached K augmented views per image with their augmentation
  parameters; each step draws one stored view per image and renders exactly that view for the student, so the
  teacher embedding and the student's pixels describe the same view (black-box, cheap on CPUs).
- ``centre``: the cached embedding of the un-augmented image while the student sees an augmented view (Li et al.'s
  recipe: CLIP features of centre crops).
- ``none``: the method needs no per-image teacher output.

Where the decoded images live (``train.device_data``): on the GPU (``gpu``: gathered there every step), or in host
memory (``host``: the memory-mapped uint8 cache, shared by every trial on a node through the page cache; each step's
images are gathered on the host, pinned and copied asynchronously, the next step's while the current one runs), by
size with ``auto``. On a CPU there is one memory: the images stay in the mapped cache.

Batch ``t`` is a pure function of (seed, rank, t) and of the generator state the checkpoint stores, so a resumed
trial continues the same stream.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD, augment, center, normalize, render
from ..data.splits import DomainBatches

BN_STREAM_OFFSET = 1_000_003   # the batches SWAD recomputes BatchNorm statistics on: a separate, seeded stream


GPU_SHARE = 0.25   # auto: the images go to the GPU when they take at most this share of its memory (per trial)


def data_on_host(mode: str, nbytes: int, device, gpus_per_worker: float = 1.0) -> bool:
    """Whether the decoded images stay in host memory (``train.device_data``: auto, gpu, host). On a CPU both are
    the same memory; ``host`` there still takes the streaming path (gather, prefetch), which the tests use."""
    if mode != "auto":
        return mode == "host"
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return nbytes > GPU_SHARE * total * min(1.0, gpus_per_worker or 1.0)


def teacher_view(cfg: dict, needs_image_embeddings: bool) -> str:
    if not needs_image_embeddings:
        return "none"
    if cfg["teacher"]["online"]:
        return "online"
    return "views" if cfg["teacher"]["views"] else "centre"


class Feeder:
    """``batch(step)`` -> {"x": normalised student view, "y", "domain", "idx", ["image_emb"]}."""

    def __init__(self, cfg: dict, images, splits, outputs, needs_image_embeddings: bool, device, rank: int = 0,
                 teacher=None, amp_dtype=None):
        tc, ds = cfg["train"], cfg["dataset"]
        self.size, self.augment, self.device = ds["image_size"], tc["augment"], device
        self.mode = teacher_view(cfg, needs_image_embeddings)
        if self.mode == "online" and teacher is None:
            raise ValueError("teacher.online needs the teacher in the worker")
        self.teacher, self.amp_dtype = teacher, amp_dtype
        self.cuda = device.type == "cuda"
        self.host = data_on_host(tc["device_data"], images.images.numel(), device,
                                 cfg["resources"]["gpus_per_worker"])
        # decoded uint8 images: on the device (augmentation runs there), or left in the host's mapped cache
        self.images = images.images if self.host else images.images.to(device)
        self.labels = images.labels.to(device)
        self.channels_last = self.cuda   # convolutional students run faster in channels_last on a GPU
        self._next: tuple | None = None  # (step, idx, images) already on their way to the device
        self.image_emb = outputs.image_emb.to(device) if self.mode == "centre" else None
        if self.mode == "views":
            self.view_params = outputs.views.params.to(device)
            self.view_emb = outputs.views.emb.to(device)
        dom_index = {d: i for i, d in enumerate(splits.source_domains)}
        self.domains = torch.cat([torch.full((tc["batch_size"],), dom_index[d], dtype=torch.long)
                                  for d in splits.source_domains]).to(device)
        self.seed, self.rank, self.splits, self.batch_size = cfg["seed"], rank, splits, tc["batch_size"]
        self.stream = DomainBatches(splits, tc["batch_size"], seed=cfg["seed"], rank=rank)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg["seed"] * 1000 + rank)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.pin_memory().to(self.device, non_blocking=True) if self.cuda else x

    def _load(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s image indices (on the device) and uint8 images (on the device, or on their way there)."""
        idx = self.stream.batch(step)
        x_u8 = self._to_device(self.images[idx]) if self.host else None
        idx = self._to_device(idx)
        return idx, (x_u8 if x_u8 is not None else self.images[idx])

    def views(self, idx: torch.Tensor, x_u8: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's views (float [B, 3, size, size] in [0, 1]) of images `idx` and the teacher's embeddings of
        the same views (float32, normalised; None when the method needs none)."""
        if x_u8 is None:
            x_u8 = self._to_device(self.images[idx.cpu()]) if self.host else self.images[idx]
        if self.mode == "views":
            pick = torch.randint(self.view_params.shape[1], (len(idx),), generator=self.gen, device=self.device)
            x01 = render(x_u8, self.view_params[idx, pick], self.size)
            return x01, self.view_emb[idx, pick].float()
        x01 = augment(x_u8, self.size, generator=self.gen) if self.augment else center(x_u8, self.size)
        if self.mode == "online":
            with torch.no_grad():
                return x01, self.teacher.encode_images(x01, batch_size=len(x01), amp_dtype=self.amp_dtype).float()
        if self.mode == "centre":
            return x01, self.image_emb[idx].float()
        return x01, None

    def batch(self, step: int) -> dict:
        if self._next is not None and self._next[0] == step:
            _, idx, x_u8 = self._next
        else:
            idx, x_u8 = self._load(step)
        if self.host:   # queue the next step's gather and copies now: on a GPU they run while this step computes
            self._next = (step + 1, *self._load(step + 1))
        x01, emb = self.views(idx, x_u8)
        x = normalize(x01, IMAGENET_MEAN, IMAGENET_STD)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = {"x": x, "y": self.labels[idx], "domain": self.domains, "idx": idx}
        if emb is not None:
            out["image_emb"] = emb
        return out

    def bn_batches(self, n: int) -> Iterator[torch.Tensor]:
        """``n`` normalised training views from a separate seeded stream (SWAD's BatchNorm recomputation), leaving the
        training stream and generator untouched."""
        stream = DomainBatches(self.splits, self.batch_size, seed=self.seed + BN_STREAM_OFFSET, rank=self.rank)
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed + BN_STREAM_OFFSET) * 1000 + self.rank)
        for step in range(n):
            idx = stream.batch(step)
            x_u8 = self._to_device(self.images[idx]) if self.host else self.images[self._to_device(idx)]
            x01 = augment(x_u8, self.size, generator=gen) if self.augment else center(x_u8, self.size)
            yield normalize(x01, IMAGENET_MEAN, IMAGENET_STD)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"].cpu())
        self.stream.load_state_dict(state["stream"])
