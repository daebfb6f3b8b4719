"""Shape outlines: the world's five shapes and twenty more for the corpora (``distill.data.synth.corpus``).

Every shape is a closed polygon of radius ``r`` (its farthest vertex from the centre), centred at ``(cx, cy)`` and
rotated by ``rot_deg``. The five shapes of the world are drawn exactly as before the corpora existed (the world's
bytes do not change); the others are unit polygons scaled and rotated the same way.
"""
from __future__ import annotations

import functools
import math

import numpy as np

WORLD_SHAPES = ["circle", "square", "triangle", "star", "cross"]


def _regular(k: int, phase_deg: float = -90.0) -> np.ndarray:
    ang = np.deg2rad(phase_deg + 360.0 / k * np.arange(k))
    return np.stack([np.cos(ang), np.sin(ang)], 1)


def _star(k: int, inner: float) -> np.ndarray:
    ang = np.deg2rad(-90 + 180.0 / k * np.arange(2 * k))
    rad = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(ang), np.sin(ang)], 1) * rad[:, None]


def _arc(cx: float, cy: float, rad: float, a0: float, a1: float, k: int = 24) -> np.ndarray:
    ang = np.linspace(a0, a1, k)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def _crescent() -> np.ndarray:
    """The part of the unit disc outside a disc of radius 0.8 centred at (0.45, 0)."""
    outer = _arc(0, 0, 1.0, 0, 2 * np.pi, 97)[:-1]
    outer = outer[np.hypot(outer[:, 0] - 0.45, outer[:, 1]) > 0.8]
    outer = outer[np.argsort(np.mod(np.arctan2(outer[:, 1], outer[:, 0]), 2 * np.pi))]
    inner = _arc(0.45, 0, 0.8, 0, 2 * np.pi, 97)[:-1]
    inner = inner[np.hypot(inner[:, 0], inner[:, 1]) < 1.0]
    inner = inner[np.argsort(-np.mod(np.arctan2(inner[:, 1], inner[:, 0] - 0.45), 2 * np.pi))]
    return np.concatenate([outer, inner])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)


def _teardrop() -> np.ndarray:
    """A disc of radius 0.6 at (0, 0.4) with its tangents to an apex at (0, -1)."""
    alpha = math.acos(0.6 / 1.4)
    arc = _arc(0, 0.4, 0.6, -np.pi / 2 + alpha, 3 * np.pi / 2 - alpha, 36)
    return np.concatenate([arc, [[0.0, -1.0]]])


_UNIT = {
    "pentagon": lambda: _regular(5),
    "hexagon": lambda: _regular(6, 0),
    "diamond": lambda: np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], float),
    "rectangle": lambda: np.array([(-1, -0.45), (1, -0.45), (1, 0.45), (-1, 0.45)], float),
    "ellipse": lambda: _arc(0, 0, 1.0, 0, 2 * np.pi, 49)[:-1] * np.array([1.0, 0.55]),
    "semicircle": lambda: np.concatenate([_arc(0, 0.5, 1.0, np.pi, 2 * np.pi, 33)]),
    "heart": _heart,
    "crescent": _crescent,
    "arrow": lambda: np.array([(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2),
                               (-1, 0.2)], float),
    "trapezoid": lambda: np.array([(-1, 0.55), (1, 0.55), (0.45, -0.55), (-0.45, -0.55)], float),
    "parallelogram": lambda: np.array([(-1, 0.5), (0.35, 0.5), (1, -0.5), (-0.35, -0.5)], float),
    "L shape": lambda: np.array([(-0.6, -1), (-0.15, -1), (-0.15, 0.55), (0.75, 0.55), (0.75, 1), (-0.6, 1)],
                                float),
    "T shape": lambda: np.array([(-1, -1), (1, -1), (1, -0.55), (0.22, -0.55), (0.22, 1), (-0.22, 1),
                                 (-0.22, -0.55), (-1, -0.55)], float),
    "chevron": lambda: np.array([(-1, -0.1), (0, -0.75), (1, -0.1), (1, 0.4), (0, -0.25), (-1, 0.4)], float),
    "lightning bolt": lambda: np.array([(0.25, -1), (-0.55, 0.15), (-0.05, 0.15), (-0.3, 1), (0.6, -0.2),
                                        (0.1, -0.2), (0.45, -1)], float),
    "kite": lambda: np.array([(0, -1), (0.6, -0.35), (0, 1), (-0.6, -0.35)], float),
    "teardrop": _teardrop,
    "hourglass": lambda: np.array([(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)], float),
    "sparkle": lambda: _star(4, 0.3),
    "hexagram": lambda: _star(6, 0.58),
}
SHAPES = WORLD_SHAPES + list(_UNIT)


@functools.lru_cache(maxsize=None)
def unit(shape: str) -> np.ndarray:
    """A shape's outline centred on its bounding box and scaled to radius 1 (read-only)."""
    pts = np.asarray(_UNIT[shape](), dtype=float)
    pts = pts - (pts.min(0) + pts.max(0)) / 2
    pts = pts / np.linalg.norm(pts, axis=1).max()
    pts.setflags(write=False)
    return pts


def _outline(shape: str, cx: float, cy: float, r: float, rot_deg: float) -> np.ndarray:
    """Vertices [K, 2] of the closed outline of ``shape`` (radius r, centre (cx, cy), rotated by rot_deg)."""
    if shape == "circle":
        ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
    elif shape == "square":
        ang = np.deg2rad(45 + 90 * np.arange(4))
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
    elif shape == "triangle":
        ang = np.deg2rad(-90 + 120 * np.arange(3))
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
    elif shape == "star":
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * rad[:, None]
    elif shape == "cross":
        a = 0.3 * r
        pts = np.array([(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
                        (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)], dtype=float)
    elif shape in _UNIT:
        pts = unit(shape) * r
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    t = math.radians(rot_deg)
    rotm = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return pts @ rotm.T + np.array([cx, cy])
