"""distill.data.augment: batched DomainBed augmentation, as explicit per-image parameters (sample_params + render)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from distill.data import augment as A


def _batch(n=6, size=24, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _row(box, flip=0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, order=(0, 1, 2, 3), gray=0):
    """One parameter row, built by column name."""
    values = dict(zip(("x1", "y1", "x2", "y2"), box), flip=flip, brightness=brightness, contrast=contrast,
                  saturation=saturation, hue=hue, gray=gray, **{f"op{k}": op for k, op in enumerate(order)})
    return torch.tensor([float(values[name]) for name in A.PARAM_NAMES])


def _col(params, name):
    return params[:, A.PARAM_NAMES.index(name)]


# ---- the transforms (moved from test_data.py) ------------------------------------------------------------------------

def test_augment_shapes_range_determinism():
    x = _batch()
    out = A.augment(x, 16, torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, A.augment(x, 16, torch.Generator().manual_seed(1)))
    assert not torch.allclose(out, A.augment(x, 16, torch.Generator().manual_seed(2)))
    assert A.augment(x, 40, torch.Generator().manual_seed(1)).shape == (6, 3, 40, 40)


def test_center_and_full_crop_are_resizes():
    x = _batch()
    assert torch.equal(A.center(x, 24), x.float() / 255)           # same size: identity
    small = A.center(x, 12)                                          # halving averages 2x2 blocks
    assert torch.allclose(small, F.avg_pool2d(x.float() / 255, 2), atol=1e-6)
    crop = A.random_resized_crop(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    assert torch.allclose(crop, small, atol=1e-6)


def test_crop_boxes_respect_scale_and_ratio():
    boxes = A.crop_boxes(2000, 224, 224, generator=torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 224).all() and (boxes[:, 3] <= 224).all()
    area = w * h / 224 ** 2
    assert area.min() > 0.68 and area.max() <= 1.0 and (w / h).min() > 0.74 and (w / h).max() < 1.35
    assert len(set(boxes[:, 0].tolist())) > 20                         # positions vary


def test_flip_and_grayscale():
    x = A.center(_batch(), 24)
    assert torch.equal(A.hflip(x, p=1.0), x.flip(-1)) and torch.equal(A.hflip(x, p=0.0), x)
    mixed = A.hflip(x, 0.5, torch.Generator().manual_seed(0))
    flipped = [torch.equal(m, f) for m, f in zip(mixed, x.flip(-1))]
    assert any(flipped) and not all(flipped)
    g = A.random_grayscale(x, p=1.0)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)


def test_color_ops_match_torchvision():
    x = A.center(_batch(size=8), 8)
    hsv = A.rgb_to_hsv(x)
    assert torch.allclose(A.hsv_to_rgb(hsv), x, atol=1e-5)
    for shift in (0.3, -0.2):
        rotated = torch.cat([(hsv[:, :1] + shift) % 1.0, hsv[:, 1:]], 1)
        assert torch.allclose(A.hsv_to_rgb(rotated), TF.adjust_hue(x, shift), atol=1e-4)
    assert torch.allclose(A.color_jitter(x, 0, 0, 0, 0), x, atol=1e-5)
    jittered = A.color_jitter(x, generator=torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x, atol=1e-2)


def test_normalize():
    x = torch.rand(2, 3, 4, 4)
    y = A.normalize(x, A.CLIP_MEAN, A.CLIP_STD)
    assert torch.allclose(y[:, 1] * A.CLIP_STD[1] + A.CLIP_MEAN[1], x[:, 1], atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_on_gpu_matches_cpu():
    x = _batch()
    cpu = A.augment(x, 16, torch.Generator().manual_seed(3))
    gpu = A.augment(x.cuda(), 16, torch.Generator().manual_seed(3))
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# ---- sample_params + render ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indexed", [True, False])
def test_render_identity_is_center_and_flip_mirrors(indexed):
    x = _batch()
    identity = _row((0, 0, 24, 24)).expand(6, -1)
    assert torch.equal(A.identity_params(6, 24, 24), identity)
    same = A.render(x, identity, 24, indexed=indexed)
    assert torch.allclose(same, x.float() / 255, atol=1e-6)                          # no resize: the image itself
    half = A.render(x, identity, 12, indexed=indexed)
    assert torch.allclose(half, A.center(x, 12), atol=1e-6)
    assert torch.allclose(half, F.avg_pool2d(x.float() / 255, 2), atol=1e-6)
    flipped = A.render(x, _row((0, 0, 24, 24), flip=1).expand(6, -1), 12, indexed=indexed)
    assert torch.allclose(flipped, F.avg_pool2d(x.float() / 255, 2).flip(-1), atol=1e-6)


def _torchvision_view(base: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The expected view of one cropped-and-resized image [3, H, W] for row: torchvision's functional ops in the row's
    order; grayscale with PIL's luma weights (0.299, 0.587, 0.114), as DomainBed's PIL pipeline."""
    p = dict(zip(A.PARAM_NAMES, row.tolist()))
    img = base.flip(-1) if p["flip"] else base
    adjust = {0: lambda im: TF.adjust_brightness(im, p["brightness"]),
              1: lambda im: TF.adjust_contrast(im, p["contrast"]),
              2: lambda im: TF.adjust_saturation(im, p["saturation"]),
              3: lambda im: TF.adjust_hue(im, p["hue"])}
    for k in range(4):
        img = adjust[int(p[f"op{k}"])](img)
    if p["gray"]:
        luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        assert torch.allclose(luma, TF.rgb_to_grayscale(img)[0], atol=2e-4)      # torchvision's tensor weights: 0.2989
        img = luma.expand(3, -1, -1)
    return img


