"""The DomainBed algorithms (CORAL, MMD, GroupDRO, IRM) pinned on tiny hand-made multi-domain batches.

Every reference value is computed here with plain Python arithmetic on lists (``math.exp``/``math.log`` and loops),
never with the code under test or with torch. The student is a tiny deterministic module following the student
contract whose backbone is the identity, so that features = x. The expected hyperparameter defaults and search
distributions are hard-coded from DomainBed's hparams_registry.py.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from distill.methods import MethodContext
from distill.methods.coral import CORAL
from distill.methods.groupdro import GroupDRO
from distill.methods.irm import IRM
from distill.methods.mmd import MMD, domain_rows

from handmath import ce, dot, linear, mean, softmax, t   # tests/handmath.py: the plain-Python reference math

torch.set_num_threads(1)
TOL = 1e-5
METHODS = (CORAL, MMD, GroupDRO, IRM)


# ------------------------------------------------------------------------------------ reference math (plain Python)
# ------------------------------------------------------------------------------------------------ hand-made data
# 3 source domains x 3 rows, F = 4 features, C = 3 classes. The features are multiples of 1/4, so that squared
# distances and products are exact in float32 (the MMD kernel's exp(-1000 d) would magnify any rounding of d).
XD = [
    [[1.0, 0.5, -0.25, 0.0], [0.25, -1.0, 0.5, 0.75], [-0.5, 0.25, 1.0, -0.25]],
    [[0.5, 0.5, 0.5, -0.75], [1.25, -0.25, 0.0, 0.5], [0.0, 0.75, -0.5, 1.0]],
    [[-1.0, 0.0, 0.25, 0.5], [0.75, 1.0, -0.75, 0.0], [0.25, -0.5, 1.5, -1.0]],
]
YD = [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
YD2 = [[1, 2, 0], [0, 2, 1], [1, 0, 2]]   # a second step's labels (GroupDRO)
WC = [[0.7, -0.5, 0.2, 0.1], [-0.3, 0.6, 0.4, -0.2], [0.1, 0.2, -0.6, 0.9]]
BC = [0.1, 0.0, -0.1]
SOURCES = ["art painting", "cartoon", "sketch"]


class TinyStudent(nn.Module):
    """The student contract with controlled values: backbone = identity Linear, so features = x."""

    def __init__(self, wc=WC, bc=BC, f=4, d=4):
        super().__init__()
        lin = nn.Linear(f, f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(f))
        self.backbone = nn.Sequential(lin)
        self.feature_dim = f
        self.proj = nn.Linear(f, d)
        self.classifier = nn.Linear(f, len(wc))
        with torch.no_grad():
            self.classifier.weight.copy_(t(wc))
            self.classifier.bias.copy_(t(bc))

    def forward(self, x):
        f = self.backbone(x)
        return {"features": f, "embed": self.proj(f), "logits": self.classifier(f)}


def make_ctx(num_domains=3, total_steps=100):
    names = ["dog", "guitar", "house"]
    return MethodContext(class_names=names, source_domains=SOURCES[:num_domains], total_steps=total_steps,
                         num_classes=3, embed_dim=4, class_prompts=[[f"a photo of a {c}."] for c in names])


def make(cls, hp=None, num_domains=3):
    return cls(TinyStudent(), hp or {}, make_ctx(num_domains), {})


def make_batch(xd=XD, yd=YD, num_domains=3, rows=3, interleave=False):
    """Domain d's first `rows` rows, in contiguous blocks (the feeder's order) or interleaved d0 d1 d2 d0 ..."""
    items = [(xd[d][i], yd[d][i], d) for d in range(num_domains) for i in range(rows)]
    if interleave:
        items = [(xd[d][i], yd[d][i], d) for i in range(rows) for d in range(num_domains)]
    return {"x": t([x for x, _, _ in items]), "y": torch.tensor([y for _, y, _ in items]),
            "domain": torch.tensor([d for _, _, d in items], dtype=torch.long)}


def domain_ce(xd=XD, yd=YD, num_domains=3, rows=3):
    """CE_d: the mean cross-entropy of domain d's rows."""
    return [mean([ce(linear(WC, BC, xd[d][i]), yd[d][i]) for i in range(rows)]) for d in range(num_domains)]


def pairs(num_domains):
    return [(i, j) for i in range(num_domains) for j in range(i + 1, num_domains)]


