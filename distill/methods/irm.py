"""IRM: ERM plus the IRMv1 penalty, the squared gradient of each domain's risk with respect to a dummy classifier
scale.

Arjovsky, Bottou, Gulrajani, Lopez-Paz. "Invariant Risk Minimization". arXiv:1907.02893, as implemented in DomainBed:
Gulrajani, Lopez-Paz. "In Search of Lost Domain Generalization". ICLR 2021 (arXiv:2007.01434).

With D source domains, z_i the student's logits and y_i the label of row i, CE_d the mean cross-entropy on domain
d's rows, and, split into the rows at even and odd positions of domain d's minibatch (DomainBed's unbiased estimate
of the squared gradient),

    g_d^even = d/ds CE(s * z, y) at s = 1 over the even rows = mean_i (softmax(z_i) . z_i - z_{i, y_i})
    g_d^odd  = the same over the odd rows

    L = (1/D) sum_d CE_d + w(step) * (1/D) sum_d g_d^even * g_d^odd
    w(step) = 1 while step < irm_penalty_anneal_iters, irm_lambda from then on (0-based global steps; no rescaling
              of the loss after the switch, as in DomainBed)

Follows DomainBed's algorithms.py (class IRM, ``_irm_penalty``) and hparams_registry.py (``irm_lambda``: default
1e2, searched as 10**U(-1, 5), i.e. log-uniform over [0.1, 1e5]; ``irm_penalty_anneal_iters``: default 500, searched
as int(10**U(0, 4))).

Deviations:
- DomainBed computes g with ``autograd.grad(..., create_graph=True)`` through a dummy scale s = 1; here the closed
  form of that same derivative is used (the same value and the same gradients, without a double backward).
- DomainBed also resets the Adam optimiser at step ``irm_penalty_anneal_iters``. This project's loop gives a fresh
  optimiser only at a stage boundary, and a new stage starts from the previous stage's best source-validation
  evaluation rather than from the last weights, so IRM stays one stage and the optimiser state is NOT reset at the
  switch: only the penalty weight changes.
- With several ranks (DDP), each rank computes the penalty on its own minibatches (DomainBed has one process).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, full_precision
from .mmd import domain_rows, nonnegative_problem


def scale_grads(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, d/ds CE(s * z, y) at s = 1: softmax(z) . z - z_y (CE = logsumexp(s z) - s z_y)."""
    p = torch.softmax(logits, dim=-1)
    return (p * logits).sum(dim=-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)


class IRM(Method):
    name = "irm"
    hparams = {
        "irm_lambda": 100.0,               # weight of the IRMv1 penalty once the annealing steps are over
        "irm_penalty_anneal_iters": 500,   # steps with penalty weight 1 before irm_lambda applies
    }
    search_space = {
        "irm_lambda": {"loguniform": [0.1, 100000.0]},   # DomainBed: 10**U(-1, 5)
        "irm_penalty_anneal_iters": {"logint": [1, 10000]},  # DomainBed's int(10**U(0, 4)): log-uniform integers
    }

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        out = nonnegative_problem(hp, "irm_lambda")
        v = hp.get("irm_penalty_anneal_iters")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            out.append(f"irm_penalty_anneal_iters: expected an integer >= 0, got {v!r}")
        return out

    def penalty_weight(self, step: int) -> float:
        return float(self.hp["irm_lambda"]) if step >= int(self.hp["irm_penalty_anneal_iters"]) else 1.0

    def forward(self, batch, step):
        logits = self.student(batch["x"])["logits"]
        rows = domain_rows(batch["domain"], len(self.ctx.source_domains))
        if rows.shape[1] < 2:
            raise ValueError(f"irm needs at least 2 rows per source domain (even and odd halves), got {rows.shape[1]}")
        with full_precision(logits):
            z, y = logits.float()[rows], batch["y"][rows]                  # [D, n, C], [D, n]
            ce = F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(dim=1).mean()
            g = scale_grads(z, y)                                          # [D, n]
            penalty = (g[:, 0::2].mean(dim=1) * g[:, 1::2].mean(dim=1)).mean()
            loss = ce + self.penalty_weight(step) * penalty
        return loss, {"ce": ce.detach(), "penalty": penalty.detach()}
