"""GroupDRO: minimise a weighted sum of the per-domain losses, the weights q moving towards the worst domains.

Sagawa, Koh, Hashimoto, Liang. "Distributionally Robust Neural Networks for Group Shifts". ICLR 2020
(arXiv:1911.08731, Algorithm 1), as implemented in DomainBed: Gulrajani, Lopez-Paz. "In Search of Lost Domain
Generalization". ICLR 2021 (arXiv:2007.01434).

With D source domains and CE_d the mean cross-entropy of the student's classifier on domain d's rows, each step:

    q_d <- q_d * exp(groupdro_eta * CE_d)      (CE_d detached: the update of q is not differentiated)
    q   <- q / sum_d q_d
    L   = sum_d q_d * CE_d                     (with the q just updated)

q (one weight per source domain, in ``ctx.source_domains`` order) starts at ones (so the first step's q is
softmax(eta * CE)) and is a persistent buffer: it lives in checkpoints and a resumed trial continues with it.
Follows DomainBed's algorithms.py (class GroupDRO) and hparams_registry.py (``groupdro_eta``: default 1e-2,
searched as 10**U(-3, -1), i.e. log-uniform over [1e-3, 0.1]).

Deviations:
- DomainBed runs the network once per domain minibatch; here the student runs once on the concatenated batch and its
  rows are grouped by ``batch["domain"]``. The two agree exactly when BatchNorm is frozen (``student.freeze_bn``,
  DomainBed's ResNet setting).
- Several ranks (DDP; DomainBed has one process): the detached per-domain losses that update q are averaged over
  the ranks first, so every rank holds the same q (that of the global batch). One process: no change.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .base import Method, MethodContext, full_precision
from .mmd import domain_rows, nonnegative_problem


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks of the default process group (``t`` itself with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class GroupDRO(Method):
    name = "groupdro"
    hparams = {
        "groupdro_eta": 0.01,   # step size of the exponentiated update of the per-domain weights q
    }
    search_space = {
        "groupdro_eta": {"loguniform": [0.001, 0.1]},   # DomainBed: 10**U(-3, -1)
    }

    def __init__(self, student, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        self.register_buffer("q", torch.ones(len(ctx.source_domains)), persistent=True)

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        return nonnegative_problem(hp, "groupdro_eta")

    def forward(self, batch, step):
        logits = self.student(batch["x"])["logits"]
        rows = domain_rows(batch["domain"], len(self.ctx.source_domains))
        with full_precision(logits):
            per_row = F.cross_entropy(logits.float(), batch["y"], reduction="none")
            losses = per_row[rows].mean(dim=1)                          # CE_d [D]
            with torch.no_grad():
                seen = mean_over_ranks(losses.detach())
                q = self.q.float() * torch.exp(float(self.hp["groupdro_eta"]) * seen)
                self.q.copy_(q / q.sum())
            loss = torch.dot(losses, self.q.clone())
        return loss, {"ce": losses.detach().mean(), "worst_ce": losses.detach().max()}
