"""``python -m distill.data synth --out DIR`` draws the built-in world; ``info ROOT`` summarises a dataset."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .images import class_counts, layout_problems, walk_images
from .registry import DatasetError, get_spec
from .synth import ensure_world


def main(argv: list[str] | None = None, prog: str = "python -m distill.data") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Draw the built-in world, or list a dataset's domains, classes and image counts.",
        epilog="examples:\n  distill data synth --out distill_runs/data/synth\n  distill data info /data/PACS",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
        files = walk_images(args.root, spec)
        print(f"{spec.name} at {args.root}: {len(files)} images, {len(spec.domains)} domains, "
              f"{len(spec.classes)} classes")
        print("classes: " + ", ".join(f"{c} ({n})" if c != n else c for c, n in zip(spec.classes, spec.class_names)))
        counts = class_counts(args.root, spec, files)
        width = max(len(c) for c in spec.classes)
        print(f"\n  {'class':{width}s} " + " ".join(f"{d[:12]:>12s}" for d in spec.domains))
        for c in spec.classes:
            cells = ["–" if counts[d][c] is None else str(counts[d][c]) for d in spec.domains]
            print(f"  {c:{width}s} " + " ".join(f"{x:>12s}" for x in cells))
        print(f"  {'total':{width}s} " + " ".join(f"{sum(v or 0 for v in counts[d].values()):>12d}"
                                                   for d in spec.domains))
        errors, warnings = layout_problems(args.root, spec, files)
        for w in warnings:
            print(f"warning: {w}")
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2 if errors or not files else 0
    except (DatasetError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
