"""MIRO (Cha et al., ECCV 2022) pinned on tiny hand-made batches.

Every reference value is computed here with plain Python arithmetic on lists (``math.exp``/``math.log`` and loops),
never with the code under test or torch ops. The tiny student's backbone is two Linear layers whose outputs are the
two MIRO feature layers (named by ``miro_feat_layers``), so every intermediate feature is known by hand.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from distill.methods import MethodContext
from distill.methods.miro import MIRO, MIROTeacher, feature_layer_names

from handmath import ce, linear, mean, t   # tests/handmath.py: the plain-Python reference math

torch.set_num_threads(1)
TOL = 1e-5


# ------------------------------------------------------------------------------------ reference math (plain Python)
def softplus(b):
    return math.log(1.0 + math.exp(b))


def sigmoid(b):
    return 1.0 / (1.0 + math.exp(-b))


def variances(bs):
    return [softplus(b) + 1e-5 for b in bs]


def vlb_layer(student_rows, oracle_rows, var):
    """0.5 * mean over samples and dimensions of (s - o)^2 / var + log var (one layer, MIRO's vlb.mean() / 2)."""
    terms = [(s - o) ** 2 / var[d] + math.log(var[d])
             for srow, orow in zip(student_rows, oracle_rows) for d, (s, o) in enumerate(zip(srow, orow))]
    return 0.5 * mean(terms)


# ------------------------------------------------------------------------------------------------ hand-made data
# B=4 samples, 4 input dims, layer 1: 3 dims, layer 2 (the features): 2 dims, C=3 classes, embed_dim E=4.
X = [[1.0, 0.5, -0.3, 0.2], [0.2, -1.0, 0.4, 0.7], [-0.6, 0.3, 0.9, -0.1], [0.5, 0.5, 0.5, -0.8]]
Y = [0, 1, 2, 1]
W1 = [[0.9, -0.2, 0.1, 0.0], [0.3, 0.8, -0.4, 0.2], [-0.1, 0.2, 0.7, 0.5]]
B1 = [0.05, -0.1, 0.2]
W1P = [[0.7, 0.1, 0.1, -0.3], [0.3, 0.5, -0.4, 0.6], [0.2, 0.2, 0.9, 0.5]]     # the student's layer 1, perturbed
W2 = [[0.6, -0.4, 0.3], [0.2, 0.5, -0.7]]
B2 = [0.1, -0.05]
WC = [[0.7, -0.5], [-0.3, 0.6], [0.1, 0.9]]
BC = [0.1, 0.0, -0.1]
WM = [[0.5, -0.2], [0.1, 0.8], [-0.6, 0.3], [0.4, 0.4]]                          # teacher-oracle mean encoder
BM = [0.0, 0.1, -0.2, 0.05]
V = [[0.8, 0.1, 0.2, 0.4], [-0.1, 0.7, 0.6, -0.2], [0.2, -0.3, 0.9, 0.3], [0.5, 0.4, -0.2, 0.6]]  # image_emb
H1 = [linear(W1, B1, x) for x in X]
H2 = [linear(W2, B2, h) for h in H1]
Z = [linear(WC, BC, h) for h in H2]
CE = mean([ce(z, y) for z, y in zip(Z, Y)])


class TinyStudent(nn.Module):
    """The student contract; backbone = Linear(4, 3) -> Linear(3, 2), both outputs MIRO feature layers."""

    def __init__(self, embed_dim=4):
        super().__init__()
        backbone = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        with torch.no_grad():
            backbone[0].weight.copy_(t(W1))
            backbone[0].bias.copy_(t(B1))
            backbone[1].weight.copy_(t(W2))
            backbone[1].bias.copy_(t(B2))
        backbone.miro_feat_layers = ["0", "1"]
        backbone.miro_input_shape = (4,)
        self.backbone = backbone
        self.feature_dim = 2
        self.proj = nn.Linear(2, embed_dim)
        self.classifier = nn.Linear(2, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(t(WC))
            self.classifier.bias.copy_(t(BC))

    def forward(self, x):
        f = self.backbone(x)
        return {"features": f, "embed": self.proj(f), "logits": self.classifier(f)}


def make_ctx(num_classes=3, embed_dim=4):
    names = ["dog", "guitar", "house", "horse", "person"][:num_classes]
    return MethodContext(class_names=names, source_domains=["art painting", "cartoon", "sketch"], total_steps=100,
                         num_classes=num_classes, embed_dim=embed_dim,
                         class_prompts=[[f"a photo of a {c}."] for c in names])


def make_batch(x=X, y=Y, v=V):
    return {"x": t(x), "y": torch.tensor(y), "domain": torch.zeros(len(y), dtype=torch.long),
            "idx": torch.arange(len(y)), "image_emb": t(v)}


def make_miro(hp=None, cls=MIRO, student=None):
    return cls(student or TinyStudent(), hp or {}, make_ctx(), {})


def set_var_biases(method, rows):
    with torch.no_grad():
        for enc, bs in zip(method.var_encoders, rows):
            enc.b.copy_(torch.tensor(bs, dtype=torch.float32).reshape(enc.b.shape))


def test_reference_math_by_hand():
    assert softplus(0.0) == pytest.approx(math.log(2.0))
    assert ce([0.0, math.log(3)], 1) == pytest.approx(math.log(4 / 3))
    # identical features, variance 0.1: the layer term is 0.5 * log 0.1
    assert vlb_layer([[1.0, 2.0]], [[1.0, 2.0]], [0.1, 0.1]) == pytest.approx(0.5 * math.log(0.1))
    # (2 - 0)^2 / 2 + log 2 = 2 + log 2, halved
    assert vlb_layer([[2.0]], [[0.0]], [2.0]) == pytest.approx(0.5 * (2.0 + math.log(2.0)))


# ------------------------------------------------------------------------------------------------ specs
def test_defaults_and_search_space_are_miros():
    # official config.yaml: ld 0.1, lr_mult 10., feat_layers stem_block; the paper's lambda grid
    assert MIRO.name == "miro"
    assert MIRO.hparams == {"ld": 0.1, "lr_mult": 10.0, "feat_layers": "stem_block", "oracle": "init"}
    assert MIRO.search_space == {"ld": {"choice": [1.0, 0.1, 0.01, 0.001]}}
    assert MIRO.needs_image_embeddings is False
    assert MIROTeacher.name == "miro_teacher"
    assert MIROTeacher.hparams == {"ld": 0.1, "lr_mult": 10.0, "feat_layers": "stem_block", "oracle": "teacher"}
    assert MIROTeacher.search_space == MIRO.search_space
    assert MIROTeacher.needs_image_embeddings is True
    for cls in (MIRO, MIROTeacher):
        assert set(cls.search_space) <= set(cls.hparams)
    assert not MIRO.wants_image_embeddings({}) and MIRO.wants_image_embeddings({"oracle": "teacher"})
    assert MIROTeacher.wants_image_embeddings({})
    import importlib
    assert "arXiv:2203.10789" in importlib.import_module(MIRO.__module__).__doc__


def test_hparam_problems():
    assert MIRO.hparam_problems({}) == [] and MIROTeacher.hparam_problems({}) == []
    assert MIRO.hparam_problems({"ld": 0.0}) == []
    for hp, key in [({"ld": -0.1}, "ld"), ({"ld": "big"}, "ld"), ({"ld": float("nan")}, "ld"), ({"ld": True}, "ld"),
                    ({"lr_mult": 0}, "lr_mult"), ({"lr_mult": -1.0}, "lr_mult"),
                    ({"feat_layers": "all"}, "feat_layers"), ({"oracle": "clip"}, "oracle"),
                    ({"oracle": "teacher"}, "oracle")]:       # miro is built without image embeddings
        problems = MIRO.hparam_problems(hp)
        assert len(problems) == 1 and problems[0].startswith(f"{key}: "), (hp, problems)
    problems = MIROTeacher.hparam_problems({"oracle": "init"})
    assert len(problems) == 1 and problems[0].startswith("oracle: ") and "'miro'" in problems[0]
    with pytest.raises(ValueError, match="ld"):
        make_miro({"ld": -1.0})
    with pytest.raises(ValueError, match="oracle"):
        make_miro({"oracle": "clip"})


# ------------------------------------------------------------------------------------------------ init oracle
def test_init_loss_is_ce_plus_ld_log_var():
    m = make_miro()
    assert [tuple(e.b.shape) for e in m.var_encoders] == [(1, 3), (1, 2)]
    assert all(isinstance(e, nn.Identity) for e in m.mean_encoders)          # official MeanEncoder: identity
    loss, terms = m(make_batch(), step=0)
    # identical networks: squared terms 0; each layer 0.5 * mean(log 0.1); the layers are summed
    reg = 2 * 0.5 * math.log(0.1)
    assert terms["ce"].item() == pytest.approx(CE, abs=TOL)
    assert terms["reg"].item() == pytest.approx(reg, abs=TOL)
    assert loss.item() == pytest.approx(CE + 0.1 * reg, abs=TOL)


B_VAR = [[0.3, -0.5, 1.2], [-1.0, 0.7]]


def perturbed_miro(ld=0.5):
    m = make_miro({"ld": ld})
    with torch.no_grad():
        m.student.backbone[0].weight.copy_(t(W1P))
    set_var_biases(m, B_VAR)
    return m


def test_init_loss_after_perturbing_the_student():
    m = perturbed_miro(ld=0.5)
    loss, terms = m(make_batch(), step=3)
    h1p = [linear(W1P, B1, x) for x in X]
    h2p = [linear(W2, B2, h) for h in h1p]
    zp = [linear(WC, BC, h) for h in h2p]
    ce_ref = mean([ce(z, y) for z, y in zip(zp, Y)])
    reg = vlb_layer(h1p, H1, variances(B_VAR[0])) + vlb_layer(h2p, H2, variances(B_VAR[1]))
    assert terms["ce"].item() == pytest.approx(ce_ref, abs=TOL)
    assert terms["reg"].item() == pytest.approx(reg, abs=TOL)
    assert loss.item() == pytest.approx(ce_ref + 0.5 * reg, abs=TOL)
    assert loss.dtype == torch.float32 and terms["reg"].requires_grad is False


def test_init_gradients_frozen_copy_none_encoders_and_student_some():
    m = perturbed_miro(ld=0.5)
    loss, _ = m(make_batch(), step=0)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in m.oracle.parameters())
    for p in list(m.student.backbone.parameters()) + list(m.student.classifier.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.student.proj.parameters())     # unused by the init oracle
    # d(ld * reg)/d b_d = ld * 0.5 * mean_n [1/var_d - diff^2/var_d^2] / D * sigmoid(b_d), by hand
    h1p = [linear(W1P, B1, x) for x in X]
    h2p = [linear(W2, B2, h) for h in h1p]
    for enc, bs, s_rows, o_rows in zip(m.var_encoders, B_VAR, (h1p, h2p), (H1, H2)):
        var, n, dims = variances(bs), len(s_rows), len(bs)
        ref = [0.5 * 0.5 * sum(1.0 / var[d] - (s[d] - o[d]) ** 2 / var[d] ** 2 for s, o in zip(s_rows, o_rows))
               / (n * dims) * sigmoid(bs[d]) for d in range(dims)]
        assert enc.b.grad.flatten().tolist() == pytest.approx(ref, abs=TOL)


def test_oracle_is_a_frozen_copy_in_eval_mode_and_not_optimised():
    m = make_miro()
    m.train()
    assert m.training and m.student.training
    assert not m.oracle.training and not any(mod.training for mod in m.oracle.modules())
    with torch.no_grad():
        m.student.backbone[0].weight.add_(1.0)                    # the copy does not follow the student
    assert m.oracle.net[0].weight.flatten().tolist() == pytest.approx([w for row in W1 for w in row])
    groups = m.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    assert not set(ids) & {id(p) for p in m.oracle.parameters()}
    assert "lr_mult" not in groups[0] and "lr" not in groups[0]
    assert groups[1]["lr_mult"] == 10.0
    assert {id(p) for p in groups[1]["params"]} == {id(e.b) for e in m.var_encoders}
    assert any(k.startswith("oracle.") for k in m.state_dict())    # checkpoints carry the oracle


def test_hooks_only_during_forward_and_deepcopy_keeps_its_own_hooks():
    m = perturbed_miro()
    m.predict(t(X))
    assert m._student_taps.outputs == [None, None] and m._oracle_taps.outputs == [None, None]
    m2 = copy.deepcopy(m)                                          # as the averager does
    loss2, _ = m2(make_batch(), step=0)
    loss, _ = m(make_batch(), step=0)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert m2._student_taps is not m._student_taps
    with torch.no_grad():
        m2.student.backbone[0].weight.copy_(t(W1))                 # the copy now equals its oracle: squared term 0
    _, terms2 = m2(make_batch(), step=0)
    reg = 0.5 * mean([math.log(v) for v in variances(B_VAR[0])]) + 0.5 * mean([math.log(v) for v in variances(B_VAR[1])])
    assert terms2["reg"].item() == pytest.approx(reg, abs=TOL)
    _, terms = m(make_batch(), step=0)                             # the original is unchanged
    assert terms["reg"].item() != pytest.approx(reg, abs=1e-3)


def test_full_precision_under_autocast():
    m = perturbed_miro()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = m(make_batch(), step=0)
    assert loss.dtype == torch.float32 and terms["reg"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ teacher oracle
B_T = [0.2, -0.4, 0.9, 0.0]


def teacher_miro(ld=0.3):
    m = make_miro({"ld": ld}, cls=MIROTeacher)
    with torch.no_grad():
        m.mean_encoders[0].weight.copy_(t(WM))
        m.mean_encoders[0].bias.copy_(t(BM))
    set_var_biases(m, [B_T])
    return m


def test_teacher_oracle_loss_by_hand():
    m = teacher_miro(ld=0.3)
    assert m.oracle is None and len(m.var_encoders) == 1 and tuple(m.var_encoders[0].b.shape) == (1, 4)
    loss, terms = m(make_batch(), step=0)
    means = [linear(WM, BM, h) for h in H2]
    reg = vlb_layer(means, V, variances(B_T))
    assert terms["ce"].item() == pytest.approx(CE, abs=TOL)
    assert terms["reg"].item() == pytest.approx(reg, abs=TOL)
    assert loss.item() == pytest.approx(CE + 0.3 * reg, abs=TOL)


def test_teacher_oracle_gradients_and_groups():
    m = teacher_miro()
    loss, _ = m(make_batch(), step=0)
    loss.backward()
    for p in list(m.mean_encoders.parameters()) + list(m.var_encoders.parameters()) + list(m.student.backbone.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    groups = m.param_groups()
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in (m.mean_encoders[0].weight,
                                                                   m.mean_encoders[0].bias, m.var_encoders[0].b)}
    assert groups[1]["lr_mult"] == 10.0
    batch = make_batch()
    del batch["image_emb"]
    with pytest.raises(KeyError, match="image_emb"):
        m(batch, step=0)


# ------------------------------------------------------------------------------------------------ real students
def test_small_cnn_student_three_layers_forward_backward():
    from distill.models.students import build_student

    torch.manual_seed(0)
    student = build_student("small_cnn", "none", False, embed_dim=8, num_classes=5)
    assert feature_layer_names(student.backbone) == ["features.3", "features.7", "features.11"]
    m = MIRO(student, {}, make_ctx(num_classes=5, embed_dim=8), {})
    assert [tuple(e.b.shape) for e in m.var_encoders] == [(1, 16, 1, 1), (1, 32, 1, 1), (1, 64, 1, 1)]
    batch = {"x": torch.randn(2, 3, 32, 32), "y": torch.tensor([0, 4]), "domain": torch.zeros(2, dtype=torch.long)}
    loss, terms = m(batch, step=0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.oracle.parameters())
    assert all(e.b.grad is not None and e.b.grad.abs().sum() > 0 for e in m.var_encoders)
    assert student.backbone.features[0].weight.grad.abs().sum() > 0


def test_small_cnn_frozen_bn_init_squared_term_is_zero():
    from distill.models.students import build_student

    torch.manual_seed(0)
    student = build_student("small_cnn", "none", True, embed_dim=8, num_classes=5)   # frozen BN, as MIRO's
    m = MIRO(student, {}, make_ctx(num_classes=5, embed_dim=8), {}).train()
    batch = {"x": torch.randn(2, 3, 32, 32), "y": torch.tensor([0, 4]), "domain": torch.zeros(2, dtype=torch.long)}
    _, terms = m(batch, step=0)
    assert terms["reg"].item() == pytest.approx(3 * 0.5 * math.log(0.1), abs=TOL)


def test_resnet_layers_stem_block_and_block():
    from distill.models.students import build_student

    torch.manual_seed(0)
    student = build_student("resnet18", "none", True, embed_dim=8, num_classes=5)
    assert feature_layer_names(student.backbone, "stem_block") == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert feature_layer_names(student.backbone, "block") == ["layer1", "layer2", "layer3", "layer4"]
    m = MIRO(student, {}, make_ctx(num_classes=5, embed_dim=8), {})
    assert [e.b.shape[1] for e in m.var_encoders] == [64, 64, 128, 256, 512]
    batch = {"x": torch.randn(2, 3, 64, 64), "y": torch.tensor([1, 2]), "domain": torch.zeros(2, dtype=torch.long)}
    loss, terms = m(batch, step=0)
    assert terms["reg"].item() == pytest.approx(5 * 0.5 * math.log(0.1), abs=TOL)   # frozen BN: equal at init
    loss.backward()
    assert all(p.grad is None for p in m.oracle.parameters())
    m_block = MIRO(build_student("resnet18", "none", True, embed_dim=8, num_classes=5), {"feat_layers": "block"},
                   make_ctx(num_classes=5, embed_dim=8), {})
    assert len(m_block.var_encoders) == 4


def test_fallback_is_the_backbone_output():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    assert feature_layer_names(backbone) == [""]
