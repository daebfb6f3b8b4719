"""The seed distillation methods (RISE, SCMD, VL2V-ADiP, Li et al.) pinned on tiny hand-made batches.

Every reference value is computed here with plain Python arithmetic on lists (``math.exp``/``math.log`` and loops),
never with the code under test or the helpers of ``distill.methods.base``. The student is a tiny deterministic
module following the student contract whose backbone is the identity, so that features = x.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.methods import REGISTRY, MethodContext, get_method
from distill.methods.li import Li, parse_loss_type
from distill.methods.rise import NON_STYLE_ANCHORS, RISE, RISE_TEMPLATES
from distill.methods.scmd import SCMD, num_selected
from distill.methods.vl2v import VL2V

from handmath import ce, cos, dot, kl, linear, mean, softmax, t, unit   # tests/handmath.py: the plain-Python reference math

torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(autouse=True)
def clip_logit_scale(request, monkeypatch):
    """The hand-made references use CLIP's logit scale 100. The methods' default is `auto` (the teacher's own scale,
    resolved by the training loop before a method is built: tests/test_train.py), so pin 100 here."""
    if "real_defaults" in request.keywords:
        return
    for cls in REGISTRY.values():
        if "teacher_logit_scale" in cls.hparams:
            monkeypatch.setattr(cls, "hparams", {**cls.hparams, "teacher_logit_scale": 100.0})


# ------------------------------------------------------------------------------------ reference math (plain Python)
# ------------------------------------------------------------------------------------------------ hand-made data
# B=4 samples, F=D=4, C=3 classes.
X = [[1.0, 0.5, -0.3, 0.2], [0.2, -1.0, 0.4, 0.7], [-0.6, 0.3, 0.9, -0.1], [0.5, 0.5, 0.5, -0.8]]
Y = [0, 1, 2, 1]
WP = [[0.9, -0.2, 0.1, 0.0], [0.3, 0.8, -0.4, 0.2], [-0.1, 0.2, 0.7, 0.5], [0.4, -0.3, 0.2, 0.6]]   # proj [D, F]
BP = [0.05, -0.1, 0.0, 0.2]
WC = [[0.7, -0.5, 0.2, 0.1], [-0.3, 0.6, 0.4, -0.2], [0.1, 0.2, -0.6, 0.9]]                          # classifier
BC = [0.1, 0.0, -0.1]
TC = [unit(r) for r in ([1.0, 0.2, -0.1, 0.3], [-0.2, 0.9, 0.4, 0.1], [0.3, -0.4, 0.8, 0.5])]         # t_c
TC2 = [unit(r) for r in ([0.5, 0.5, 0.1, -0.2], [0.1, -0.3, 0.9, 0.2], [-0.4, 0.6, 0.3, 0.7])]        # other set
V = [unit(r) for r in ([0.8, 0.1, 0.2, 0.4], [-0.1, 0.7, 0.6, -0.2], [0.2, -0.3, 0.9, 0.3], [0.5, 0.4, -0.2, 0.6])]
S = [linear(WP, BP, x) for x in X]                                                                    # s = P f
Z = [linear(WC, BC, x) for x in X]                                                                    # z_S


class TinyStudent(nn.Module):
    """The student contract with controlled values: backbone = identity Linear (optionally + BatchNorm1d)."""

    def __init__(self, wp=WP, bp=BP, wc=WC, bc=BC, bn=False):
        super().__init__()
        f, d, c = len(wp[0]), len(wp), len(wc)
        lin = nn.Linear(f, f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(f))
        self.backbone = nn.Sequential(lin, nn.BatchNorm1d(f)) if bn else nn.Sequential(lin)
        self.feature_dim = f
        self.proj = nn.Linear(f, d, bias=bp is not None)
        self.classifier = nn.Linear(f, c, bias=bc is not None)
        with torch.no_grad():
            self.proj.weight.copy_(t(wp))
            self.classifier.weight.copy_(t(wc))
            if bp is not None:
                self.proj.bias.copy_(t(bp))
            if bc is not None:
                self.classifier.bias.copy_(t(bc))

    def forward(self, x):
        f = self.backbone(x)
        return {"features": f, "embed": self.proj(f), "logits": self.classifier(f)}


def make_ctx(num_classes=3, total_steps=100, style=True, sources=("art painting", "cartoon", "sketch"),
             descriptions=None, class_names=None):
    names = class_names or ["dog", "guitar", "house", "horse", "person"][:num_classes]
    return MethodContext(class_names=names, source_domains=list(sources),
                         total_steps=total_steps, num_classes=num_classes, embed_dim=4,
                         class_prompts=[[f"a photo of a {c}."] for c in names], style_domains=style,
                         descriptions=descriptions)


def make_batch(x=X, y=Y, v=V):
    return {"x": t(x), "y": torch.tensor(y), "domain": torch.zeros(len(y), dtype=torch.long),
            "idx": torch.arange(len(y)), "image_emb": t(v)}


def grads_none(module):
    return all(p.grad is None for p in module.parameters())


def grads_some(module):
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_reference_math_by_hand():
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.1438410362258904, abs=1e-12)
    assert softmax([0.0, math.log(3)]) == pytest.approx([0.25, 0.75])
    assert ce([0.0, math.log(3)], 1) == pytest.approx(math.log(4 / 3))
    assert cos([1, 0], [0.6, 0.8]) == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------------ registry / specs
@pytest.mark.parametrize("name", ["rise", "scmd", "vl2v", "li"])
def test_registry_and_specs(name):
    cls = get_method(name)
    assert REGISTRY[name] is cls and cls.name == name
    assert cls.needs_image_embeddings
    assert set(cls.search_space) <= set(cls.hparams), "search keys must be hyperparameters"
    for spec in cls.search_space.values():
        (kind, arg), = spec.items()
        assert kind in ("uniform", "loguniform", "int", "choice")
        if kind != "choice":
            assert len(arg) == 2 and arg[0] < arg[1]
        else:
            assert len(arg) >= 1
    import importlib
    assert importlib.import_module(cls.__module__).__doc__.count("arXiv") >= 1


def test_no_teacher_weights_in_methods():
    import pathlib
    import distill.methods as m
    for name in ("rise", "scmd", "vl2v", "li"):
        src = (pathlib.Path(m.__file__).parent / f"{name}.py").read_text()
        assert "teachers" not in src and "open_clip" not in src and "load_teacher" not in src


# ------------------------------------------------------------------------------------------------------- RISE
def rise_text(anchor_rows=None, tc=TC):
    text = {"classes": t(TC2), "rise_classes": t(tc)}
    if anchor_rows is not None:
        text["rise_anchors"] = t(anchor_rows)
    return text


def anchors_hand(C=3, J=3):
    """Deterministic anchor embeddings a_{c,j}, class-major rows c*J + j."""
    return [unit([math.sin(1.0 + 3 * c + 1.7 * j + 0.9 * d) for d in range(4)]) for c in range(C) for j in range(J)]


def test_rise_prompt_sets_and_anchors():
    ctx = make_ctx()
    sets = RISE.prompt_sets({}, ctx)
    assert sets["rise_classes"][1] == [tmpl.format(c="guitar") for tmpl in RISE_TEMPLATES]
    assert sets["rise_classes"][0][0] == "itap of a dog." and len(RISE_TEMPLATES) == 7
    prompts = pytest.importorskip("distill.models.prompts")
    assert RISE_TEMPLATES == prompts.TEMPLATES["rise"]                   # one list, two homes: keep them equal
    assert sets["rise_anchors"] == [["a art painting of a dog"], ["a cartoon of a dog"], ["a sketch of a dog"],
                                    ["a art painting of a guitar"], ["a cartoon of a guitar"], ["a sketch of a guitar"],
                                    ["a art painting of a house"], ["a cartoon of a house"], ["a sketch of a house"]]
    # the test domain ("photo") never appears
    assert not any("photo" in row[0] for row in sets["rise_anchors"])
    # non-style datasets (VLCS, TerraIncognita): fixed photo-quality anchors
    ctx = make_ctx(style=False, sources=("Caltech101", "LabelMe", "SUN09"))
    sets = RISE.prompt_sets({"loss_type": "both"}, ctx)
    assert NON_STYLE_ANCHORS == ["bright photo", "corrupted photo", "dark photo", "good photo"]
    assert sets["rise_anchors"][:4] == [["a bright photo of a dog"], ["a corrupted photo of a dog"],
                                        ["a dark photo of a dog"], ["a good photo of a dog"]]
    assert len(sets["rise_anchors"]) == 3 * 4
    # abs-only needs no anchors; config templates need no rise set
    sets = RISE.prompt_sets({"loss_type": "abs", "templates": "config"}, make_ctx())
    assert set(sets) == {"classes"}
    with pytest.raises(ValueError):
        RISE.prompt_sets({"loss_type": "absolute"}, make_ctx())


def rise_reference(w1, w2, w3, T, loss_type, text_head, tc=TC, anchors=None, J=3):
    logits = [[dot(tc[c], s) for c in range(3)] for s in S] if text_head else Z
    z_t = [[100 * cos(v, tc[c]) for c in range(3)] for v in V]
    kd = T * T * mean([kl(softmax([z / T for z in zt]), softmax([z / T for z in zs])) for zt, zs in zip(z_t, logits)])
    ce_ = mean([ce(z, y) for z, y in zip(logits, Y)])
    out = {"kd": kd, "ce": ce_}
    total = w1 * kd + w2 * ce_
    if loss_type in ("abs", "both"):
        out["ad"] = mean([1 - cos(s, tc[y]) for s, y in zip(S, Y)])
        total += w3 * out["ad"]
    if loss_type in ("rel", "both"):
        sq = []
        for s, y in zip(S, Y):
            a = [anchors[y * J + j] for j in range(J)]
            ds = softmax([cos(s, aj) for aj in a])
            dt = softmax([cos(tc[y], aj) for aj in a])
            sq += [(p - q) ** 2 for p, q in zip(ds, dt)]
        out["rd"] = 10 * mean(sq)
        total += w3 * out["rd"]
    return total, out


@pytest.mark.parametrize("loss_type", ["abs", "rel", "both"])
@pytest.mark.parametrize("text_head", [True, False])
def test_rise_loss_values(loss_type, text_head):
    anchors = anchors_hand()
    hp = {"loss_type": loss_type, "text_classifier": text_head, "distance_weight": 2.0, "kd_weight": 0.8}
    m = RISE(TinyStudent(), hp, make_ctx(), rise_text(anchors))
    loss, terms = m(make_batch(), step=0)
    ref, ref_terms = rise_reference(0.8, 0.2, 2.0, 3.0, loss_type, text_head, anchors=anchors)
    assert loss.item() == pytest.approx(ref, abs=TOL)
    assert set(terms) == set(ref_terms)
    for k, v in ref_terms.items():
        assert float(terms[k]) == pytest.approx(v, abs=TOL), k
    # predict: the text head on s (or the student's classifier)
    pred = m.predict(t(X))
    want = [[dot(TC[c], s) for c in range(3)] for s in S] if text_head else Z
    assert torch.allclose(pred, t(want), atol=TOL)
    if text_head:
        assert torch.allclose(m.head.weight, t(TC)) and m.head.bias.abs().sum().item() == 0.0
        loss.backward()
        assert grads_none(m.student.classifier) and m.head.weight.grad is not None


def test_rise_defaults_and_config_templates():
    # defaults: T=3, w1=.9, w2=1-w1=.1, w3=1, both, text head; templates=config uses the "classes" set
    anchors = anchors_hand()
    m = RISE(TinyStudent(), {"templates": "config"}, make_ctx(), {"classes": t(TC), "rise_anchors": t(anchors)})
    loss, _ = m(make_batch(), step=0)
    ref, _ = rise_reference(0.9, 0.1, 1.0, 3.0, "both", True, anchors=anchors)
    assert loss.item() == pytest.approx(ref, abs=TOL)
    m = RISE(TinyStudent(), {"ce_weight": 0.5, "loss_type": "abs"}, make_ctx(), rise_text())
    ref, _ = rise_reference(0.9, 0.5, 1.0, 3.0, "abs", True)
    assert m(make_batch(), 0)[0].item() == pytest.approx(ref, abs=TOL)


def test_rise_kd_and_ad_by_hand():
    # C=2: v_T is orthogonal to both t_0 and t_1 -> p_T = [.5, .5]; z_S = [0, 3 ln 3] -> p_S(T=3) = [.25, .75]
    # KD = 9 * .5 ln(4/3); CE(y=1) = ln(28/27); AD = 1 - cos([1,0,0,0], t_1=[0,0,1,0]) = 1
    stu = TinyStudent(wp=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bp=None,
                      wc=[[0, 0, 0, 0], [3 * math.log(3), 0, 0, 0]], bc=None)
    ctx = make_ctx(num_classes=2)
    m = RISE(stu, {"loss_type": "abs", "text_classifier": False, "kd_weight": 0.5},
             ctx, {"classes": t([[0, 1, 0, 0], [0, 0, 1, 0]]), "rise_classes": t([[0, 1, 0, 0], [0, 0, 1, 0]])})
    loss, terms = m(make_batch(x=[[1, 0, 0, 0]], y=[1], v=[[0, 0, 0, 1]]), 0)
    assert float(terms["kd"]) == pytest.approx(4.5 * math.log(4 / 3), abs=1e-5)   # 1.2945687...
    assert float(terms["ce"]) == pytest.approx(math.log(28 / 27), abs=1e-6)
    assert float(terms["ad"]) == pytest.approx(1.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 4.5 * math.log(4 / 3) + 0.5 * math.log(28 / 27) + 1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------------- SCMD
# B=10 batch for selection; W (the cross-modal head) set by hand.
X10 = [[math.sin(1.3 * i + 0.7 * d) + 0.1 * d for d in range(4)] for i in range(10)]
Y10 = [i % 3 for i in range(10)]
V10 = [unit([math.cos(0.9 * i + 1.1 * d) for d in range(4)]) for i in range(10)]
WCM = [[0.5, -0.2, 0.3, 0.1], [0.2, 0.4, -0.1, 0.6], [-0.3, 0.1, 0.8, 0.2], [0.6, 0.3, 0.2, -0.4]]


def scmd_reference(keep, T, l1, l2, scale):
    ce_, kd_, cm_ = [], [], []
    for i in keep:
        zs = linear(WC, BC, X10[i])
        zt = [100 * cos(V10[i], TC[c]) for c in range(3)]
        wf = linear(WCM, None, X10[i])
        zcm = [scale * cos(wf, TC[c]) for c in range(3)]
        pt = softmax([z / T for z in zt])
        ce_.append(ce(zs, Y10[i]))
        kd_.append(kl(pt, softmax([z / T for z in zs])))
        cm_.append(kl(pt, softmax([z / T for z in zcm])))
    ce_, kd_, cm_ = mean(ce_), T * T * mean(kd_), T * T * mean(cm_)
    return ce_ + l1 * kd_ + l2 * cm_, {"ce": ce_, "kd": kd_, "cm": cm_}


def make_scmd(hp=None, total_steps=100):
    m = SCMD(TinyStudent(), hp or {}, make_ctx(total_steps=total_steps), {"classes": t(TC)})
    with torch.no_grad():
        m.cm_proj.weight.copy_(t(WCM))
    return m


def test_scmd_keeps_the_hardest_and_pins_the_loss():
    m = make_scmd({"selection_ratio": 0.3, "temperature": 2.5, "kd_weight": 0.7, "cm_weight": 0.6})
    per_sample = [ce(linear(WC, BC, x), y) for x, y in zip(X10, Y10)]
    hardest = sorted(range(10), key=lambda i: -per_sample[i])[:3]          # floor(0.3 * 10) = 3
    assert len(set(round(v, 6) for v in per_sample)) == 10                  # no ties
    loss, terms = m(make_batch(X10, Y10, V10), step=0)
    assert m.last_selected.tolist() == hardest
    assert float(terms["selected"]) == 3
    ref, ref_terms = scmd_reference(hardest, 2.5, 0.7, 0.6, 1 / 0.07)
    assert loss.item() == pytest.approx(ref, abs=1e-4)
    for k, v in ref_terms.items():
        assert float(terms[k]) == pytest.approx(v, abs=1e-4), k
    # floor(p*B): 0.25 * 10 -> 2, 0.2 * 10 -> 2
    m = make_scmd({"selection_ratio": 0.25})
    m(make_batch(X10, Y10, V10), step=0)
    assert m.last_selected.tolist() == hardest[:2]
    assert num_selected(96, 0.2) == 19 and num_selected(96, 0.3) == 28 and num_selected(100, 0.29) == 29
    assert num_selected(4, 0.2) == 2 and num_selected(1, 0.2) == 1      # at least 2 (BatchNorm), at most B
    # gradients: classifier, backbone, W and the logit scale learn; proj is unused
    loss, _ = m(make_batch(X10, Y10, V10), step=0)
    loss.backward()
    assert grads_none(m.student.proj) and grads_some(m.student.classifier) and grads_some(m.cm_proj)
    assert m.logit_scale.grad is not None


def test_scmd_full_batch_after_selection():
    m = make_scmd({"k": 0.25}, total_steps=100)                # selection on steps 0..74
    loss, terms = m(make_batch(X10, Y10, V10), step=75)
    assert float(terms["selected"]) == 10 and m.last_selected.tolist() == list(range(10))
    ref, _ = scmd_reference(range(10), 3.0, 0.5, 0.5, 1 / 0.07)
    assert loss.item() == pytest.approx(ref, abs=1e-4)
    _, terms = m(make_batch(X10, Y10, V10), step=74)
    assert float(terms["selected"]) == 2


@pytest.mark.parametrize("total,k,last", [(100, 0.25, 74), (1000, 0.25, 749), (5001, 0.25, 3750),
                                          (20000, 0.25, 14999), (5001, 0.4, 3000), (5001, 0.2, 4000),
                                          (1000, 0.3, 699)])
def test_scmd_selection_schedule(total, k, last):
    m = SCMD(TinyStudent(), {"k": k}, make_ctx(total_steps=total), {"classes": t(TC)})
    flags = [m.selecting(s) for s in range(total)]
    assert flags[last] and (last + 1 == total or not flags[last + 1])
    assert flags == [s <= last for s in range(total)]                      # one contiguous prefix
    assert abs(sum(flags) - (1 - k) * total) <= 1                          # the first (1-k) of training


def test_scmd_logit_scale_clamped_at_100():
    m = make_scmd({"k": 1.0})                                              # k = 1: never select
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    _, terms = m(make_batch(X10, Y10, V10), step=0)
    assert float(terms["selected"]) == 10
    assert float(terms["cm_scale"]) == pytest.approx(100.0, rel=1e-5)
    _, ref = scmd_reference(range(10), 3.0, 0.5, 0.5, 100.0)
    assert float(terms["cm"]) == pytest.approx(ref["cm"], abs=1e-4)
    assert m.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)


# ------------------------------------------------------------------------------------------------------- VL2V
def test_vl2v_loss_by_hand():
    # s = [1,0,0,0]; cos(s, v_T) = .6; cos(s, t_y) = 0 -> L = -lam * .6
    stu = TinyStudent(wp=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bp=None)
    for lam in (0.5, 0.25):
        m = VL2V(stu, {"lam": lam}, make_ctx(num_classes=2, total_steps=10),
                 {"classes": t([[0, 0, 1, 0], [0, 1, 0, 0]])})
        for step in (0, 9):
            loss, terms = m(make_batch(x=[[1, 0, 0, 0]], y=[1], v=[[0.6, 0.8, 0, 0]]), step)
            assert loss.item() == pytest.approx(-lam * 0.6, abs=1e-6)
            assert float(terms["img_cos"]) == pytest.approx(0.6) and float(terms["txt_cos"]) == pytest.approx(0.0)


def test_vl2v_loss_values_and_predict():
    m = VL2V(TinyStudent(), {"lam": 0.3}, make_ctx(total_steps=10), {"classes": t(TC)})
    ref = mean([-0.3 * cos(s, v) - 0.7 * cos(s, TC[y]) for s, v, y in zip(S, V, Y)])
    for step in (0, 5):       # Align (eval-mode, no-grad backbone) and Distill (frozen P) give the same value here
        loss, _ = m(make_batch(), step)
        assert loss.item() == pytest.approx(ref, abs=TOL)
    want = [[100 * cos(s, TC[c]) for c in range(3)] for s in S]
    assert torch.allclose(m.predict(t(X)), t(want), atol=1e-3)


def test_vl2v_align_trains_only_the_projection():
    m = VL2V(TinyStudent(bn=True), {}, make_ctx(total_steps=10), {"classes": t(TC)})
    m.train()
    bn = m.student.backbone[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    assert m.stage(0) == "align" and m.handoff_step == 5
    loss, terms = m(make_batch(), step=4)
    loss.backward()
    assert float(terms["stage"]) == 0.0
    assert grads_none(m.student.backbone) and grads_none(m.student.classifier)
    assert grads_some(m.student.proj)
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)
    assert m.student.training and bn.training                          # modes restored after the frozen pass
    # the frozen pass used the running statistics: s = P((x - .3) / sqrt(2 + eps))
    xs = [[(v - 0.3) / math.sqrt(2.0 + bn.eps) for v in x] for x in X]
    ref = mean([-0.5 * cos(linear(WP, BP, x), v) - 0.5 * cos(linear(WP, BP, x), TC[y]) for x, v, y in zip(xs, V, Y)])
    assert loss.item() == pytest.approx(ref, abs=TOL)
    # an optimiser step with weight decay leaves the backbone untouched
    w0 = m.student.backbone[0].weight.detach().clone()
    torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.5).step()
    assert torch.equal(m.student.backbone[0].weight, w0)


def test_vl2v_distill_trains_only_the_backbone():
    m = VL2V(TinyStudent(bn=True), {}, make_ctx(total_steps=10), {"classes": t(TC)})
    m.train()
    loss, terms = m(make_batch(), step=5)
    loss.backward()
    assert float(terms["stage"]) == 1.0
    assert grads_none(m.student.proj) and grads_none(m.student.classifier)
    assert grads_some(m.student.backbone)
    assert m.student.proj.training
    p0 = [p.detach().clone() for p in m.student.proj.parameters()]
    torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5).step()
    assert all(torch.equal(a, b) for a, b in zip(p0, m.student.proj.parameters()))


@pytest.mark.parametrize("hp,steps,align,distill", [({}, 5, 5, 5), ({"align_steps": 3}, 10, 3, 10),
                                                     ({"distill_steps": 2}, 4, 4, 2),
                                                     ({"align_steps": 1, "distill_steps": 6}, 9, 1, 6)])
def test_vl2v_two_stages_and_the_handoff_happens_once(hp, steps, align, distill):
    """Align then Distill, as the official code's two runs: each defaults to train.steps; the stage is a function of
    the global step, so the hand-off happens exactly once."""
    assert VL2V.stages(hp, steps) == [("align", align), ("distill", distill)]
    total = align + distill
    m = VL2V(TinyStudent(), hp, make_ctx(total_steps=total), {"classes": t(TC)})
    assert m.handoff_step == align
    stages = []
    for step in range(total):
        _, terms = m(make_batch(), step)
        stages.append(int(terms["stage"]))
        assert m.stage(step) == ("align" if step < align else "distill")
    assert stages == [0] * align + [1] * distill
    assert m.handoffs == 1


def test_vl2v_stage_lengths_are_checked_before_any_trial():
    from distill.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="method.align_steps: expected an integer >= 1 or null"):
        build_config({"method": {"name": "vl2v", "align_steps": 0}})
    with pytest.raises(ConfigError, match="method.distill_steps"):
        build_config({"method": {"name": "vl2v", "distill_steps": 2.5}})


def test_vl2v_with_ddp_leaves_frozen_grads_none():
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        m = VL2V(TinyStudent(bn=True), {}, make_ctx(total_steps=4), {"classes": t(TC)})
        ddp = DDP(m, find_unused_parameters=True)
        for step, (frozen, trained) in enumerate([("backbone", "proj")] * 2 + [("proj", "backbone")] * 2):
            m.zero_grad(set_to_none=True)
            loss, _ = ddp(make_batch(), step)
            loss.backward()
            assert grads_none(getattr(m.student, frozen)) and grads_some(getattr(m.student, trained)), step
            assert grads_none(m.student.classifier)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------- Li
def li_reference(terms, tau=0.07, topk=256, filt=False, tc=TC):
    C = len(tc)
    out = {}
    cs = [[cos(s, tc[c]) for c in range(C)] for s in S]
    if "cls" in terms:
        out["cls"] = mean([ce([v / tau for v in row], y) for row, y in zip(cs, Y)])
    if "vlalign" in terms:
        vals, n = [], 0
        for i, v in enumerate(V):
            ct = [cos(v, tc[c]) for c in range(C)]
            if filt and max(range(C), key=lambda c: ct[c]) != Y[i]:
                continue
            n += 1
            ids = sorted(range(C), key=lambda c: -ct[c])[:min(topk, C)]
            vals.append(kl(softmax([ct[c] / tau for c in ids]), softmax([cs[i][c] / tau for c in ids])))
        out["vlalign"] = mean(vals) if vals else 0.0
        out["aligned"] = n
    if "mse" in terms:
        out["mse"] = mean([sum((a - b) ** 2 for a, b in zip(unit(s), v)) for s, v in zip(S, V)])
    if "imcst" in terms:
        sim = [[cos(s, v) / tau for v in V] for s in S]
        rows = mean([ce(sim[i], i) for i in range(4)])
        cols = mean([ce([sim[j][i] for j in range(4)], i) for i in range(4)])
        out["imcst"] = 0.5 * (rows + cols)
    return sum(out[k] for k in terms), out


@pytest.mark.parametrize("loss_type", ["cls+vlalign+mse+imcst", "cls", "vlalign", "mse+imcst", "imcst + cls"])
@pytest.mark.parametrize("filt", [False, True])
def test_li_loss_values(loss_type, filt):
    hp = {"loss_type": loss_type, "topk": 2, "filter_misclassified": filt}
    m = Li(TinyStudent(), hp, make_ctx(), {"classes": t(TC)})
    loss, terms = m(make_batch(), step=0)
    names = parse_loss_type(loss_type)
    ref, ref_terms = li_reference(names, topk=2, filt=filt)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)
    for k, v in ref_terms.items():
        assert float(terms[k]) == pytest.approx(v, rel=1e-4, abs=1e-4), k
    assert torch.allclose(m.predict(t(X)), t([[cos(s, TC[c]) / 0.07 for c in range(3)] for s in S]), atol=1e-3)


def test_li_filter_drops_teacher_mistakes_from_vlalign():
    # the teacher's zero-shot predictions on V: sample 3 (y=1) is misclassified
    preds = [max(range(3), key=lambda c: cos(v, TC[c])) for v in V]
    wrong = [i for i, (p, y) in enumerate(zip(preds, Y)) if p != y]
    assert wrong and len(wrong) < 4
    m = Li(TinyStudent(), {"loss_type": "vlalign", "topk": 3}, make_ctx(), {"classes": t(TC)})
    _, terms = m(make_batch(), 0)
    assert float(terms["aligned"]) == 4 - len(wrong)
    # every sample misclassified -> a zero term that still backpropagates
    _, terms = m(make_batch(y=[(p + 1) % 3 for p in preds]), 0)
    assert float(terms["vlalign"]) == 0.0 and float(terms["aligned"]) == 0


def test_li_mse_by_hand():
    # ||[1,0,0,0] - [.6,.8,0,0]||^2 = .16 + .64 = .8
    stu = TinyStudent(wp=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bp=None)
    m = Li(stu, {"loss_type": "mse"}, make_ctx(), {"classes": t(TC)})
    loss, _ = m(make_batch(x=[[2, 0, 0, 0]], y=[0], v=[[0.6, 0.8, 0, 0]]), 0)
    assert loss.item() == pytest.approx(0.8, abs=1e-6)


def test_li_topk_picks_the_teachers_nearest_classes():
    tc5 = [unit(r) for r in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0])]
    v = [unit([0.1, 0.9, 0.05, 0.3]), unit([0.2, 0.1, 0.8, 0.6])]
    cos_t = [[cos(vi, tcj) for tcj in tc5] for vi in v]
    want = [sorted(range(5), key=lambda c: -row[c])[:2] for row in cos_t]
    assert want == [[1, 4], [2, 3]]
    m = Li(TinyStudent(), {"topk": 2}, make_ctx(num_classes=5), {"classes": t(tc5)})
    ids = m.topk_classes(t(cos_t))
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in want]
    assert m.topk_classes(t(cos_t)).shape == (2, 2)
    m = Li(TinyStudent(), {"topk": 256}, make_ctx(num_classes=5), {"classes": t(tc5)})
    assert m.topk_classes(t(cos_t)).shape == (2, 5)                     # clipped to C
    # the vlalign value is the KL over exactly those classes
    x2 = [[0.3, 0.1, 0.5, 0.2], [0.9, -0.2, 0.1, 0.4]]
    m = Li(TinyStudent(), {"topk": 2, "loss_type": "vlalign", "filter_misclassified": False},
           make_ctx(num_classes=5), {"classes": t(tc5)})
    _, terms = m(make_batch(x=x2, y=[1, 2], v=v), 0)
    s2 = [linear(WP, BP, x) for x in x2]
    ref = mean([kl(softmax([cos_t[i][c] / 0.07 for c in want[i]]), softmax([cos(s2[i], tc5[c]) / 0.07 for c in want[i]]))
                for i in range(2)])
    assert float(terms["vlalign"]) == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_li_loss_type_syntax():
    assert parse_loss_type("cls+vlalign+mse+imcst") == ("cls", "vlalign", "mse", "imcst")
    assert parse_loss_type(" mse + cls ") == ("cls", "mse")
    assert parse_loss_type(["imcst", "cls"]) == ("cls", "imcst")
    for bad in ("", "cls+kd", "+", []):
        with pytest.raises(ValueError):
            parse_loss_type(bad)
    for choice in Li.search_space["loss_type"]["choice"]:
        parse_loss_type(choice)


def test_li_descriptions_prompts():
    ctx = make_ctx(descriptions={"dog": "a furry pet with four legs", "guitar": "a stringed instrument",
                                 "house": "a building with a roof"})
    sets = Li.prompt_sets({"name": "li", "descriptions": True}, ctx)
    # the official code's wording (main_experiments.py): f"a photo of {c} . {description}"
    assert sets["described"] == [["a photo of dog . a furry pet with four legs"],
                                 ["a photo of guitar . a stringed instrument"],
                                 ["a photo of house . a building with a roof"]]
    assert sets["classes"] == ctx.class_prompts
    m = Li(TinyStudent(), {"descriptions": True}, ctx, {"classes": t(TC2), "described": t(TC)})
    assert torch.allclose(m.class_text(), t(TC))
    assert "described" not in Li.prompt_sets({}, ctx)
    with pytest.raises(ValueError, match="no class descriptions"):
        Li.prompt_sets({"descriptions": True}, make_ctx())
    with pytest.raises(ValueError, match="house"):
        Li.prompt_sets({"descriptions": True}, make_ctx(descriptions={"dog": "x", "guitar": "y", "house": ""}))


# ------------------------------------------------------------------------------------- autocast, real student
@pytest.mark.parametrize("name", ["rise", "scmd", "vl2v", "li"])
def test_loss_heads_run_in_float32_under_bf16_autocast(name):
    """The loop runs forward under bf16 autocast on GPUs: the loss heads must still be float32 (same values)."""
    cls = get_method(name)
    ctx = make_ctx(total_steps=10)
    text = {"classes": t(TC), "rise_classes": t(TC), "rise_anchors": t(anchors_hand())}
    torch.manual_seed(0)
    m = cls(TinyStudent(), {}, ctx, {k: v for k, v in text.items() if k in cls.prompt_sets({}, ctx)})
    batch = make_batch(X10, Y10, V10)
    for step in (0, 9):
        ref, ref_terms = m(batch, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, terms = m(batch, step)
        assert loss.dtype == torch.float32
        # only the student's own Linear layers ran in bf16 (~3 significant digits)
        assert loss.item() == pytest.approx(ref.item(), rel=0.02, abs=0.02)
        assert all(not v.requires_grad for v in terms.values())


@pytest.mark.parametrize("name", ["rise", "scmd", "vl2v", "li"])
def test_with_the_real_student(name):
    from distill.models.students import build_student

    torch.manual_seed(0)
    ctx = make_ctx(total_steps=4)
    cls = get_method(name)
    sets = cls.prompt_sets({"name": name}, ctx)
    text = {k: torch.nn.functional.normalize(torch.randn(len(rows), 8), dim=-1) for k, rows in sets.items()}
    m = cls(build_student("resnet18", "none", embed_dim=8, num_classes=3), {}, ctx, text)
    m.train()
    batch = {"x": torch.randn(6, 3, 32, 32), "y": torch.tensor([0, 1, 2, 0, 1, 2]),
             "domain": torch.tensor([0, 0, 1, 1, 2, 2]), "idx": torch.arange(6),
             "image_emb": torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)}
    for step in (0, 3):
        loss, terms = m(batch, step)
        assert torch.isfinite(loss) and all(not v.requires_grad for v in terms.values())
        m.zero_grad(set_to_none=True)
        loss.backward()
    m.eval()
    with torch.no_grad():
        assert m.predict(batch["x"]).shape == (6, 3)


# ------------------------------------------------------------------------------------------------------ ERM and KD
def test_erm_is_cross_entropy():
    m = get_method("erm")(TinyStudent(), {}, make_ctx(), {"classes": t(TC)})
    loss, terms = m(make_batch(), 0)
    assert loss.item() == pytest.approx(mean([ce(z, y) for z, y in zip(Z, Y)]), abs=TOL)


def test_kd_loss_by_hand():
    # one sample, two classes, t_c = e1, e2 and v = e1: z_T = 100*cos = [100, 0]; at T = 100, p_T = softmax([1, 0])
    # = [e/(1+e), 1/(1+e)] = [0.7310586, 0.2689414]; z_S = [0, 0] -> p_S = [.5, .5];
    # KL = .7310586 ln(1.4621172) + .2689414 ln(0.5378828) = 0.2777183 - 0.1667749 = 0.1109434; loss = T^2 KL
    student = TinyStudent(wp=[[1.0, 0.0]], bp=None, wc=[[0.0, 0.0], [0.0, 0.0]], bc=None)
    kd = get_method("kd")(student, {"temperature": 100.0, "kd_weight": 1.0}, make_ctx(num_classes=2),
                          {"classes": t([[1.0, 0.0], [0.0, 1.0]])})
    batch = {"x": t([[1.0, 0.0]]), "y": torch.tensor([0]), "image_emb": t([[1.0, 0.0]])}
    loss, terms = kd(batch, 0)
    assert loss.item() == pytest.approx(1e4 * 0.1109434, rel=1e-5)
    # and the mixed loss on the hand-made batch: (1-a) CE + a T^2 KL(softmax(100 cos(v,t)/T) || softmax(z_S/T))
    a, temp = 0.3, 2.0
    kd = get_method("kd")(TinyStudent(), {"temperature": temp, "kd_weight": a}, make_ctx(), {"classes": t(TC)})
    loss, terms = kd(make_batch(), 0)
    kls = [kl(softmax([100 * cos(v, tc) / temp for tc in TC]), softmax([z_i / temp for z_i in z])) for v, z in zip(V, Z)]
    expected = (1 - a) * mean([ce(z, y) for z, y in zip(Z, Y)]) + a * temp ** 2 * mean(kls)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert terms["kd"].item() == pytest.approx(temp ** 2 * mean(kls), abs=1e-4)


@pytest.mark.parametrize("name, extra", [
    ("kd", {"kd_weight": 1.0}),
    ("rise", {"text_classifier": False, "templates": "config", "loss_type": "abs"}),
    ("scmd", {}),
])
def test_teacher_logit_scale(name, extra):
    """z_T = scale * cos(v_T, t_c) with the scale given (the loop resolves `auto` to the teacher's own); an
    unresolved `auto` is refused with a clear message."""
    temp = 2.0
    for scale in (100.0, 13.7):
        hp = {"temperature": temp, **extra}
        if scale != 100.0:
            hp["teacher_logit_scale"] = scale
        m = get_method(name)(TinyStudent(), hp, make_ctx(total_steps=4), {"classes": t(TC)})
        _, terms = m(make_batch(), 10)  # SCMD: past its selection window, the full batch
        kls = [kl(softmax([scale * cos(v, tc) / temp for tc in TC]), softmax([z_i / temp for z_i in z]))
               for v, z in zip(V, Z)]
        assert terms["kd"].item() == pytest.approx(temp ** 2 * mean(kls), abs=1e-4), (name, scale)
    m = get_method(name)(TinyStudent(), {"temperature": temp, **extra, "teacher_logit_scale": "auto"},
                         make_ctx(total_steps=4), {"classes": t(TC)})
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        m(make_batch(), 10)


@pytest.mark.real_defaults
def test_teacher_logit_scale_must_be_auto_or_positive(tmp_path):
    from distill.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="method.teacher_logit_scale: expected 'auto' .* or a number > 0, got 0"):
        build_config({"method": {"name": "kd", "teacher_logit_scale": 0}})
    with pytest.raises(ConfigError, match="method.teacher_logit_scale: expected 'auto' .* got nan"):
        build_config({"method": {"name": "rise", "teacher_logit_scale": float("nan")}})
    with pytest.raises(ConfigError, match="got 'big'"):
        build_config({"method": {"name": "scmd", "teacher_logit_scale": "big"}})
    assert build_config({"method": {"name": "kd"}})["method"]["teacher_logit_scale"] == "auto"
    with pytest.raises(ConfigError, match="method.temperature: must be > 0"):  # T = 0 divides by zero
        build_config({"method": {"name": "scmd", "temperature": 0.0}})
    assert build_config({"method": {"name": "scmd", "teacher_logit_scale": 13.7}})["method"]["teacher_logit_scale"] == 13.7
