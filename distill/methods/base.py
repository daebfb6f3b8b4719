"""The method contract and the loss helpers shared by several methods.

A method is an ``nn.Module`` that owns the student and its own extra trainable heads, so that the loop can wrap
the whole thing in DDP. It computes a loss from a batch; it never runs a loop, an optimiser or an evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

CLIP_LOGIT_SCALE = 100.0
from ..config import AUTO  # teacher_logit_scale: the teacher's own learned logit scale (resolved before __init__)


@dataclass
class MethodContext:
    """What a method may know about its task: never the test domain, not even its name."""

    class_names: list[str]                 # human-readable, in label order
    source_domains: list[str]              # human-readable names of the training domains, in batch order
    total_steps: int                       # optimiser steps of the whole trial (every stage)
    num_classes: int
    embed_dim: int                         # the teacher's embedding width
    class_prompts: list[list[str]]         # prompts per class from teacher.prompts ({d}: the source domains only)
    style_domains: bool = True             # False for datasets whose domains are not styles (VLCS, Terra)
    descriptions: dict[str, str] | None = None   # class name -> attribute description (Li et al.)
    extra: dict = field(default_factory=dict)


class Method(nn.Module):
    name: ClassVar[str] = ""
    hparams: ClassVar[dict] = {}
    search_space: ClassVar[dict] = {}
    needs_image_embeddings: ClassVar[bool] = False

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__()
        self.student = student
        self.hp = {**self.hparams, **(hp or {})}
        problems = self.hparam_problems(self.hp)   # the config checked them already; a method built directly too
        if problems:
            raise ValueError(f"{self.name}: {'; '.join(problems)}")
        self.ctx = ctx
        for key, value in text.items():
            self.register_buffer(f"text_{key}", value.float(), persistent=False)

    @classmethod
    def prompt_sets(cls, hp: dict, ctx: MethodContext) -> dict[str, list[list[str]]]:
        """Text embeddings to precompute with the teacher: name -> one list of prompts (ensembled) per row."""
        return {"classes": ctx.class_prompts}

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        """Problems with hyperparameter values (``"key: message"``), found before any trial starts."""
        return []

    @classmethod
    def stages(cls, hp: dict, steps: int) -> list[tuple[str, int]]:
        """The trial's training stages, (name, optimiser steps), run one after another, each with a fresh optimiser
        and schedule; a stage after the first starts from the previous stage's best source-validation evaluation.
        Only the last stage's evaluations are the trial's model. One stage of ``train.steps`` by default."""
        return [("train", int(steps))]

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups (a group may set its own ``lr``); every trainable parameter once."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def text(self, key: str) -> torch.Tensor:
        return getattr(self, f"text_{key}")

    def forward(self, batch: dict, step: int):  # -> (loss, {term: detached tensor})
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)["logits"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity [N, M] between the rows of a [N, D] and b [M, D]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()


def teacher_logits(image_emb: torch.Tensor, class_text: torch.Tensor, scale: float = CLIP_LOGIT_SCALE):
    """CLIP zero-shot logits z_T = scale * cos(v_T, t_c)."""
    if scale == AUTO:
        raise ValueError("teacher_logit_scale 'auto' must be resolved to the teacher's logit scale before training "
                         "(distill.trial.loop does it from the prepared assets)")
    return float(scale) * cosine(image_emb, class_text)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), batch mean, computed on log-probabilities."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def full_precision(device) -> torch.autocast:
    """A context with autocast off, so that loss heads (cosines scaled by 100, softmaxes, KLs) run in float32 even
    when the loop wraps ``forward`` in bf16 autocast (under autocast a matmul of float32 tensors still runs in bf16,
    which puts errors of ~0.4 on a 100*cos logit). Use it around the part of a loss after the student's forward."""
    dev = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    return torch.autocast(device_type=dev.type, enabled=False)
