"""Fit a CLIP-architecture teacher (from scratch or from a checkpoint/tag) with open_clip's own ``ClipLoss``, and the
cached built-in teacher (``ensure_teacher``).

The built-in teacher (``synth``) is fitted on the teacher corpus (``distill.data.synth.corpus``: 25 shapes in 17
styles, captions with style, colour, size, position and rotation, disjoint from every world's images), never on the
task's images, with the recipe ``BUILTIN``; the package ships its weights (``distill.models.weights``), used when
the recipe hash is the current one. Any other dataset is fitted on its own images: captions come from
``manifest.jsonl`` in the dataset root (fields ``path``, ``caption``) or default to ``"a {domain} of a {class}"``;
each step an image is paired with one of its caption variants (see ``caption_variants``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import configs as _configs  # noqa: F401  (registers the timm image tower of distill-tiny-rn)
from .prompts import class_prompts
from .teachers import Teacher, arch_image_size, load_teacher, normalize_arch
from .weights import atomic_save, ensure_file, recipe_hash, torch_threads, write_json

DEFAULT_ARCH = "distill-tiny-rn"
# fitting on a dataset's own images (any dataset but synth)
DEFAULTS = {"steps": 400, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.1, "warmup": 50, "threads": 1}
# the built-in teacher: on the teacher corpus; geometric augmentation is a mild crop and a flip (a flipped image is
# paired with its mirror image's captions), no rotation, so that the captions' position and rotation words stay
# true; token embeddings stay at their random init (the corpus has ~80 words: training all 49,408 rows of the
# table only costs optimiser time)
BUILTIN = {"steps": 2000, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.1, "warmup": 100, "crop": 0.8,
           "flip": True, "rotate": False, "freeze_token_embedding": True}
FIT_VERSION = 2   # bump when the recipe changes: cached teachers then get a new key


# --------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Captioned:
    """Decoded images with their caption variants (what a fit needs)."""

    images: torch.Tensor            # uint8 [N, 3, S, S]
    labels: torch.Tensor            # long [N]
    domains: torch.Tensor           # long [N], index into domain_folders
    captions: list[list[str]]       # per image: its caption variants
    class_names: list[str]
    domain_names: list[str]
    domain_folders: list[str]
    fingerprint: str
    mirrored: list[list[str]] | None = None     # per image: the variants of its mirror image (used when flipped)

    def select_domains(self, folders: Sequence[str]) -> "Captioned":
        """The images of some domains (folder names); domain indices keep their meaning."""
        unknown = [d for d in folders if d not in self.domain_folders]
        if unknown:
            from ..data.registry import DatasetError
            raise DatasetError(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(self.domain_folders)}")
        wanted = torch.tensor([self.domain_folders.index(d) for d in folders])
        idx = torch.isin(self.domains, wanted).nonzero().flatten()
        fp = hashlib.sha1(f"{self.fingerprint}|{sorted(folders)}".encode()).hexdigest()
        return Captioned(self.images[idx], self.labels[idx], self.domains[idx],
                         [self.captions[i] for i in idx.tolist()], self.class_names, self.domain_names,
                         self.domain_folders, fp,
                         [self.mirrored[i] for i in idx.tolist()] if self.mirrored is not None else None)


def caption_variants(caption: str | None, domain_name: str, class_name: str) -> list[str]:
    """The captions an image is paired with (one drawn per step): its own caption, ``"a {domain} of a {class}"``,
    and both without the ``"a {domain} of "`` prefix (style-free: the class carries across domains), each with
    and without a final period."""
    short = f"a {domain_name} of a {class_name}"
    base = [caption.strip().rstrip(".")] if caption else []
    base.append(short)
    prefix = f"a {domain_name} of "
    base += [c[len(prefix):] for c in list(base) if c.startswith(prefix)]
    out = []
    for c in base:
        out += [c, c + "."]
    return list(dict.fromkeys(out))


def read_manifest(root: str | os.PathLike) -> dict[str, str]:
    """Relative path -> caption from ``root/manifest.jsonl`` (empty if there is none)."""
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("caption") and row.get("path"):
                    out[str(row["path"]).replace(os.sep, "/")] = row["caption"]
    return out


def load_captioned(root: str | os.PathLike, dataset: str = "synth", size: int = 32,
                   cache_dir: str | os.PathLike | None = None) -> Captioned:
    """Decode a dataset (``distill.data``) at ``size`` px and attach each image's caption variants."""
    from ..data.images import load_images
    from ..data.registry import get_spec

    spec = get_spec(dataset, root)
    images = load_images(root, spec, store_size=size, skip_unreadable=True, cache_dir=cache_dir)
    manifest = read_manifest(root)
    caps = []
    for rel, d, c in zip(images.paths, images.domains.tolist(), images.labels.tolist()):
        caps.append(caption_variants(manifest.get(rel), spec.domain_names[d], spec.class_names[c]))
    return Captioned(images.images, images.labels, images.domains, caps, list(spec.class_names),
                     list(spec.domain_names), list(spec.domains), images.fingerprint)


