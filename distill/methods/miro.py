"""MIRO: Mutual-Information Regularization with Oracle.

Cha, Lee, Park, Chun. "Domain Generalization by Mutual-Information Regularization with Pre-trained Models".
ECCV 2022 (arXiv:2203.10789). Official code: github.com/khanrc/miro (domainbed/algorithms/miro.py,
domainbed/networks/ur_networks.py, config.yaml).

The student's features are pulled towards an oracle's through a variational lower bound of their mutual
information. With f_l the student's l-th feature map, f0_l the oracle's, a mean encoder mu_l and a variance encoder
Sigma_l (a learned diagonal, ``softplus(b) + 1e-5``, initialised at 0.1, shared by every sample and position):

    L = CE(classifier(f), y) + ld * sum_l 0.5 * mean_{batch, channel, position}
                                       [ (mu_l(f_l) - f0_l)^2 / Sigma_l + log Sigma_l ]

as the official ``update``: ``reg_loss += vlb.mean() / 2.`` for each layer (a SUM over the layers, each layer's
term the mean over all its elements, halved), ``loss += reg_loss * ld``.

Two oracles (hyperparameter ``oracle``):

- ``init`` (MIRO): a frozen deep copy of the student's backbone as built (its ImageNet or built-in weights), never
  trained (``requires_grad`` False, always in eval mode, run under ``no_grad``, not in ``param_groups``). The
  regularised features are intermediate ones, caught by forward hooks on both networks: for a torchvision ResNet
  the outputs of ``maxpool`` (the stem; ``feat_layers: stem_block``, the official default) and of ``layer1`` ..
  ``layer4``; for ``SmallCNN`` the outputs of its three conv blocks (after each MaxPool; it has no stem, so both
  ``feat_layers`` give those three); for any other backbone its own output (the pooled features), one layer. A
  backbone may name its own layers with an attribute ``miro_feat_layers`` (names of its submodules, ``""`` for
  itself), probed at construction with a dummy input of shape ``miro_input_shape`` (default 3x64x64). As the
  official code, the mean encoder is the identity (no parameters) and the variance is per channel
  (shape [1, C, 1, 1] of a [N, C, H, W] map; [1, D] of a [N, D] feature).
- ``teacher`` (MIRO's CLIP experiments, with the CLIP teacher as the oracle): the oracle feature is the teacher's
  image embedding of the same view (``batch["image_emb"]``, raw as given), the regularised feature is the student's
  final pooled feature mapped by a learned mean encoder Linear(feature_dim -> embed_dim) (the projection the widths
  need), with a per-dimension variance encoder: one layer.

The encoders are one parameter group marked ``lr_mult`` (official: ``lr * lr_mult``, 10). The loop's
``make_optimizer`` passes groups to torch as they are: it must turn ``lr_mult`` into ``lr = train.lr * lr_mult``
(otherwise the encoders train at the base lr; torch keeps the extra key in the group and ignores it).

``needs_image_embeddings`` is a class attribute that the loop reads before building the method: ``MIRO`` (name
``miro``) has it False and accepts only ``oracle: init``; ``MIROTeacher`` (name ``miro_teacher``) has it True and
uses ``oracle: teacher``. ``MIRO.wants_image_embeddings(hp)`` gives the per-configuration answer for a loop that asks.
"""
from __future__ import annotations

import copy
import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from ..models.students import SmallCNN
from .base import Method, MethodContext, full_precision

ORACLES = ("init", "teacher")
FEAT_LAYERS = ("stem_block", "block")
VAR_INIT = 0.1     # the variance encoder's initial variance (official VarianceEncoder init)
VAR_EPS = 1e-5     # added to softplus(b) (official eps)
RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")        # official BLOCKNAMES["resnet"]["stem"]; its last is hooked
RESNET_BLOCKS = ("layer1", "layer2", "layer3", "layer4")
PROBE_SHAPE = (3, 64, 64)


def feature_layer_names(backbone: nn.Module, feat_layers: str = "stem_block") -> list[str]:
    """Names (in ``backbone.named_modules()``) of the modules whose outputs MIRO regularises, in forward order."""
    own = getattr(backbone, "miro_feat_layers", None)
    if own is not None:
        return list(own)
    if feat_layers not in FEAT_LAYERS:
        raise ValueError(f"feat_layers must be one of {FEAT_LAYERS}, got {feat_layers!r}")
    if all(isinstance(getattr(backbone, n, None), nn.Module) for n in RESNET_STEM + RESNET_BLOCKS):
        stem = [RESNET_STEM[-1]] if feat_layers == "stem_block" else []
        return stem + list(RESNET_BLOCKS)
    if isinstance(backbone, SmallCNN):
        return [f"features.{i}" for i, m in enumerate(backbone.features) if isinstance(m, nn.MaxPool2d)]
    return [""]


