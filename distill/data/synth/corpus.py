"""Corpora drawn by the world's generator, standing in for what pretrained models have seen:

- the **teacher corpus** (``TEACHER_CORPUS``): every shape of ``SHAPES`` (the world's 5 and 20 more) in every style
  (the world's 4 and 13 more), each image with captions naming its style, colour (10 colours), shape, size, position
  and rotation: what the built-in CLIP is fitted on, as CLIP was fitted on the web;
- the **student corpus** (``STUDENT_CORPUS``): photo style only, every shape, labelled by shape: what students are
  pretrained on, as torchvision's students were on ImageNet.

Neither holds a world image: image i of (style s, shape c) is drawn from ``default_rng([SALT, kind, seed, s, c,
i])`` (indices into ``ALL_STYLES``/``SHAPES``), while the world draws from ``default_rng([seed, d, c, i])``, and
colour is uniform (no cue). A corpus is a pure function of its parameters (``corpus_hash``); ``ensure_corpus``
draws it once under a root, atomically (temporary folder renamed into place), as ``ensure_world`` does:
``images.npy`` (uint8 [N, 3, S, S]), ``labels.npy`` (shape index into the corpus's ``classes``), ``styles.npy``,
``captions.jsonl`` (per image its attributes; teacher corpus: its caption variants, and those of its mirror image,
which a fit that flips the image uses) and ``corpus.json`` (written last).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .more_styles import MORE_STYLES
from .shapes import SHAPES
from .styles import STYLES
from .world import COLOURS, VERSION, draw

CORPUS_VERSION = 1      # bump when a corpus's drawing or captions change (its hash, hence every cache key, changes)
SALT = 0x5EED_C0        # first entropy word of every corpus image: no corpus stream is a world stream
KINDS = {"teacher": 1, "student": 2}
ALL_STYLES = {**STYLES, **MORE_STYLES}
PALETTE = {**COLOURS, "orange": (245, 140, 30), "pink": (240, 120, 180), "cyan": (40, 200, 210),
           "brown": (130, 80, 40), "grey": (128, 128, 128)}
# rotational symmetry order of each shape (0: any rotation looks the same): the caption's rotation is modulo 360/k
SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "cross": 4, "pentagon": 5, "hexagon": 6,
            "diamond": 2, "rectangle": 2, "ellipse": 2, "hourglass": 2, "sparkle": 4, "hexagram": 6}
# the mirror image (x -> -x) of a shape rotated by r is the shape rotated by -r (symmetric about the vertical axis,
# the default), by 180 - r (about the horizontal axis), or no rotation of it (chiral: its caption drops the angle)
MIRROR = {"arrow": "x", "crescent": "x", "parallelogram": None, "L shape": None, "lightning bolt": None}

TEACHER_CORPUS = {"kind": "teacher", "seed": 0, "size": 32, "styles": list(ALL_STYLES), "classes": list(SHAPES),
                  "per_class": 32, "boost": {"photo": 4, "sketch": 4, "cartoon": 4, "painting": 4}}
STUDENT_CORPUS = {"kind": "student", "seed": 0, "size": 32, "styles": ["photo"], "classes": list(SHAPES),
                  "per_class": 800, "boost": {}}


def corpus_params(base: dict, **overrides) -> dict:
    """A corpus's full parameters (``base`` with ``overrides``), checked."""
    p = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    p.pop("version", None), p.pop("world_version", None)       # full parameters given back: set again below
    unknown = set(p) - set(TEACHER_CORPUS)
    if unknown:
        raise ValueError(f"corpus: unknown parameter(s) {sorted(unknown)}")
    if p["kind"] not in KINDS:
        raise ValueError(f"corpus kind must be one of {list(KINDS)}, got {p['kind']!r}")
    bad = [s for s in p["styles"] if s not in ALL_STYLES] + [c for c in p["classes"] if c not in SHAPES]
    if bad:
        raise ValueError(f"corpus: unknown style(s)/shape(s) {bad}")
    if int(p["per_class"]) < 1 or int(p["size"]) < 8:
        raise ValueError("corpus: per_class must be >= 1 and size >= 8")
    return {"kind": p["kind"], "seed": int(p["seed"]), "size": int(p["size"]), "styles": list(p["styles"]),
            "classes": list(p["classes"]), "per_class": int(p["per_class"]),
            "boost": {k: int(v) for k, v in sorted(p["boost"].items()) if k in p["styles"]},
            "version": CORPUS_VERSION, "world_version": VERSION}


def corpus_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ---- captions --------------------------------------------------------------------------------------------------------

def _size_word(frac: float) -> str:
    return "small" if frac < 0.55 else "large" if frac >= 0.65 else "medium"


def _position(cx: float, cy: float) -> str:
    h = "left" if cx < 0.42 else "right" if cx > 0.58 else ""
    v = "top" if cy < 0.42 else "bottom" if cy > 0.58 else ""
    if h and v:
        return f"in the {v} {h}"
    return f"at the {v}" if v else f"on the {h}" if h else "in the centre"


def _rotation(shape: str, rot: float) -> str | None:
    k = SYMMETRY.get(shape, 1)
    if k == 0:
        return None
    period = 360 / k
    deg = int(round((rot % period) / 15) * 15) % int(round(period))
    return f"rotated by {deg} degrees"