@pytest.mark.parametrize("indexed", [True, False])
def test_render_matches_torchvision_in_each_order(indexed):
    smooth = torch.stack(torch.meshgrid(torch.linspace(0, 255, 24), torch.linspace(255, 0, 24), indexing="ij"))
    smooth = torch.cat([smooth, smooth[:1].flip(-1)]).round().to(torch.uint8)           # a colour gradient
    images = torch.cat([_batch(3, 24, seed=4), smooth[None]])
    full, crop = (0, 0, 24, 24), (3, 2, 21, 22)
    cases = [  # image, box, flip, factors (brightness, contrast, saturation), hue, order, gray
        (0, full, 0, (1.3, 0.7, 1.25), 0.3, (0, 1, 2, 3), 0),
        (1, full, 1, (0.7, 1.3, 0.8), -0.3, (3, 2, 1, 0), 0),
        (2, full, 0, (1.1, 1.2, 1.3), 0.17, (1, 3, 0, 2), 1),
        (3, full, 1, (0.8, 0.75, 1.3), -0.12, (2, 0, 3, 1), 0),
        (0, crop, 1, (0.9, 1.3, 0.7), 0.25, (3, 0, 2, 1), 0),
        (3, crop, 0, (1.2, 0.7, 1.1), -0.21, (1, 2, 3, 0), 1),
        (1, crop, 0, (0.75, 1.05, 1.2), 0.05, (2, 3, 1, 0), 0),
    ]
    x = torch.stack([images[i] for i, *_ in cases])
    params = torch.stack([_row(box, flip, *f, hue, order, gray) for _, box, flip, f, hue, order, gray in cases])
    views = A.render(x, params, 24, indexed=indexed)
    for view, img, (i, box, *_), row in zip(views, x, cases, params):
        if box == full:                                                   # same size: crop + resize is the identity
            base = img.float() / 255
        else:                                                             # the cropped-resized tensor
            base = A.resize_boxes(img[None], torch.tensor([box], dtype=torch.float32), 24)[0].clamp(0, 1)
        expected = _torchvision_view(base, row)
        assert (view - expected).abs().max() < 1e-4, (i, box, row.tolist())


def test_render_is_per_image_and_reproduces_augment():
    x = _batch(10, 24, seed=1)
    params = A.sample_params(10, 24, 24, torch.Generator().manual_seed(5))
    for indexed in (True, False):
        out = A.render(x, params, 16, indexed=indexed)
        assert torch.equal(out, A.render(x, params, 16, indexed=indexed))                      # deterministic
        for i, j in ((0, 1), (3, 7), (9, 10), (2, 10), (5, 6)):
            assert torch.equal(A.render(x[i:j], params[i:j], 16, indexed=indexed), out[i:j]), (indexed, i, j)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
        assert torch.equal(A.render(x[perm], params[perm], 16, indexed=indexed), out[perm])
    # both evaluation strategies of the colour ops agree
    assert torch.allclose(A.render(x, params, 16, indexed=True), A.render(x, params, 16, indexed=False), atol=1e-6)
    # larger images (per-image sums beyond one reduction grain) and one image at a time
    big = _batch(3, 200, seed=2)
    params = A.sample_params(3, 200, 200, torch.Generator().manual_seed(6))
    ops = [A.PARAM_NAMES.index(f"op{k}") for k in range(4)]
    params[:, ops] = torch.tensor([1.0, 0.0, 2.0, 3.0])   # contrast first: the mean luma of the full-size view
    out = A.render(big, params, 192)
    assert all(torch.equal(A.render(big[i:i + 1], params[i:i + 1], 192), out[i:i + 1]) for i in range(3))
    # augment is sample_params + render on the same stream
    gen_seed = 11
    assert torch.equal(A.augment(x, 16, torch.Generator().manual_seed(gen_seed)),
                       A.render(x, A.sample_params(10, 24, 24, torch.Generator().manual_seed(gen_seed)), 16))


