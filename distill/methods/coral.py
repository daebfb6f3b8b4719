"""CORAL: ERM plus the distance between the means and covariances of the student's features of every pair of
source domains.

Sun, Saenko. "Deep CORAL: Correlation Alignment for Deep Domain Adaptation". ECCV 2016 workshops (arXiv:1607.01719),
as implemented in DomainBed: Gulrajani, Lopez-Paz. "In Search of Lost Domain Generalization". ICLR 2021
(arXiv:2007.01434).

With D source domains, f_d the student's ``features`` of domain d's rows (n >= 2 rows each, F dimensions) and CE_d
the mean cross-entropy of the student's classifier on them:

    L = (1/D) sum_d CE_d + mmd_gamma * penalty,   penalty = mean over the D(D-1)/2 pairs d < e of dist(f_d, f_e)
    dist(x, y) = (1/F) sum_k (mu_x - mu_y)_k^2 + (1/F^2) sum_kl (C_x - C_y)_kl^2
    mu = the feature mean, C = (x - mu)^T (x - mu) / (n - 1)

(penalty = 0 with a single source domain). Follows DomainBed's algorithms.py (classes AbstractMMD and CORAL, i.e.
``gaussian=False``, the "mean_cov" kernel) and hparams_registry.py (``mmd_gamma``: default 1, searched as
10**U(-1, 1), i.e. log-uniform over [0.1, 10]).

Deviation: DomainBed runs the featurizer once per domain minibatch; here the student runs once on the concatenated
batch and its rows are grouped by ``batch["domain"]``. The two agree exactly when BatchNorm is frozen
(``student.freeze_bn``, DomainBed's ResNet setting); with train-mode BatchNorm the batch statistics here are those of
all source domains together.
"""
from __future__ import annotations

from .mmd import FeatureAlignment, mean_cov_distance


class CORAL(FeatureAlignment):
    name = "coral"
    hparams = {
        "mmd_gamma": 1.0,   # weight of the mean-and-covariance (CORAL) penalty (mean over pairs of source domains)
    }
    search_space = {
        "mmd_gamma": {"loguniform": [0.1, 10.0]},   # DomainBed: 10**U(-1, 1)
    }
    min_rows_per_domain = 2   # the unbiased covariance divides by n - 1

    def distance(self, x, y):
        return mean_cov_distance(x, y)