def test_reference_math_by_hand():
    assert softmax([0.0, math.log(3)]) == pytest.approx([0.25, 0.75])
    assert ce([0.0, math.log(3)], 1) == pytest.approx(math.log(4 / 3))
    assert coral_ref([[0, 0], [2, 2]], [[0, 0], [0, 0]]) == pytest.approx(0.5 * (1 + 1) + 0.25 * 4 * 4)
    # one point each at squared distance 1: 2 * sum_g (1 - exp(-g))
    want = 2 * sum(1 - math.exp(-g) for g in (0.001, 0.01, 0.1, 1, 10, 100, 1000))
    assert mmd_ref([[0.0, 0.0]], [[1.0, 0.0]]) == pytest.approx(want)


# ------------------------------------------------------------------------------------------------ hyperparameters
def test_defaults_and_search_spaces_are_domainbeds():
    # hparams_registry.py: mmd_gamma 1., 10**U(-1, 1); groupdro_eta 1e-2, 10**U(-3, -1);
    # irm_lambda 1e2, 10**U(-1, 5); irm_penalty_anneal_iters 500, int(10**U(0, 4))
    for cls in (MMD, CORAL):
        assert cls.hparams == {"mmd_gamma": 1.0}
        assert cls.search_space == {"mmd_gamma": {"loguniform": [0.1, 10.0]}}
    assert GroupDRO.hparams == {"groupdro_eta": 0.01}
    assert GroupDRO.search_space == {"groupdro_eta": {"loguniform": [0.001, 0.1]}}
    assert IRM.hparams == {"irm_lambda": 100.0, "irm_penalty_anneal_iters": 500}
    assert isinstance(IRM.hparams["irm_penalty_anneal_iters"], int)
    assert IRM.search_space == {"irm_lambda": {"loguniform": [0.1, 100000.0]},
                                "irm_penalty_anneal_iters": {"logint": [1, 10000]}}
    assert [cls.name for cls in METHODS] == ["coral", "mmd", "groupdro", "irm"]


@pytest.mark.parametrize("cls", METHODS)
def test_specs_and_documented_hparams(cls):
    from distill.reference import _assigned_dict, _dict_comments

    assert set(cls.search_space) <= set(cls.hparams)
    for spec in cls.search_space.values():
        (kind, arg), = spec.items()
        from distill.tune.space import DISTRIBUTIONS

        assert kind in DISTRIBUTIONS and len(arg) == 2 and 0 < arg[0] < arg[1]
    src = inspect.getsource(cls)   # the docs' table reads the comment beside each key of the class's own literal
    notes = _dict_comments(src, _assigned_dict(src, "hparams"))
    assert all(notes.get(k) for k in cls.hparams), notes
    import importlib
    doc = importlib.import_module(cls.__module__).__doc__
    assert "DomainBed's algorithms.py (class" in doc and "hparams_registry.py" in doc and "arXiv" in doc
    assert cls.hparam_problems(dict(cls.hparams)) == []


@pytest.mark.parametrize("cls,hp,key", [
    (MMD, {"mmd_gamma": -0.5}, "mmd_gamma"), (CORAL, {"mmd_gamma": float("nan")}, "mmd_gamma"),
    (GroupDRO, {"groupdro_eta": -0.01}, "groupdro_eta"), (IRM, {"irm_lambda": -1.0}, "irm_lambda"),
    (IRM, {"irm_penalty_anneal_iters": -1}, "irm_penalty_anneal_iters"),
    (IRM, {"irm_penalty_anneal_iters": 2.5}, "irm_penalty_anneal_iters"),
    (MMD, {"mmd_gamma": "big"}, "mmd_gamma"), (GroupDRO, {"groupdro_eta": True}, "groupdro_eta"),
])
def test_hparam_problems_reject_bad_values(cls, hp, key):
    problems = cls.hparam_problems({**cls.hparams, **hp})
    assert len(problems) == 1 and problems[0].startswith(f"{key}: ")
    with pytest.raises(ValueError, match=key):
        make(cls, hp)
    # zero weights are allowed (the penalty or the reweighting switched off)
    assert cls.hparam_problems({**cls.hparams, key: 0}) == []


# ------------------------------------------------------------------------------------------------ domain grouping
def test_domain_rows_groups_by_domain_index():
    dom = torch.tensor([0, 1, 2, 0, 1, 2])
    assert domain_rows(dom, 3).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert domain_rows(torch.tensor([0, 0, 1, 1]), 2).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        domain_rows(torch.tensor([0, 0, 1]), 2)


# ------------------------------------------------------------------------------------------------ MMD and CORAL
GAMMAS = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


def kernel(a, b):
    d = max(sum((ai - bi) ** 2 for ai, bi in zip(a, b)), 1e-30)
    return sum(math.exp(-g * d) for g in GAMMAS)


def kmean(xs, ys):
    return mean([kernel(a, b) for a in xs for b in ys])


