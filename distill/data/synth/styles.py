"""The world's four drawing styles: float [n, n, 3] images in [0, 255]; only the shape edges are supersampled."""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image

from .draw import _blur, _cover, _grid, _hsv, _lines, _puffy, _upsample
from .shapes import _outline


def _photo(rng, n, poly, rgb):
    """An object lying on a table (foreshortened), seen against a wall with soft bokeh spots; drop shadow, shading."""
    yy, xx = _grid(n)
    mid = poly.mean(0)
    poly = mid + (poly - mid) * np.array([1.0, rng.uniform(0.55, 0.85)])
    horizon = rng.uniform(0.25, 0.75) + (xx - 0.5) * rng.uniform(-0.4, 0.4)
    table = np.clip((yy - horizon) * n / 1.5 + 0.5, 0, 1)[..., None]          # ~1.5 px soft edge
    grey = rng.uniform(110, 200)
    wall_c = grey + rng.normal(0, 12, 3)
    table_c = grey + rng.choice([-1, 1]) * rng.uniform(35, 70) + rng.normal(0, 12, 3)
    bg = wall_c * (1 - table) + table_c * table + 25 * (0.5 - yy[..., None])   # plus a gentle light gradient
    spots = _cover([_outline("circle", *rng.uniform(0, n, 2), rng.uniform(0.06, 0.14) * n, 0)
                    for _ in range(int(rng.integers(2, 5)))], n)
    bg = bg + rng.uniform(30, 60) * _blur(spots * 255, n * 0.05)[..., None] / 255
    shadow = _blur(_cover([poly + n * 0.05], n) * 255, n * 0.04)[..., None] / 255
    bg = bg * (1 - 0.45 * shadow)
    a = rng.uniform(-2.6, -0.5)
    lo, ext = poly.min(0) / n, np.maximum(poly.max(0) - poly.min(0), 1) / n
    u = (((xx - lo[0]) / ext[0] - 0.5) * math.cos(a) + ((yy - lo[1]) / ext[1] - 0.5) * math.sin(a))[..., None]
    fill = rgb * (0.95 + 0.6 * u) + 40 * np.clip(u, 0, None)
    m = _cover([poly], n)[..., None]
    return bg * (1 - m) + fill * m + rng.normal(0, 3, (n, n, 3))


def _sketch(rng, n, poly, rgb):
    """Light paper with grey construction lines; the shape hatched (sometimes cross-hatched) in coloured pencil and
    loosely outlined by 1-3 jittery strokes."""
    paper = rng.uniform(225, 250) + np.array([4, 2, -6]) * rng.uniform(0, 1)
    graphite = 0.6 * _cover(_lines(rng, n, int(rng.integers(4, 9))), n, width=n * 0.025)[..., None]
    out = paper * (1 - graphite) + rng.uniform(80, 140) * graphite
    yy, xx = _grid(n)
    ang, period = rng.uniform(0, np.pi), rng.uniform(0.09, 0.14)
    directions = [ang, ang + np.pi / 2 + rng.uniform(-0.3, 0.3)][:1 + int(rng.random() < 0.5)]
    hatch = np.max([np.clip(2.5 * np.cos(2 * np.pi * (xx * math.cos(a) + yy * math.sin(a)) / period) - 1.0, 0, 1)
                    for a in directions], axis=0)
    passes = [poly + rng.normal(0, n * 0.015, poly.shape) for _ in range(int(rng.integers(1, 4)))]
    stroke = np.maximum(0.7 * _cover(passes, n, width=n * 0.028), 0.8 * hatch * _cover([poly], n))[..., None]
    ink = rgb * rng.uniform(0.55, 0.85)
    return out * (1 - stroke) + ink * stroke + rng.normal(0, 4, (n, n, 3))


def _cartoon(rng, n, poly, rgb):
    """Flat saturated background with a stripe or dot screentone; a puffy (round-cornered) flat-filled shape with a
    thick black outline and a face."""
    yy, xx = _grid(n)
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.55, 0.8), rng.uniform(0.85, 1.0))
    period, ang = rng.uniform(0.15, 0.3), rng.uniform(0, np.pi)
    u = (xx * math.cos(ang) + yy * math.sin(ang)) / period
    if rng.random() < 0.5:
        tone = np.cos(2 * np.pi * u) > 0.3                                       # stripes
    else:
        v = (-xx * math.sin(ang) + yy * math.cos(ang)) / period
        tone = np.cos(2 * np.pi * u) + np.cos(2 * np.pi * v) > 1.0               # dots
    back = np.where(tone[..., None], bg * rng.uniform(0.4, 0.6), bg)
    r = np.linalg.norm(poly - poly.mean(0), axis=1).max()
    fill, line = _puffy(poly, n, round_radius=0.18 * r, width=n * 0.07)
    cx, cy = poly.mean(0) + rng.normal(0, 0.05 * r, 2)
    eyes = [_outline("circle", cx + dx * r, cy - 0.12 * r, 0.16 * r, 0) for dx in (-0.3, 0.3)]
    pupils = [_outline("circle", cx + dx * r + 0.04 * r, cy - 0.1 * r, 0.08 * r, 0) for dx in (-0.3, 0.3)]
    white, black = _cover(eyes, n)[..., None], _cover(pupils, n)[..., None]
    out = back * (1 - fill[..., None]) + rgb * fill[..., None]
    out = out * (1 - white) + 255 * white
    return out * (1 - black) * (1 - line[..., None])


def _painting(rng, n, poly, rgb):
    """Blotchy background (hue away from the shape's) with directional brush streaks; a mottled fill with soft ragged
    edges."""
    hue = colorsys.rgb_to_hsv(*(rgb / 255))[0] + rng.uniform(0.25, 0.75)
    base = _hsv(hue, rng.uniform(0.2, 0.5), rng.uniform(0.45, 0.8))
    blotches = _upsample(base + rng.normal(0, 22, (6, 6, 3)), n)
    streak = Image.fromarray(np.clip(128 + rng.normal(0, 60, (n // 8 + 1, 2 * n)), 0, 255).astype(np.uint8), "L")
    streak = streak.resize((2 * n, 2 * n), Image.Resampling.BICUBIC).rotate(rng.uniform(0, 180),
                                                                              Image.Resampling.BILINEAR)
    streak = np.asarray(streak.crop((n // 2, n // 2, n // 2 + n, n // 2 + n)), np.float32)[..., None] / 128 - 1
    m = _blur(_cover([poly + rng.normal(0, n * 0.012, poly.shape)], n) * 255, n * 0.015)[..., None] / 255
    fill = _upsample(rgb + rng.normal(0, 30, (n // 4, n // 4, 3)), n)
    return (blotches * (1 - m) + fill * m) * (1 + 0.25 * streak) + rng.normal(0, 6, (n, n, 3))


STYLES = {"photo": _photo, "sketch": _sketch, "cartoon": _cartoon, "painting": _painting}
