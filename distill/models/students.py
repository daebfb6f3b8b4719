"""Students: a torchvision backbone, a projection head to the teacher's embedding width, and a classifier.

``forward(x)`` returns ``{"features", "embed", "logits"}`` so that a method can use any of them.
"""
from __future__ import annotations

import os

import torch
from torch import nn


def _tv_models():
    """torchvision.models, imported when a torchvision backbone is built (the import costs ~4 s of CPU: a trial of
    small_cnn does not pay it)."""
    import torchvision.models

    return torchvision.models


def _resnet(name):
    def build(weights):
        model = getattr(_tv_models(), name)(weights=weights)
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    return build


def _classifier_backbone(name):
    """torchvision models whose head is `classifier` (MobileNet, EfficientNet, ...): keep the pooled features."""
    def build(weights):
        model = getattr(_tv_models(), name)(weights=weights)
        model.classifier = nn.Identity()
        with torch.no_grad():
            was_training = model.training
            model.eval()
            dim = model(torch.zeros(1, 3, 64, 64)).shape[1]
            model.train(was_training)
        return model, dim
    return build


class SmallCNN(nn.Module):
    """A small CNN for small images (32-64 px), in the spirit of DomainBed's MNIST_CNN: three blocks of 3x3 conv,
    BatchNorm, ReLU and 2x2 max-pool (width, 2*width, 4*width channels), then average pooling to a 4x4 grid, flattened
    (16 * 4 * width features, whatever the input size: the coarse layout is kept). Trains from scratch in a minute on
    a CPU (the built-in world, tests, laptops); it has no ImageNet weights, only the built-in ones
    (``pretrained: builtin``)."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out_dim = 16 * chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _small_cnn(weights):
    model = SmallCNN()
    return model, model.out_dim


# name -> (builder, torchvision weights enum name for `pretrained: imagenet`; None: the backbone has no weights)
BACKBONES = {
    "small_cnn": (_small_cnn, None),
    "resnet18": (_resnet("resnet18"), "ResNet18_Weights"),
    "resnet34": (_resnet("resnet34"), "ResNet34_Weights"),
    "resnet50": (_resnet("resnet50"), "ResNet50_Weights"),
    "mobilenet_v3_small": (_classifier_backbone("mobilenet_v3_small"), "MobileNet_V3_Small_Weights"),
    "mobilenet_v3_large": (_classifier_backbone("mobilenet_v3_large"), "MobileNet_V3_Large_Weights"),
    "efficientnet_b0": (_classifier_backbone("efficientnet_b0"), "EfficientNet_B0_Weights"),
}


class PretrainedWeightsUnavailable(RuntimeError):
    pass


def _weights(backbone: str, pretrained: str):
    if pretrained != "imagenet":
        return None
    enum = getattr(_tv_models(), BACKBONES[backbone][1])
    return enum.DEFAULT  # IMAGENET1K_V2 for ResNet-50, as SCMD used


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """DomainBed's frozen BatchNorm (networks.py, ResNet.freeze_bn; SCMD's too): the layer always runs in eval mode,
    so its running statistics stay those it was built with, while its affine weight and bias keep training."""

    def train(self, mode: bool = True):
        return super().train(False)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen.eval())
        else:
            freeze_batchnorm(child)
    return module


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, embed_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "embed": self.proj(features), "logits": self.classifier(features)}


PRETRAINED = ("none", "imagenet", "builtin")


def load_backbone_weights(net: nn.Module, weights_path: str | os.PathLike, backbone: str) -> None:
    """Load a pretrained backbone state_dict (``distill.models.pretrain.ensure_student``) into ``net``."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not hold {backbone!r} backbone weights (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def build_student(backbone: str = "resnet18", pretrained: str = "none", freeze_bn: bool = False,
                  embed_dim: int = 512, num_classes: int = 7, weights_path: str | os.PathLike | None = None) -> Student:
    """A student. ``pretrained``: ``none`` (random init), ``imagenet`` (torchvision's weights) or ``builtin``
    (weights pretrained on the built-in photo corpus: ``weights_path``, which the driver resolves with
    ``distill.models.pretrain.ensure_student``; the workers never pretrain)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown student backbone {backbone!r}; known: {sorted(BACKBONES)}")
    if pretrained not in PRETRAINED:
        raise ValueError(f"student.pretrained must be one of {PRETRAINED}, got {pretrained!r}")
    if pretrained == "imagenet" and BACKBONES[backbone][1] is None:
        raise ValueError(f"student backbone {backbone!r} has no pretrained weights: set student.pretrained: none")
    if pretrained == "builtin" and weights_path is None:
        raise ValueError("student.pretrained: builtin needs the pretrained weights file (weights_path), resolved by "
                         "the driver: distill.models.pretrain.ensure_student(storage, backbone, image_size)")
    try:
        net, dim = BACKBONES[backbone][0](_weights(backbone, pretrained))
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights for student backbone {backbone!r} ({exc.__class__.__name__}: {exc}). "
            f"On a machine with internet run `python -c \"import torchvision; torchvision.models.{backbone}"
            f"(weights='DEFAULT')\"` to fill the torch hub cache ($TORCH_HOME, default ~/.cache/torch), copy that "
            f"cache here, or set student.pretrained: none.") from exc
    if pretrained == "builtin":
        load_backbone_weights(net, weights_path, backbone)
    if freeze_bn:
        freeze_batchnorm(net)
    return Student(net, dim, embed_dim, num_classes)
