"""SCMD: selective cross-modality distillation from CLIP.

Leng, Li, Wang. "Choosing Wisely and Learning Deeply: Selective Cross-Modality Distillation via CLIP for Domain
Generalization". TMLR 2024 (arXiv:2402.11411; official code github.com/SeanLeng1/SCMD, a DomainBed fork).

Each step, on the concatenated all-domain batch of size B:

1. Selection (the first (1-k) of training): per-sample CE of the student's classifier, computed without gradients;
   keep the floor(p*B) samples with the largest CE (p = ``selection_ratio``; at least 2, which only matters for
   batches with p*B < 2: a train-mode BatchNorm cannot normalise a single sample). Selection is on while
   ``step <= floor((1-k) * (total_steps - 1))`` (0-based steps), i.e. the official ``step <= int(5000 * (1-k))``
   with its 5,001 steps, but scaled to ``ctx.total_steps``; the full batch is used afterwards.
2. On the kept samples (the student is run again on them, with gradients):

       L = CE(z_S, y) + l1 * T^2 * KL(p_T || p_S) + l2 * T^2 * KL(p_T || p_CM)
       p_T  = softmax(z_T / T),   z_T = s_T * cos(v_T, t_c), s_T the teacher's own logit scale (auto)
       p_S  = softmax(z_S / T),   z_S = student.classifier(f_S)
       p_CM = softmax(scale * cos(W f_S, t_c) / T),   scale = exp(logit_scale) <= 100

   W = Linear(F, D, bias=False) and logit_scale (init ln(1/0.07)) are the method's own trainable parameters;
   logit_scale has its own optimiser group at lr 1e-4, as in the official code. The
   official code clamps logit_scale to [0, ln 100] after every optimiser step; here it is clamped in place at the
   start of each forward (the same thing, applied just before the value is next used), so exp(logit_scale) <= 100.

The scoring pass runs the student in its current mode under ``torch.no_grad`` (as the official code does; with
``student.freeze_bn`` - the official setting - it changes nothing; with trainable BatchNorm the pass also updates
the running statistics with the full batch). ``student.proj`` is not used by SCMD (no gradient).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import CLIP_LOGIT_SCALE, Method, MethodContext, full_precision, kd_loss, teacher_logits

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(CLIP_LOGIT_SCALE)
LOGIT_SCALE_LR = 1e-4   # the official optimiser's own group for the cross-modal logit scale


def selection_last_step(total_steps: int, k: float) -> int:
    """The last 0-based step at which hard samples are selected (-1: never)."""
    k = float(k)
    if k >= 1.0 or total_steps <= 0:
        return -1
    return int(math.floor((1.0 - k) * (total_steps - 1) + 1e-9))


def num_selected(batch_size: int, p: float) -> int:
    """floor(p * B), but at least 2 (a train-mode BatchNorm cannot normalise one sample) and at most B."""
    return max(min(2, batch_size), min(batch_size, int(math.floor(float(p) * batch_size + 1e-9))))


class SCMD(Method):
    name = "scmd"
    hparams = {
        "temperature": 3.0,       # T
        "kd_weight": 0.5,         # l1: logit distillation
        "cm_weight": 0.5,         # l2: cross-modality distillation
        "k": 0.25,                # the last k of training uses the full batch
        "selection_ratio": 0.2,   # p: fraction of the batch kept (the hardest)
        "teacher_logit_scale": "auto",  # z_T = scale * cos(v_T, t_c); auto: the teacher's own logit_scale.exp(), as
                                        # the official code (100 for OpenAI CLIP); a number overrides
    }
    # The paper's search (its lr in {3e-5, 5e-5} is the loop's train.lr).
    search_space = {
        "kd_weight": {"uniform": [0.5, 1.0]},
        "cm_weight": {"uniform": [0.5, 1.0]},
        "temperature": {"uniform": [2.0, 5.0]},
        "k": {"uniform": [0.2, 0.4]},
        "selection_ratio": {"choice": [0.2, 0.25, 0.3]},
    }
    needs_image_embeddings = True

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        if not 0.0 < float(self.hp["selection_ratio"]) <= 1.0:
            raise ValueError(f"scmd: selection_ratio must be in (0, 1], got {self.hp['selection_ratio']!r}")
        if not 0.0 <= float(self.hp["k"]) <= 1.0:
            raise ValueError(f"scmd: k must be in [0, 1], got {self.hp['k']!r}")
        if float(self.hp["temperature"]) <= 0:
            raise ValueError(f"scmd: temperature must be > 0, got {self.hp['temperature']!r}")
        self.cm_proj = nn.Linear(student.feature_dim, self.text("classes").shape[1], bias=False)   # W
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.last_selected: torch.Tensor | None = None   # indices kept at the last forward (for inspection)

    def param_groups(self) -> list[dict]:
        """The official optimiser: the logit scale in its own group at lr 1e-4 (algorithms.py), the rest at train.lr."""
        rest = [p for n, p in self.named_parameters() if p.requires_grad and n != "logit_scale"]
        return [{"params": rest}, {"params": [self.logit_scale], "lr": LOGIT_SCALE_LR}]

    def selecting(self, step: int) -> bool:
        return step <= selection_last_step(self.ctx.total_steps, self.hp["k"])

    def cm_logits(self, features: torch.Tensor) -> torch.Tensor:
        """scale * cos(W f_S, t_c) [B, C]."""
        w = F.normalize(self.cm_proj(features.float()), dim=-1)
        t = F.normalize(self.text("classes"), dim=-1)
        return self.logit_scale.exp() * (w @ t.t())

    def forward(self, batch, step):
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        x, y, v = batch["x"], batch["y"], batch["image_emb"]
        if self.selecting(step):
            with torch.no_grad():
                per_sample = F.cross_entropy(self.student(x)["logits"].float(), y, reduction="none")
            n = num_selected(len(y), self.hp["selection_ratio"])
            keep = torch.sort(per_sample, descending=True, stable=True).indices[:n]
            x, y, v = x[keep], y[keep], v[keep]
        else:
            keep = torch.arange(len(y), device=y.device)
        self.last_selected = keep.detach()
        out = self.student(x)
        with full_precision(y):
            logits = out["logits"].float()
            z_t = teacher_logits(v.float(), self.text("classes"), self.hp["teacher_logit_scale"])
            T = float(self.hp["temperature"])
            ce = F.cross_entropy(logits, y)
            kd = kd_loss(logits, z_t, T)
            cm = kd_loss(self.cm_logits(out["features"]), z_t, T)
            loss = ce + float(self.hp["kd_weight"]) * kd + float(self.hp["cm_weight"]) * cm
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "cm": cm.detach(),
                      "selected": torch.full((), float(len(keep)), device=loss.device),   # a fill: no host copy
                      "cm_scale": self.logit_scale.detach().exp()}
