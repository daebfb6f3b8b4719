"""One YAML schema for a single trial and a sweep: defaults, `--set` overrides, and validation that lists every
problem at once, before any Ray or model work starts.

The schema is data (``DEFAULTS`` + ``TYPES``); method hyperparameters live with each method (``Method.hparams``) and
are validated against the chosen method. The sweep-only sections (``search``, ``seeds``) are validated by
``distill.tune``; a single trial ignores them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": "distill",  # the run or sweep name: MLflow experiment, sweep directory, registered models
    "storage": "./distill_runs",  # data, caches, runs and the MLflow sqlite store (a shared mount on a cluster)
    "seed": 0,  # data split, initialisation and batch order (a sweep: each of `seeds`)
    "test_domains": None,  # list of domain folder names; None = every domain of the dataset
    "dataset": {
        "name": "synth",  # synth (the built-in world), a DomainBed dataset (PACS, VLCS, OfficeHome, ...) or folder
        "root": None,  # synth: <storage>/data/synth when not given (generated on first use)
        "holdout_fraction": 0.2,  # each domain's in-domain validation share (DomainBed's 80/20 split)
        "image_size": 32,  # student input resolution
        "store_size": None,  # decoded images kept in memory at this size (default: image_size * 8/7, >= image_size)
        "skip_unreadable": False,  # false: an unreadable image is an error before anything starts
        "world": {"seed": 0, "per_class": 100, "size": 32},  # the built-in world's generator settings
    },
    "teacher": {
        "arch": "distill-tiny-rn",  # any open_clip architecture
        "pretrained": None,  # an open_clip pretrained tag (e.g. openai); needs internet or a warm cache
        "checkpoint": "fit",  # a local checkpoint path, or `fit`: the project's small teacher fitted on the dataset
        "fit_steps": None,  # steps when fitting (None: the fitter's default)
        "preprocess": "clip",  # clip (correct) | imagenet (what RISE/SCMD/VL2V's code fed CLIP)
        "prompts": "domain",  # a template set name (single, domain, openai, rise, scmd, li) or a list of templates
        "online": False,  # true: the teacher encodes the student's augmented views in the workers (white-box)
        "views": 0,  # K > 0: the driver caches the teacher's embeddings of K augmented views per image (black-box)
    },
    "student": {
        "backbone": "resnet18",  # small_cnn | resnet18/34/50 | mobilenet_v3_small/large | efficientnet_b0 (torchvision)
        "pretrained": "none",  # none | imagenet (torchvision; internet or a warm hub cache) | builtin (photo corpus)
        "freeze_bn": False,  # BatchNorm always in eval mode (DomainBed's ResNet; SCMD, VL2V)
    },
    "method": {"name": "erm"},  # a method of the registry; its hyperparameters: method.<key>
    "train": {
        "steps": 300,  # optimiser steps (per stage, for staged methods)
        "batch_size": 32,  # per source domain (DomainBed)
        "optimizer": "adam",  # adam | adamw | sgd
        "lr": 1e-3,  # learning rate
        "weight_decay": 0.0,  # L2 penalty (decoupled with adamw)
        "momentum": 0.9,  # sgd only
        "lr_schedule": "constant",  # constant | cosine | step (x0.1 at 80%)
        "eval_every": 50,  # steps between evaluations (each one a selectable checkpoint)
        "augment": True,  # DomainBed's training augmentation (random resized crop, flip, colour jitter, grayscale)
        "amp": "auto",  # auto (bf16 on GPU) | bf16 | off
        "grad_clip": None,
        "num_checkpoints": 2,  # kept per trial: the latest, and the best by source validation (first of equal scores)
        "max_failures": 1,  # worker failures retried from the last checkpoint
        "averaging": "none",  # none | sma (DomainBed/SCMD's moving average) | swad (SWAD's loss-valley average)
        "averaging_start": 300,  # sma: the first averaged step (SCMD: 300)
        "swad": {"n_converge": 3, "n_tolerance": 6, "tolerance_ratio": 0.3, "bn_steps": 500},  # SWAD's defaults
        "device_data": "auto",  # auto | gpu | host: the decoded images on the GPU, or in host memory (streamed)
        "compile": False,  # torch.compile the student's backbone (GPU; measure it: benchmarks/loop.py)
        "stop_collapsed": 0,  # N > 0: a trial whose best source-val accuracy in its last stage is still at most
                              # 1.5 x chance after N evaluation rounds stops there, marked collapsed; 0: never
    },
    "resources": {
        "num_workers": 1,  # DDP workers per trial
        "cpus_per_worker": 1,
        "gpus_per_worker": 0,  # may be fractional (0.25: four small trials share a GPU)
        "launcher": "train",  # train: a Ray Train TorchTrainer per trial | inline: single-worker trials run in
                              # the launching process (a sweep's reused Tune trial function): no per-trial processes
    },
    # sweep-only sections, validated by distill.tune
    "seeds": None,
    "search": None,
}

# expected types; tuples allow several; None in a tuple allows null
NUMBER = (int, float)
TYPES: dict[str, Any] = {
    "name": str,
    "storage": str,
    "seed": int,
    "test_domains": (list, str, type(None)),
    "dataset.name": str,
    "dataset.root": (str, type(None)),
    "dataset.holdout_fraction": NUMBER,
    "dataset.image_size": int,
    "dataset.store_size": (int, type(None)),
    "dataset.skip_unreadable": bool,
    "dataset.world.seed": int,
    "dataset.world.per_class": int,
    "dataset.world.size": int,
    "teacher.arch": str,
    "teacher.pretrained": (str, type(None)),
    "teacher.checkpoint": (str, type(None)),
    "teacher.fit_steps": (int, type(None)),
    "teacher.preprocess": str,
    "teacher.prompts": (str, list),
    "teacher.online": bool,
    "teacher.views": int,
    "student.backbone": str,
    "student.pretrained": str,
    "student.freeze_bn": bool,
    "method.name": str,
    "train.steps": int,
    "train.batch_size": int,
    "train.optimizer": str,
    "train.lr": NUMBER,
    "train.weight_decay": NUMBER,
    "train.momentum": NUMBER,
    "train.lr_schedule": str,
    "train.eval_every": int,
    "train.augment": bool,
    "train.amp": str,
    "train.grad_clip": (int, float, type(None)),
    "train.num_checkpoints": int,
    "train.max_failures": int,
    "train.averaging": str,
    "train.averaging_start": int,
    "train.swad.n_converge": int,
    "train.swad.n_tolerance": int,
    "train.swad.tolerance_ratio": NUMBER,
    "train.swad.bn_steps": int,
    "train.device_data": str,
    "train.compile": bool,
    "train.stop_collapsed": int,
    "resources.num_workers": int,
    "resources.cpus_per_worker": NUMBER,
    "resources.gpus_per_worker": NUMBER,
    "resources.launcher": str,
    "seeds": (list, type(None)),
    "search": (dict, type(None)),
}

CHOICES = {
    "teacher.preprocess": ["clip", "imagenet"],
    "student.pretrained": ["none", "imagenet", "builtin"],
    "train.optimizer": ["adam", "adamw", "sgd"],
    "train.lr_schedule": ["constant", "cosine", "step"],
    "train.amp": ["auto", "bf16", "off"],
    "train.averaging": ["none", "sma", "swad"],
    "train.device_data": ["auto", "gpu", "host"],
    "resources.launcher": ["train", "inline"],
}

FIT = "fit"


class ConfigError(ValueError):
    """A config with problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


