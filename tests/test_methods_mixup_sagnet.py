"""DomainBed's Mixup and SagNet as distill methods, pinned on tiny hand-made batches.

Every reference value is computed here with plain Python arithmetic on lists (``math.exp``/``math.log`` and loops),
never with the code under test; the only things read from the code under test are its random draws (the
permutations, lambdas and interpolation weights of a step), which the references then use. The student is a tiny
deterministic module following the student contract whose backbone is the identity, so that features = x.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.methods import MethodContext
from distill.methods.mixup import MIXUP_SEED, Mixup, domain_pairs, mixup_draws
from distill.methods.sagnet import SAGNET_SEED, SagNet, randomize, sagnet_draws

from handmath import ce, linear, log_softmax, mean, t   # tests/handmath.py: the plain-Python reference math

torch.set_num_threads(1)
TOL = 1e-5


# ------------------------------------------------------------------------------------ reference math (plain Python)
def var_unbiased(v):
    m = mean(v)
    return sum((x - m) ** 2 for x in v) / (len(v) - 1)


def mix(lam, a, b):
    return [lam * x + (1 - lam) * y for x, y in zip(a, b)]


def randomize_ref(rows, what, alpha, perm, eps=1e-5):
    """DomainBed's randomize on a list of rows (per-row statistics), the draws given."""
    mu = [mean(r) for r in rows]
    var = [var_unbiased(r) for r in rows]
    z = [[(x - mu[b]) / math.sqrt(var[b] + eps) for x in r] for b, r in enumerate(rows)]
    out = []
    for b in range(len(rows)):
        if what == "style":
            m = alpha[b] * mu[b] + (1 - alpha[b]) * mu[perm[b]]
            v = alpha[b] * var[b] + (1 - alpha[b]) * var[perm[b]]
            out.append([x * math.sqrt(v + eps) + m for x in z[b]])
        else:
            out.append([x * math.sqrt(var[b] + eps) + mu[b] for x in z[perm[b]]])
    return out


# ------------------------------------------------------------------------------------------------ hand-made data
# 3 source domains x 2 rows, F=4 features, C=3 classes.
X = [[1.0, 0.5, -0.3, 0.2], [0.2, -1.0, 0.4, 0.7],      # domain 0
     [-0.6, 0.3, 0.9, -0.1], [0.5, 0.5, 0.5, -0.8],     # domain 1
     [0.3, -0.2, 1.1, 0.6], [-0.9, 0.4, 0.0, 0.25]]     # domain 2
Y = [0, 1, 2, 1, 0, 2]
D = [0, 0, 1, 1, 2, 2]
WC = [[0.7, -0.5, 0.2, 0.1], [-0.3, 0.6, 0.4, -0.2], [0.1, 0.2, -0.6, 0.9]]    # classifier = network_c
BC = [0.1, 0.0, -0.1]
WS = [[0.2, 0.4, -0.3, 0.5], [-0.6, 0.1, 0.3, 0.2], [0.5, -0.2, 0.1, -0.4]]    # network_s
BS = [-0.05, 0.15, 0.0]
SOURCES = ("art painting", "cartoon", "sketch")


class TinyStudent(nn.Module):
    """The student contract with controlled values: backbone = identity Linear, so features = x."""

    def __init__(self, wc=WC, bc=BC):
        super().__init__()
        f, c = len(wc[0]), len(wc)
        self.backbone = nn.Sequential(nn.Linear(f, f, bias=False))
        self.feature_dim = f
        self.proj = nn.Linear(f, 4)
        self.classifier = nn.Linear(f, c)
        with torch.no_grad():
            self.backbone[0].weight.copy_(torch.eye(f))
            self.classifier.weight.copy_(t(wc))
            self.classifier.bias.copy_(t(bc))

    def forward(self, x):
        f = self.backbone(x)
        return {"features": f, "embed": self.proj(f), "logits": self.classifier(f)}


def make_ctx(sources=SOURCES):
    names = ["dog", "guitar", "house"]
    return MethodContext(class_names=names, source_domains=list(sources), total_steps=100, num_classes=3,
                         embed_dim=4, class_prompts=[[f"a photo of a {c}."] for c in names])


def make_batch(x=X, y=Y, d=D):
    return {"x": t(x), "y": torch.tensor(y), "domain": torch.tensor(d), "idx": torch.arange(len(y))}


