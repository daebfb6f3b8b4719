"""Teacher command line: fit a CLIP-architecture teacher, or measure zero-shot accuracy.

    python -m distill.teacher fit --data DIR [--dataset synth] [--on corpus|data] [--storage DIR] [--arch A]
                                  [--steps N] [--batch-size B] [--lr LR] [--seed 0] [--out PATH] [--ship] ...
    python -m distill.teacher zeroshot --arch A (--checkpoint P | --pretrained TAG) --data DIR [--dataset synth]

``fit`` on ``synth`` fits the built-in teacher on the teacher corpus (``--on corpus``, drawn under ``--storage`` on
first use) and reports zero-shot accuracy on the world at ``--data``; ``--on data`` (the default for any other
dataset) fits on the dataset's own images. ``--ship`` writes the fitted corpus teacher into the package.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def _data_root(path: str, dataset: str) -> Path:
    """The dataset root; for ``synth``, a missing world is drawn there first."""
    root = Path(path).expanduser().absolute()
    if dataset.lower() == "synth" and not (root / "world.json").is_file():
        from .data.synth import ensure_world

        print(f"drawing the built-in world into {root}")
        ensure_world(root)
    elif not root.is_dir():
        raise SystemExit(f"error: dataset root {root} does not exist")
    return root


def _fit(args) -> int:
    from .models.fit import DEFAULTS, builtin_recipe, fit_builtin, fit_teacher, recipe_hash
    from .models.teachers import normalize_arch

    start = time.time()
    root = _data_root(args.data, args.dataset)
    on = args.on or ("corpus" if args.dataset.lower() == "synth" else "data")
    arch = normalize_arch(args.arch)
    if on == "corpus":
        if args.init or args.domains:
            raise SystemExit("error: --init and --domains apply to --on data only")
        rec = builtin_recipe(arch, args.steps, args.seed, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, per_class=args.per_class)
        key = recipe_hash(rec)
        out = args.out or Path(args.storage) / "teachers" / f"{arch}-{key}.pt"
        summary = fit_builtin(args.storage, rec, out, data_root=root, dataset=args.dataset, threads=args.threads)
    else:
        steps = args.steps or DEFAULTS["steps"]
        out = args.out or Path(args.storage) / "teachers" / f"{arch}-{args.dataset}-steps{steps}-seed{args.seed}.pt"
        summary = fit_teacher(root, out, dataset=args.dataset, arch=arch, init=args.init, steps=steps,
                              batch_size=args.batch_size or DEFAULTS["batch_size"], lr=args.lr or DEFAULTS["lr"],
                              weight_decay=args.weight_decay if args.weight_decay is not None
                              else DEFAULTS["weight_decay"], seed=args.seed, domains=args.domains or None,
                              cache_dir=args.cache_dir, threads=args.threads)
    print(f"checkpoint: {summary['checkpoint']}  (load with load_teacher({summary['arch']!r}, "
          f"checkpoint=...), or teacher.arch: {summary['arch']} + teacher.checkpoint: <path> in a config)")
    print(f"total {time.time() - start:.0f}s for this command")
    if args.ship:
        if on != "corpus":
            raise SystemExit("error: --ship ships the built-in teacher (--on corpus) only")
        _ship(args, arch, key, rec, summary, root)
    return 0


def _ship(args, arch: str, key: str, rec: dict, summary: dict, root: Path) -> None:
    """Write the fitted teacher into the package as fp16, with the zero-shot report of those very (rounded)
    weights on the world at ``root``."""
    import tempfile

    import torch

    from .data.images import load_images
    from .data.registry import get_spec
    from .models.fit import BUILTIN, format_report, zero_shot_report
    from .models.teachers import load_teacher
    from .models.weights import ship

    keep = [a for a in args.argv if a != "--ship"]
    for flag in ("--data", "--storage", "--out", "--cache-dir"):   # where things go does not change the weights
        while flag in keep:
            i = keep.index(flag)
            del keep[i:i + 2]
    command = " ".join(["python -m distill.teacher fit --data WORLD_DIR", *map(shlex.quote, keep[1:]), "--ship"])
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(rounded, Path(tmp) / "t.pt")
        teacher = load_teacher(arch, checkpoint=Path(tmp) / "t.pt")
        spec = get_spec(args.dataset, root)
        task = load_images(root, spec, store_size=teacher.image_size, cache_dir=Path(args.storage) / "cache")
        report = zero_shot_report(teacher, task.images, task.labels, task.domains, spec.class_names,
                                  spec.domain_names)
    print(f"the shipped (fp16) weights, on the task's {len(task.labels)} images:\n{format_report(report)}")
    path = ship(state, f"teacher-{arch}", key, command,
                {"recipe": rec, "zero_shot": report, "zero_shot_on": f"{spec.name} world {root.name}: "
                 f"{len(task.labels)} images", "fit_seconds": summary["fit_seconds"], "builtin_defaults": BUILTIN})
    print(f"shipped: {path} (+ .json)")


def _zeroshot(args) -> int:
    import torch

    from .data.images import load_images
    from .data.registry import get_spec
    from .models.fit import format_report, zero_shot_report
    from .models.teachers import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    root = _data_root(args.data, args.dataset)
    teacher = load_teacher(args.arch, pretrained=args.pretrained, checkpoint=args.checkpoint,
                           preprocess=args.preprocess, device=args.device)
    spec = get_spec(args.dataset, root)
    images = load_images(root, spec, store_size=teacher.image_size, skip_unreadable=True, cache_dir=args.cache_dir)
    templates = args.prompts or ["domain", "single"]
    report = zero_shot_report(teacher, images.images, images.labels, images.domains, spec.class_names,
                              spec.domain_names, templates=templates)
    print(f"{teacher}  on {len(images)} images of {spec.name} at {root}")
    print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


EXAMPLES = """examples:
  distill teacher fit --data distill_runs/data/synth                  the built-in teacher (on its corpus)
  distill teacher fit --data ~/data/PACS --dataset PACS --init openai --arch ViT-B-16 --on data
  distill teacher zeroshot --arch ViT-B-16 --pretrained openai --data ~/data/PACS --dataset PACS
