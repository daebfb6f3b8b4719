"""Thirteen more drawing styles, for the teacher's corpus only (the world keeps its four): what a CLIP has seen
besides photos, sketches, cartoons and paintings. Same contract as ``styles.py``: ``style(rng, n, outline, rgb)``
-> float [n, n, 3] in [0, 255]."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .draw import _blur, _cover, _grid, _hsv


def _mix(a, b, t):
    return a * (1 - t) + b * t


def _paper(rng, n, lo=225, hi=250):
    return np.full((n, n, 3), rng.uniform(lo, hi), np.float32) + np.array([4, 2, -6]) * rng.uniform(0, 1)


def _line_drawing(rng, n, poly, rgb):
    """Ink outline on paper, no fill."""
    ink = _mix(rgb, np.zeros(3), rng.uniform(0.1, 0.4))
    m = _cover([poly + rng.normal(0, n * 0.006, poly.shape)], n, width=n * rng.uniform(0.03, 0.05))[..., None]
    return _paper(rng, n) * (1 - m) + ink * m + rng.normal(0, 2, (n, n, 3))


def _clipart(rng, n, poly, rgb):
    """Flat fill with a thin darker outline on a plain light background."""
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.92, 1.0))
    fill, line = _cover([poly], n)[..., None], _cover([poly], n, width=n * 0.035)[..., None]
    out = bg * (1 - fill) + rgb * fill
    return out * (1 - line) + rgb * 0.45 * line


def _chalk(rng, n, poly, rgb):
    """Chalk on a dark board: a speckled pastel outline and a faint scribbled fill, smudges on the board."""
    board = np.array([rng.uniform(25, 50), rng.uniform(45, 75), rng.uniform(35, 55)], np.float32)
    out = board + _blur(rng.normal(0, 25, (n, n)) + 128, n * 0.08)[..., None] - 128
    speck = rng.uniform(0.4, 1.0, (n, n))[..., None]
    chalk = _mix(rgb, np.full(3, 255.0), 0.45)
    m = np.maximum(_cover([poly], n, width=n * 0.05), 0.3 * _cover([poly], n))[..., None] * speck
    return out * (1 - m) + chalk * m


def _blueprint(rng, n, poly, rgb):
    """A tinted pale outline over a blue sheet with a fine grid."""
    yy, xx = _grid(n)
    period = rng.uniform(0.1, 0.16)
    grid = ((np.abs(((xx / period) % 1) - 0.5) > 0.44) | (np.abs(((yy / period) % 1) - 0.5) > 0.44))
    sheet = np.array([30, 70, rng.uniform(140, 180)], np.float32) * (1 + 0.25 * grid[..., None])
    pen = _mix(np.full(3, 240.0), rgb, 0.45)
    m = _cover([poly], n, width=n * 0.035)[..., None]
    return sheet * (1 - m) + pen * m + rng.normal(0, 3, (n, n, 3))


def _tiles(cover: np.ndarray, k: int, n: int) -> np.ndarray:
    """Coverage averaged over a k x k grid, shown at n x n (nearest)."""
    img = Image.fromarray((cover * 255).astype(np.uint8), "L").resize((k, k), Image.Resampling.BOX)
    return np.asarray(img.resize((n, n), Image.Resampling.NEAREST), np.float32) / 255


def _mosaic(rng, n, poly, rgb):
    """Square tiles (about 2.5 px) with grout: tiles inside the shape in its colour, the others in a second one."""
    k = max(4, round(n / 2.5))
    cover = _tiles(_cover([poly], n), k, n)[..., None] > 0.5
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.9))
    jitter = np.asarray(Image.fromarray(rng.integers(0, 255, (k, k), dtype=np.uint8), "L").resize(
        (n, n), Image.Resampling.NEAREST), np.float32)[..., None] / 255 - 0.5
    out = np.where(cover, rgb, bg) * (1 + 0.3 * jitter)
    idx = (np.arange(n) * k) // n
    grout = (np.diff(idx, prepend=-1) != 0)
    edge = (grout[:, None] | grout[None, :])[..., None]
    return np.where(edge, _mix(out, np.full(3, rng.uniform(150, 200)), 0.4), out)


def _pixel_art(rng, n, poly, rgb):
    """A low-resolution (half the side) flat drawing with a darker outline, shown with square pixels."""
    k = max(4, n // 2)
    fill = _tiles(_cover([poly], n), k, n)[..., None] > 0.45
    line = _tiles(_cover([poly], n, width=n * 0.07), k, n)[..., None] > 0.4
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.5), rng.uniform(0.7, 1.0))
    out = np.where(fill, rgb, bg)
    return np.where(line & fill, rgb * 0.5, out)


def _neon(rng, n, poly, rgb):
    """A glowing tube along the outline on a dark wall."""
    wall = rng.uniform(10, 40) + rng.normal(0, 4, (n, n, 3))
    core = _cover([poly], n, width=n * 0.035)
    glow = _blur(core * 255, n * 0.06) / 255
    tube = _mix(rgb, np.full(3, 255.0), 0.55)
    out = wall + 2.2 * glow[..., None] * rgb
    return _mix(out, tube, core[..., None])


def _watercolor(rng, n, poly, rgb):
    """Translucent wash on paper: a mottled blurred fill with darker pigment at its edges."""
    m = _blur(_cover([poly + rng.normal(0, n * 0.015, poly.shape)], n) * 255, n * 0.03) / 255
    edge = np.clip(m - _blur(m * 255, n * 0.05) / 255, 0, 1) * 2.5
    mottle = _blur(rng.normal(0, 60, (n, n)) + 128, n * 0.06) / 128 - 1
    alpha = np.clip(m * (0.55 + 0.25 * mottle) + edge, 0, 1)[..., None]
    return _paper(rng, n, 235, 252) * (1 - alpha) + rgb * alpha + rng.normal(0, 2, (n, n, 3))


def _embroidery(rng, n, poly, rgb):
    """Satin stitches filling the shape on woven fabric, with a dark running-stitch outline."""
    yy, xx = _grid(n)
    cloth = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95))
    weave = 0.08 * np.cos(2 * np.pi * xx * n / 2) * np.cos(2 * np.pi * yy * n / 2)
    ang = rng.uniform(0, np.pi)
    stitch = 0.75 + 0.25 * np.cos(2 * np.pi * (xx * math.cos(ang) + yy * math.sin(ang)) * n / 2.5)
    m = _cover([poly], n)[..., None]
    out = cloth * (1 + weave[..., None]) * (1 - m) + rgb * stitch[..., None] * m
    dash = (np.cos(2 * np.pi * (xx + yy) * n / 4) > 0)[..., None]
    line = _cover([poly], n, width=n * 0.03)[..., None] * dash
    return out * (1 - line) + rgb * 0.35 * line


def _graffiti(rng, n, poly, rgb):
    """Spray paint on a brick wall: a soft overspray halo, a speckled fill and a black outline."""
    yy, xx = _grid(n)
    rows = rng.uniform(5, 7)
    r = np.floor(yy * rows)
    mortar = (np.abs((yy * rows) % 1 - 0.5) > 0.42) | (np.abs(((xx * rows / 2 + 0.5 * (r % 2)) % 1) - 0.5) > 0.46)
    brick = np.array([rng.uniform(130, 170), rng.uniform(55, 80), rng.uniform(40, 60)], np.float32)
    wall = np.where(mortar[..., None], 175.0, brick) + rng.normal(0, 8, (n, n, 3))
    m = _cover([poly], n)
    spray = np.clip(_blur(m * 255, n * 0.04) / 255 * rng.uniform(0.8, 1.0, (n, n)), 0, 1)[..., None]
    out = wall * (1 - spray) + rgb * spray
    line = _cover([poly], n, width=n * 0.05)[..., None] * 0.9
    return out * (1 - line) + 15 * line


def _origami(rng, n, poly, rgb):
    """Folded paper: the shape in two tones split by a fold line, with a soft shadow on a plain table."""
    yy, xx = _grid(n)
    table = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.2), rng.uniform(0.8, 0.95))
    shadow = _blur(_cover([poly + n * 0.04], n) * 255, n * 0.03)[..., None] / 255
    out = table * (1 - 0.35 * shadow)
    a, c = rng.uniform(0, np.pi), poly.mean(0) / n
    side = ((xx - c[0]) * math.cos(a) + (yy - c[1]) * math.sin(a)) > 0
    fill = np.where(side[..., None], rgb * 0.78, np.minimum(rgb * 1.08 + 10, 255))
    m = _cover([poly], n)[..., None]
    return out * (1 - m) + fill * m


def _tattoo(rng, n, poly, rgb):
    """A bold black outline with a faded colour fill on skin."""
    skin = _hsv(rng.uniform(0.04, 0.1), rng.uniform(0.25, 0.5), rng.uniform(0.55, 0.95))
    out = skin + _blur(rng.normal(0, 20, (n, n)) + 128, n * 0.05)[..., None] - 128
    m = _cover([poly], n)[..., None] * rng.uniform(0.6, 0.85)
    out = out * (1 - m) + _mix(rgb, skin, 0.2) * m
    line = _blur(_cover([poly], n, width=n * 0.06) * 255, n * 0.01)[..., None] / 255
    return out * (1 - line) + 25 * line


def _rendering(rng, n, poly, rgb):
    """A 3D rendering: the shape extruded (a darker side), lit from one side, on a gradient floor."""
    yy, xx = _grid(n)
    floor = _mix(np.full(3, rng.uniform(150, 200)), np.full(3, rng.uniform(60, 110)), yy[..., None])
    depth = rng.uniform(0.05, 0.09) * n
    direction = np.array([math.cos(a := rng.uniform(0, 2 * np.pi)), math.sin(a)])
    out = floor
    for t in np.linspace(1, 0.2, 5):
        side = _cover([poly + direction * depth * t], n)[..., None]
        out = out * (1 - side) + rgb * 0.45 * side
    top = _cover([poly], n)[..., None]
    light = (0.85 + 0.3 * (xx * direction[0] + yy * direction[1]))[..., None]
    return out * (1 - top) + np.clip(rgb * light, 0, 255) * top + rng.normal(0, 2, (n, n, 3))


MORE_STYLES = {
    "line drawing": _line_drawing, "clipart": _clipart, "chalk drawing": _chalk, "blueprint": _blueprint,
    "mosaic": _mosaic, "pixel art": _pixel_art, "neon sign": _neon, "watercolor": _watercolor,
    "embroidery": _embroidery, "graffiti": _graffiti, "origami": _origami, "tattoo": _tattoo,
    "rendering": _rendering,
}
