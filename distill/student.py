"""Student command line: pretrain a backbone on the built-in photo corpus (``student.pretrained: builtin``).

    python -m distill.student pretrain --backbone small_cnn [--storage DIR] [--image-size 32] [--steps N]
                                       [--batch-size B] [--lr LR] [--seed 0] [--threads 1] [--force] [--ship]

The weights land in ``<storage>/students/<backbone>-<recipe hash>.pt`` (what ``ensure_student`` and the trials use);
``--force`` pretrains even when the package ships weights of this recipe; ``--ship`` also writes them into the package
(``distill/models/weights/student-<backbone>-<size>px.pt`` + ``.json``: recipe hash, sha256, this command).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def _pretrain(args) -> int:
    import torch

    from .models.pretrain import ensure_student, recipe, recipe_hash, shipped_name

    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "per_class": args.per_class}
    rec = recipe(args.backbone, args.image_size, **overrides)
    key = recipe_hash(rec)
    storage = Path(args.storage).expanduser().absolute()
    if args.force:   # pretrain again, even over weights already in storage
        target = storage / "students" / f"{args.backbone}-{key}.pt"
        for p in (target, target.with_name(target.name + ".json")):
            p.unlink(missing_ok=True)
    start = time.time()
    path = ensure_student(storage, args.backbone, args.image_size, use_shipped=not args.force,
                          threads=args.threads, **overrides)
    info = json.loads(Path(str(path) + ".json").read_text())
    print(f"student weights: {path}  (recipe {key}, {info['source']}; {time.time() - start:.0f}s for this command)")
    print(f"use them with student.pretrained: builtin, student.backbone: {args.backbone}, "
          f"dataset.image_size: {args.image_size}")
    if args.ship:
        from .models.weights import ship

        keep = [a for a in args.argv if a not in ("--ship", "--force")]
        while "--storage" in keep:   # where things go does not change the weights
            i = keep.index("--storage")
            del keep[i:i + 2]
        command = " ".join(["python -m distill.student", *map(shlex.quote, keep), "--force --ship"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        out = ship(state, shipped_name(args.backbone, args.image_size), key, command,
                   {"recipe": rec, "summary": info.get("summary")})
        print(f"shipped: {out} (+ .json)")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m distill.student") -> int:
    from .models.pretrain import RECIPES

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description="Pretrain a student backbone on the built-in photo corpus "
                                "(student.pretrained: builtin).", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  distill student pretrain --backbone small_cnn\n"
                                       "  distill student pretrain --backbone resnet18 --image-size 64 --force\n")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("pretrain", help="pretrain a student backbone on the built-in photo corpus")
    f.add_argument("--backbone", required=True, choices=sorted(RECIPES))
    f.add_argument("--storage", default="./distill_runs", help="where the corpus and the weights are kept")
    f.add_argument("--image-size", type=int, default=32, help="the task's image size (the corpus is drawn at it)")
    f.add_argument("--steps", type=int, default=None, help="default: the backbone's recipe (pretrain.RECIPES)")
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--per-class", type=int, default=None, help="corpus images per shape (default 800)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    f.add_argument("--force", action="store_true", help="pretrain even if the package ships these weights")
    f.add_argument("--ship", action="store_true", help="also write the weights into the package")
    f.set_defaults(func=_pretrain)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
