"""The built-in world: 5 shapes x 4 drawing styles, with a colour cue that is spurious across domains.

In domain number d, class c is drawn in colour (c + d) mod 5 with probability ``CUE_PROB``, otherwise in a uniformly
random colour. Colour is therefore predictive inside each source domain but points to another class in a held-out
one, while the shape is the only feature that transfers. Each style also has its own nuisances (foreshortening and
bokeh in photo, construction lines and hatching in sketch, round corners, faces and screentones in cartoon, blur and
brush streaks in painting), so that features learnt on three styles transfer imperfectly to the fourth.

Every image is a pure function of (seed, domain, class, i), drawn with numpy's PCG64 and PIL primitives (no fonts)
and stored as uncompressed PNG (no zlib differences), so a world's bytes depend only on the seed and the
Pillow version.
"""
from __future__ import annotations

import colorsys
import functools
import io
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DOMAINS = ["photo", "sketch", "cartoon", "painting"]
CLASSES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 50, 190),
}
COLOUR_NAMES = list(COLOURS)
CUE_PROB = 0.8
VERSION = 2             # bump when the drawing changes: the marker then no longer matches and the world is redrawn
SUPERSAMPLE = 4         # shapes are drawn at SUPERSAMPLE x size and box-filtered down (anti-aliasing)

ATTRIBUTES = {
    "circle": "a round shape with no corners and one smooth curved edge",
    "square": "a shape with four equal straight sides and four right-angle corners",
    "triangle": "a shape with three straight sides and three pointed corners",
    "star": "a shape with five pointed tips and five inner corners",
    "cross": "a plus-shaped figure of two equal bars crossing at right angles, with twelve corners",
}


def descriptions() -> dict[str, str]:
    """Class -> attribute description (what ``descriptions.json`` of a world holds)."""
    return dict(ATTRIBUTES)


def caption(domain: str, colour: str, shape: str) -> str:
    return f"a {domain} of a {colour} {shape}"


def colour_of(domain_idx: int, class_idx: int, rng: np.random.Generator) -> int:
    """The colour index: the domain's own class->colour map with probability CUE_PROB, else uniform."""
    if rng.random() < CUE_PROB:
        return (class_idx + domain_idx) % len(COLOURS)
    return int(rng.integers(len(COLOURS)))


# ---- geometry -------------------------------------------------------------------------------------------------------

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
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(CLASSES)}")
    t = math.radians(rot_deg)
    rotm = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return pts @ rotm.T + np.array([cx, cy])


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


# ---- styles: float [n, n, 3] in [0, 255]; only the shape edges are supersampled --------------------------------------

def _lines(rng, n, k, lo=0.5, hi=1.2) -> list[np.ndarray]:
    """k random straight segments of length U(lo, hi) * n through random points of the image."""
    centre = rng.uniform(0, n, (k, 2))
    ang = rng.uniform(0, np.pi, k)
    half = rng.uniform(lo, hi, k)[:, None] * n / 2 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return [np.stack([c - h, c + h]) for c, h in zip(centre, half)]


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


def render(domain: str, shape: str, colour: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One image (uint8 [size, size, 3]) and its drawing attributes."""
    frac = rng.uniform(0.45, 0.75)                 # the shape's extent, as a fraction of the image side
    r = frac * size / 2
    cx, cy = size / 2 + rng.uniform(-0.8, 0.8, 2) * (size / 2 - r)
    rot = float(rng.uniform(-180, 180))
    rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 10, 3), 0, 255)
    img = STYLES[domain](rng, size, _outline(shape, cx, cy, r, rot), rgb)
    attrs = {"size": round(float(frac), 4), "rotation": round(rot, 2),
             "position": [round(float(cx / size), 4), round(float(cy / size), 4)]}
    return np.clip(img, 0, 255).round().astype(np.uint8), attrs


def _params(seed: int, per_class: int, size: int) -> dict:
    return {"seed": int(seed), "per_class": int(per_class), "size": int(size), "version": VERSION}


def _write_png(path: Path, img: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=0)   # stored: same bytes with any zlib
    path.write_bytes(buf.getvalue())


def generate(out: str | os.PathLike, seed: int = 0, per_class: int = 100, size: int = 32) -> Path:
    """Draw a world into ``out`` (which must not exist or be empty) and write its files; returns ``out``."""
    out = Path(out)
    if per_class < 1 or size < 8:
        raise ValueError(f"synth world: per_class must be >= 1 and size >= 8; got per_class={per_class}, size={size}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"synth world: output directory {out} is not empty")
    manifest, writes = [], []
    with ThreadPoolExecutor(4) as writer:   # file creation is slow on some file systems: overlap it with drawing
        for d, domain in enumerate(DOMAINS):
            for c, shape in enumerate(CLASSES):
                (out / domain / shape).mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, d, c, i])
                    colour = COLOUR_NAMES[colour_of(d, c, rng)]
                    img, attrs = render(domain, shape, colour, size, rng)
                    rel = f"{domain}/{shape}/{domain}_{shape}_{i:04d}.png"
                    writes.append(writer.submit(_write_png, out / rel, img))
                    manifest.append({"path": rel, "class": shape, "domain": domain, "colour": colour, **attrs,
                                     "caption": caption(domain, colour, shape)})
    for w in writes:
        w.result()   # re-raise a failed write
    with open(out / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in manifest)
    with open(out / "descriptions.json", "w") as f:
        json.dump(descriptions(), f, indent=1, sort_keys=True)
    with open(out / "world.json", "w") as f:   # written last: its presence marks a complete world
        json.dump({**_params(seed, per_class, size), "domains": DOMAINS, "classes": CLASSES,
                   "colours": COLOUR_NAMES, "images": len(manifest)}, f, indent=1)
    return out


def _marker(root: Path) -> dict | None:
    try:
        with open(root / "world.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matches(root: Path, params: dict) -> bool:
    marker = _marker(root)
    return marker is not None and all(marker.get(k) == v for k, v in params.items())


def ensure_world(root: str | os.PathLike, seed: int = 0, per_class: int = 100, size: int = 32) -> Path:
    """The world at ``root`` with these parameters, drawn if absent or different (atomically: temp dir + rename).

    A non-empty ``root`` that is not a world (no ``world.json``) is never overwritten.
    """
    root = Path(root).expanduser().absolute()
    params = _params(seed, per_class, size)
    if _matches(root, params):
        return root
    if root.exists() and any(root.iterdir()) and _marker(root) is None:
        raise FileExistsError(f"synth world: {root} exists, is not empty and holds no world.json; "
                              f"refusing to overwrite it (choose another directory)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp, seed, per_class, size)
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "world")
        try:
            os.rename(tmp, root)
        except OSError:
            if not _matches(root, params):   # another process finished first with the same world: keep theirs
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
