"""SagNet: style-agnostic networks, as DomainBed's ``SagNet``.

Nam, Lee, Park, Yoon, Yoo. "Reducing Domain Gap by Reducing Style Bias". CVPR 2021 (arXiv:1910.11645), in the form
of DomainBed (Gulrajani, Lopez-Paz, ICLR 2021, arXiv:2007.01434; ``domainbed/algorithms.py``, class ``SagNet``):
the featurizer network_f, a content head network_c and a style head network_s, both linear on the featurizer's
output (DomainBed's ``networks.Classifier`` with ``nonlinear_classifier`` False; the ResNet-specific split of the
paper is commented out there). Here network_f = ``student.backbone``, network_c = ``student.classifier`` (so
``predict``, the student's logits, is DomainBed's ``predict`` = network_c(network_f(x))) and network_s = a new
``nn.Linear(feature_dim, num_classes)`` registered on the method (``self.network_s``: checkpoints and DDP see it).

Randomisation (DomainBed's ``randomize``, eps = 1e-5). For features f [B, F] (a 4-D map [B, C, H, W] is viewed as
[B, C, H*W] and its statistics taken per channel, as DomainBed), per sample over the last dimension:

    mu = mean(f), var = unbiased variance(f) (divisor F - 1),  z = (f - mu) / sqrt(var + eps)
    style   (alpha ~ U[0,1) per sample, a random permutation pi of the batch):
            mu' = alpha * mu + (1 - alpha) * mu[pi],  var' = alpha * var + (1 - alpha) * var[pi],
            out = z * sqrt(var' + eps) + mu'
    content (pi):  out = z[pi].detach() * sqrt(var + eps) + mu     (alpha is drawn but unused, as DomainBed)

Note the content randomisation detaches only the swapped content z[pi]: mu and var keep their graph.

DomainBed's ``update`` takes three optimiser steps per batch (three Adams with the same lr and weight decay):

    1. learn content:   loss_c = CE(network_c(style(network_f(x))), y);     steps network_f and network_c
    2. learn style:     loss_s = CE(network_s(content(network_f(x))), y);   steps network_s only (the gradient that
                        loss_s leaves on network_f through mu, var is zeroed before network_f's next step)
    3. learn adversary: loss_adv = -w_adv * mean_b mean_k log_softmax(network_s(content(network_f(x))))_bk
                        (w_adv times the CE to the uniform distribution); steps network_f only

Here the loop takes ONE backward and ONE optimiser step over one loss, so the three updates are routed by detaching:

    loss = loss_c + loss_s + loss_adv
    loss_c   = CE(classifier(style(f)), y)                        -> backbone, classifier
    loss_s   = CE(network_s(content(f.detach())), y)              -> network_s only
    loss_adv = -w_adv * mean log_softmax(network_s~(content(f)))  -> backbone only (network_s~: network_s applied
               with detached parameters, ``torch.func.functional_call``: its ``grad`` stays None)

so each parameter's gradient is the gradient DomainBed's step(s) for it would compute at the same weights:
classifier <- d loss_c, network_s <- d loss_s, backbone <- d loss_c + d loss_adv. f = ``student.backbone(x)`` is
computed once per step and everything after it runs in float32 (``full_precision``).

Deviations from DomainBed (the one-optimiser contract), all stated:
- DomainBed steps its optimisers one after another, so its steps 2 and 3 see the weights updated by the earlier
  steps (and run network_f again: three featurizer forwards per batch, three BatchNorm running-statistics updates,
  three dropout masks); here all three gradients come from one forward at the same weights.
- DomainBed's network_f takes two Adam steps per batch (one on d loss_c, one on d loss_adv, each with its own
  moment update and weight decay, the step count advancing twice); here the backbone takes one step of the loop's
  optimiser on the summed gradient. The heads take one step each, as in DomainBed.
- One optimiser (the loop's, with its lr, weight decay, schedule, clipping) for the three parameter sets, instead
  of three Adams with DomainBed's lr and weight decay.

Randomness. DomainBed draws alpha (``torch.rand``) and pi (``torch.randperm``) from torch's global RNG, afresh in
each of its three ``randomize`` calls. Here the same six draws, in the same order (style: alpha, pi; content for
loss_s: alpha, pi; content for loss_adv: alpha, pi), come from a private ``torch.Generator`` on the CPU seeded with
``step_seed(step, SAGNET_SEED)`` (``sagnet_draws``), so a step's draws are the same on every run and device and after a
resume, and the global RNG is untouched. The permutation is of each rank's own batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import Method, MethodContext, full_precision

SAGNET_SEED = 29   # the method's fixed seed (its draws at step s are seeded with step_seed(s, SAGNET_SEED))
EPS = 1e-5         # DomainBed's randomize(eps=1e-5)
STYLE, CONTENT = "style", "content"


def step_seed(step: int, base: int) -> int:
    """The seed of one step's draws: a fixed affine function of the (global, 0-based) step."""
    return 1_000_003 * int(step) + int(base)


