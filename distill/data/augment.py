"""Batched image transforms on uint8 [B, 3, S, S] tensors, on whatever device the tensor lives (no PIL).

``augment`` is DomainBed's training transform (RandomResizedCrop(scale=(0.7, 1)), horizontal flip, ColorJitter(0.3,
0.3, 0.3, 0.3), RandomGrayscale(0.1)) with parameters drawn per image; ``center`` is its evaluation transform (resize).

``augment`` is split in two so that a view can be stored and re-rendered exactly (as Fast Knowledge Distillation
stores crop coordinates next to soft labels):

- ``sample_params(n, height, width, generator, device)`` draws everything the transform draws, one float32 row of
  ``PARAM_NAMES`` per image (``NUM_PARAMS`` columns):

  - ``x1 y1 x2 y2``: the RandomResizedCrop box in pixels of the *stored* image (pixel i spans [i, i+1)), integer
    valued; area fraction in (0.7, 1), aspect w / h in (3/4, 4/3) (as ``crop_boxes``);
  - ``flip``: 1 to mirror left-right (p 0.5), else 0;
  - ``brightness contrast saturation``: ColorJitter factors ~ U(0.7, 1.3) (1: unchanged);
  - ``hue``: hue shift in turns ~ U(-0.3, 0.3) (0: unchanged), torchvision's ``hue_factor``;
  - ``op0 op1 op2 op3``: the order of the four colour ops, drawn per image as torchvision's ColorJitter draws it
    per call (``fn_idx``; DomainBed calls it once per image): the op applied at position k, an index into
    ``COLOR_OPS`` (0 brightness, 1 contrast, 2 saturation, 3 hue); a permutation of 0..3;
  - ``gray``: 1 to replace the image by its luma on all three channels (p 0.1), else 0.

  Rows are drawn in float32 and re-render the same view when stored as float32 (float16 would round the factors and
  the hue); the box refers to the stored image size (re-rendering from images stored at another size is wrong).
- ``render(x, params, size)`` is a pure function of (image, its row): crop + resize, flip, the colour ops in the row's
  order, grayscale, as torchvision. Rows are independent of each other (on CPU ``render(x[i:j], p[i:j])`` is exactly
  ``render(x, p)[i:j]``). On CUDA nothing synchronises with the host: all four colour ops are computed at each of the
  four positions and selected per image arithmetically; on CPU each op runs on the index subset of images that need
  it (no wasted work, no sync cost there).

Random numbers come from ``generator`` (on any device); parameters are drawn on the generator's device and moved to
the images' device in one (non-blocking, for CPU -> CUDA) copy. Colour ops follow torchvision's tensor functions
(``adjust_brightness/contrast/saturation/hue``) except the luma weights (0.299, 0.587, 0.114), which are PIL's (what
DomainBed's PIL pipeline uses; torchvision's tensor version uses 0.2989).
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as PIL's convert("L") (torchvision's tensor version: 0.2989)

# DomainBed's training transform
CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
JITTER = 0.3                           # brightness, contrast, saturation factors ~ U(1 -/+ 0.3), hue ~ U(-/+ 0.3)
GRAY_P = 0.1

COLOR_OPS = ("brightness", "contrast", "saturation", "hue")
PARAM_NAMES = ("x1", "y1", "x2", "y2", "flip", "brightness", "contrast", "saturation", "hue",
               "op0", "op1", "op2", "op3", "gray")
NUM_PARAMS = len(PARAM_NAMES)
RENDER_VERSION = 1   # bump when `render` changes what a parameter row draws: stored teacher views are then recomputed
_BOX, _FLIP, _FACTORS, _HUE, _ORDER, _GRAY = slice(0, 4), 4, slice(5, 8), 8, slice(9, 13), 13


def _uniform(shape, lo, hi, generator, device) -> torch.Tensor:
    src = generator.device if generator is not None else device
    return (torch.rand(shape, generator=generator, device=src) * (hi - lo) + lo).to(device)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float tensors are passed through as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def resize_boxes(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box b (x1, y1, x2, y2 in pixels, pixel i spanning [i, i+1)) out of image b and resize it to
    ``size`` x ``size``, for the whole batch in one roi_align call (averaging ceil(box/size) samples per output
    pixel and axis, i.e. antialiased when shrinking, bilinear when enlarging). Returns float [B, 3, size, size]."""
    x01 = to_float(x)
    rois = torch.cat([torch.arange(len(x), device=x.device, dtype=x01.dtype)[:, None], boxes.to(x01)], 1)
    if torch.are_deterministic_algorithms_enabled() and x01.device.type != "cpu":
        from torchvision.ops import roi_align   # torchvision's deterministic (pure PyTorch) version on accelerators

        return roi_align(x01, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return _roi_align_op()(x01, rois, 1.0, size, size, -1, True)


_ROI_ALIGN = None


def _roi_align_op():
    """torchvision's RoIAlign kernel (`torch.ops.torchvision.roi_align`: input, rois, spatial_scale, height, width,
    sampling_ratio, aligned), loaded from torchvision's extension library alone: `import torchvision` takes ~4 s of
    CPU (its ops import torch._dynamo and triton), which every trial's worker would pay before its first step. Falls
    back to the package where the library is not where torchvision keeps it."""
    global _ROI_ALIGN
    if _ROI_ALIGN is None:
        if not hasattr(torch.ops.torchvision, "roi_align"):
            spec = importlib.util.find_spec("torchvision")
            dirs = list(spec.submodule_search_locations or []) if spec else []
            for lib in sorted(p for d in dirs for p in glob.glob(os.path.join(d, "_C*.so"))):
                try:
                    torch.ops.load_library(lib)
                    break
                except OSError:
                    continue
        if not hasattr(torch.ops.torchvision, "roi_align"):
            import torchvision.ops  # noqa: F401  (registers the op the documented way, or raises its own error)
        _ROI_ALIGN = torch.ops.torchvision.roi_align
    return _ROI_ALIGN


def center(x: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: the whole image resized to ``size`` x ``size``, float in [0, 1]."""
    h, w = x.shape[-2:]
    boxes = torch.zeros((len(x), 4), device=x.device)       # filled on the device (no host -> device copy, no sync)
    boxes[:, 2], boxes[:, 3] = w, h
    return resize_boxes(x, boxes, size).clamp_(0, 1)


def crop_boxes(batch: int, height: int, width: int, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
               device="cpu", attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's box sampling, per image: area fraction ~ U(scale), log aspect ~ U(log ratio), integer
    sides; the first of ``attempts`` draws that fits, else the centred crop of the clamped aspect. [B, 4] boxes."""
    area = height * width
    target = area * _uniform((batch, attempts), scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # fallback (no attempt fits): the whole image, cut to the nearest allowed aspect ratio
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
             (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    none = ~fits.any(1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    u = _uniform((batch, 2), 0.0, 1.0, generator, device)
    top = torch.where(none, (height - h) // 2, torch.floor(u[:, 0] * (height - h + 1)))
    left = torch.where(none, (width - w) // 2, torch.floor(u[:, 1] * (width - w + 1)))
    return torch.stack([left, top, left + w, top + h], 1)


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3),
                        generator=None) -> torch.Tensor:
    """A random crop per image (see ``crop_boxes``) resized to ``size``; float in [0, 1]."""
    boxes = crop_boxes(len(x), x.shape[-2], x.shape[-1], scale, ratio, generator, x.device)
    return resize_boxes(x, boxes, size).clamp_(0, 1)


def hflip(x: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = _uniform(len(x), 0.0, 1.0, generator, x.device) < p
    return _select(flip, x.flip(-1), x)


def _luma(x01: torch.Tensor) -> torch.Tensor:
    """0.299 r + 0.587 g + 0.114 b as [B, 1, H, W] (elementwise only: the same bits whatever the batch)."""
    r, g, b = x01[:, 0:1], x01[:, 1:2], x01[:, 2:3]
    return (r * GRAY_WEIGHTS[0]).add_(g * GRAY_WEIGHTS[1]).add_(b * GRAY_WEIGHTS[2])


def grayscale(x01: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of float RGB images."""
    return _luma(x01.reshape(-1, *x01.shape[-3:])).view(*x01.shape[:-3], 1, *x01.shape[-2:])


def random_grayscale(x01: torch.Tensor, p: float = 0.1, generator=None) -> torch.Tensor:
    """Replace each image by its luma (on all three channels) with probability p."""
    gray = _uniform(len(x01), 0.0, 1.0, generator, x01.device) < p
    return _select(gray, grayscale(x01).expand_as(x01), x01)


def _frac(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x)


def rgb_to_hsv(x01: torch.Tensor) -> torch.Tensor:
    """Float RGB [..., 3, H, W] in [0, 1] -> HSV, every channel in [0, 1]."""
    r, g, b = x01.unbind(-3)
    maxc, minc = x01.amax(-3), x01.amin(-3)
    delta = maxc - minc
    d = delta.clamp_min(1e-12)                       # grey pixels: every numerator below is 0, so hue 0
    is_r = (maxc == r).to(x01.dtype)
    is_g = (maxc == g).to(x01.dtype) * (1 - is_r)
    hue = is_r * (g - b) / d + is_g * (2.0 + (b - r) / d) + (1 - is_r - is_g) * (4.0 + (r - g) / d)
    return torch.stack([_frac(hue / 6.0), delta / maxc.clamp_min(1e-12), maxc], -3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6."""
    h, s, v = hsv.unsqueeze(-3).unbind(-4)
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype)[:, None, None]
    k = 6.0 * _frac((n + 6.0 * h) / 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: a where mask [B] is set, else b (exact; arithmetic, as torch.where is slow on CPU)."""
    m = mask.to(a.dtype)[:, None, None, None]
    return m * a + (1 - m) * b


# ---- the colour ops on float [B, 3, H, W] in [0, 1], per-image factors [B] ------------------------------------------
# Only elementwise arithmetic (no transcendental functions, no fused multiply-adds) and row-wise sums, so an image's
# result does not depend on which other images share its batch or subset.

def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _image_mean(gray: torch.Tensor) -> torch.Tensor:
    """Mean of each [1, H, W] image as [B, 1, 1, 1]: summed row by row, then the row sums (each sum one thread's
    sequential reduction, whatever the batch size or thread count)."""
    h, w = gray.shape[-2:]
    return gray.sum(-1).sum(-1)[:, :, None, None] / float(h * w)


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness (f x, clamped), in place."""
    return x.mul_(_per_image(f)).clamp_(0, 1)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_contrast (blend with the image's mean luma), in place."""
    f = _per_image(f)
    mean = _image_mean(_luma(x))
    return x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)


def _saturation_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation (blend with the luma image), in place."""
    f = _per_image(f)
    gray = _luma(x).mul_(1 - f)
    return x.mul_(f).add_(gray).clamp_(0, 1)


_HUE_OFFSETS = (5.0, 3.0, 1.0)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (rotate the HSV hue by ``shift`` turns) without materialising HSV: with max, min
    and delta = max - min of the pixel and h its hue in sextants, channel c = max - delta clamp(min(k, 4 - k), 0, 1),
    k = (n_c + h + 6 shift) mod 6, n = (5, 3, 1). Returns a new tensor."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # hue in sextants (-1, 5] (grey pixels: 0 / 1e-12 = 0)
    h = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(delta * 2.0), (r - g).add_(delta * 4.0)))
    h = h.div_(delta.clamp_min(1e-12)).add_(shift[:, None, None] * 6.0)
    k = h.new_empty(x.shape)                                 # [B, 3, H, W] (no constant tensor: no host copy)
    for c, n in enumerate(_HUE_OFFSETS):
        torch.add(h, n, out=k[:, c])
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))              # mod 6
    w = torch.minimum(k, torch.neg(k).add_(4.0)).clamp_(0, 1)
    return w.mul_(torch.neg(delta)[:, None]).add_(maxc[:, None])


def _color_indexed_(x: torch.Tensor, factors: torch.Tensor, shift: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The four colour ops in each image's order, in place: at every position each op runs on the index subset of
    images that apply it there (CPU: exactly the work of one op per image and position, and small temporaries)."""
    for k in range(4):
        col = order[:, k]
        for op in range(4):
            idx = (col == op).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sub = x.index_select(0, idx)
            if op == 3:
                sub = _hue(sub, shift.index_select(0, idx))
            else:
                (_brightness_, _contrast_, _saturation_)[op](sub, factors[:, op].index_select(0, idx))
            x.index_copy_(0, idx, sub)
    return x


def _color_masked(x: torch.Tensor, factors: torch.Tensor, shift: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The four colour ops in each image's order without data-dependent control flow (no host sync on CUDA): at
    every position one blend covers brightness (reference 0), contrast (mean luma) and saturation (luma) with the
    image's factor (1 for images whose op there is hue: exactly the identity), then the hue rotation of the whole
    batch is selected for the images whose op there is hue (four hue rotations per image: cheap on a GPU, about 4x
    the indexed path on CPU)."""
    for k in range(4):
        onehot = (order[:, k, None] == torch.arange(4, device=x.device)).to(x.dtype)
        use_c, use_s, use_h = _per_image(onehot[:, 1]), _per_image(onehot[:, 2]), onehot[:, 3]
        f = _per_image((onehot[:, :3] * factors).sum(1) + use_h)
        gray = _luma(x)
        ref = use_c * _image_mean(gray) + use_s * gray
        x = (f * x + (1 - f) * ref).clamp_(0, 1)
        x = torch.where(_per_image(use_h) > 0.5, _hue(x, shift), x)
    return x


def _color(x: torch.Tensor, factors: torch.Tensor, shift: torch.Tensor, order: torch.Tensor,
           indexed: bool | None = None) -> torch.Tensor:
    """Per image: the colour ops in ``order`` ([B, 4] long, op at each position) with ``factors`` ([B, 3]:
    brightness, contrast, saturation) and hue ``shift`` ([B]). May modify x (a fresh tensor) in place."""
    if indexed is None:
        indexed = x.device.type == "cpu"
    return (_color_indexed_ if indexed else _color_masked)(x, factors, shift, order)


def _random_orders(n: int, generator, device) -> torch.Tensor:
    """n uniform random permutations of 0..3 ([n, 4] long): the argsort of 4 uniforms per row."""
    return torch.rand((n, 4), generator=generator, device=device).argsort(1)


def color_jitter(x01: torch.Tensor, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.3,
                 generator=None) -> torch.Tensor:
    """torchvision's ColorJitter with factors drawn per image (brightness/contrast/saturation ~ U(1 -/+ v),
    hue shift ~ U(-hue, hue) of a turn) and, as DomainBed (one ColorJitter call per image), the order of the four
    drawn per image too."""
    n, dev = len(x01), x01.device
    factors = torch.stack([_uniform(n, 1 - v, 1 + v, generator, dev) for v in (brightness, contrast, saturation)], 1)
    shift = _uniform(n, -hue, hue, generator, dev)
    src = generator.device if generator is not None else dev
    order = _random_orders(n, generator, src).to(dev)
    return _color(x01.float().clone(), factors, shift, order)


# ---- augmentation as explicit per-image parameters -------------------------------------------------------------------

def _to_device(p: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if p.device == device:
        return p
    if p.device.type == "cpu" and device.type == "cuda":
        return p.pin_memory().to(device, non_blocking=True)     # no host sync (the pinned block is kept until copied)
    return p.to(device)


def sample_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                  device="cpu") -> torch.Tensor:
    """DomainBed's training-transform parameters for n images stored at height x width: float32 [n, NUM_PARAMS],
    columns ``PARAM_NAMES`` (see the module docstring). Drawn on the generator's device (``device`` without one), in
    this order: crop box (``crop_boxes``), flip, brightness, contrast, saturation, hue, colour-op order, gray; then
    moved to ``device``."""
    src = generator.device if generator is not None else torch.device(device)
    boxes = crop_boxes(n, height, width, CROP_SCALE, CROP_RATIO, generator, src)
    flip = _uniform(n, 0.0, 1.0, generator, src) < FLIP_P
    factors = [_uniform(n, 1 - JITTER, 1 + JITTER, generator, src) for _ in range(3)]
    shift = _uniform(n, -JITTER, JITTER, generator, src)
    order = _random_orders(n, generator, src)
    gray = _uniform(n, 0.0, 1.0, generator, src) < GRAY_P
    params = torch.cat([boxes.float(), flip.float()[:, None], torch.stack([*factors, shift], 1), order.float(),
                        gray.float()[:, None]], 1)
    return _to_device(params, device)


def identity_params(n: int, height: int, width: int, device="cpu") -> torch.Tensor:
    """Rows that render the evaluation view (``center``): the whole image, no flip, factors 1, hue 0, no gray."""
    row = torch.tensor([0.0, 0.0, width, height, 0, 1, 1, 1, 0, 0, 1, 2, 3, 0])
    return _to_device(row.expand(n, NUM_PARAMS).clone(), device)


def render(x: torch.Tensor, params: torch.Tensor, size: int, *, indexed: bool | None = None) -> torch.Tensor:
    """The view of each uint8 image [B, 3, H, W] described by its row of ``params`` ([B, NUM_PARAMS], as
    ``sample_params`` draws them for this H x W; best on x's device) -> float [B, 3, size, size] in [0, 1].

    torchvision's order: crop box resized to size (``resize_boxes``), flip, the colour ops in the row's order,
    grayscale. Deterministic and row by row: an image's view depends only on the image and its row (exactly so on
    CPU). ``indexed`` (default: on CPU) runs the colour ops on index subsets instead of computing all of them and
    selecting arithmetically (the sync-free way, the default elsewhere); both give the same views up to rounding."""
    if params.shape != (len(x), NUM_PARAMS):
        raise ValueError(f"params must be [{len(x)}, {NUM_PARAMS}] ({', '.join(PARAM_NAMES)}), "
                         f"got {list(params.shape)}")
    if indexed is None:
        indexed = x.device.type == "cpu"
    p = params.to(device=x.device, dtype=torch.float32)
    out = resize_boxes(x, p[:, _BOX], size).clamp_(0, 1)
    flip, gray = p[:, _FLIP] > 0.5, p[:, _GRAY] > 0.5
    order = p[:, _ORDER].round().long()
    if indexed:
        idx = flip.nonzero().squeeze(1)
        if idx.numel():
            out.index_copy_(0, idx, out.index_select(0, idx).flip(-1))
        out = _color(out, p[:, _FACTORS], p[:, _HUE], order, indexed=True)
        idx = gray.nonzero().squeeze(1)
        if idx.numel():
            out.index_copy_(0, idx, _luma(out.index_select(0, idx)).expand(-1, 3, -1, -1))
        return out
    out = torch.where(_per_image(flip), out.flip(-1), out)
    out = _color(out, p[:, _FACTORS], p[:, _HUE], order, indexed=False)
    return torch.where(_per_image(gray), _luma(out).expand_as(out), out)


def augment(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DomainBed's training view of uint8 images [B, 3, S, S] -> float [B, 3, size, size] in [0, 1]:
    ``render(x, sample_params(len(x), S, S, generator, x.device), size)``."""
    return render(x, sample_params(len(x), x.shape[-2], x.shape[-1], generator, x.device), size)


_CONSTANTS: dict = {}


def _channel_constant(values, like: torch.Tensor) -> torch.Tensor:
    """values as a [3, 1, 1] tensor on like's device and dtype; tuples are cached per device (building one from
    Python values on a GPU is a host -> device copy, which synchronises)."""
    if not isinstance(values, tuple):
        return torch.as_tensor(values, device=like.device, dtype=like.dtype)[:, None, None]
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.as_tensor(values, device=like.device, dtype=like.dtype)[:, None, None]
    return _CONSTANTS[key]


def normalize(x01: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel."""
    return (x01 - _channel_constant(mean, x01)) / _channel_constant(std, x01)
