"""Decode a ``root/<domain>/<class>/<image>`` dataset once into a uint8 tensor, with an on-disk cache."""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .registry import DatasetError, DatasetSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
PARALLEL_MIN_FILES = 256   # decode in a thread pool from this many files on
CACHE_VERSION = 1          # part of the fingerprint: bump when decoding changes


class UnreadableImageError(RuntimeError):
    """An image file that PIL cannot decode."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(f"unreadable image {self.path}: {reason} "
                         f"(remove the file, or set dataset.skip_unreadable: true to skip such files)")


@dataclass
class ImageSet:
    """A decoded dataset: row i is ``paths[i]`` with label ``labels[i]`` and domain ``domains[i]``.

    ``images`` may be memory-mapped from the cache: treat it as read-only.
    """

    spec: DatasetSpec
    images: torch.Tensor          # uint8 [N, 3, S, S]
    labels: torch.Tensor          # long [N], index into spec.classes
    domains: torch.Tensor         # long [N], index into spec.domains
    paths: list[str]              # relative to the root, '/'-separated, sorted
    fingerprint: str              # sha1 of paths, file sizes and store size
    skipped: list[str] = field(default_factory=list)   # unreadable files left out (skip_unreadable)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def store_size(self) -> int:
        return int(self.images.shape[-1])

    def domain_indices(self, domain: str) -> torch.Tensor:
        """Row indices (ascending) of one domain's images."""
        return torch.nonzero(self.domains == self.spec.domain_index(domain)).flatten()

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per domain and class: {domain: {class: n}}."""
        table = torch.zeros(len(self.spec.domains), len(self.spec.classes), dtype=torch.long)
        table.index_put_((self.domains, self.labels), torch.ones_like(self.labels), accumulate=True)
        return {d: {c: int(table[i, j]) for j, c in enumerate(self.spec.classes)}
                for i, d in enumerate(self.spec.domains)}

    def summary(self) -> str:
        """A human-readable table of the images per domain and class."""
        counts = self.counts()
        lines = [f"{self.spec.name}: {len(self)} images of {self.store_size}px, "
                 f"{len(self.spec.domains)} domains, {len(self.spec.classes)} classes"
                 + (f", {len(self.skipped)} unreadable skipped" if self.skipped else "")]
        lines += [f"  {d}: {sum(row.values())} ({', '.join(f'{c} {n}' for c, n in row.items())})"
                  for d, row in counts.items()]
        return "\n".join(lines)


def list_images(root: str | os.PathLike, spec: DatasetSpec) -> list[tuple[str, int]]:
    """(relative path, file size) of every image under ``root/<domain>/<class>/`` (recursively), sorted by path.

    Hidden files and directories (a leading '.') are ignored.
    """
    root = Path(root)
    missing = [d for d in spec.domains if not (root / d).is_dir()]
    if missing:
        raise DatasetError(f"dataset {spec.name}: missing domain folder(s) {', '.join(missing)} in {root}")
    files = walk_images(root, spec)
    if not files:
        raise DatasetError(f"dataset {spec.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                           f"under {root}/<domain>/<class>/")
    errors, _ = layout_problems(root, spec, files)
    if errors:
        raise DatasetError(f"dataset {spec.name} at {root}: " + "; ".join(errors))
    return files


def walk_images(root: str | os.PathLike, spec: DatasetSpec) -> list[tuple[str, int]]:
    """(relative path, file size) of the images under ``root/<domain>/<class>/``, sorted, without any check."""
    root = Path(root)
    files = []
    for domain in spec.domains:
        for cls in spec.classes:
            for dirpath, dirnames, filenames in os.walk(root / domain / cls):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    path = Path(dirpath) / name
                    files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(files)


def class_counts(root: str | os.PathLike, spec: DatasetSpec, files: list[tuple[str, int]]) -> dict:
    """{domain: {class: images, or None where the class folder does not exist}}."""
    counts = {d: {c: (0 if (Path(root) / d / c).is_dir() else None) for c in spec.classes} for d in spec.domains}
    for rel, _ in files:
        domain, cls = rel.split("/", 2)[:2]
        counts[domain][cls] = (counts[domain][cls] or 0) + 1
    return counts


def layout_problems(root: str | os.PathLike, spec: DatasetSpec, files: list[tuple[str, int]]
                    ) -> tuple[list[str], list[str]]:
    """(errors, warnings) about lopsided data, found before any trial: an empty class folder is an error (a class
    there that has no image); a class folder missing from some domains only is a warning with the counts."""
    counts = class_counts(root, spec, files)
    errors = [f"class folder {d}/{c} holds no images" for d in spec.domains for c in spec.classes
              if counts[d][c] == 0]
    warnings = []
    for c in spec.classes:
        missing = [d for d in spec.domains if counts[d][c] is None]
        if missing and len(missing) < len(spec.domains):
            per = ", ".join(f"{d} {counts[d][c] or 0}" for d in spec.domains)
            warnings.append(f"class {c!r} has no folder in domain(s) {', '.join(missing)} (images: {per})")
    return errors, warnings


def check_layout(root: str, spec_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """layout_problems of a registered (or folder) dataset root, listed once per process and state of its folders
    (a sweep's validation builds many configs of one dataset)."""
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in Path(root).glob("*/*") if p.is_dir()))
    return _check_layout(root, spec_name, stamp)