# --------------------------------------------------------------------------------------------------------------
# training


def light_augment(x01: torch.Tensor, generator: torch.Generator, scale=(0.6, 1.0), rotate: bool = True,
                  flip: bool = True, return_flips: bool = False):
    """Batched geometric augmentation, no colour changes (captions name colours): random resized crop (square,
    area fraction in ``scale``), a horizontal flip when ``flip``, and a random rotation when ``rotate``. With
    ``return_flips``, also the boolean mask of the flipped images."""
    n = x01.shape[0]
    s = torch.empty(n).uniform_(*scale, generator=generator).sqrt()
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - s)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    a = torch.rand(n, generator=generator) * 2 * math.pi if rotate else torch.zeros(n)
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s * cos * flip, -s * sin, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = s * sin * flip, s * cos, ty
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    out = F.grid_sample(x01, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (out, flip < 0) if return_flips else out


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name
         or "positional_embedding" in name or "token_embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


HELD_OUT = "domain, held out"   # zero-shot on domain d with `domain` prompts over the OTHER domains (a trial's view)


def zero_shot_report(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor,
                     class_names: Sequence[str], domain_names: Sequence[str],
                     templates: Sequence = ("domain", HELD_OUT, "single"),
                     batch_size: int = 512) -> dict[str, dict[str, float]]:
    """Per-domain zero-shot accuracy of uint8 ``images`` for each template set:
    {template set: {domain name: accuracy, ..., "mean": accuracy over all images}}. ``HELD_OUT``: each domain d
    with the ``domain`` templates expanded over the other domains only, as a trial with d held out prompts."""
    emb = torch.cat([teacher.encode_images(images[i:i + batch_size].float() / 255)
                     for i in range(0, len(images), batch_size)]).cpu()
    out = {}
    for t in templates:
        if t == HELD_OUT:
            pred = torch.empty_like(labels)
            for d, name in enumerate(domain_names):
                others = [n for n in domain_names if n != name]
                text = teacher.class_text(class_prompts(list(class_names), "domain", others)).cpu()
                m = domains == d
                pred[m] = (emb[m] @ text.t()).argmax(1)
        else:
            text = teacher.class_text(class_prompts(list(class_names), t, list(domain_names))).cpu()
            pred = (emb @ text.t()).argmax(1)
        res = {}
        for d, name in enumerate(domain_names):
            m = domains == d
            if m.any():
                res[name] = float((pred[m] == labels[m]).float().mean())
        res["mean"] = float((pred == labels).float().mean())
        out[t if isinstance(t, str) else " | ".join(t)] = res
    return out


def format_report(report: dict[str, dict[str, float]]) -> str:
    lines = []
    for t, res in report.items():
        accs = "  ".join(f"{k} {100 * v:5.1f}" for k, v in res.items())
        lines.append(f"zero-shot [{t}]  {accs}")
    return "\n".join(lines)


def chance_warnings(report: dict[str, dict[str, float]], num_classes: int, factor: float = 1.5) -> list[str]:
    """One warning line per prompt set on which the teacher is near chance (below ``factor`` x chance) on some
    domain."""
    chance, out = 1 / max(1, num_classes), []
    for t, res in report.items():
        low = [f"{d} {100 * acc:.1f}%" for d, acc in res.items() if d != "mean" and acc < factor * chance]
        if low:
            out.append(f"WARNING: the fitted teacher is near chance with [{t}] prompts on {', '.join(low)} (chance "
                       f"{100 * chance:.1f}%, warned below {factor:g}x chance): distilling it will not help there")
    return out


def fit_clip(data: Captioned, arch: str = DEFAULT_ARCH, init: str | None = None, steps: int = DEFAULTS["steps"],
             batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
             weight_decay: float = DEFAULTS["weight_decay"], warmup: int = DEFAULTS["warmup"], seed: int = 0,
             log: Callable[[str], None] | None = print, log_every: int = 50, crop: float = 0.6, flip: bool = True,
             rotate: bool = True, freeze_token_embedding: bool = False):
    """Train an open_clip model with ``ClipLoss``: from scratch (``init=None``) or from a checkpoint file / tag.
    Augmentation: ``light_augment`` (crop of ``crop``-1 of the area, ``flip``, ``rotate``). Returns the model (eval
    mode, on CPU). Deterministic for a given seed and torch thread count."""
    import open_clip
    from open_clip.loss import ClipLoss

    arch = normalize_arch(arch)
    torch.manual_seed(seed)
    if init:
        base = load_teacher(arch, checkpoint=init) if os.path.isfile(init) else load_teacher(arch, pretrained=init)
        model = base.model.requires_grad_(True)
        mean, std = base.mean, base.std
    else:
        model = open_clip.create_model(arch, pretrained=None)
        cfg = open_clip.get_model_preprocess_cfg(model)
        mean, std = cfg["mean"], cfg["std"]
    if freeze_token_embedding and hasattr(model, "token_embedding"):
        model.token_embedding.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)

    # tokens of every distinct caption, and per image the indices of its variants (and of its mirror image's)
    mirrored = data.mirrored if data.mirrored is not None else data.captions
    vocab = list(dict.fromkeys(c for caps in (*data.captions, *mirrored) for c in caps))
    where = {c: i for i, c in enumerate(vocab)}
    tokens = tokenizer(vocab)
    nvar = max(len(c) for c in (*data.captions, *mirrored))
    var_idx = torch.tensor([[where[c[j % len(c)]] for j in range(nvar)] for c in data.captions])
    var_mirror = torch.tensor([[where[c[j % len(c)]] for j in range(nvar)] for c in mirrored])

    images = data.images
    if images.shape[-1] != size:
        images = (F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False).clamp(0, 255).round().to(torch.uint8))
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    batch_size = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    t0, running = time.time(), None
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x, flipped = light_augment(images[idx].float() / 255, gen, scale=(crop, 1.0), rotate=rotate, flip=flip,
                                   return_flips=True)
        x = (x - mean_t) / std_t
        choice = torch.randint(nvar, (len(idx),), generator=gen)
        text = tokens[torch.where(flipped, var_mirror[idx, choice], var_idx[idx, choice])]
        img_f, txt_f, scale = model(x, text)[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if log and (step % log_every == 0 or step == steps or step == 1):
            log(f"fit step {step}/{steps}  loss {running:.3f}  logit scale {model.logit_scale.exp().item():.1f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  elapsed {time.time() - t0:.0f}s")
    return model.eval()


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Atomically write a plain state_dict that ``open_clip.create_model(arch, pretrained=path)`` loads."""
    return atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def fit_teacher(data_root: str | os.PathLike, out: str | os.PathLike, dataset: str = "synth",
                arch: str = DEFAULT_ARCH, init: str | None = None, steps: int = DEFAULTS["steps"],
                batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                weight_decay: float = DEFAULTS["weight_decay"], seed: int = 0, domains: Sequence[str] | None = None,
                cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = print,
                threads: int | None = DEFAULTS["threads"]) -> dict:
    """Fit, save ``out`` (+ ``out`` with ``.json``: settings and zero-shot accuracies), and return that summary.

    ``threads``: torch CPU threads for the fit (default 1: this small model gains little from more, and loses
    badly when the cores are shared with other work)."""
    arch = normalize_arch(arch)
    size = arch_image_size(arch) or 224
    data = load_captioned(data_root, dataset, size=size, cache_dir=cache_dir)
    train = data.select_domains(domains) if domains else data
    if log:
        log(f"fit {arch} on {len(train.labels)} images of {dataset} ({', '.join(domains or data.domain_folders)}), "
            f"{steps} steps, batch {batch_size}, lr {lr}, seed {seed}, init {init or 'scratch'}")
    t0 = time.time()
    with torch_threads(threads):
        model = fit_clip(train, arch=arch, init=init, steps=steps, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, log=log)
        seconds = time.time() - t0
        path = save_checkpoint(model, out)
        teacher = load_teacher(arch, checkpoint=path)
        report = zero_shot_report(teacher, data.images, data.labels, data.domains, data.class_names,
                                  data.domain_names)
    summary = {"arch": arch, "checkpoint": str(path), "teacher_id": teacher.id, "dataset": dataset,
               "data_root": str(data_root), "data_fingerprint": train.fingerprint, "images": len(train.labels),
               "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
               "init": init, "domains": list(domains) if domains else None, "fit_seconds": round(seconds, 1),
               "zero_shot": report, "fit_version": FIT_VERSION}
    write_json(summary, Path(str(path) + ".json"))
    if log:
        log(f"fitted in {seconds:.0f}s -> {path}")
        log(format_report(report))
        for line in chance_warnings(report, len(data.class_names)):
            log(line)
    return summary


# --------------------------------------------------------------------------------------------------------------
# the cached built-in teacher


def _captions_hash(root: str | os.PathLike) -> str | None:
    """sha1 of the root's manifest.jsonl and world.json: the image fingerprint (paths + file sizes) cannot tell
    apart two synth worlds of the same shape (uncompressed PNGs of one size all have one file size)."""
    h, found = hashlib.sha1(), False
    for name in ("manifest.jsonl", "world.json"):
        p = Path(root) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
            found = True
    return h.hexdigest() if found else None


def builtin_recipe(arch: str = DEFAULT_ARCH, steps: int | None = None, seed: int = 0, per_class: int | None = None,
                   **overrides) -> dict:
    """Everything the built-in teacher is a function of (its hash keys the cache and the shipped weights): the
    architecture's config, the teacher corpus's parameters, ``BUILTIN`` with ``overrides``, the seed."""
    import open_clip

    from ..data.synth.corpus import TEACHER_CORPUS, corpus_params

    unknown = sorted(set(overrides) - set(BUILTIN))
    if unknown:
        raise ValueError(f"built-in teacher: unknown recipe key(s) {unknown}; known: {sorted(BUILTIN)}")
    arch = normalize_arch(arch)
    rec = {**BUILTIN, **{k: v for k, v in overrides.items() if v is not None}}
    rec.update(arch=arch, arch_config=open_clip.get_model_config(arch), seed=int(seed),
               steps=int(steps or BUILTIN["steps"]), fit_version=FIT_VERSION,
               corpus=corpus_params(TEACHER_CORPUS, size=arch_image_size(arch) or 32, per_class=per_class))
    return rec


def corpus_captioned(path: str | os.PathLike) -> Captioned:
    """A drawn teacher corpus as fitting data (styles play the domains)."""
    import numpy as np

    from ..data.synth.corpus import load_corpus

    c = load_corpus(path)
    return Captioned(torch.from_numpy(np.array(c.images)), torch.from_numpy(c.labels.astype("int64")),
                     torch.from_numpy(c.styles.astype("int64")), [r["captions"] for r in c.rows], c.classes,
                     c.style_names, c.style_names, c.params["hash"], [r["mirrored"] for r in c.rows])


def fit_builtin(storage: str | os.PathLike, rec: dict, out: str | os.PathLike, data_root=None, dataset: str = "synth",
                log: Callable[[str], None] | None = print, threads: int | None = DEFAULTS["threads"]) -> dict:
    """Fit the built-in teacher of recipe ``rec`` on its corpus (drawn under ``<storage>/corpora`` on first use),
    save ``out`` + ``out.json``; the zero-shot report is on the task's images at ``data_root`` when given."""
    from ..data.synth.corpus import ensure_corpus

    t0 = time.time()
    corpus = ensure_corpus(Path(storage).expanduser().absolute() / "corpora", rec["corpus"], log=log)
    data = corpus_captioned(corpus)
    fit_args = {k: rec[k] for k in BUILTIN if k != "steps"}
    if log:
        log(f"fit {rec['arch']} on the teacher corpus {corpus.name} ({len(data.labels)} images, "
            f"{len(data.class_names)} shapes, {len(data.domain_names)} styles), {rec['steps']} steps, {fit_args}, "
            f"seed {rec['seed']} (recipe {recipe_hash(rec)})")
    with torch_threads(threads):
        t1 = time.time()
        model = fit_clip(data, arch=rec["arch"], steps=rec["steps"], seed=rec["seed"], log=log, **fit_args)
        seconds = time.time() - t1
        path = save_checkpoint(model, out)
        summary = {"arch": rec["arch"], "checkpoint": str(path), "recipe": rec, "recipe_hash": recipe_hash(rec),
                   "corpus": str(corpus), "fit_seconds": round(seconds, 1), "fit_version": FIT_VERSION}
        if data_root is not None:
            from ..data.images import load_images
            from ..data.registry import get_spec

            spec = get_spec(dataset, data_root)
            task = load_images(data_root, spec, store_size=arch_image_size(rec["arch"]) or 32,
                               cache_dir=Path(storage) / "cache")
            teacher = load_teacher(rec["arch"], checkpoint=path)
            summary.update(teacher_id=teacher.id, data_root=str(data_root), data_fingerprint=task.fingerprint,
                           zero_shot=zero_shot_report(teacher, task.images, task.labels, task.domains,
                                                      spec.class_names, spec.domain_names))
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(summary, Path(str(path) + ".json"))
    if log:
        log(f"fitted in {seconds:.0f}s ({summary['seconds']:.0f}s with the corpus and the report) -> {path}")
        if "zero_shot" in summary:
            log(f"on the task's {len(task.labels)} images at {data_root} (chance {100 / len(spec.classes):.0f}%):")
            log(format_report(summary["zero_shot"]))
            for line in chance_warnings(summary["zero_shot"], len(spec.classes)):
                log(line)
    return summary


def ensure_teacher(storage: str | os.PathLike, data_root: str | os.PathLike, dataset: str = "synth",
                   arch: str = DEFAULT_ARCH, steps: int | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = print, use_shipped: bool = True, **fit_kwargs) -> Path:
    """The fitted teacher, cached at ``<storage>/teachers/<arch>-<hash>.pt`` (its summary in ``<...>.pt.json``).

    ``synth``: the built-in teacher of ``builtin_recipe(arch, steps, seed, **fit_kwargs)`` (the task's images play
    no part in it, and in its key): the package's shipped weights when their recipe hash is this one, else fitted
    on the teacher corpus on first use. Other datasets: fitted on the dataset's own images (the key covers them).
    Written atomically under a file lock, so concurrent drivers fit once."""
    arch = normalize_arch(arch)
    storage = Path(storage).expanduser().absolute()
    threads = fit_kwargs.pop("threads", DEFAULTS["threads"])
    fit_kwargs.pop("cache_dir", None)
    if str(dataset).lower() == "synth":
        rec = builtin_recipe(arch, steps, seed, **fit_kwargs)
        key = recipe_hash(rec)
    else:
        from ..data.images import fingerprint, list_images
        from ..data.registry import get_spec

        size = arch_image_size(arch) or 224
        files = list_images(data_root, get_spec(dataset, data_root))     # no decoding: paths and sizes
        settings = {"fingerprint": fingerprint(files, size), "captions": _captions_hash(data_root),
                    "steps": int(steps or DEFAULTS["steps"]), "seed": int(seed), "arch": arch, "dataset": dataset,
                    "fit_version": FIT_VERSION, **{k: fit_kwargs[k] for k in sorted(fit_kwargs)}}
        key = recipe_hash(settings)
    path = storage / "teachers" / f"{arch}-{key}.pt"

    def produce() -> None:
        if str(dataset).lower() != "synth":
            fit_teacher(data_root, path, dataset=dataset, arch=arch, steps=steps or DEFAULTS["steps"], seed=seed,
                        cache_dir=storage / "cache", log=log, threads=threads, **fit_kwargs)
            return
        from .weights import materialise

        shipped = materialise(f"teacher-{arch}", key, path) if use_shipped else None
        if shipped is not None:
            write_json({"arch": arch, "checkpoint": str(path), "recipe": rec, "recipe_hash": key, "source": "shipped",
                        **{k: shipped[k] for k in ("sha256", "command", "zero_shot", "zero_shot_on", "fit_seconds")
                           if k in shipped}},
                       Path(str(path) + ".json"))
            if log:
                log(f"teacher: {arch} weights from the package (recipe {key}) -> {path}")
            return
        fit_builtin(storage, rec, path, data_root=data_root, dataset=dataset, log=log, threads=threads)

    return ensure_file(path, produce, f"teacher: reusing fitted {path}", log)
