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

import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .draw import SUPERSAMPLE  # noqa: F401  (re-exported)
from .shapes import _outline
from .styles import STYLES

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


def render(domain: str, shape: str, colour: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One image of the world (uint8 [size, size, 3]) and its drawing attributes."""
    return draw(STYLES[domain], shape, COLOURS[colour], size, rng)


def draw(style, shape: str, rgb, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One image (uint8 [size, size, 3]) of ``shape`` in colour ``rgb`` drawn by ``style`` (a function of
    (rng, size, outline, rgb)), and its drawing attributes (size, rotation, position)."""
    frac = rng.uniform(0.45, 0.75)                 # the shape's extent, as a fraction of the image side
    r = frac * size / 2
    cx, cy = size / 2 + rng.uniform(-0.8, 0.8, 2) * (size / 2 - r)
    rot = float(rng.uniform(-180, 180))
    rgb = np.clip(np.array(rgb, np.float32) + rng.normal(0, 10, 3), 0, 255)
    img = style(rng, size, _outline(shape, cx, cy, r, rot), rgb)
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