def mmd_ref(xs, ys):
    return kmean(xs, xs) + kmean(ys, ys) - 2 * kmean(xs, ys)


def coral_ref(xs, ys):
    f = len(xs[0])

    def stats(rows):
        n = len(rows)
        mu = [mean([r[k] for r in rows]) for k in range(f)]
        cov = [[sum((r[k] - mu[k]) * (r[m] - mu[m]) for r in rows) / (n - 1) for m in range(f)] for k in range(f)]
        return mu, cov

    mx, cx = stats(xs)
    my, cy = stats(ys)
    mean_diff = sum((a - b) ** 2 for a, b in zip(mx, my)) / f
    cov_diff = sum((cx[k][m] - cy[k][m]) ** 2 for k in range(f) for m in range(f)) / (f * f)
    return mean_diff + cov_diff


@pytest.mark.parametrize("cls,dist", [(MMD, mmd_ref), (CORAL, coral_ref)])
@pytest.mark.parametrize("num_domains,rows", [(3, 3), (2, 2), (3, 2)])
def test_feature_alignment_loss_values(cls, dist, num_domains, rows):
    gamma = 0.7
    m = make(cls, {"mmd_gamma": gamma}, num_domains)
    loss, terms = m(make_batch(num_domains=num_domains, rows=rows), step=0)
    feats = [XD[d][:rows] for d in range(num_domains)]
    ce_ref = mean(domain_ce(num_domains=num_domains, rows=rows))
    pen_ref = mean([dist(feats[i], feats[j]) for i, j in pairs(num_domains)])
    assert set(terms) == {"ce", "penalty"}
    assert float(terms["ce"]) == pytest.approx(ce_ref, abs=TOL)
    assert float(terms["penalty"]) == pytest.approx(pen_ref, abs=TOL)
    assert loss.item() == pytest.approx(ce_ref + gamma * pen_ref, abs=TOL)
    assert all(not v.requires_grad for v in terms.values())
    # the grouping follows batch["domain"], not the row order
    loss2, _ = m(make_batch(num_domains=num_domains, rows=rows, interleave=True), step=0)
    assert loss2.item() == pytest.approx(loss.item(), abs=TOL)
    # the default weight is 1
    loss3, _ = make(cls, None, num_domains)(make_batch(num_domains=num_domains, rows=rows), step=0)
    assert loss3.item() == pytest.approx(ce_ref + pen_ref, abs=TOL)


def test_mmd_kernel_sums_the_seven_bandwidths_by_hand():
    # domain 0 = one point at 0, domain 1 = one point at squared distance 0.25: MMD = 2 * sum_g (1 - exp(-g/4))
    m = make(MMD, {"mmd_gamma": 1.0}, 2)
    batch = {"x": t([[0, 0, 0, 0], [0.5, 0, 0, 0]]), "y": torch.tensor([0, 1]), "domain": torch.tensor([0, 1])}
    _, terms = m(batch, step=0)
    assert float(terms["penalty"]) == pytest.approx(2 * sum(1 - math.exp(-g / 4) for g in GAMMAS), abs=TOL)


@pytest.mark.parametrize("dx", [2 ** -5, 2 ** -3, 0.5, 2.0, 8.0])
def test_mmd_bandwidths_at_several_distances(dx):
    """One point per domain at squared distance d = dx^2 (exact in float32): MMD = 2 * sum_g (1 - exp(-g d)), where
    the small distances pin the large bandwidths (g = 1000 at d = 2^-10) and the large ones the small bandwidths."""
    m = make(MMD, {"mmd_gamma": 1.0}, 2)
    batch = {"x": t([[0, 0, 0, 0], [dx, 0, 0, 0]]), "y": torch.tensor([0, 1]), "domain": torch.tensor([0, 1])}
    _, terms = m(batch, step=0)
    d = dx * dx
    assert float(terms["penalty"]) == pytest.approx(2 * sum(1 - math.exp(-g * d) for g in GAMMAS), abs=TOL)


def test_feature_alignment_single_domain_and_row_limits():
    for cls in (MMD, CORAL):
        m = make(cls, {"mmd_gamma": 3.0}, 1)
        loss, terms = m(make_batch(num_domains=1), step=0)
        assert float(terms["penalty"]) == 0.0
        assert loss.item() == pytest.approx(domain_ce(num_domains=1)[0], abs=TOL)
    with pytest.raises(ValueError, match="2 rows"):       # the unbiased covariance of one row: n - 1 = 0
        make(CORAL)(make_batch(rows=1), step=0)
    loss, _ = make(MMD)(make_batch(rows=1), step=0)
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------------------------------------------- IRM
def scaled_ce(rows, s):
    """mean_i CE(s * z_i, y_i) over (x, y) rows."""
    return mean([ce([s * v for v in linear(WC, BC, x)], y) for x, y in rows])


