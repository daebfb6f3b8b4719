"""Students: real torchvision backbones at tiny input sizes."""
import pytest
import torch

from distill.models.students import BACKBONES, FrozenBatchNorm2d, PretrainedWeightsUnavailable, build_student


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "small_cnn"])
def test_outputs(name):
    s = build_student(name, embed_dim=64, num_classes=5)
    out = s(torch.randn(3, 3, 32, 32))
    assert out["features"].shape == (3, s.feature_dim)
    assert out["embed"].shape == (3, 64) and out["logits"].shape == (3, 5)


def test_frozen_bn_freezes_statistics_and_keeps_affine_parameters_trainable():
    """DomainBed's freeze_bn: BatchNorm always in eval mode (running statistics fixed), weight and bias trained."""
    s = build_student("resnet18", freeze_bn=True, embed_dim=8, num_classes=3)
    frozen = [m for m in s.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(type(m) is torch.nn.BatchNorm2d for m in s.modules())
    bn = frozen[0]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in frozen}
    s.train()
    assert not any(m.training for m in frozen)
    out = s(torch.randn(4, 3, 32, 32))
    out["logits"].sum().backward()
    for m in frozen:   # statistics untouched in train mode, affine parameters get gradients
        assert torch.equal(m.running_mean, before[id(m)][0]) and torch.equal(m.running_var, before[id(m)][1])
        assert m.weight.requires_grad and m.weight.grad is not None and m.bias.grad is not None
    # the layer is (x - running_mean) / sqrt(running_var + eps) * weight + bias, computed here by hand
    x = torch.randn(2, bn.num_features, 3, 3)
    ref = ((x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
           * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    assert torch.allclose(bn(x), ref, atol=1e-5)


def test_imagenet_weights_load_or_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the download is attempted
    try:
        student = build_student("resnet18", pretrained="imagenet")
    except PretrainedWeightsUnavailable as exc:  # offline (CI): the message says what to do
        assert "student.pretrained: none" in str(exc) and "torch hub cache" in str(exc)
    else:  # online: real ImageNet weights, not a random init
        assert student.backbone.conv1.weight.std().item() > 0.06  # kaiming init gives ~0.025


def test_registry_has_the_promised_backbones():
    assert {"resnet18", "resnet50", "mobilenet_v3_small"} <= set(BACKBONES)


def test_small_cnn_keeps_a_4x4_layout_at_any_input_size():
    s = build_student("small_cnn", embed_dim=8, num_classes=3)
    assert s.feature_dim == 16 * 64  # width 16 -> 64 channels on a 4x4 grid
    convs = [m for m in s.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]
    for size in (32, 64):
        assert s(torch.randn(2, 3, size, size))["features"].shape == (2, 1024)
    # the layout is kept: the same content moved to another corner gives different features
    s.eval()
    x = torch.zeros(1, 3, 32, 32)
    x[..., 2:10, 2:10] = 1.0
    assert not torch.allclose(s(x)["features"], s(x.flip(-1).flip(-2))["features"])


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_student("small_cnn", pretrained="imagenet")