def make_sagnet(hp=None):
    m = SagNet(TinyStudent(), hp or {}, make_ctx(), {})
    with torch.no_grad():
        m.network_s.weight.copy_(t(WS))
        m.network_s.bias.copy_(t(BS))
    return m


def test_reference_math_by_hand():
    assert log_softmax([0.0, math.log(3)]) == pytest.approx([math.log(0.25), math.log(0.75)])
    assert var_unbiased([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    # style with alpha = 1 is the identity (up to eps); content with the identity permutation too
    rows = [[1.0, 2.0, 4.0], [3.0, -1.0, 0.0]]
    for what, alpha, perm in (("style", [1.0, 1.0], [1, 0]), ("content", [0.3, 0.3], [0, 1])):
        for r, o in zip(rows, randomize_ref(rows, what, alpha, perm)):
            assert o == pytest.approx(r, abs=1e-6)


# ------------------------------------------------------------------------------------------- defaults / specs
def test_defaults_and_search_spaces_are_domainbeds():
    # hparams_registry.py: _hparam('mixup_alpha', 0.2, lambda r: 10**r.uniform(-1, 1))
    assert Mixup.name == "mixup"
    assert Mixup.hparams == {"mixup_alpha": 0.2}
    assert Mixup.search_space == {"mixup_alpha": {"loguniform": [0.1, 10.0]}}
    # hparams_registry.py: _hparam('sag_w_adv', 0.1, lambda r: 10**r.uniform(-2, 1))
    assert SagNet.name == "sagnet"
    assert SagNet.hparams == {"sag_w_adv": 0.1}
    assert SagNet.search_space == {"sag_w_adv": {"loguniform": [0.01, 10.0]}}
    for cls in (Mixup, SagNet):
        assert not cls.needs_image_embeddings
        assert set(cls.search_space) <= set(cls.hparams)
        import importlib
        assert importlib.import_module(cls.__module__).__doc__.count("arXiv") >= 1


def test_hparams_carry_doc_comments():
    from distill.reference import _assigned_dict, _dict_comments
    import inspect
    for cls, key in ((Mixup, "mixup_alpha"), (SagNet, "sag_w_adv")):
        src = inspect.getsource(cls)
        assert _dict_comments(src, _assigned_dict(src, "hparams"))[key]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, float("nan"), float("inf"), "0.2", True, None])
def test_mixup_hparam_problems(bad):
    problems = Mixup.hparam_problems({"mixup_alpha": bad})
    assert len(problems) == 1 and problems[0].startswith("mixup_alpha:")
    with pytest.raises(ValueError, match="mixup_alpha"):
        Mixup(TinyStudent(), {"mixup_alpha": bad}, make_ctx(), {})


def test_mixup_hparam_problems_accepts_good_values():
    assert Mixup.hparam_problems({}) == []
    assert Mixup.hparam_problems({"mixup_alpha": 10}) == []
    assert Mixup.hparam_problems({"mixup_alpha": 0.1}) == []


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", False, None])
def test_sagnet_hparam_problems(bad):
    problems = SagNet.hparam_problems({"sag_w_adv": bad})
    assert len(problems) == 1 and problems[0].startswith("sag_w_adv:")
    with pytest.raises(ValueError, match="sag_w_adv"):
        SagNet(TinyStudent(), {"sag_w_adv": bad}, make_ctx(), {})


def test_sagnet_hparam_problems_accepts_good_values():
    assert SagNet.hparam_problems({}) == []
    assert SagNet.hparam_problems({"sag_w_adv": 0}) == []
    assert SagNet.hparam_problems({"sag_w_adv": 10.0}) == []


# ------------------------------------------------------------------------------------------------------ Mixup
def test_domain_pairs_are_domainbeds_cycle():
    # random_pairs_of_minibatches: pair k = (perm[k], perm[k+1]), the last with the first
    assert domain_pairs([2, 0, 1]) == [(2, 0), (0, 1), (1, 2)]
    assert domain_pairs([1, 0]) == [(1, 0), (0, 1)]
    assert domain_pairs([0]) == [(0, 0)]


def test_mixup_draws_reproducible_and_private():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = mixup_draws(7, 3, 0.2)
    b = mixup_draws(7, 3, 0.2)
    assert a == b                                          # the same step: the same draws
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNGs are untouched
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    perm, lams = a
    assert sorted(perm) == [0, 1, 2] and len(lams) == 3 and all(0.0 <= v <= 1.0 for v in lams)
    assert mixup_draws(8, 3, 0.2) != a                     # another step: other draws
    assert mixup_draws(7, 3, 0.2, base=MIXUP_SEED + 1) != a
    m = Mixup(TinyStudent(), {"mixup_alpha": 0.2}, make_ctx(), {})
    assert m.draws(7, 3) == a                              # the method draws exactly these