def irm_reference(num_domains=3, rows=3):
    """(CE, penalty): penalty_d = g_even * g_odd, g = d/ds CE(s z, y) at s = 1 by a central difference."""
    h = 1e-4
    pens = []
    for d in range(num_domains):
        items = list(zip(XD[d][:rows], YD[d][:rows]))
        grads = []
        for half in (items[0::2], items[1::2]):
            grads.append((scaled_ce(half, 1 + h) - scaled_ce(half, 1 - h)) / (2 * h))
        pens.append(grads[0] * grads[1])
    return mean(domain_ce(num_domains=num_domains, rows=rows)), mean(pens)


@pytest.mark.parametrize("num_domains,rows", [(3, 3), (2, 2), (2, 3)])
def test_irm_before_and_after_the_anneal_step(num_domains, rows):
    lam = 7.5
    m = make(IRM, {"irm_lambda": lam, "irm_penalty_anneal_iters": 3}, num_domains)
    ce_ref, pen_ref = irm_reference(num_domains, rows)
    assert abs(pen_ref) > 1e-3                                        # a penalty worth pinning
    batch = make_batch(num_domains=num_domains, rows=rows)
    for step, weight in ((0, 1.0), (2, 1.0), (3, lam), (4, lam), (1000, lam)):
        loss, terms = m(batch, step=step)
        assert set(terms) == {"ce", "penalty"}
        assert float(terms["ce"]) == pytest.approx(ce_ref, abs=TOL)
        assert float(terms["penalty"]) == pytest.approx(pen_ref, abs=TOL)
        assert loss.item() == pytest.approx(ce_ref + weight * pen_ref, abs=TOL), step   # no rescaling after


def test_irm_defaults_switch_at_step_500():
    m = make(IRM)
    ce_ref, pen_ref = irm_reference()
    batch = make_batch()
    assert m(batch, step=499)[0].item() == pytest.approx(ce_ref + pen_ref, abs=TOL)
    assert m(batch, step=500)[0].item() == pytest.approx(ce_ref + 100.0 * pen_ref, rel=1e-6, abs=TOL)
    assert m.penalty_weight(0) == 1.0 and m.penalty_weight(500) == 100.0
    m0 = make(IRM, {"irm_penalty_anneal_iters": 0})                     # lambda from the first step
    assert m0.penalty_weight(0) == 100.0
    with pytest.raises(ValueError, match="2 rows"):
        m(make_batch(rows=1), step=0)