@functools.lru_cache(maxsize=32)
def _check_layout(root: str, spec_name: str, stamp: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .registry import get_spec

    spec = get_spec(spec_name, root)
    try:
        files = list_images(root, spec)
    except DatasetError as exc:
        return (str(exc),), ()
    errors, warnings = layout_problems(root, spec, files)
    return tuple(errors), tuple(warnings)


def fingerprint(files: list[tuple[str, int]], store_size: int) -> str:
    h = hashlib.sha1(f"images-v{CACHE_VERSION} store_size={store_size}\n".encode())
    for rel, size in files:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def decode(path: str | os.PathLike, store_size: int) -> np.ndarray:
    """uint8 [3, S, S]: RGB, shorter side resized to S (antialiased bicubic), centre-cropped to S x S."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (store_size, store_size))   # JPEG: let the decoder downscale by 2^k, never below S
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
            w, h = img.size
            scale = store_size / min(w, h)
            nw, nh = max(store_size, round(w * scale)), max(store_size, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - store_size) // 2, (nh - store_size) // 2
            img = img.crop((left, top, left + store_size, top + store_size))
            return np.array(img, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:   # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def cache_path(cache_dir: str | os.PathLike, fp: str) -> Path:
    return Path(cache_dir) / f"images-{fp}.pt"


def _labels(spec: DatasetSpec, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    dom = {d: i for i, d in enumerate(spec.domains)}
    cls = {c: i for i, c in enumerate(spec.classes)}
    parts = [p.split("/", 2) for p in paths]
    return (torch.tensor([cls[p[1]] for p in parts], dtype=torch.long),
            torch.tensor([dom[p[0]] for p in parts], dtype=torch.long))


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_images(root: str | os.PathLike, spec: DatasetSpec, store_size: int, skip_unreadable: bool = False,
                cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> ImageSet:
    """Decode every image of ``spec`` under ``root`` to ``store_size`` x ``store_size`` (or read the cache).

    With ``cache_dir``, the decoded tensor is kept in ``cache_dir/images-<fingerprint>.pt`` and memory-mapped by
    later calls (other processes included), so decoding happens once per (files, store size).
    """
    files = list_images(root, spec)
    for warning in layout_problems(root, spec, files)[1]:
        print(f"[distill] warning: dataset {spec.name}: {warning}", flush=True)
    fp = fingerprint(files, store_size)
    marker = Path(root) / "world.json"  # generated worlds: same paths and sizes for every seed, so hash the parameters
    if marker.is_file():
        fp = hashlib.sha1(f"{fp}\n{marker.read_text()}".encode()).hexdigest()
    paths = [rel for rel, _ in files]
    cached = cache_path(cache_dir, fp) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        blob = torch.load(cached, mmap=True, weights_only=True)
        if blob["skipped"] and not skip_unreadable:
            raise UnreadableImageError(Path(root) / blob["skipped"][0], "could not be decoded when it was cached")
        labels, domains = _labels(spec, blob["paths"])
        return ImageSet(spec, blob["images"], labels, domains, blob["paths"], fp, blob["skipped"])

    images = torch.empty(len(paths), 3, store_size, store_size, dtype=torch.uint8)
    ok = torch.ones(len(paths), dtype=torch.bool)

    def one(i: int) -> None:
        try:
            images[i] = torch.from_numpy(decode(Path(root) / paths[i], store_size))
        except UnreadableImageError:
            if not skip_unreadable:
                raise
            ok[i] = False

    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(paths) >= PARALLEL_MIN_FILES else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:   # PIL releases the GIL while decoding and resizing
            try:
                for _ in pool.map(one, range(len(paths))):
                    pass
            except BaseException:
                pool.shutdown(cancel_futures=True)   # fail fast on the first unreadable file
                raise
    else:
        for i in range(len(paths)):
            one(i)
    skipped = [p for p, good in zip(paths, ok.tolist()) if not good]
    if skipped:
        keep = torch.nonzero(ok).flatten()
        images, paths = images[keep], [paths[i] for i in keep.tolist()]
        if not paths:
            raise DatasetError(f"dataset {spec.name}: every image under {root} is unreadable")
    if cached is not None:
        save_atomic({"images": images, "paths": paths, "skipped": skipped, "store_size": store_size}, cached)
    labels, domains = _labels(spec, paths)
    return ImageSet(spec, images, labels, domains, paths, fp, skipped)