def test_mixup_lambda_is_beta_alpha_alpha():
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); with a = 0.2: 1/5.6
    lams = [v for s in range(800) for v in mixup_draws(s, 2, 0.2)[1]]
    mu = mean(lams)
    var = sum((v - mu) ** 2 for v in lams) / (len(lams) - 1)
    assert mu == pytest.approx(0.5, abs=0.04)
    assert var == pytest.approx(1 / 5.6, abs=0.02)
    # every permutation of 3 domains occurs
    assert {tuple(mixup_draws(s, 3, 1.0)[0]) for s in range(200)} == {
        (0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def mixup_reference(perm, lams, x=X, y=Y, n=3):
    rows = len(x) // n
    xs = [x[d * rows:(d + 1) * rows] for d in range(n)]
    ys = [y[d * rows:(d + 1) * rows] for d in range(n)]
    total = 0.0
    for k in range(n):
        i, j = perm[k], perm[(k + 1) % n]
        lam = lams[k]
        logits = [linear(WC, BC, mix(lam, a, b)) for a, b in zip(xs[i], xs[j])]
        ce_i = mean([ce(z, c) for z, c in zip(logits, ys[i])])
        ce_j = mean([ce(z, c) for z, c in zip(logits, ys[j])])
        total += lam * ce_i + (1 - lam) * ce_j
    return total / n


@pytest.mark.parametrize("step", [0, 5, 123])
@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixup_loss_by_hand(step, alpha):
    m = Mixup(TinyStudent(), {"mixup_alpha": alpha}, make_ctx(), {})
    perm, lams = mixup_draws(step, 3, alpha)
    loss, terms = m(make_batch(), step)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mixup_reference(perm, lams), abs=TOL)
    assert set(terms) == {"mix_ce"} and float(terms["mix_ce"]) == pytest.approx(loss.item())
    assert m.last_draws == (perm, lams)
    loss2, _ = m(make_batch(), step)                      # the same step again: the same loss
    assert loss2.item() == loss.item()


def test_mixup_fixed_draws_by_hand():
    m = Mixup(TinyStudent(), {}, make_ctx(), {})
    m.draws = lambda step, n: ([2, 0, 1], [0.25, 0.9, 0.6])
    loss, _ = m(make_batch(), 0)
    assert loss.item() == pytest.approx(mixup_reference([2, 0, 1], [0.25, 0.9, 0.6]), abs=TOL)
    # lam = 1 everywhere: each domain's plain CE once, averaged over domains = the batch CE
    m.draws = lambda step, n: ([0, 1, 2], [1.0, 1.0, 1.0])
    loss, _ = m(make_batch(), 0)
    assert loss.item() == pytest.approx(mean([ce(linear(WC, BC, r), c) for r, c in zip(X, Y)]), abs=TOL)


def test_mixup_one_domain_is_plain_ce_and_gradients_flow():
    m = Mixup(TinyStudent(), {}, make_ctx(sources=("photo",)), {})
    loss, _ = m(make_batch(d=[0] * 6), 3)
    assert loss.item() == pytest.approx(mean([ce(linear(WC, BC, r), c) for r, c in zip(X, Y)]), abs=TOL)
    m = Mixup(TinyStudent(), {}, make_ctx(), {})
    loss, _ = m(make_batch(), 3)
    loss.backward()
    assert m.student.backbone[0].weight.grad is not None and m.student.classifier.weight.grad is not None
    with pytest.raises(ValueError, match="equal per-domain blocks"):
        m(make_batch(x=X[:5], y=Y[:5], d=D[:5]), 0)


def test_mixup_float32_under_autocast():
    m = Mixup(TinyStudent(), {}, make_ctx(), {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m(make_batch(), 4)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------- SagNet
R = [[1.0, 2.0, 4.0], [3.0, -1.0, 0.0], [0.5, 0.5, 2.0]]
ALPHA = [0.25, 0.5, 1.0]
PERM = [2, 0, 1]


@pytest.mark.parametrize("what", ["style", "content"])
def test_randomize_by_hand(what):
    out = randomize(t(R), what, t([[a] for a in ALPHA]), torch.tensor(PERM))
    # the hand computation, written out for row 0 of style: mu0 = 7/3, var0 = 7/3; mu2 = 1, var2 = 0.75
    want = randomize_ref(R, what, ALPHA, PERM)
    assert torch.allclose(out, t(want), atol=1e-5)
    if what == "style":
        mu = 0.25 * 7 / 3 + 0.75 * 1.0
        var = 0.25 * 7 / 3 + 0.75 * 0.75
        z0 = [(x - 7 / 3) / math.sqrt(7 / 3 + 1e-5) for x in R[0]]
        assert out[0].tolist() == pytest.approx([z * math.sqrt(var + 1e-5) + mu for z in z0], abs=1e-5)
    else:   # row 0 takes row 2's content with row 0's statistics
        z2 = [(x - 1.0) / math.sqrt(0.75 + 1e-5) for x in R[2]]
        assert out[0].tolist() == pytest.approx([z * math.sqrt(7 / 3 + 1e-5) + 7 / 3 for z in z2], abs=1e-5)


def test_randomize_4d_is_per_channel():
    # [B=2, C=2, H=1, W=3]: statistics per (sample, channel) over H*W; alpha per sample
    maps = [[[1.0, 2.0, 4.0], [3.0, -1.0, 0.0]], [[0.5, 0.5, 2.0], [-2.0, 1.0, 1.5]]]
    x = t(maps).reshape(2, 2, 1, 3)
    alpha, perm = [0.3, 0.8], [1, 0]
    out = randomize(x, "style", t([[a] for a in alpha]), torch.tensor(perm))
    assert out.shape == x.shape
    for c in range(2):
        rows = [maps[b][c] for b in range(2)]
        want = randomize_ref(rows, "style", alpha, perm)
        for b in range(2):
            assert out[b, c, 0].tolist() == pytest.approx(want[b], abs=1e-5)
    with pytest.raises(ValueError):
        randomize(t(R), "colour", t([[a] for a in ALPHA]), torch.tensor(PERM))


def test_randomize_content_detaches_the_swapped_content_only():
    x = t(R).requires_grad_()
    out = randomize(x, "content", t([[a] for a in ALPHA]), torch.tensor(PERM))
    w = t([[0.3, -1.2, 0.7], [0.1, 0.4, -0.5], [1.0, 0.2, 0.6]])
    g, = torch.autograd.grad((out[0] * w[0]).sum(), x)
    assert g[2].abs().sum() == 0          # row 0's content came from row 2, detached
    assert g[0].abs().sum() > 0           # row 0's own mean and variance keep their graph
    x = t(R).requires_grad_()
    out = randomize(x, "style", t([[a] for a in ALPHA]), torch.tensor(PERM))
    g, = torch.autograd.grad((out[0] * w[0]).sum(), x)
    assert g[2].abs().sum() > 0           # style: row 0 mixes row 2's statistics


def test_sagnet_draws_reproducible_and_private():
    state = torch.get_rng_state()
    a, b = sagnet_draws(11, 6), sagnet_draws(11, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 3
    for (aa, pa), (ab, pb) in zip(a, b):
        assert torch.equal(aa, ab) and torch.equal(pa, pb)
        assert aa.shape == (6, 1) and bool(((aa >= 0) & (aa < 1)).all())
        assert sorted(pa.tolist()) == list(range(6))
    c = sagnet_draws(12, 6)
    assert not torch.equal(a[0][0], c[0][0])
    # DomainBed's order from one generator: rand, randperm (style); rand, randperm (content); rand, randperm (adv)
    g = torch.Generator().manual_seed(1_000_003 * 11 + SAGNET_SEED)
    for alpha, perm in a:
        assert torch.equal(alpha, torch.rand(6, 1, generator=g))
        assert torch.equal(perm, torch.randperm(6, generator=g))
    m = make_sagnet()
    assert all(torch.equal(u, v) for da, dm in zip(a, m.draws(11, 6)) for u, v in zip(da, dm))


def sagnet_reference(draws, w_adv, x=X, y=Y):
    (a_c, p_c), (a_s, p_s), (a_a, p_a) = draws
    fs = randomize_ref(x, "style", a_c, p_c)
    loss_c = mean([ce(linear(WC, BC, r), c) for r, c in zip(fs, y)])
    fc = randomize_ref(x, "content", a_s, p_s)
    loss_s = mean([ce(linear(WS, BS, r), c) for r, c in zip(fc, y)])
    fa = randomize_ref(x, "content", a_a, p_a)
    loss_adv = w_adv * -mean([mean(log_softmax(linear(WS, BS, r))) for r in fa])
    return {"loss_c": loss_c, "loss_s": loss_s, "loss_adv": loss_adv}


FIXED = [([0.2, 0.9, 0.5, 0.0, 0.7, 0.35], [3, 2, 5, 0, 1, 4]),
         ([0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [1, 0, 3, 2, 5, 4]),
         ([0.6, 0.4, 0.8, 0.3, 0.9, 0.05], [5, 4, 3, 2, 1, 0])]


def test_sagnet_loss_by_hand_fixed_draws():
    m = make_sagnet({"sag_w_adv": 0.7})
    m.draws = lambda step, n: [(t([[a] for a in al]), torch.tensor(p)) for al, p in FIXED]
    loss, terms = m(make_batch(), 0)
    ref = sagnet_reference(FIXED, 0.7)
    assert set(terms) == {"loss_c", "loss_s", "loss_adv"}
    for k, v in ref.items():
        assert float(terms[k]) == pytest.approx(v, abs=TOL), k
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref["loss_c"] + ref["loss_s"] + ref["loss_adv"], abs=TOL)


@pytest.mark.parametrize("step", [0, 42])
def test_sagnet_loss_by_hand_generator_draws(step):
    m = make_sagnet()
    draws = [(a.reshape(-1).tolist(), p.tolist()) for a, p in sagnet_draws(step, 6)]
    loss, terms = m(make_batch(), step)
    ref = sagnet_reference(draws, 0.1)
    assert loss.item() == pytest.approx(sum(ref.values()), abs=TOL)
    for k, v in ref.items():
        assert float(terms[k]) == pytest.approx(v, abs=TOL), k
    assert m(make_batch(), step)[0].item() == loss.item()   # the same step: the same draws, the same loss


def test_sagnet_predict_is_network_c_of_network_f():
    m = make_sagnet()
    assert torch.allclose(m.predict(t(X)), t([linear(WC, BC, r) for r in X]), atol=TOL)


def test_sagnet_gradient_routing():
    m = make_sagnet({"sag_w_adv": 0.5})
    backbone = list(m.student.backbone.parameters())
    head_c = list(m.student.classifier.parameters())
    head_s = list(m.network_s.parameters())
    groups = {"backbone": backbone, "network_c": head_c, "network_s": head_s}
    params = backbone + head_c + head_s
    terms = m.losses(m.student.backbone(t(X)), torch.tensor(Y), 3)
    reaches = {}
    grads = {}
    for name, term in terms.items():
        g = torch.autograd.grad(term, params, allow_unused=True, retain_graph=True)
        grads[name] = g
        got, i = {}, 0
        for group, ps in groups.items():
            gs = g[i:i + len(ps)]
            i += len(ps)
            got[group] = any(x is not None and x.abs().sum() > 0 for x in gs)
        reaches[name] = {k for k, v in got.items() if v}
    assert reaches["loss_c"] == {"backbone", "network_c"}
    assert reaches["loss_s"] == {"network_s"}
    assert reaches["loss_adv"] == {"backbone"}
    # one backward of the summed loss: each parameter gets its DomainBed step's gradient
    m.zero_grad(set_to_none=True)
    loss, _ = m(make_batch(), 3)
    loss.backward()
    for k, p in enumerate(params):
        want = sum(g[k] for g in grads.values() if g[k] is not None)
        assert torch.allclose(p.grad, want, atol=1e-6)
    # loss_adv's backbone gradient = DomainBed's step 3 (network_s live, its gradient just not stepped)
    (_, _), (_, _), (a_a, p_a) = sagnet_draws(3, 6)
    f = m.student.backbone(t(X))
    adv = 0.5 * -torch.log_softmax(m.network_s(randomize(f, "content", a_a, p_a)), 1).mean(1).mean()
    g_db = torch.autograd.grad(adv, backbone)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(g_db, grads["loss_adv"][:len(backbone)]))


def test_sagnet_owns_network_s_and_float32_under_autocast():
    m = make_sagnet()
    assert {"network_s.weight", "network_s.bias"} <= set(m.state_dict())
    ids = {id(p) for g in m.param_groups() for p in g["params"]}
    assert all(id(p) in ids for p in m.parameters())
    assert m.network_s.weight.shape == (3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = m(make_batch(), 1)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
