"""MMD: ERM plus a Gaussian-kernel MMD between the student's features of every pair of source domains.

Li, Pan, Wang, Kot. "Domain Generalization with Adversarial Feature Learning". CVPR 2018 (MMD-AAE), as implemented
in DomainBed: Gulrajani, Lopez-Paz. "In Search of Lost Domain Generalization". ICLR 2021 (arXiv:2007.01434).

With D source domains, f_d the student's ``features`` of domain d's rows (n rows each) and CE_d the mean
cross-entropy of the student's classifier on them:

    L = (1/D) sum_d CE_d + mmd_gamma * penalty,   penalty = mean over the D(D-1)/2 pairs d < e of MMD(f_d, f_e)
    MMD(x, y) = mean K(x, x) + mean K(y, y) - 2 mean K(x, y)        (the biased estimator: diagonals included)
    K(a, b) = sum_{g in [1e-3, 1e-2, 1e-1, 1, 10, 100, 1000]} exp(-g * ||a - b||^2),
    ||a - b||^2 computed as ||a||^2 + ||b||^2 - 2 a.b and clamped below at 1e-30 (DomainBed's ``my_cdist``)

(penalty = 0 with a single source domain). Follows DomainBed's algorithms.py (classes AbstractMMD and MMD) and
hparams_registry.py (``mmd_gamma``: default 1, searched as 10**U(-1, 1), i.e. log-uniform over [0.1, 10]).

Deviation: DomainBed runs the featurizer once per domain minibatch; here the student runs once on the concatenated
batch and its rows are grouped by ``batch["domain"]``. The two agree exactly when BatchNorm is frozen
(``student.freeze_bn``, DomainBed's ResNet setting); with train-mode BatchNorm the batch statistics here are those of
all source domains together.

This module also holds what the DomainBed methods share (``domain_rows``; ``FeatureAlignment``, the base of MMD and
CORAL, DomainBed's AbstractMMD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Method, full_precision

GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)   # DomainBed's gaussian_kernel bandwidths
MIN_SQ_DIST = 1e-30                                    # DomainBed's my_cdist clamp


def domain_rows(domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """The row indices of each source domain, [num_domains, n]: row d holds domain d's rows in batch order.

    The batch contract: equal counts per domain (``train.batch_size`` each). A stable sort of the domain indices
    groups the rows without a host synchronisation (no ``.item()``), whatever their order in the batch."""
    b = domain.shape[0]
    if num_domains < 1 or b % num_domains:
        raise ValueError(f"a batch of {b} rows cannot hold equal minibatches of {num_domains} source domains")
    order = torch.sort(domain, stable=True).indices
    return order.view(num_domains, b // num_domains)


def nonnegative_problem(hp: dict, key: str) -> list[str]:
    """``["key: ..."]`` unless hp[key] is a finite number >= 0."""
    v = hp.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return [f"{key}: expected a finite number >= 0, got {v!r}"]
    return []


def sq_dists(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, M], as DomainBed's my_cdist: ||a||^2 + ||b||^2 - 2 a.b, clamped at 1e-30."""
    n1 = x1.pow(2).sum(dim=-1, keepdim=True)
    n2 = x2.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(n2.t(), x1, x2.t(), alpha=-2).add(n1).clamp_min(MIN_SQ_DIST)


def gaussian_kernel(x1: torch.Tensor, x2: torch.Tensor, gammas=GAMMAS) -> torch.Tensor:
    """sum_g exp(-g * ||a - b||^2) [N, M]."""
    d = sq_dists(x1, x2)
    return sum(torch.exp(-g * d) for g in gammas)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()


def mean_cov_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CORAL: mean over dims of (mu_x - mu_y)^2 + mean over entries of (C_x - C_y)^2, C unbiased (n - 1)."""
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cx, cy = x - mx, y - my
    cov_x = cx.t() @ cx / (len(x) - 1)
    cov_y = cy.t() @ cy / (len(y) - 1)
    return (mx - my).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


class FeatureAlignment(Method):
    """DomainBed's AbstractMMD: per-domain CE averaged over domains + mmd_gamma * mean pairwise feature distance."""

    min_rows_per_domain = 1

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        return nonnegative_problem(hp, "mmd_gamma")

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch, step):
        out = self.student(batch["x"])
        num = len(self.ctx.source_domains)
        rows = domain_rows(batch["domain"], num)
        if rows.shape[1] < self.min_rows_per_domain:
            raise ValueError(f"{self.name} needs at least {self.min_rows_per_domain} rows per source domain, "
                             f"got {rows.shape[1]}")
        with full_precision(out["logits"]):
            logits, feats = out["logits"].float(), out["features"].float()
            per_row = F.cross_entropy(logits, batch["y"], reduction="none")
            ce = per_row[rows].mean(dim=1).mean()           # (1/D) sum_d CE_d
            f = feats.flatten(1)[rows]                       # [D, n, F]
            pairs = [self.distance(f[i], f[j]) for i in range(num) for j in range(i + 1, num)]
            penalty = torch.stack(pairs).mean() if pairs else ce.new_zeros(())
            loss = ce + float(self.hp["mmd_gamma"]) * penalty
        return loss, {"ce": ce.detach(), "penalty": penalty.detach()}


class MMD(FeatureAlignment):
    name = "mmd"
    hparams = {
        "mmd_gamma": 1.0,   # weight of the Gaussian-kernel MMD penalty (mean over pairs of source domains)
    }
    search_space = {
        "mmd_gamma": {"loguniform": [0.1, 10.0]},   # DomainBed: 10**U(-1, 1)
    }

    def distance(self, x, y):
        return gaussian_mmd(x, y)
