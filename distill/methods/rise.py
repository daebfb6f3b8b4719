"""RISE: distilling CLIP into a student with language guidance.

Huang, Zhou, Lin, Cai, Wang, Lee. "A Sentence Speaks a Thousand Images: Domain Generalization through Distilling
CLIP with Language Guidance". ICCV 2023 (arXiv:2309.12530; official code github.com/WisconsinAIVision/RISE).

With s = student.proj(f_S) (the student's projected embedding), t_c the class text embeddings (7-template
ensemble, normalised), z_S the student's class logits and v_T the teacher's image embedding:

    KD = T^2 * KL(softmax(z_T / T) || softmax(z_S / T)),          z_T = 100 * cos(v_T, t_c)
    CE = cross_entropy(z_S, y)
    AD = mean_i (1 - cos(s_i, t_{y_i}))                               absolute distance
    RD = 10 * MSE(softmax_j cos(s_i, a_{y_i,j}), softmax_j cos(t_{y_i}, a_{y_i,j}))    relative distance
    L  = w1 * KD + w2 * CE + w3 * (AD and/or RD, by `loss_type`: "abs", "rel" or "both")

t_c is the official code's ensemble of the 7 templates: the mean of the raw (unnormalised) text embeddings, then
normalised. The anchors a_{c,j} are the teacher's text embeddings of "a {anchor_j} of a {c}" where the anchors are the
source domains' names (never the held-out domain's) (e.g. "a sketch of a dog"), or, for datasets whose domains are not image styles (VLCS,
TerraIncognita: ``ctx.style_domains`` False), "bright photo", "corrupted photo", "dark photo", "good photo". The
softmax over anchors has no temperature and the MSE is the mean over the [B, J] entries, as in the official code.

Classifier (`text_classifier`, default true, as in the official code): RISE's student classifies its 512-d
*projected* embedding with a linear layer whose weight is initialised to the normalised class text embeddings and
whose bias is zero (a zero-shot-style head). Our contract's ``student.classifier`` is ``Linear(F, C)`` on the
backbone features, which cannot hold t_c, so with ``text_classifier: true`` the method owns an extra trainable head
``head = Linear(D, C)`` with ``head.weight = t_c``, ``head.bias = 0``, and z_S = head(s) (for training and
``predict``); ``student.classifier`` is then unused. With ``text_classifier: false``, z_S = student.classifier(f_S)
(randomly initialised, our contract's default classifier).

Weights: the paper's grids always have w1 + w2 = 1; ``ce_weight`` defaults to None, meaning 1 - ``kd_weight``.
Templates: ``templates: rise`` (default) uses the paper's 7-template ensemble for t_c (KD, AD, RD and the head);
``templates: config`` uses the config's ``teacher.prompts`` (the "classes" set) instead, e.g. for a teacher fitted
on captions of a different wording.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, MethodContext, full_precision, kd_loss, teacher_logits
from ..models.prompts import TEMPLATES, PromptSet

# The official code's 7-template ensemble: one list, shared with the prompt registry.
RISE_TEMPLATES = TEMPLATES["rise"]
# Anchors for datasets whose domains are not styles (VLCS, TerraIncognita), from the official code.
NON_STYLE_ANCHORS = ["bright photo", "corrupted photo", "dark photo", "good photo"]
ANCHOR_TEMPLATE = "a {anchor} of a {c}"
LOSS_TYPES = ("abs", "rel", "both")
TEMPLATE_SETS = ("rise", "config")


def rise_anchors(ctx: MethodContext) -> list[str]:
    """The anchor words: the source domains' names for style datasets, fixed photo qualities otherwise."""
    return list(ctx.source_domains) if ctx.style_domains else list(NON_STYLE_ANCHORS)


