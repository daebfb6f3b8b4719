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


def test_frozen_bn_matches_eval_batchnorm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5)
    expected = bn.eval()(x)
    frozen = FrozenBatchNorm2d(bn)
    assert torch.allclose(frozen(x), expected, atol=1e-6)
    s = build_student("resnet18", freeze_bn=True, embed_dim=8, num_classes=3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in s.modules())
    s.train()(torch.randn(2, 3, 32, 32))  # train mode does not touch frozen statistics
    assert all(not p.requires_grad for m in s.modules() if isinstance(m, FrozenBatchNorm2d)
               for p in m.parameters())


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