def sagnet_draws(step: int, batch_size: int, base: int = SAGNET_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's three (alpha [B, 1] in [0, 1), permutation [B]) draws, for style (loss_c), content (loss_s) and
    content (loss_adv), in DomainBed's order, on the CPU."""
    g = torch.Generator().manual_seed(step_seed(step, base))
    out = []
    for _ in range(3):
        alpha = torch.rand(batch_size, 1, generator=g)
        perm = torch.randperm(batch_size, generator=g)
        out.append((alpha, perm))
    return out


def randomize(x: torch.Tensor, what: str, alpha: torch.Tensor, perm: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """DomainBed's ``SagNet.randomize`` with its random draws given: per-sample statistics over the last dimension
    (of [B, F], or of [B, C, H*W] for a 4-D map), style: interpolate mean and variance with a permuted sample's;
    content: keep the sample's mean and variance, take a permuted sample's (detached) normalised content."""
    if what not in (STYLE, CONTENT):
        raise ValueError(f"randomize: what must be {STYLE!r} or {CONTENT!r}, got {what!r}")
    sizes = x.shape
    alpha = alpha.reshape(sizes[0], 1).to(device=x.device, dtype=x.dtype)
    perm = perm.to(x.device)
    if x.dim() == 4:
        x = x.reshape(sizes[0], sizes[1], -1)
        alpha = alpha.unsqueeze(-1)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)
    z = (x - mean) / (var + eps).sqrt()
    if what == STYLE:
        mean = alpha * mean + (1 - alpha) * mean[perm]
        var = alpha * var + (1 - alpha) * var[perm]
    else:
        z = z[perm].detach()
    return (z * (var + eps).sqrt() + mean).reshape(sizes)


class SagNet(Method):
    name = "sagnet"
    hparams = {
        "sag_w_adv": 0.1,   # w_adv: weight of the adversarial loss (the featurizer's CE to uniform through the style head)
    }
    # DomainBed's random search (hparams_registry.py): sag_w_adv = 10**U(-2, 1).
    search_space = {
        "sag_w_adv": {"loguniform": [0.01, 10.0]},
    }

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        self.network_s = nn.Linear(student.feature_dim, ctx.num_classes)   # the style head (PyTorch's default init)
        self.seed_base = SAGNET_SEED + 7919 * int(ctx.extra.get("seed", 0))   # ctx.extra["seed"]: optional, default 0

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        v = {**cls.hparams, **(hp or {})}["sag_w_adv"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return [f"sag_w_adv: expected a finite number >= 0, got {v!r}"]
        return []

    def draws(self, step: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return sagnet_draws(step, batch_size, self.seed_base)

    def losses(self, f: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """loss_c, loss_s and loss_adv (already times w_adv) from the featurizer's output f, routed as documented."""
        (a_c, p_c), (a_s, p_s), (a_a, p_a) = self.draws(step, f.shape[0])
        with full_precision(f):
            f = f.float()
            loss_c = F.cross_entropy(self.student.classifier(randomize(f, STYLE, a_c, p_c)), y)
            loss_s = F.cross_entropy(self.network_s(randomize(f.detach(), CONTENT, a_s, p_s)), y)
            frozen = {name: p.detach() for name, p in self.network_s.named_parameters()}
            z_adv = functional_call(self.network_s, frozen, (randomize(f, CONTENT, a_a, p_a),))
            loss_adv = float(self.hp["sag_w_adv"]) * -F.log_softmax(z_adv, dim=1).mean(1).mean()
        return {"loss_c": loss_c, "loss_s": loss_s, "loss_adv": loss_adv}

    def forward(self, batch, step):
        terms = self.losses(self.student.backbone(batch["x"]), batch["y"], step)
        loss = terms["loss_c"] + terms["loss_s"] + terms["loss_adv"]
        return loss, {k: v.detach() for k, v in terms.items()}