def mirrored(shape: str, attrs: dict) -> dict:
    """The drawing attributes of an image's mirror image (a horizontal flip): position and rotation mirrored."""
    axis = MIRROR.get(shape, "y")
    rot = None if axis is None else -attrs["rotation"] if axis == "y" else 180 - attrs["rotation"]
    return {**attrs, "position": [1 - attrs["position"][0], attrs["position"][1]], "rotation": rot}


def captions(style: str, colour: str, shape: str, attrs: dict) -> list[str]:
    """An image's caption variants (the fit draws one per step): with its style, with attributes, and style-free
    (so that class words carry across styles), each with and without a final period."""
    size, pos = _size_word(attrs["size"]), _position(*attrs["position"])
    rot = None if attrs["rotation"] is None else _rotation(shape, attrs["rotation"])
    base = [f"a {style} of a {size} {colour} {shape} {pos}", f"a {style} of a {colour} {shape}",
            f"a {style} of a {shape}", f"a {colour} {shape}", f"a {shape}",
            f"a {size} {shape} {pos}" + (f", {rot}" if rot else "")]
    return [c for b in base for c in (b, b + ".")]


# ---- drawing ---------------------------------------------------------------------------------------------------------

def items(params: dict) -> list[tuple[str, str, int]]:
    """(style, shape, i) of every image, in storage order."""
    boost = params["boost"]
    return [(s, c, i) for s in params["styles"] for c in params["classes"]
            for i in range(params["per_class"] * boost.get(s, 1))]


def draw_item(params: dict, style: str, shape: str, i: int) -> tuple[np.ndarray, str, dict]:
    """One corpus image (uint8 [S, S, 3]), its colour name and drawing attributes."""
    rng = np.random.default_rng([SALT, KINDS[params["kind"]], params["seed"], list(ALL_STYLES).index(style),
                                 SHAPES.index(shape), i])
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    img, attrs = draw(ALL_STYLES[style], shape, PALETTE[colour], params["size"], rng)
    return img, colour, attrs


def generate_corpus(out: str | os.PathLike, params: dict, log: Callable[[str], None] | None = None) -> Path:
    """Draw a corpus into the empty folder ``out``."""
    out = Path(out)
    todo = items(params)
    n, size = len(todo), params["size"]
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    labels, styles = np.zeros(n, np.int16), np.zeros(n, np.int16)
    t0 = time.time()
    with open(out / "captions.jsonl", "w") as f:
        for k, (style, shape, i) in enumerate(todo):
            img, colour, attrs = draw_item(params, style, shape, i)
            images[k] = img.transpose(2, 0, 1)
            labels[k], styles[k] = params["classes"].index(shape), params["styles"].index(style)
            row = {"style": style, "shape": shape, "colour": colour, **attrs}
            if params["kind"] == "teacher":
                row["captions"] = captions(style, colour, shape, attrs)
                row["mirrored"] = captions(style, colour, shape, mirrored(shape, attrs))
            f.write(json.dumps(row, sort_keys=True) + "\n")
            if log and (k + 1) % 5000 == 0:
                log(f"corpus: {k + 1}/{n} images drawn ({time.time() - t0:.0f}s)")
    images.flush()
    del images
    np.save(out / "labels.npy", labels)
    np.save(out / "styles.npy", styles)
    with open(out / "corpus.json", "w") as f:   # written last: its presence marks a complete corpus
        json.dump({**params, "hash": corpus_hash(params), "images": n,
                   "seconds": round(time.time() - t0, 1)}, f, indent=1)
    return out


def ensure_corpus(root: str | os.PathLike, params: dict, log: Callable[[str], None] | None = print) -> Path:
    """``<root>/<kind>-<hash>``, drawn there on first use (temporary folder renamed into place)."""
    root = Path(root).expanduser().absolute()
    path = root / f"{params['kind']}-{corpus_hash(params)}"
    if (path / "corpus.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        if log:
            log(f"corpus: drawing {len(items(params))} {params['kind']} images ({len(params['classes'])} shapes, "
                f"{len(params['styles'])} styles, {params['size']} px) into {path}")
        t0 = time.time()
        generate_corpus(tmp, params, log)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "corpus.json").is_file():   # another process finished first: keep theirs
                raise
        if log:
            log(f"corpus: drawn in {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass
class Corpus:
    images: np.ndarray          # uint8 [N, 3, S, S] (memory-mapped)
    labels: np.ndarray          # int16 [N], index into classes
    styles: np.ndarray          # int16 [N], index into style_names
    classes: list[str]
    style_names: list[str]
    rows: list[dict]            # per image: style, shape, colour, size, position, rotation (+ captions)
    params: dict


def load_corpus(path: str | os.PathLike) -> Corpus:
    path = Path(path)
    with open(path / "corpus.json") as f:
        meta = json.load(f)
    with open(path / "captions.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return Corpus(np.load(path / "images.npy", mmap_mode="r"), np.load(path / "labels.npy"),
                  np.load(path / "styles.npy"), meta["classes"], meta["styles"], rows, meta)