class _Tap:
    """One forward hook: writes its module's output into slot ``i`` of its ``_Taps`` while armed. A plain object, so
    that a deep copy of the network (the averager's) carries hooks writing to its own copy of the taps."""

    def __init__(self, taps: "_Taps", i: int):
        self.taps, self.i = taps, i

    def __call__(self, module, inputs, output):
        if self.taps.armed:
            self.taps.outputs[self.i] = output


class _Taps:
    """Forward hooks keeping the outputs of named submodules, only while armed (never during evaluation)."""

    def __init__(self, module: nn.Module, names: list[str]):
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"miro: the backbone has no modules named {missing}")
        self.names = list(names)
        self.armed = False
        self.outputs: list = [None] * len(names)
        for i, n in enumerate(names):
            modules[n].register_forward_hook(_Tap(self, i))

    def run(self, fn):
        """``fn()`` with the hooks armed; returns (fn's result, the outputs caught, in ``names`` order)."""
        self.outputs = [None] * len(self.names)
        self.armed = True
        try:
            result = fn()
        finally:
            self.armed = False
        outs, self.outputs = self.outputs, [None] * len(self.names)
        if any(o is None for o in outs):
            raise RuntimeError(f"miro: the forward did not run every feature layer {self.names}")
        return result, outs


class FrozenOracle(nn.Module):
    """The pre-trained oracle: a deep copy, never trained, always in eval mode."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        return self.net(x)


class VarianceEncoder(nn.Module):
    """Bias-only diagonal variance softplus(b) + eps, b initialised so that the variance starts at ``init``; per
    channel of a [N, C, H, W] map, per dimension of a [N, D] feature (official: [1, 1, C] for CLIP-ViT's [L, N, C])."""

    def __init__(self, shape, init: float = VAR_INIT, eps: float = VAR_EPS):
        super().__init__()
        shape = tuple(shape)
        if len(shape) == 4:
            b_shape = (1, shape[1], 1, 1)
        elif len(shape) == 3:
            b_shape = (1, 1, shape[2])
        elif len(shape) == 2:
            b_shape = (1, shape[1])
        else:
            raise ValueError(f"miro: no variance encoder for a feature of shape {shape}")
        self.eps = eps
        self.b = nn.Parameter(torch.full(b_shape, math.log(math.expm1(init - eps))))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.b) + self.eps


