"""``python -m distill.data synth --out DIR`` draws the built-in world; ``info ROOT`` summarises a dataset."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .images import list_images
from .registry import DatasetError, get_spec
from .synth import ensure_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="draw the built-in world (idempotent)")
    p.add_argument("--out", required=True, help="directory of the world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=100, help="images per (domain, class)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p = sub.add_parser("info", help="domains, classes and image counts of a dataset root (no decoding)")
    p.add_argument("root")
    p.add_argument("--dataset", default=None,
                   help="registered name (default: synth if ROOT holds a world.json, else 'folder')")
    args = parser.parse_args(argv)

    try:
        if args.command == "synth":
            start = time.perf_counter()
            root = ensure_world(args.out, args.seed, args.per_class, args.size)
            print(f"world at {root} ({time.perf_counter() - start:.1f}s)")
            return 0
        name = args.dataset or ("synth" if (Path(args.root) / "world.json").is_file() else "folder")
        spec = get_spec(name, args.root)
        files = list_images(args.root, spec)
        print(f"{spec.name} at {args.root}: {len(files)} images, {len(spec.domains)} domains, "
              f"{len(spec.classes)} classes")
        print("classes: " + ", ".join(f"{c} ({n})" if c != n else c for c, n in zip(spec.classes, spec.class_names)))
        for domain, human in zip(spec.domains, spec.domain_names):
            n = sum(1 for rel, _ in files if rel.split("/", 1)[0] == domain)
            print(f"  {domain}" + (f" ({human})" if human != domain else "") + f": {n} images")
        return 0
    except (DatasetError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
