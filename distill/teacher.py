"""Teacher command line: fit a CLIP-architecture teacher on a captioned dataset, or measure zero-shot accuracy.

    python -m distill.teacher fit --data DIR [--dataset synth] [--arch distill-tiny-rn] [--init CKPT_OR_TAG]
                                  [--steps N] [--batch-size 128] [--lr 2e-3] [--seed 0] [--out PATH] [--domains ...]
    python -m distill.teacher zeroshot --arch A (--checkpoint P | --pretrained TAG) --data DIR [--dataset synth]
"""
from __future__ import annotations

import argparse
import json
import sys
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
    from .models.fit import fit_teacher
    from .models.teachers import normalize_arch

    root = _data_root(args.data, args.dataset)
    out = args.out or Path("distill_runs") / "teachers" / (
        f"{normalize_arch(args.arch)}-{args.dataset}-steps{args.steps}-seed{args.seed}.pt")
    summary = fit_teacher(root, out, dataset=args.dataset, arch=args.arch, init=args.init, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                          domains=args.domains or None, cache_dir=args.cache_dir, threads=args.threads)
    print(f"checkpoint: {summary['checkpoint']}  (load with load_teacher({summary['arch']!r}, "
          f"checkpoint=...), or teacher.arch: {summary['arch']} + teacher.checkpoint: <path> in a config)")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    from .models.fit import DEFAULT_ARCH, DEFAULTS

    p = argparse.ArgumentParser(prog="python -m distill.teacher", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a CLIP-architecture teacher with open_clip's ClipLoss")
    f.add_argument("--data", required=True, help="dataset root (for synth: drawn there if missing)")
    f.add_argument("--dataset", default="synth", help="registry name (synth, PACS, ..., folder)")
    f.add_argument("--arch", default=DEFAULT_ARCH, help="open_clip architecture")
    f.add_argument("--init", default=None, help="start from a checkpoint file or a pretrained tag (default: scratch)")
    f.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    f.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    f.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    f.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default=None, help="checkpoint path (default distill_runs/teachers/<arch>-...pt)")
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
    from .data.registry import DatasetError
    from .models.prompts import PromptError
    from .models.teachers import TeacherError

    try:
        return args.func(args)
    except (TeacherError, DatasetError, PromptError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