class MIRO(Method):
    name = "miro"
    hparams = {
        "ld": 0.1,                   # lambda, the weight of the regulariser (official config.yaml default)
        "lr_mult": 10.0,             # the encoders' learning rate is lr * lr_mult (official config.yaml)
        "feat_layers": "stem_block",  # ResNet layers: stem_block (maxpool + layer1..4, official) | block (layer1..4)
        "oracle": "init",            # init: frozen copy of the initial backbone (MIRO) | teacher: the CLIP image embedding
    }
    # The official code fixes lr_mult and feat_layers; the paper tunes lambda in {1.0, 0.1, 0.01, 0.001} (README's
    # chosen values: 0.01 PACS/VLCS, 0.1 OfficeHome/TerraIncognita/DomainNet). lr, dropout, wd are the loop's.
    search_space = {
        "ld": {"choice": [1.0, 0.1, 0.01, 0.001]},
    }
    needs_image_embeddings = False

    def __init__(self, student: nn.Module, hp: dict, ctx: MethodContext, text: dict[str, torch.Tensor]):
        super().__init__(student, hp, ctx, text)
        self.teacher_oracle = self.hp["oracle"] == "teacher"
        if self.teacher_oracle:
            self.oracle = None
            self.layer_names = ["features"]
            self.mean_encoders = nn.ModuleList([nn.Linear(student.feature_dim, ctx.embed_dim)])
            self.var_encoders = nn.ModuleList([VarianceEncoder((1, ctx.embed_dim))])
            return
        backbone = student.backbone
        self.layer_names = feature_layer_names(backbone, self.hp["feat_layers"])
        self.oracle = FrozenOracle(copy.deepcopy(backbone))   # copied before the student's hooks exist
        self._oracle_taps = _Taps(self.oracle.net, self.layer_names)
        self._student_taps = _Taps(backbone, self.layer_names)
        shapes = self._probe_shapes(getattr(backbone, "miro_input_shape", PROBE_SHAPE))
        self.mean_encoders = nn.ModuleList([nn.Identity() for _ in shapes])   # official MeanEncoder: identity
        self.var_encoders = nn.ModuleList([VarianceEncoder(s) for s in shapes])

    def _probe_shapes(self, input_shape) -> list[torch.Size]:
        """The feature shapes, from a dummy forward of the oracle (official get_shapes; zeros: no RNG draw)."""
        try:
            device = next(self.oracle.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        with torch.no_grad():
            _, feats = self._oracle_taps.run(lambda: self.oracle(torch.zeros(1, *input_shape, device=device)))
        return [f.shape for f in feats]

    @classmethod
    def wants_image_embeddings(cls, hp: dict) -> bool:
        """Whether this configuration reads ``batch["image_emb"]`` (the teacher oracle)."""
        return {**cls.hparams, **(hp or {})}.get("oracle") == "teacher"

    @classmethod
    def hparam_problems(cls, hp: dict) -> list[str]:
        hp = {**cls.hparams, **(hp or {})}
        out = []
        ld = hp.get("ld")
        if not isinstance(ld, Real) or isinstance(ld, bool) or not math.isfinite(ld) or ld < 0:
            out.append(f"ld: expected a finite number >= 0, got {ld!r}")
        lr_mult = hp.get("lr_mult")
        if not isinstance(lr_mult, Real) or isinstance(lr_mult, bool) or not math.isfinite(lr_mult) or lr_mult <= 0:
            out.append(f"lr_mult: expected a finite number > 0, got {lr_mult!r}")
        if hp.get("feat_layers") not in FEAT_LAYERS:
            out.append(f"feat_layers: expected one of {list(FEAT_LAYERS)}, got {hp.get('feat_layers')!r}")
        oracle = hp.get("oracle")
        if oracle not in ORACLES:
            out.append(f"oracle: expected one of {list(ORACLES)}, got {oracle!r}")
        elif (oracle == "teacher") != bool(cls.needs_image_embeddings):
            other = "miro_teacher" if oracle == "teacher" else "miro"
            out.append(f"oracle: {oracle!r} is method {other!r} (method {cls.name!r} is built "
                       f"{'with' if cls.needs_image_embeddings else 'without'} the teacher's image embeddings)")
        return out

    def param_groups(self) -> list[dict]:
        """The student's trainable parameters at the loop's lr; the encoders marked ``lr_mult`` (official:
        ``lr * lr_mult``); the frozen oracle nowhere."""
        student = [p for p in self.student.parameters() if p.requires_grad]
        encoders = [p for m in (self.mean_encoders, self.var_encoders) for p in m.parameters() if p.requires_grad]
        return [{"params": student}, {"params": encoders, "lr_mult": float(self.hp["lr_mult"])}]

    def forward(self, batch, step):
        x = batch["x"]
        if self.teacher_oracle:
            if "image_emb" not in batch:
                raise KeyError("miro (oracle: teacher) needs batch['image_emb']: the loop gives it to methods with "
                               "needs_image_embeddings (method miro_teacher)")
            out = self.student(x)
            feats, pre_feats = [out["features"]], [batch["image_emb"]]
        else:
            out, feats = self._student_taps.run(lambda: self.student(x))
            with torch.no_grad():
                _, pre_feats = self._oracle_taps.run(lambda: self.oracle(x))
        logits = out["logits"]
        with full_precision(logits):
            ce = F.cross_entropy(logits.float(), batch["y"])
            reg = logits.new_zeros((), dtype=torch.float32)
            for f, pre_f, mean_enc, var_enc in zip(feats, pre_feats, self.mean_encoders, self.var_encoders,
                                                   strict=True):
                mean = mean_enc(f.float())
                var = var_enc()
                vlb = (mean - pre_f.detach().float()).pow(2).div(var) + var.log()
                reg = reg + vlb.mean() / 2.0
            loss = ce + float(self.hp["ld"]) * reg
        return loss, {"ce": ce.detach(), "reg": reg.detach()}


class MIROTeacher(MIRO):
    """MIRO with the CLIP teacher's image embedding as the oracle (``oracle: teacher``)."""

    name = "miro_teacher"
    hparams = {**MIRO.hparams, "oracle": "teacher"}   # the teacher oracle; ld and lr_mult as MIRO's
    search_space = dict(MIRO.search_space)
    needs_image_embeddings = True