def _check_hp(hp: dict) -> dict:
    if hp["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"rise: loss_type must be one of {LOSS_TYPES}, got {hp['loss_type']!r}")
    if hp["templates"] not in TEMPLATE_SETS:
        raise ValueError(f"rise: templates must be one of {TEMPLATE_SETS}, got {hp['templates']!r}")
    if float(hp["temperature"]) <= 0:
        raise ValueError(f"rise: temperature must be > 0, got {hp['temperature']!r}")
    return hp


class RISE(Method):
    name = "rise"
    hparams = {
        "temperature": 3.0,       # T
        "kd_weight": 0.9,         # w1
        "ce_weight": None,        # w2; None = 1 - kd_weight (every grid of the paper has w1 + w2 = 1)
        "distance_weight": 1.0,   # w3, on AD and RD
        "loss_type": "both",      # abs | rel | both
        "text_classifier": True,  # zero-shot-style head on s initialised from t_c (official); false: student.classifier
        "templates": "rise",      # rise: the paper's 7-template ensemble; config: the config's teacher.prompts
        "teacher_logit_scale": "auto",  # z_T = scale * cos(v_T, t_c); auto: the teacher's own logit_scale.exp() (100
                                        # for OpenAI CLIP, RISE's hard-coded value); a number overrides
    }
    # The paper's grids: T = 3; (w1, w2) in {(.9,.1), (.8,.2)} PACS/VLCS, {(.2,.8), (.1,.9)} OfficeHome,
    # {(.2,.8), (.3,.7)} TerraIncognita (w2 = 1 - w1); w3 in {0.5, 1, 2}. One method-wide space: the union.
    search_space = {
        "kd_weight": {"choice": [0.1, 0.2, 0.3, 0.8, 0.9]},
        "distance_weight": {"choice": [0.5, 1.0, 2.0]},
    }
    needs_image_embeddings = True

    @classmethod
    def prompt_sets(cls, hp: dict, ctx: MethodContext) -> dict[str, list[list[str]]]:
        hp = _check_hp({**cls.hparams, **(hp or {})})
        sets = {"classes": ctx.class_prompts}
        if hp["templates"] == "rise":
            # the official ensemble (train_rise.py): the mean of the raw template embeddings, then normalised
            sets["rise_classes"] = PromptSet([[t.format(c=c) for t in RISE_TEMPLATES] for c in ctx.class_names],
                                             ensemble="raw")
        if hp["loss_type"] in ("rel", "both"):
            # class-major rows: row c * J + j is "a {anchor_j} of a {class_c}"
            sets["rise_anchors"] = [[ANCHOR_TEMPLATE.format(anchor=a, c=c)] for c in ctx.class_names
                                    for a in rise_anchors(ctx)]
        return sets

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        _check_hp(self.hp)
        self.n_anchors = len(rise_anchors(ctx))
        t = self.class_text()
        self.head = None
        if self.hp["text_classifier"]:
            self.head = nn.Linear(t.shape[1], t.shape[0])
            with torch.no_grad():
                self.head.weight.copy_(t)
                self.head.bias.zero_()

    def class_text(self) -> torch.Tensor:
        """t_c [C, D], normalised."""
        return F.normalize(self.text("rise_classes" if self.hp["templates"] == "rise" else "classes"), dim=-1)

    def weights(self) -> tuple[float, float, float]:
        w1 = float(self.hp["kd_weight"])
        w2 = 1.0 - w1 if self.hp["ce_weight"] is None else float(self.hp["ce_weight"])
        return w1, w2, float(self.hp["distance_weight"])

    def _logits(self, out: dict) -> torch.Tensor:
        if self.head is not None:
            return self.head(out["embed"].float())
        return out["logits"].float()

    def forward(self, batch, step):
        out = self.student(batch["x"])
        y = batch["y"]
        with full_precision(y):
            logits = self._logits(out)
            s = out["embed"].float()
            t = self.class_text()
            w1, w2, w3 = self.weights()
            z_t = teacher_logits(batch["image_emb"].float(), t, self.hp["teacher_logit_scale"])
            kd = kd_loss(logits, z_t, self.hp["temperature"])
            ce = F.cross_entropy(logits, y)
            loss = w1 * kd + w2 * ce
            terms = {"kd": kd.detach(), "ce": ce.detach()}
            s_n = F.normalize(s, dim=-1)
            t_y = t[y]                                                       # [B, D]
            if self.hp["loss_type"] in ("abs", "both"):
                ad = (1.0 - (s_n * t_y).sum(-1)).mean()
                loss = loss + w3 * ad
                terms["ad"] = ad.detach()
            if self.hp["loss_type"] in ("rel", "both"):
                anchors = F.normalize(self.text("rise_anchors"), dim=-1)
                a = anchors.view(-1, self.n_anchors, anchors.shape[-1])[y]  # [B, J, D]
                d_s = torch.einsum("bd,bjd->bj", s_n, a).softmax(dim=-1)
                d_t = torch.einsum("bd,bjd->bj", t_y, a).softmax(dim=-1)
                rd = 10.0 * F.mse_loss(d_s, d_t)
                loss = loss + w3 * rd
                terms["rd"] = rd.detach()
        return loss, terms

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.student(x))
