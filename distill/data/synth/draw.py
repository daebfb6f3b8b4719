"""Drawing primitives of the built-in world and corpora: anti-aliased polygon coverage, blur, smooth upsampling,
colours. Images are float arrays in [0, 255]; every primitive is deterministic (PIL, numpy)."""
from __future__ import annotations

import colorsys
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4         # shapes are drawn at SUPERSAMPLE x size and box-filtered down (anti-aliasing)


def _cover(polys: list[np.ndarray], n: int, width: float | None = None) -> np.ndarray:
    """Anti-aliased coverage [n, n] in [0, 1] of filled polygons (width None) or of their closed outlines.

    Drawn at SUPERSAMPLE x n and box-filtered down; coordinates are in output pixels.
    """
    big = n * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        pts = [tuple(p) for p in (poly * SUPERSAMPLE).round(2)]
        if width is None:
            draw.polygon(pts, fill=255)
        else:
            draw.line(pts + pts[:1], fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")
    return np.asarray(img.resize((n, n), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _puffy(poly: np.ndarray, n: int, round_radius: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage [n, n] of the polygon with rounded corners, and of an outline about ``width`` px thick around it."""
    big = n * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in (poly * SUPERSAMPLE).round(2)], fill=255)
    img = img.filter(ImageFilter.GaussianBlur(float(round_radius) * SUPERSAMPLE / 2)).point(lambda v: 255 * (v > 127))
    # the band where a blurred copy is neither ~0 nor ~1 straddles the edge: about 2.8 sigma wide
    edge = img.filter(ImageFilter.GaussianBlur(width * SUPERSAMPLE / 2.8)).point(lambda v: 255 * (20 < v < 235))

    def shrink(im):
        return np.asarray(im.resize((n, n), Image.Resampling.BOX), np.float32) / 255.0
    return shrink(img), shrink(edge)


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of an [n, n] or [n, n, 3] float image in [0, 255] (through PIL, deterministic)."""
    img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L" if a.ndim == 2 else "RGB")
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _upsample(a: np.ndarray, n: int) -> np.ndarray:
    """A small [h, w, 3] float array resized smoothly to [n, n, 3]."""
    img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
    return np.asarray(img.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
    return yy, xx


def _lines(rng, n, k, lo=0.5, hi=1.2) -> list[np.ndarray]:
    """k random straight segments of length U(lo, hi) * n through random points of the image."""
    centre = rng.uniform(0, n, (k, 2))
    ang = rng.uniform(0, np.pi, k)
    half = rng.uniform(lo, hi, k)[:, None] * n / 2 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return [np.stack([c - h, c + h]) for c, h in zip(centre, half)]