def test_sample_params_distribution():
    n = 2000
    params = A.sample_params(n, 224, 160, torch.Generator().manual_seed(0))
    assert params.shape == (n, A.NUM_PARAMS) == (n, len(A.PARAM_NAMES)) and params.dtype == torch.float32
    assert len(set(A.PARAM_NAMES)) == A.NUM_PARAMS == 14
    # crop boxes: as crop_boxes, in pixels of the 224 x 160 (height x width) image
    x1, y1, x2, y2 = (_col(params, c) for c in ("x1", "y1", "x2", "y2"))
    w, h = x2 - x1, y2 - y1
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 160).all() and (y2 <= 224).all()
    assert all(torch.equal(v, v.round()) for v in (x1, y1, x2, y2))
    area = w * h / (224 * 160)
    assert area.min() > 0.68 and area.max() <= 1.0 and (w / h).min() > 0.74 and (w / h).max() < 1.35
    # flip and gray: 0 / 1 with p 0.5 and 0.1
    flip, gray = _col(params, "flip"), _col(params, "gray")
    assert set(flip.tolist()) == {0.0, 1.0} and set(gray.tolist()) == {0.0, 1.0}
    assert abs(flip.mean().item() - 0.5) < 0.04 and abs(gray.mean().item() - 0.1) < 0.025
    # colour factors ~ U(0.7, 1.3), hue ~ U(-0.3, 0.3), covering their ranges
    for name, lo, hi in (("brightness", 0.7, 1.3), ("contrast", 0.7, 1.3), ("saturation", 0.7, 1.3),
                         ("hue", -0.3, 0.3)):
        v = _col(params, name)
        assert v.min() >= lo and v.max() <= hi, name
        assert v.min() < lo + 0.01 and v.max() > hi - 0.01 and abs(v.mean().item() - (lo + hi) / 2) < 0.02, name
    # the colour-op order: a permutation of 0..3 per image, all 24 about equally often
    order = params[:, [A.PARAM_NAMES.index(f"op{k}") for k in range(4)]]
    assert (order.sort(1).values == torch.arange(4.0)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in order.long().tolist():
        counts[tuple(row)] += 1
    expected = n / 24
    assert all(abs(c - expected) < 4 * math.sqrt(expected) for c in counts.values()), counts
    # ... drawn per image, not once per batch
    batch = A.sample_params(96, 32, 32, torch.Generator().manual_seed(1))
    assert len({tuple(r) for r in batch[:, [A.PARAM_NAMES.index(f"op{k}") for k in range(4)]].tolist()}) > 12
    # reproducible from the generator
    assert torch.equal(params, A.sample_params(n, 224, 160, torch.Generator().manual_seed(0)))


def test_render_checks_params():
    with pytest.raises(ValueError, match="params must be"):
        A.render(_batch(2), torch.zeros(2, 5), 16)
    with pytest.raises(ValueError, match="params must be"):
        A.render(_batch(2), A.identity_params(3, 24, 24), 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_render_on_gpu_matches_cpu_without_host_sync():
    x = _batch(8, 32)
    xg = x.cuda()
    A.normalize(xg.float())                                   # builds the cached normalisation constants
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        params = A.sample_params(8, 32, 32, cuda_gen, "cuda")
        view = A.normalize(A.render(xg, params, 24))
        A.augment(xg, 24, cuda_gen)
        A.augment(xg, 24, torch.Generator().manual_seed(0))   # CPU generator: one non-blocking pinned copy
        A.center(xg, 24)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert params.is_cuda and view.is_cuda
    cpu = A.normalize(A.render(x, params.cpu(), 24))
    assert torch.allclose(view.cpu(), cpu, atol=1e-4)


def test_a_trial_worker_imports_neither_torchvision_nor_open_clip():
    """A trial's worker (small_cnn, cached teacher) pays no `import torchvision` (~4 s of CPU: its ops import
    torch._dynamo) and no open_clip at start: the crop-and-resize loads torchvision's RoIAlign kernel alone, and gives
    what torchvision.ops.roi_align gives."""
    import subprocess
    import sys

    code = """
import sys, torch
import distill.trial.loop, distill.methods, distill.models.cache
from distill.data import augment as A
from distill.models.students import build_student
build_student("small_cnn", embed_dim=8, num_classes=3)
x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
boxes = torch.tensor([[0., 0., 20., 20.], [2., 3., 15., 19.], [4.5, 1., 9., 7.5]])
out = A.resize_boxes(x, boxes, 12)
print(sorted(m for m in ("torchvision", "open_clip") if m in sys.modules))
import torchvision.ops
rois = torch.cat([torch.arange(3.)[:, None], boxes], 1)
ref = torchvision.ops.roi_align(x.float() / 255, rois, (12, 12), 1.0, -1, True)
print(torch.equal(out, ref))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"], out.stdout
