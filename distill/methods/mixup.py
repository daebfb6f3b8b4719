"""Mixup of minibatches from different domains (inter-domain Mixup), as DomainBed's ``Mixup``.

Gulrajani, Lopez-Paz. "In Search of Lost Domain Generalization". ICLR 2021 (arXiv:2007.01434; official code
github.com/facebookresearch/DomainBed, ``domainbed/algorithms.py``, class ``Mixup``), after Xu et al. "Adversarial
Domain Adaptation with Domain Mixup" (arXiv:2001.00677) and Yan et al. "Improve Unsupervised Domain Adaptation with
Mixup Training" (arXiv:1912.01805).

The batch holds one minibatch per source domain, (x_d, y_d) for d = 0..n-1 (``ctx.source_domains`` order, equal
blocks). Each step, as DomainBed's ``random_pairs_of_minibatches`` (``domainbed/lib/misc.py``):

    perm = a random permutation of the n domains
    pairs k = 0..n-1:  (i, j) = (perm[k], perm[(k + 1) % n])          (a random cycle: n pairs, each domain twice)
    lam_k ~ Beta(alpha, alpha), one per pair, drawn in pair order
    x_k   = lam_k * x_i + (1 - lam_k) * x_j                            (both cut to min(len(x_i), len(x_j)) rows)
    L     = (1/n) * sum_k [ lam_k * CE(f(x_k), y_i) + (1 - lam_k) * CE(f(x_k), y_j) ]

CE is the batch mean; f is the student's classifier on its backbone (``predict``). As in DomainBed each pair is a
separate forward of the student (a train-mode BatchNorm normalises each mixed minibatch on its own statistics), and
the sum is divided by the number of domains n (= the number of pairs). With one source domain the only pair is
(0, 0), so x_0 is mixed with itself and L is plain CE. The mixing is on the normalised images the loop feeds (DomainBed
also mixes its normalised tensors). Evaluation: the student's logits, as DomainBed's ``predict``.

Randomness. DomainBed draws the permutation from torch's global RNG (``torch.randperm``) and lambda from numpy's
global RNG (``np.random.beta``). Here both are drawn from private generators seeded with a function of the step
(``step_seed``): the permutation from a ``torch.Generator`` and the lambdas from a ``numpy.random.Generator`` (torch
has no Beta sampler that takes a generator), both seeded with the same value, so that a step's draws are the same
on every run, on every device, and after a resume from a checkpoint, and consume nothing from the global RNGs.
``mixup_draws`` returns them. Every rank of a multi-GPU trial draws the same permutation and lambdas (as DomainBed's
single process mixes its whole batch of each pair with one lambda).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, MethodContext, full_precision

MIXUP_SEED = 17   # the method's fixed seed (its draws at step s are seeded with step_seed(s, MIXUP_SEED))


def step_seed(step: int, base: int) -> int:
    """The seed of one step's draws: a fixed affine function of the (global, 0-based) step."""
    return 1_000_003 * int(step) + int(base)


def domain_pairs(perm: list[int]) -> list[tuple[int, int]]:
    """DomainBed's ``random_pairs_of_minibatches`` given its permutation: (perm[k], perm[k+1]), the last with the first."""
    n = len(perm)
    return [(perm[k], perm[k + 1 if k < n - 1 else 0]) for k in range(n)]


def mixup_draws(step: int, num_domains: int, alpha: float, base: int = MIXUP_SEED) -> tuple[list[int], list[float]]:
    """The step's draws: (the permutation of the domains, one lambda ~ Beta(alpha, alpha) per pair, in pair order)."""
    seed = step_seed(step, base)
    perm = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed)).tolist()
    rng = np.random.default_rng(seed)
    lams = [float(rng.beta(float(alpha), float(alpha))) for _ in range(num_domains)]
    return perm, lams


class Mixup(Method):
    name = "mixup"
    hparams = {
        "mixup_alpha": 0.2,   # alpha of lam ~ Beta(alpha, alpha), the mixing weight of each pair of domains (DomainBed's)
    }
    # DomainBed's random search (hparams_registry.py): mixup_alpha = 10**U(-1, 1).
    search_space = {
        "mixup_alpha": {"loguniform": [0.1, 10.0]},
    }

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        self.seed_base = MIXUP_SEED + 7919 * int(ctx.extra.get("seed", 0))   # ctx.extra["seed"]: optional, default 0
        self.last_draws: tuple[list[int], list[float]] | None = None          # (perm, lams) of the last forward

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        v = {**cls.hparams, **(hp or {})}["mixup_alpha"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return [f"mixup_alpha: expected a finite number > 0 (Beta(alpha, alpha)), got {v!r}"]
        return []

    def draws(self, step: int, num_domains: int) -> tuple[list[int], list[float]]:
        return mixup_draws(step, num_domains, self.hp["mixup_alpha"], self.seed_base)

    def forward(self, batch, step):
        x, y = batch["x"], batch["y"]
        n = len(self.ctx.source_domains)
        if n < 1 or len(x) % n:
            raise ValueError(f"mixup: a batch of {len(x)} rows is not {n} equal per-domain blocks")
        xs, ys = torch.split(x, len(x) // n), torch.split(y, len(y) // n)
        perm, lams = self.draws(step, n)
        self.last_draws = (perm, lams)
        objective = None
        for (i, j), lam in zip(domain_pairs(perm), lams):
            m = min(len(xs[i]), len(xs[j]))
            logits = self.student(lam * xs[i][:m] + (1.0 - lam) * xs[j][:m])["logits"]
            with full_precision(logits):
                logits = logits.float()
                term = lam * F.cross_entropy(logits, ys[i][:m]) + (1.0 - lam) * F.cross_entropy(logits, ys[j][:m])
            objective = term if objective is None else objective + term
        with full_precision(objective):
            loss = objective / n
        return loss, {"mix_ce": loss.detach()}
