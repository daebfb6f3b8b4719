"""Weights shipped inside the package, so that a newcomer's first run fits and pretrains nothing: the built-in
teacher (``teacher-<arch>.pt``) and pretrained students (``student-<backbone>-<size>px.pt``), each an fp16
state_dict with a JSON beside it recording the recipe hash, the file's sha256 and the exact command that
reproduces it.

``materialise(name, recipe_hash, dest)`` writes the shipped weights (back in float32) to ``dest`` when the shipped
recipe hash equals the current code's, so a recipe change without re-shipping is never served stale weights (and
``tests/test_miniature.py`` fails until the file is shipped again).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ...console import say

WEIGHTS_DIR = Path(__file__).resolve().parent


def recipe_hash(rec: dict) -> str:
    """16 hex digits of the SHA-1 of a recipe's JSON (sorted keys): the name of the weights it produces."""
    return hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: leave torch's setting), restoring the setting afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped(name: str) -> dict | None:
    """The record of a shipped file (its JSON, plus ``path``), or None."""
    meta, path = WEIGHTS_DIR / f"{name}.json", WEIGHTS_DIR / f"{name}.pt"
    if not (meta.is_file() and path.is_file()):
        return None
    with open(meta) as f:
        return {**json.load(f), "path": str(path)}


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock (POSIX), so concurrent drivers fit or pretrain a model once."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (not POSIX)
            pass
        yield


def ensure_file(path: Path, produce, reusing: str | None = None, log=print) -> Path:
    """``path`` when it exists (saying ``reusing`` with --verbose only: reusing a cache is not news; ``log=None``
    never), else ``produce()`` (which writes it) under ``path.lock``, re-checked inside the lock: concurrent drivers
    produce a cached model once. (Not a test of ``log is print``: Ray Train replaces ``builtins.print`` in a process
    that has run a trainer, and the default argument would then no longer be it.)"""
    if path.is_file():
        if log is not None and reusing:
            say(reusing)
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():
            produce()
    return path


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomically write ``obj`` as indented, sorted JSON."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)   # mkstemp's 0600 would make installed package files unreadable to other users
    os.replace(tmp, path)


def atomic_save(obj, dest: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file renamed into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:   # a file object: the archive is named "archive", not after the temporary file,
            torch.save(obj, f)        # so equal weights give equal bytes (and equal teacher ids) in every storage
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def materialise(name: str, recipe_hash: str, dest: str | os.PathLike) -> dict | None:
    """Write the shipped weights ``name`` as a float32 state_dict at ``dest`` (atomically) if their recorded recipe
    hash is ``recipe_hash`` and their sha256 is the recorded one; returns the record, or None (nothing written)."""
    rec = shipped(name)
    if rec is None or rec.get("recipe_hash") != recipe_hash:
        return None
    if sha256(rec["path"]) != rec.get("sha256"):
        raise RuntimeError(f"shipped weights {rec['path']} do not match their recorded sha256: reinstall the package "
                           f"or ship them again ({rec.get('command')})")
    state = torch.load(rec["path"], map_location="cpu", weights_only=True)
    atomic_save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, Path(dest))
    return rec


def ship(state: dict, name: str, recipe_hash: str, command: str, info: dict | None = None,
         directory: str | os.PathLike | None = None) -> Path:
    """Write ``state`` as an fp16 state_dict ``<name>.pt`` with its record ``<name>.json`` (into the package by
    default)."""
    directory = Path(directory) if directory else WEIGHTS_DIR
    path = atomic_save({k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
                         for k, v in state.items()}, directory / f"{name}.pt")
    write_json({"name": name, "recipe_hash": recipe_hash, "sha256": sha256(path), "command": command,
                "bytes": path.stat().st_size, **(info or {})}, directory / f"{name}.json")
    return path
