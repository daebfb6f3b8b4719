"""Batched image transforms on uint8 [B, 3, S, S] tensors, on whatever device the tensor lives (no PIL).

``augment`` is DomainBed's training transform (RandomResizedCrop(scale=(0.7, 1)), horizontal flip, ColorJitter(0.3,
0.3, 0.3, 0.3), RandomGrayscale(0.1)) with parameters drawn per image; ``center`` is its evaluation transform (resize).
Random numbers come from ``generator`` (on any device) and are moved to the images' device.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as torchvision's rgb_to_grayscale


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
    return roi_align(x01, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def center(x: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: the whole image resized to ``size`` x ``size``, float in [0, 1]."""
    h, w = x.shape[-2:]
    boxes = torch.tensor([0.0, 0.0, w, h], device=x.device).expand(len(x), 4)
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


def grayscale(x01: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of float RGB images."""
    w = torch.tensor(GRAY_WEIGHTS, device=x01.device, dtype=x01.dtype)
    return (x01 * w[:, None, None]).sum(-3, keepdim=True)


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


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor[:, None, None, None]
    return (f * a + (1 - f) * b).clamp_(0, 1)


def color_jitter(x01: torch.Tensor, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.3,
                 generator=None) -> torch.Tensor:
    """torchvision's ColorJitter with factors drawn per image (brightness/contrast/saturation ~ U(1 -/+ v),
    hue shift ~ U(-hue, hue) of a turn). The order of the four is drawn once per batch (torchvision: per call)."""
    n, dev = len(x01), x01.device
    factors = [_uniform(n, 1 - v, 1 + v, generator, dev) for v in (brightness, contrast, saturation)]
    shift = _uniform(n, -hue, hue, generator, dev)
    src = generator.device if generator is not None else dev
    order = torch.randperm(4, generator=generator, device=src).tolist()
    for op in order:
        if op == 0:
            x01 = _blend(x01, torch.zeros_like(x01), factors[0])
        elif op == 1:
            x01 = _blend(x01, grayscale(x01).mean((-3, -2, -1), keepdim=True), factors[1])
        elif op == 2:
            x01 = _blend(x01, grayscale(x01), factors[2])
        else:
            hsv = rgb_to_hsv(x01)
            hsv = torch.cat([_frac(hsv[:, :1] + shift[:, None, None, None]), hsv[:, 1:]], 1)
            x01 = hsv_to_rgb(hsv).clamp_(0, 1)
    return x01


def augment(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DomainBed's training view of uint8 images [B, 3, S, S] -> float [B, 3, size, size] in [0, 1]."""
    out = random_resized_crop(x, size, generator=generator)
    out = hflip(out, 0.5, generator)
    out = color_jitter(out, 0.3, 0.3, 0.3, 0.3, generator)
    return random_grayscale(out, 0.1, generator)


def normalize(x01: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.as_tensor(mean, device=x01.device, dtype=x01.dtype)[:, None, None]
    s = torch.as_tensor(std, device=x01.device, dtype=x01.dtype)[:, None, None]
    return (x01 - m) / s