# ---------------------------------------------------------------------------------------------------------- helpers
def get_dotted(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent floats without a dot (``3e-3``, ``1e4``) as numbers, as YAML 1.2 and
    Python do: under YAML 1.1 they are strings, so ``lr: 3e-3`` would fail the schema's number check."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """A config file's or a --set value's YAML (safe: plain data only)."""
    return yaml.load(text, Loader=_Loader)   # noqa: S506 - _Loader is a SafeLoader


def parse_overrides(items: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """`a.b=value` strings -> {dotted key: YAML-parsed value}, plus problems."""
    out, problems = {}, []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        try:
            out[key.strip()] = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: value is not valid YAML ({exc})")
    return out, problems


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "search":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full in {"dataset", "dataset.world", "teacher", "student", "train", "train.swad",
                                                      "resources", "method"}:
            keys += _leaf_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def _type_ok(value: Any, expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        return False  # YAML `true` is not a number
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_name(expected: Any) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "mapping",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _suggest(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------------- validation
def schema_problems(cfg: dict) -> list[str]:
    """Unknown keys, wrong types, bad ranges and unknown choices: everything that needs no imports of heavy code."""
    problems: list[str] = []
    known = list(TYPES)
    for key in _leaf_keys(cfg):
        if key.startswith("method.") and key != "method.name":
            continue  # method hyperparameters: checked against the method
        if key not in TYPES:
            problems.append(f"unknown key {key!r}{_suggest(key, known)}")
    for key, expected in TYPES.items():
        value = get_dotted(cfg, key, _MISSING)
        if value is _MISSING:
            continue
        if not _type_ok(value, expected):
            problems.append(f"{key}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}")
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of {CHOICES[key]}")

    def check(key, ok, msg):
        value = get_dotted(cfg, key)
        if _type_ok(value, TYPES[key]) and value is not None and not ok(value):
            problems.append(f"{key}: {msg}, got {value!r}")

    check("dataset.holdout_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
    check("dataset.image_size", lambda v: v >= 8, "must be >= 8")
    check("dataset.store_size", lambda v: v >= get_dotted(cfg, "dataset.image_size", 0), "must be >= dataset.image_size")
    check("dataset.world.per_class", lambda v: v >= 5, "must be >= 5")
    check("dataset.world.size", lambda v: v >= 16, "must be >= 16")
    check("teacher.fit_steps", lambda v: v >= 1, "must be >= 1")
    check("train.steps", lambda v: v >= 1, "must be >= 1")
    check("train.batch_size", lambda v: v >= 1, "must be >= 1")
    check("train.lr", lambda v: v > 0, "must be > 0")
    check("train.weight_decay", lambda v: v >= 0, "must be >= 0")
    check("train.eval_every", lambda v: v >= 1, "must be >= 1")
    check("train.num_checkpoints", lambda v: v >= 1, "must be >= 1")
    check("train.max_failures", lambda v: v >= 0, "must be >= 0")
    check("train.stop_collapsed", lambda v: v >= 0, "must be >= 0 (evaluation rounds; 0: never)")
    check("train.grad_clip", lambda v: v > 0, "must be > 0")
    check("teacher.views", lambda v: v >= 0, "must be >= 0 (0: the centre view only)")
    check("train.averaging_start", lambda v: v >= 1, "must be >= 1")
    check("train.swad.n_converge", lambda v: v >= 1, "must be >= 1")
    check("train.swad.n_tolerance", lambda v: v >= 1, "must be >= 1")
    check("train.swad.tolerance_ratio", lambda v: v >= 0, "must be >= 0")
    check("train.swad.bn_steps", lambda v: v >= 0, "must be >= 0")
    views = get_dotted(cfg, "teacher.views")
    if isinstance(views, int) and not isinstance(views, bool) and views > 0:
        if get_dotted(cfg, "teacher.online") is True:
            problems.append("teacher.views and teacher.online: choose one way for the teacher to see the student's "
                            "views (online: the teacher runs in the workers; views: K cached views)")
        if get_dotted(cfg, "train.augment") is False:
            problems.append("teacher.views: cached augmented views need train.augment: true")
    check("resources.num_workers", lambda v: v >= 1, "must be >= 1")
    check("resources.cpus_per_worker", lambda v: v > 0, "must be > 0")
    check("resources.gpus_per_worker", lambda v: v >= 0, "must be >= 0")
    gpus = get_dotted(cfg, "resources.gpus_per_worker")
    if isinstance(gpus, (int, float)) and gpus > 1 and gpus != int(gpus):
        problems.append(f"resources.gpus_per_worker: fractions are for sharing one GPU (<= 1), got {gpus!r}")
    workers = get_dotted(cfg, "resources.num_workers")
    if isinstance(gpus, (int, float)) and 0 < gpus < 1 and isinstance(workers, int) and workers > 1:
        problems.append(f"resources: gpus_per_worker {gpus!r} < 1 with num_workers {workers}: Ray may put two workers "
                        f"of one trial on the same GPU, and NCCL then fails with 'Duplicate GPU detected' (Ray issue "
                        f"48012); share GPUs between single-worker trials, or give each worker a whole GPU")
    if get_dotted(cfg, "resources.launcher") == "inline" and isinstance(workers, int) and workers != 1:
        problems.append(f"resources.launcher inline runs a trial's one worker in the launching process: "
                        f"num_workers {workers} needs launcher train (a TorchTrainer of DDP workers)")
    return problems


def method_problems(cfg: dict) -> list[str]:
    from .methods import REGISTRY

    name = get_dotted(cfg, "method.name")
    if not isinstance(name, str):
        return []
    if name not in REGISTRY:
        return [f"method.name: unknown method {name!r}{_suggest(name, list(REGISTRY))}; known: {sorted(REGISTRY)}"]
    method = REGISTRY[name]
    problems = []
    for key, value in (cfg.get("method") or {}).items():
        if key == "name":
            continue
        if key not in method.hparams:
            problems.append(f"method.{key}: not a hyperparameter of {name!r}{_suggest(key, list(method.hparams))}; "
                            f"it has: {sorted(method.hparams) or 'none'}")
            continue
        default = method.hparams[key]
        if key in AUTO_OR_POSITIVE:
            if value != AUTO and not (_type_ok(value, float) and value > 0):  # NaN too
                problems.append(f"method.{key}: expected {AUTO!r} (the teacher's own learned logit scale) or a "
                                f"number > 0, got {value!r}")
        elif default is not None and not _type_ok(value, float if isinstance(default, float) else type(default)):
            problems.append(f"method.{key}: expected {_type_name(type(default))} like the default {default!r}, "
                            f"got {value!r}")
        elif key in POSITIVE_HPARAMS and _type_ok(value, float) and not value > 0:  # NaN too
            problems.append(f"method.{key}: must be > 0, got {value!r}")
    if not problems:
        hp = {**method.hparams, **{k: v for k, v in (cfg.get("method") or {}).items() if k != "name"}}
        problems += [f"method.{p}" for p in method.hparam_problems(hp)]
    return problems


# method hyperparameters that are scales or temperatures, whatever the method: must be > 0
POSITIVE_HPARAMS = {"temperature"}
# ... or `auto`: the teacher's own learned logit scale, read from the loaded teacher
AUTO = "auto"
AUTO_OR_POSITIVE = {"teacher_logit_scale"}


def reference_problems(cfg: dict) -> list[str]:
    """Names that must exist: dataset and its domains, backbone, teacher architecture, method."""
    from .data.registry import validate_dataset
    from .models.students import BACKBONES
    from .models.teachers import validate_teacher

    problems = []
    name, root = get_dotted(cfg, "dataset.name"), get_dotted(cfg, "dataset.root")
    tests = get_dotted(cfg, "test_domains")
    if isinstance(name, str):
        found = validate_dataset(name, resolve_path(root) if root else None, tests if isinstance(tests, list) else [])
        problems += found
        if not found and root and name != "synth" and resolve_path(root).is_dir():
            from .data.images import check_layout

            problems += list(check_layout(str(resolve_path(root)), name)[0])
    backbone = get_dotted(cfg, "student.backbone")
    if isinstance(backbone, str) and backbone not in BACKBONES:
        problems.append(f"student.backbone: unknown backbone {backbone!r}{_suggest(backbone, list(BACKBONES))}; "
                        f"known: {sorted(BACKBONES)}")
    elif (isinstance(backbone, str) and BACKBONES[backbone][1] is None
          and get_dotted(cfg, "student.pretrained") == "imagenet"):
        problems.append(f"student.pretrained: backbone {backbone!r} has no pretrained weights; use 'none'")
    if get_dotted(cfg, "student.pretrained") == "builtin" and get_dotted(cfg, "dataset.name") != "synth":
        problems.append("student.pretrained: 'builtin' weights are pretrained on the built-in world's photo corpus "
                        "(distill.models.pretrain); use them with dataset.name: synth ('imagenet' elsewhere)")
    if isinstance(get_dotted(cfg, "teacher.arch"), str):
        teacher = dict(cfg["teacher"])
        if teacher.get("checkpoint") == FIT:
            teacher["checkpoint"] = None  # the built-in teacher, fitted on first use
        elif teacher.get("checkpoint") is not None:
            teacher["checkpoint"] = str(resolve_path(teacher["checkpoint"]))
        problems += validate_teacher(teacher)
    if get_dotted(cfg, "teacher.checkpoint") == FIT and get_dotted(cfg, "teacher.arch") != "distill-tiny-rn" \
            and isinstance(get_dotted(cfg, "teacher.arch"), str):
        problems.append("teacher.checkpoint: `fit` fits the built-in architecture distill-tiny-rn only; "
                        "fit another with `python -m distill.teacher fit --arch ...` and give its checkpoint path")
    return problems + method_problems(cfg)


_MISSING = object()


def validate(cfg: dict) -> list[str]:
    problems = schema_problems(cfg)
    return problems + [p for p in reference_problems(cfg) if p not in problems]


# ---------------------------------------------------------------------------------------------------------- loading
def resolve_path(p: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(p)))).resolve()


def finalize(cfg: dict) -> dict:
    """Fill what derives from other keys (absolute storage, data root, test domains, method defaults)."""
    from .data.registry import get_spec
    from .methods import REGISTRY

    cfg = copy.deepcopy(cfg)
    cfg["storage"] = str(resolve_path(cfg["storage"]))
    ds = cfg["dataset"]
    if ds["root"] is None and ds["name"] == "synth":
        ds["root"] = str(Path(cfg["storage"]) / "data" / "synth")
    elif ds["root"] is not None:
        ds["root"] = str(resolve_path(ds["root"]))
    if ds["store_size"] is None:
        ds["store_size"] = max(ds["image_size"], round(ds["image_size"] * 8 / 7)) if ds["image_size"] > 64 \
            else ds["image_size"]
    teacher = cfg["teacher"]
    if teacher["checkpoint"] is None and teacher["pretrained"] is None:
        teacher["checkpoint"] = FIT  # validation allowed this for the built-in architectures only
    elif teacher["checkpoint"] not in (None, FIT):
        teacher["checkpoint"] = str(resolve_path(teacher["checkpoint"]))
    if cfg["test_domains"] is None or cfg["test_domains"] == "all":
        cfg["test_domains"] = list(get_spec(ds["name"], ds["root"] if ds["name"] != "synth" else None).domains)
    elif isinstance(cfg["test_domains"], str):
        cfg["test_domains"] = [cfg["test_domains"]]
    method = REGISTRY[cfg["method"]["name"]]
    cfg["method"] = {"name": method.name, **method.hparams,
                     **{k: v for k, v in cfg["method"].items() if k != "name"}}
    return cfg


def build_config(raw: dict, overrides: dict[str, Any] | None = None, source: str | None = None) -> dict:
    """Merge defaults, the file's contents and overrides; validate; finalize. Raises ConfigError."""
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the file must hold a YAML mapping, got {type(raw).__name__}"], source)
    cfg = _merge(DEFAULTS, raw)
    for key, value in (overrides or {}).items():
        if key.split(".")[0] not in DEFAULTS:
            problems.append(f"--set {key}: unknown key{_suggest(key, list(TYPES))}")
            continue
        set_dotted(cfg, key, value)
    if isinstance(cfg.get("test_domains"), list) and not all(isinstance(d, str) for d in cfg["test_domains"]):
        problems.append("test_domains: expected a list of domain names")
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return finalize(cfg)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | dict | None = None) -> dict:
    raw = load_yaml(path)
    if isinstance(overrides, list):
        overrides, problems = parse_overrides(overrides)
        if problems:
            raise ConfigError(problems, str(path))
    return build_config(raw, overrides, str(path))


def trial_config(cfg: dict, test_domain: str | None = None, seed: int | None = None,
                 lodo_domain: str | None = None) -> dict:
    """The config of one trial: one test domain and one seed; sweep-only sections dropped. ``lodo_domain``: a source
    domain also held out of training (a leave-one-domain-out selection run)."""
    out = copy.deepcopy(cfg)
    out["test_domain"] = test_domain or cfg["test_domains"][0]
    if seed is not None:
        out["seed"] = seed
    if lodo_domain is not None:
        out["lodo_domain"] = lodo_domain
    out.pop("search", None)
    out.pop("seeds", None)
    return out


def config_hash(cfg: dict, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:n]


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
