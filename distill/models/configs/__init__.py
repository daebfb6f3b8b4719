"""The built-in teacher architectures: open_clip model configs (``*.json``, registered with open_clip by
``distill.models.teachers``) and the image tower they name (``timm_model_name``), registered with timm when this
package is imported (``distill.models.fit`` imports it; so should ``distill.models.teachers``).

``distill_cnn``: a plain CNN for 32-px images, the image tower of ``distill-tiny-rn`` (whose name is kept from its
first version, an open_clip ModifiedResNet): three stages of two 3x3 conv-BatchNorm-ReLU (width w, 2w, 4w at 32,
16 and 8 px) with 2x2 max pooling after each, a last 3x3 conv-BatchNorm-ReLU (8w channels at 4 px) and global max
pooling (is there a tip, a corner, a curve anywhere?). Per CPU second it learns the built-in world's shapes far
faster than the ModifiedResNet, whose stem halves a 32-px input twice before its first stage (supervised probes on
5 shapes x 4 styles, 400 steps of 128 images: 95% against 50-63%; a ModifiedResNet CLIP fitted 2,000 steps on the
teacher corpus: ~50% zero-shot). A residual variant of this layout was 25% slower per step and, fitted without
flips, reached 84-94% zero-shot where this one reaches 94-99%.
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from timm.models import register_model
except ImportError:  # pragma: no cover (open_clip depends on timm)
    register_model = None


class DistillCNN(nn.Module):
    """The ``distill_cnn`` trunk, with timm's classifier interface (open_clip's ``TimmModel`` resets it to no
    classifier and adds its own projection)."""

    def __init__(self, width: int = 16, num_classes: int = 0, global_pool: str = "max", in_chans: int = 3, **_):
        super().__init__()
        layers, c_in = [], in_chans
        for c in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(c_in, 8 * width, 3, padding=1, bias=False), nn.BatchNorm2d(8 * width),
                   nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.num_features = 8 * width
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": num_classes}
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int = 0, global_pool: str | None = None):
        if global_pool is not None:
            if global_pool not in ("max", "avg", ""):
                raise ValueError(f"distill_cnn: global_pool must be max, avg or '', got {global_pool!r}")
            self.global_pool = global_pool or "max"
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax((2, 3)) if self.global_pool == "max" else x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _build(width: int, pretrained: bool = False, **kwargs) -> DistillCNN:
    if pretrained:
        raise ValueError("distill_cnn has no pretrained weights in timm (the built-in teacher is fitted: "
                         "python -m distill.teacher fit)")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return DistillCNN(width=width, **kwargs)


if register_model is not None:
    from timm.models import is_model

    if not is_model("distill_cnn"):
        @register_model
        def distill_cnn(pretrained: bool = False, **kwargs) -> DistillCNN:
            """distill's CNN image tower for 32-px images, width 16 (see distill.models.configs)."""
            return _build(16, pretrained, **kwargs)
