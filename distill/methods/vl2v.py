"""VL2V-ADiP: Align, Distill, Predict (black-box teacher).

Addepalli, Asokan, Sharma, Babu. "Leveraging Vision-Language Models for Improving Domain Generalization in Image
Classification". CVPR 2024 (arXiv:2310.08255).

With P = student.proj, f_S the backbone features, v_T the teacher image embedding and t_y the text embedding of the
sample's class:

    L = -lam * cos(P(f_S), v_T) - (1 - lam) * cos(P(f_S), t_y)

Two stages, as the official code's two runs (run_stage1.sh, run_stage2.sh: stage 2 loads stage 1's best
training-domain validation checkpoint, trainer.py): ``align_steps`` then ``distill_steps`` (each defaulting to
``train.steps``), each with a fresh optimiser and schedule, inside one trial (``Method.stages``; the loop hands the
best source-validation evaluation of Align to Distill, and only Distill's evaluations are the trial's model).

- Align (global steps [0, align_steps)): only P is trained. The backbone is frozen by running the student in eval mode under
  ``torch.no_grad`` (no gradient reaches it, BatchNorm running statistics and dropout are frozen too), then P is
  applied, with gradients, to the detached features.
- Distill (global steps [align_steps, align_steps + distill_steps)): starts from Align's best evaluation; P is frozen and the backbone is trained. P is
  frozen by applying it with detached parameters (``torch.func.functional_call``) and in eval mode, so the loss
  reaches the backbone through P but P gets no gradient (``grad`` stays None: the optimiser neither moves it nor
  decays it, and its Adam moments are left as Align left them).
- Predict: the frozen zero-shot head, logits = 100 * cos(P(f_S(x)), t_c).

The stage is a pure function of the global step, so the hand-off happens exactly once, also across a resume from a
checkpoint. ``student.classifier`` is never used. No teacher weights are needed: the method only reads the cached teacher image embeddings and the class text
embeddings (black-box mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import CLIP_LOGIT_SCALE, Method, MethodContext, full_precision

ALIGN, DISTILL = "align", "distill"


class VL2V(Method):
    name = "vl2v"
    hparams = {
        "lam": 0.5,              # weight of the image term (1 - lam on the text term); the official scripts' 0.5
        "align_steps": None,     # Align's optimiser steps (None: train.steps)
        "distill_steps": None,   # Distill's optimiser steps (None: train.steps)
    }
    # The paper's search: lam in {0.1, ..., 0.9}; lr in {5e-6 .. 1e-3} and wd 10^U(-6,-2) are the loop's.
    search_space = {
        "lam": {"choice": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]},
    }
    needs_image_embeddings = True

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        if not 0.0 <= float(self.hp["lam"]) <= 1.0:
            raise ValueError(f"vl2v: lam must be in [0, 1], got {self.hp['lam']!r}")
        problems = self.hparam_problems(self.hp)
        if problems:
            raise ValueError(f"vl2v: {'; '.join(problems)}")
        self.handoffs = 0            # Align -> Distill transitions seen by forward (for inspection)
        self._last_stage: str | None = None

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        out = []
        for key in ("align_steps", "distill_steps"):
            v = hp.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                out.append(f"{key}: expected an integer >= 1 or null (train.steps), got {v!r}")
        return out

    @classmethod
    def stages(cls, hp: dict, steps: int) -> list[tuple[str, int]]:
        hp = {**cls.hparams, **(hp or {})}
        return [(ALIGN, int(hp["align_steps"] or steps)), (DISTILL, int(hp["distill_steps"] or steps))]

    @property
    def handoff_step(self) -> int:
        """The first global step of Distill (ctx.total_steps = Align's + Distill's steps; None means train.steps)."""
        if self.hp["align_steps"] is not None:
            return int(self.hp["align_steps"])
        if self.hp["distill_steps"] is not None:
            return self.ctx.total_steps - int(self.hp["distill_steps"])
        return self.ctx.total_steps // 2

    def stage(self, step: int) -> str:
        return ALIGN if step < self.handoff_step else DISTILL

    def _embed(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        student, proj = self.student, self.student.proj
        if stage == ALIGN:
            was_training = student.training
            student.eval()
            try:
                with torch.no_grad():
                    features = student(x)["features"]
            finally:
                student.train(was_training)
            return proj(features.detach())
        was_training = proj.training
        proj.eval()
        try:
            features = student(x)["features"]
            frozen = {name: p.detach() for name, p in proj.named_parameters()}
            return functional_call(proj, frozen, (features,))
        finally:
            proj.train(was_training)

    def forward(self, batch, step):
        stage = self.stage(step)
        if self._last_stage == ALIGN and stage == DISTILL:
            self.handoffs += 1
        self._last_stage = stage
        s = self._embed(batch["x"], stage)
        with full_precision(s):
            s_n = F.normalize(s.float(), dim=-1)
            v = F.normalize(batch["image_emb"].float(), dim=-1)
            t_y = F.normalize(self.text("classes"), dim=-1)[batch["y"]]
            img = (s_n * v).sum(-1).mean()
            txt = (s_n * t_y).sum(-1).mean()
            lam = float(self.hp["lam"])
            loss = -lam * img - (1.0 - lam) * txt
        return loss, {"img_cos": img.detach(), "txt_cos": txt.detach(),
                      "stage": torch.full((), float(stage == DISTILL), device=loss.device)}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        s = F.normalize(self.student(x)["embed"].float(), dim=-1)
        return CLIP_LOGIT_SCALE * (s @ F.normalize(self.text("classes"), dim=-1).t())