"""


def main(argv: list[str] | None = None, prog: str = "python -m distill.teacher") -> int:
    from .models.fit import DEFAULT_ARCH, DEFAULTS

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description="Fit a CLIP-architecture teacher, or measure a teacher's "
                                "per-domain zero-shot accuracy.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a CLIP-architecture teacher with open_clip's ClipLoss")
    f.add_argument("--data", required=True, help="dataset root (for synth: drawn there if missing)")
    f.add_argument("--dataset", default="synth", help="registry name (synth, PACS, ..., folder)")
    f.add_argument("--arch", default=DEFAULT_ARCH, help="open_clip architecture")
    f.add_argument("--on", choices=["corpus", "data"], default=None,
                   help="fit on the teacher corpus (default for synth) or on the dataset's own images")
    f.add_argument("--storage", default="distill_runs", help="the corpus and (by default) the checkpoint go here")
    f.add_argument("--init", default=None, help="start from a checkpoint file or a pretrained tag (default: scratch)")
    f.add_argument("--steps", type=int, default=None, help="default: 2000 on the corpus, 400 on data")
    f.add_argument("--batch-size", type=int, default=None, help="default 128")
    f.add_argument("--lr", type=float, default=None, help="default 2e-3")
    f.add_argument("--weight-decay", type=float, default=None, help="default 0.1")
    f.add_argument("--per-class", type=int, default=None, help="corpus images per (style, shape) (default 32)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default=None, help="checkpoint path (default <storage>/teachers/<arch>-...pt)")
    f.add_argument("--ship", action="store_true", help="write the fitted corpus teacher into the package")
    f.add_argument("--domains", nargs="*", help="train on these domain folders only (default: all)")
    f.add_argument("--cache-dir", default=None, help="keep decoded images here")
    f.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help="torch CPU threads (default 1: fastest when the cores are shared)")
    f.set_defaults(func=_fit)

    z = sub.add_parser("zeroshot", help="per-domain zero-shot accuracy of a teacher")
    z.add_argument("--arch", default=DEFAULT_ARCH)
    z.add_argument("--checkpoint", default=None)
    z.add_argument("--pretrained", default=None, help="an open_clip pretrained tag")
    z.add_argument("--data", required=True)
    z.add_argument("--dataset", default="synth")
    z.add_argument("--preprocess", default="clip", choices=["clip", "imagenet"])
    z.add_argument("--prompts", nargs="*", help="template sets or literal templates (default: domain single)")
    z.add_argument("--device", default="cpu")
    z.add_argument("--cache-dir", default=None)
    z.add_argument("--threads", type=int, default=None)
    z.add_argument("--json", action="store_true", help="also print the report as JSON")
    z.set_defaults(func=_zeroshot)

    args = p.parse_args(argv)
    args.argv = argv
    from .data.registry import DatasetError
    from .models.prompts import PromptError
    from .models.teachers import TeacherError

    try:
        return args.func(args)
    except (TeacherError, DatasetError, PromptError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