def test_irm_penalty_gradient_matches_domainbeds_double_backward():
    """The closed-form derivative gives the same gradients as DomainBed's autograd.grad(create_graph=True)."""
    m = make(IRM, {"irm_penalty_anneal_iters": 0, "irm_lambda": 10.0})
    batch = make_batch()
    loss, _ = m(batch, step=0)
    loss.backward()
    ours = [p.grad.clone() for p in m.student.classifier.parameters()]
    m.zero_grad()
    logits = m.student(batch["x"])["logits"]
    nll, pen = 0.0, 0.0
    for d in range(3):
        z, y = logits[3 * d:3 * d + 3], batch["y"][3 * d:3 * d + 3]
        scale = torch.tensor(1.0, requires_grad=True)
        g1 = torch.autograd.grad(nn.functional.cross_entropy(z[0::2] * scale, y[0::2]), [scale], create_graph=True)[0]
        g2 = torch.autograd.grad(nn.functional.cross_entropy(z[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
        nll, pen = nll + nn.functional.cross_entropy(z, y), pen + g1 * g2
    (nll / 3 + 10.0 * pen / 3).backward()
    for a, p in zip(ours, m.student.classifier.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- GroupDRO
def test_groupdro_q_after_one_and_two_steps():
    eta = 0.5
    m = make(GroupDRO, {"groupdro_eta": eta})
    assert m.q.tolist() == [1.0, 1.0, 1.0]
    # step 1: q_d = 1 * exp(eta CE_d), normalised; L = sum_d q_d CE_d
    l1 = domain_ce()
    q1 = [math.exp(eta * v) for v in l1]
    q1 = [v / sum(q1) for v in q1]
    loss, terms = m(make_batch(), step=0)
    assert m.q.tolist() == pytest.approx(q1, abs=1e-6)
    assert loss.item() == pytest.approx(dot(q1, l1), abs=TOL)
    assert set(terms) == {"ce", "worst_ce"}
    assert float(terms["ce"]) == pytest.approx(mean(l1), abs=TOL)
    assert float(terms["worst_ce"]) == pytest.approx(max(l1), abs=TOL)
    # step 2 (other labels): q_d <- q_d exp(eta CE'_d), normalised
    l2 = domain_ce(yd=YD2)
    q2 = [q * math.exp(eta * v) for q, v in zip(q1, l2)]
    q2 = [v / sum(q2) for v in q2]
    loss2, _ = m(make_batch(yd=YD2), step=1)
    assert m.q.tolist() == pytest.approx(q2, abs=1e-6)
    assert loss2.item() == pytest.approx(dot(q2, l2), abs=TOL)
    assert abs(q2[0] - q1[0]) > 1e-3                                    # q really moved
    # q is a persistent buffer: in the state_dict, and a resumed method continues with it
    state = m.state_dict()
    assert "q" in state and state["q"].tolist() == pytest.approx(q2, abs=1e-6)
    resumed = make(GroupDRO, {"groupdro_eta": eta})
    resumed.load_state_dict(state)
    q3 = [q * math.exp(eta * v) for q, v in zip(q2, l1)]
    q3 = [v / sum(q3) for v in q3]
    loss3, _ = resumed(make_batch(), step=2)
    assert resumed.q.tolist() == pytest.approx(q3, abs=1e-6)
    assert loss3.item() == pytest.approx(dot(q3, l1), abs=TOL)


def test_groupdro_q_follows_the_losses_of_every_rank(monkeypatch):
    """With several ranks the q update uses the per-domain losses averaged over the ranks (every rank the same q);
    the loss itself still weights this rank's own losses. A fake 2-rank group whose other rank saw `other`."""
    import distill.methods.groupdro as mod

    other = [0.25, 2.0, 1.0]

    class FakeDist:
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda: 2)

        @staticmethod
        def all_reduce(x):
            x += torch.tensor(other)

    monkeypatch.setattr(mod, "dist", FakeDist)
    eta = 0.5
    m = make(GroupDRO, {"groupdro_eta": eta})
    loss, _ = m(make_batch(), step=0)
    l1 = domain_ce()
    q = [math.exp(eta * (a + b) / 2) for a, b in zip(l1, other)]
    q = [v / sum(q) for v in q]
    assert m.q.tolist() == pytest.approx(q, abs=1e-6)
    assert loss.item() == pytest.approx(dot(q, l1), abs=TOL)


def test_groupdro_q_is_not_differentiated():
    """d L / d bias_c = sum_d q_d * mean_i (p_ic - [y_i = c]): q acts as a constant."""
    eta = 0.5
    m = make(GroupDRO, {"groupdro_eta": eta})
    loss, _ = m(make_batch(interleave=True), step=0)                 # grouping by batch["domain"]
    loss.backward()
    l1 = domain_ce()
    q = [math.exp(eta * v) for v in l1]
    q = [v / sum(q) for v in q]
    want = [0.0, 0.0, 0.0]
    for d in range(3):
        for x, y in zip(XD[d], YD[d]):
            p = softmax(linear(WC, BC, x))
            for c in range(3):
                want[c] += q[d] * (p[c] - (1.0 if c == y else 0.0)) / 3
    assert m.student.classifier.bias.grad.tolist() == pytest.approx(want, abs=TOL)
    assert not m.q.requires_grad


# ------------------------------------------------------------------------------------------------ backpropagation
@pytest.mark.parametrize("cls,hp,step", [(CORAL, None, 0), (MMD, None, 0), (GroupDRO, None, 0), (IRM, None, 0),
                                         (IRM, None, 600)])
def test_loss_reaches_backbone_and_classifier(cls, hp, step):
    m = make(cls, hp)
    loss, _ = m(make_batch(), step=step)
    loss.backward()
    for module in (m.student.backbone, m.student.classifier):
        for p in module.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.student.proj.parameters())


@pytest.mark.parametrize("cls", [CORAL, MMD])
def test_alignment_penalty_alone_reaches_the_backbone(cls):
    """The penalty's own gradient (mmd_gamma large vs 0) changes the backbone's gradient, not the classifier's."""
    grads = {}
    for gamma in (0.0, 5.0):
        m = make(cls, {"mmd_gamma": gamma})
        m(make_batch(), step=0)[0].backward()
        grads[gamma] = (m.student.backbone[0].weight.grad.clone(), m.student.classifier.weight.grad.clone())
    assert not torch.allclose(grads[0.0][0], grads[5.0][0])
    assert torch.allclose(grads[0.0][1], grads[5.0][1])
