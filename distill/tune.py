"""Hyperparameter sweeps: ``python -m distill.tune --space FILE.yaml [--storage DIR_OR_URI] [--set key=value ...]
[--resume] [--dry-run]``.

The YAML is the single-trial schema (``distill.config``) plus the sweep sections ``seeds`` and ``search``. One Ray
Tune ``Tuner`` with ``OptunaSearch`` (TPE on a define-by-run space) runs per (held-out domain, seed), sequentially in
this driver; each Tune trial is a function that runs one ``distill.train.run_trial`` (a Ray Train ``TorchTrainer``
reporting through ``TuneReportCallback``). Optuna and ASHA only ever see ``val_acc_best`` (source-domain
validation); the test domain's accuracies are logged and reported, never optimised. Every evaluation row the trials
report is appended to ``<storage>/<sweep>/trials.jsonl``, from which ``distill.report`` selects models and builds the
DomainBed-style table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from . import tracking
from .config import (DEFAULTS, TYPES, ConfigError, build_config, config_hash, flatten, get_dotted, load_yaml,
                     parse_overrides, resolve_path, set_dotted, trial_config)

METRIC = "val_acc_best"  # = distill.train.BEST_METRIC: best source-validation accuracy so far (never the test domain)
MODE = "max"
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SCHEDULERS = ("none", "asha")
SEARCH_DEFAULTS: dict[str, Any] = {
    "num_samples": 1,  # trials per (held-out domain, seed)
    "max_concurrent": None,  # None: as many as the cluster's CPUs/GPUs hold
    "scheduler": "none",  # none | asha
    "asha": {"grace_period": 1, "reduction_factor": 2},  # in evaluation rounds (train.eval_every steps)
    "sampler_seed": None,  # None: the config's `seed`
    "max_failures": 1,  # Tune-level retries of a failed trial (it resumes from its last Train checkpoint)
    "lodo": False,  # also train each trial's leave-one-domain-out models (DomainBed's LODO selection; x sources)
    "space": {},
}
# keys that define the sweep itself (its outer loop, its paths, its cluster share): never searched
STRUCTURAL = {"name", "storage", "seed", "seeds", "search", "test_domains", "dataset.name", "dataset.root",
              "resources.num_workers", "resources.cpus_per_worker", "resources.gpus_per_worker"}
# what each Tune trial's own function holds: no CPU (it only waits on its TorchTrainer, whose controller asks for
# none either and whose workers get their own placement group); Tune refuses an all-zero request, so the trial asks
# for a token of memory. Concurrency is then limited by max_concurrent_trials, computed from the cluster.
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 1024 ** 2}
ROWS_FILE = "trials.jsonl"
SWEEP_FILE = "sweep.json"
PLAN_FILE = "plan.json"


# ------------------------------------------------------------------------------------------------------- the space
def _same(a: Any, b: Any) -> bool:
    """Equality as YAML means it: `true` is not `1`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _among(value: Any, allowed: tuple) -> bool:
    return any(_same(value, a) for a in allowed)


@dataclass(frozen=True)
class Param:
    """One searched key: a distribution, its explicit `when` conditions, and (for `method.<hp>`) the methods that
    have that hyperparameter."""

    key: str
    kind: str  # uniform | loguniform | int | choice
    values: tuple  # (lo, hi) or the choices
    when: tuple = ()  # ((dotted key, (allowed values...)), ...)
    methods: tuple | None = None  # method.<hp>: the methods with this hyperparameter; None: no implicit condition

    def suggest(self, trial) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(self.key, float(self.values[0]), float(self.values[1]))
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, float(self.values[0]), float(self.values[1]), log=True)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.values[0]), int(self.values[1]))
        return trial.suggest_categorical(self.key, list(self.values))

    def describe(self) -> str:
        dist = f"{self.kind}{list(self.values)}"
        methods = list(self.methods) if self.methods is not None else None
        conds = []
        for k, v in self.when:
            if k == "method.name" and methods is not None:
                methods = [m for m in methods if _among(m, v)]
            else:
                conds.append(f"{k} in {list(v)}")
        if methods is not None:
            conds.insert(0, f"method.name in {methods}")
        return f"{self.key}: {dist}" + (f"  when {' and '.join(conds)}" if conds else "")


class SearchSpace:
    """The define-by-run space handed to OptunaSearch: a module-level, picklable class (a closure would crash at
    Tune's first experiment checkpoint; a function in ``__main__`` breaks restore). Parameters are suggested in
    dependency order and only on their branch: a parameter whose conditions fail is not suggested at all, so
    TPE (``multivariate=True, group=True``) models each branch separately."""

    def __init__(self, params: list[Param], fixed: dict[str, Any]):
        self.params = list(params)
        self.fixed = dict(fixed)  # the base config's value of every key a condition mentions

    def active(self, param: Param, values: dict[str, Any]) -> bool:
        for key, allowed in param.when:
            if not _among(values.get(key, self.fixed.get(key)), allowed):
                return False
        if param.methods is not None:
            return values.get("method.name", self.fixed.get("method.name")) in param.methods
        return True

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for param in self.params:
            if self.active(param, values):
                values[param.key] = param.suggest(trial)
        return None

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def choices(self, key: str) -> list | None:
        for p in self.params:
            if p.key == key and p.kind == "choice":
                return list(p.values)
        return None

    def describe(self) -> list[str]:
        return [p.describe() for p in self.params] or ["(empty: every trial runs the base config)"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _known_hparams() -> dict[str, dict]:
    from .methods import REGISTRY

    return {name: dict(cls.hparams) for name, cls in REGISTRY.items()}


def parse_space(space: Any, base: dict, where: str = "search.space") -> tuple[list[Param], dict[str, Any], list[str]]:
    """The YAML space -> (params in suggestion order, fixed values the conditions need, problems)."""
    from .config import _suggest  # the config's did-you-mean helper

    problems: list[str] = []
    if space is None:
        return [], {}, problems
    if not isinstance(space, dict):
        return [], {}, [f"{where}: expected a mapping of dotted config keys to distributions, "
                        f"got {type(space).__name__}"]
    hparams = _known_hparams()
    method_spec = space.get("method.name")
    method_choices = None
    if isinstance(method_spec, dict) and isinstance(method_spec.get("choice"), list):
        method_choices = [m for m in method_spec["choice"] if isinstance(m, str)]
    base_method = get_dotted(base, "method.name")
    choosable = method_choices if method_choices is not None else ([base_method] if isinstance(base_method, str)
                                                                    else [])
    searchable = [k for k in TYPES if k not in STRUCTURAL and not k.startswith("resources.")]
    all_hps = sorted({f"method.{h}" for hp in hparams.values() for h in hp})

    parsed: dict[str, dict] = {}
    for key, spec in space.items():
        at = f"{where}.{key}"
        if not isinstance(key, str):
            problems.append(f"{where}: keys must be dotted config keys, got {key!r}")
            continue
        methods = None
        if key in STRUCTURAL or key.startswith("resources."):
            problems.append(f"{at}: cannot be searched: it defines the sweep itself (held-out domains and seeds "
                            f"are the sweep's outer loop; paths and resources are fixed per sweep)")
            continue
        if key.startswith("method.") and key != "method.name":
            hp = key[len("method."):]
            having = tuple(m for m in choosable if hp in hparams.get(m, {}))
            if not having:
                owners = sorted(m for m, hps in hparams.items() if hp in hps)
                if owners:
                    problems.append(f"{at}: {hp!r} is a hyperparameter of {owners}, none of which this sweep "
                                    f"can choose (method.name: {choosable})")
                else:
                    problems.append(f"{at}: unknown key: no method has a hyperparameter {hp!r}"
                                    f"{_suggest(key, all_hps)}")
                continue
            methods = having
        elif key not in TYPES:
            problems.append(f"{at}: unknown key{_suggest(key, searchable + all_hps)}")
            continue
        if not isinstance(spec, dict):
            problems.append(f"{at}: expected a distribution mapping like {{uniform: [lo, hi]}}, "
                            f"{{loguniform: [lo, hi]}}, {{int: [lo, hi]}} or {{choice: [...]}}, got {spec!r}")
            continue
        kinds = [k for k in spec if k in DISTRIBUTIONS]
        extra = [k for k in spec if k not in DISTRIBUTIONS and k != "when"]
        if extra:
            problems.append(f"{at}: unknown field(s) {extra}; a distribution is one of {list(DISTRIBUTIONS)} "
                            f"plus an optional `when`")
        if len(kinds) != 1:
            problems.append(f"{at}: give exactly one distribution of {list(DISTRIBUTIONS)}, got {kinds or 'none'}")
            continue
        kind, args = kinds[0], spec[kinds[0]]
        values = _check_distribution(at, kind, args, problems)
        if values is None:
            continue
        parsed[key] = {"kind": kind, "values": values, "when": spec.get("when"), "methods": methods}

    # conditions: known keys, values that can occur
    for key, p in parsed.items():
        at = f"{where}.{key}.when"
        when = p["when"]
        conds = []
        if when is None:
            p["when"] = ()
            continue
        if not isinstance(when, dict) or not when:
            problems.append(f"{at}: expected a mapping {{dotted.key: value or [values]}}, got {when!r}")
            p["when"] = None
            continue
        ok = True
        for ckey, cval in when.items():
            allowed = tuple(cval) if isinstance(cval, list) else (cval,)
            if ckey == key:
                problems.append(f"{at}: a parameter cannot depend on itself")
                ok = False
                continue
            is_hp = isinstance(ckey, str) and ckey.startswith("method.") and ckey != "method.name" and \
                any(ckey[len("method."):] in hparams.get(m, {}) for m in choosable)
            if ckey in space and ckey not in parsed:
                ok = False  # that parameter has its own problem already
                continue
            if ckey in parsed:
                dep = parsed[ckey]
                if dep["kind"] != "choice":
                    problems.append(f"{at}: {ckey} is a continuous parameter ({dep['kind']}); a condition needs a "
                                    f"choice parameter or a fixed config value")
                    ok = False
                    continue
                never = [v for v in allowed if not _among(v, tuple(dep["values"]))]
                if never:
                    problems.append(f"{at}: {ckey} never takes {never} (its choices: {list(dep['values'])})")
                    ok = False
                    continue
            elif not isinstance(ckey, str) or (ckey not in TYPES and not is_hp):
                problems.append(f"{at}: unknown key {ckey!r}{_suggest(str(ckey), searchable + all_hps)}")
                ok = False
                continue
            else:  # a fixed value of the base config
                fixed = _fixed_value(base, ckey, hparams)
                if not _among(fixed, allowed):
                    problems.append(f"{at}: never holds: {ckey} is not searched and is fixed to {fixed!r}")
                    ok = False
                    continue
            conds.append((ckey, allowed))
        p["when"] = tuple(conds) if ok else None

    # suggestion order: a parameter after every searched key its conditions mention (method.<hp> after method.name)
    deps = {k: {c for c, _ in (p["when"] or ()) if c in parsed} | ({"method.name"} if p["methods"] is not None
                                                                   and "method.name" in parsed else set())
            for k, p in parsed.items()}
    order: list[str] = []
    pending = list(parsed)
    while pending:
        ready = [k for k in pending if deps[k] <= set(order)]
        if not ready:
            problems.append(f"{where}: circular `when` conditions between {sorted(pending)}")
            break
        order += ready
        pending = [k for k in pending if k not in ready]
    params = [Param(k, parsed[k]["kind"], tuple(parsed[k]["values"]), parsed[k]["when"] or (), parsed[k]["methods"])
              for k in order if parsed[k]["when"] is not None]
    fixed = {ckey: _fixed_value(base, ckey, hparams) for p in params for ckey, _ in p.when if ckey not in parsed}
    if "method.name" not in parsed:
        fixed["method.name"] = base_method
    return params, fixed, problems


def _fixed_value(base: dict, key: str, hparams: dict[str, dict]) -> Any:
    """A key's value in the base config; a method hyperparameter the file does not set: the method's default."""
    value = get_dotted(base, key)
    if value is None and key.startswith("method.") and key != "method.name":
        value = hparams.get(get_dotted(base, "method.name"), {}).get(key[len("method."):])
    return value


def _check_distribution(at: str, kind: str, args: Any, problems: list[str]) -> tuple | None:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            problems.append(f"{at}: choice needs a non-empty list, got {args!r}")
            return None
        bad = [v for v in args if not (v is None or isinstance(v, (str, int, float, bool)))]
        if bad:
            problems.append(f"{at}: choice values must be scalars (string, number, boolean, null), got {bad}")
            return None
        dup = [v for i, v in enumerate(args) if _among(v, tuple(args[:i]))]
        if dup:
            problems.append(f"{at}: choice lists {dup} twice")
            return None
        return tuple(args)
    if not isinstance(args, list) or len(args) != 2:
        problems.append(f"{at}: {kind} needs [lo, hi], got {args!r}")
        return None
    lo, hi = args
    if kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
            problems.append(f"{at}: int needs two integers [lo, hi], got {args!r}")
            return None
    elif not all(_is_number(v) for v in (lo, hi)):
        problems.append(f"{at}: {kind} needs two numbers [lo, hi], got {args!r}")
        return None
    if lo >= hi:
        problems.append(f"{at}: empty or inverted range: lo {lo!r} must be < hi {hi!r}")
        return None
    if kind == "loguniform" and lo <= 0:
        problems.append(f"{at}: loguniform needs 0 < lo, got lo {lo!r}")
        return None
    return (lo, hi)


# ------------------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything a sweep needs, validated, before any Ray work."""

    source: str  # the YAML path
    text: str  # the YAML as given
    overrides: dict[str, Any]
    raw: dict  # the YAML's mapping with overrides and absolute paths, without the sweep sections
    cfg: dict  # the finalized base config (base method)
    seeds: list[int]
    search: dict  # the search section with defaults
    space: SearchSpace
    methods: list[str]  # the methods the sweep can choose
    results_root: str  # where Tune experiments and Train runs go: <storage> or a URI
    tracking_uri: str

    @property
    def name(self) -> str:
        return self.cfg["name"]

    @property
    def test_domains(self) -> list[str]:
        return list(self.cfg["test_domains"])

    @property
    def sweep_dir(self) -> Path:
        return Path(self.cfg["storage"]) / self.name

    @property
    def tune_root(self) -> str:
        return _join(self.results_root, self.name, "tune")

    @property
    def train_root(self) -> str:
        return _join(self.results_root, self.name, "train")

    def searches(self) -> list[tuple[str, int]]:
        return [(d, s) for s in self.seeds for d in self.test_domains]

    def fingerprint(self) -> str:
        """What must not change between a sweep and its --resume (max_concurrent may)."""
        search = {k: v for k, v in self.search.items() if k != "max_concurrent"}
        return config_hash({"raw": self.raw, "seeds": self.seeds, "search": search}, 16)

    def resources(self) -> dict[str, float]:
        res = self.cfg["resources"]
        out = {"CPU": res["num_workers"] * res["cpus_per_worker"]}
        if res["gpus_per_worker"]:
            out["GPU"] = res["num_workers"] * res["gpus_per_worker"]
        return out

    def to_dict(self) -> dict:
        return {"sweep": self.name, "source": self.source, "overrides": self.overrides,
                "test_domains": self.test_domains, "seeds": self.seeds,
                "searches": [search_name(d, s) for d, s in self.searches()],
                "trials_per_search": self.search["num_samples"],
                "total_trials": self.search["num_samples"] * len(self.searches()),
                "methods": self.methods, "method_searched": "method.name" in self.space.keys(),
                "metric": METRIC, "mode": MODE, "search": self.search, "space": self.space.describe(),
                "resources_per_trial": {"workers": self.cfg["resources"], "total": self.resources(),
                                        "trial_function": TRIAL_RESOURCES},
                "train_steps": self.cfg["train"]["steps"], "eval_every": self.cfg["train"]["eval_every"],
                "storage": self.cfg["storage"], "sweep_dir": str(self.sweep_dir), "tune_root": self.tune_root,
                "train_root": self.train_root, "tracking_uri": self.tracking_uri,
                "fingerprint": self.fingerprint(), "base_config": self.cfg}


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root, *parts))


def search_name(test_domain: str, seed: int) -> str:
    return f"{test_domain}-s{seed}"


def train_run_name(sweep: str, test_domain: str, seed: int, trial_id: str) -> str:
    """The Train run (and MLflow child run) of a Tune trial: deterministic, so a restored trial resumes it."""
    return f"{sweep}-{test_domain}-s{seed}-{trial_id}"


def _search_section(raw: Any, problems: list[str]) -> dict:
    search = copy.deepcopy(SEARCH_DEFAULTS)
    if raw is None:
        return search
    if not isinstance(raw, dict):
        problems.append(f"search: expected a mapping, got {type(raw).__name__}")
        return search
    from .config import _suggest

    for key, value in raw.items():
        if key not in SEARCH_DEFAULTS:
            problems.append(f"search.{key}: unknown key{_suggest(str(key), list(SEARCH_DEFAULTS))}; "
                            f"known: {sorted(SEARCH_DEFAULTS)}")
            continue
        search[key] = value

    def check(key, ok, expected, allow_none=False):
        value = search[key]
        if value is None and allow_none:
            return
        if not ok(value):
            problems.append(f"search.{key}: expected {expected}, got {value!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    check("num_samples", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    check("max_concurrent", lambda v: is_int(v) and v >= 1, "an integer >= 1 or null", allow_none=True)
    check("sampler_seed", is_int, "an integer or null", allow_none=True)
    check("max_failures", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    check("lodo", lambda v: isinstance(v, bool), "true or false")
    if search["scheduler"] is None:
        search["scheduler"] = "none"
    check("scheduler", lambda v: v in SCHEDULERS, f"one of {list(SCHEDULERS)}")
    asha = search["asha"]
    if asha is None:
        search["asha"] = dict(SEARCH_DEFAULTS["asha"])
    elif not isinstance(asha, dict):
        problems.append(f"search.asha: expected a mapping {{grace_period, reduction_factor}}, got {asha!r}")
        search["asha"] = dict(SEARCH_DEFAULTS["asha"])
    else:
        unknown = [k for k in asha if k not in SEARCH_DEFAULTS["asha"]]
        if unknown:
            problems.append(f"search.asha: unknown key(s) {unknown}; known: {sorted(SEARCH_DEFAULTS['asha'])}")
        search["asha"] = {**SEARCH_DEFAULTS["asha"], **{k: v for k, v in asha.items() if k not in unknown}}
        gp, rf = search["asha"]["grace_period"], search["asha"]["reduction_factor"]
        if not (is_int(gp) and gp >= 1):
            problems.append(f"search.asha.grace_period: expected an integer >= 1 (evaluation rounds), got {gp!r}")
        if not (_is_number(rf) and rf > 1):
            problems.append(f"search.asha.reduction_factor: expected a number > 1, got {rf!r}")
    return search


def _seeds(raw: Any, default: Any, problems: list[str]) -> list[int]:
    if raw is None:
        return [default] if isinstance(default, int) and not isinstance(default, bool) else [0]
    if not isinstance(raw, list) or not raw:
        problems.append(f"seeds: expected a non-empty list of integers, got {raw!r}")
        return [0]
    bad = [s for s in raw if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        problems.append(f"seeds: expected integers, got {bad}")
    good = [s for s in raw if s not in bad]
    if len(set(good)) != len(good):
        problems.append(f"seeds: {raw} lists a seed twice")
    return list(dict.fromkeys(good)) or [0]


def _build(raw: dict) -> tuple[dict | None, list[str]]:
    try:
        return build_config(raw), []
    except ConfigError as exc:
        return None, exc.problems
    except Exception as exc:  # noqa: BLE001 - a value that breaks finalisation is a config problem too
        return None, [f"{type(exc).__name__}: {exc}"]


def _with_method(raw: dict, method: str) -> dict:
    """`raw` with method.name set and only that method's hyperparameters kept from the method section."""
    hps = _known_hparams().get(method, {})
    out = copy.deepcopy(raw)
    block = out.get("method") if isinstance(out.get("method"), dict) else {}
    out["method"] = {"name": method, **{k: v for k, v in block.items() if k != "name" and k in hps}}
    return out


def trial_raw(raw: dict, params: dict[str, Any]) -> dict:
    """The trial's YAML mapping: the sweep's base with the sampled values set (dotted keys); when method.name is
    searched, the method section keeps only the chosen method's hyperparameters (each method's own defaults fill
    the rest, not another method's)."""
    out = copy.deepcopy(raw)
    for key, value in params.items():
        set_dotted(out, key, value)
    method = get_dotted(out, "method.name")
    return _with_method(out, method) if "method.name" in params and isinstance(method, str) else out


def trial_cfg(raw: dict, params: dict[str, Any], test_domain: str, seed: int, lodo_domain: str | None = None) -> dict:
    return trial_config(build_config(trial_raw(raw, params)), test_domain, seed, lodo_domain)


def make_plan(path: str | os.PathLike, overrides: list[str] | None = None, storage: str | None = None) -> Plan:
    """Read and validate a sweep YAML; raises one ConfigError listing every problem."""
    source = str(path)
    raw = load_yaml(path)
    text = Path(path).read_text()
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the file must hold a YAML mapping, got {type(raw).__name__}"], source)
    over, oproblems = parse_overrides(overrides)
    problems += oproblems
    results_root = None
    if storage:
        if "://" in storage and not storage.startswith("file://"):
            results_root = storage.rstrip("/")  # Tune/Train results on a shared URI; caches stay in `storage:`
        else:
            over["storage"] = storage[len("file://"):] if storage.startswith("file://") else storage
    raw = copy.deepcopy(raw)
    for key, value in over.items():
        if key.split(".")[0] not in DEFAULTS:
            from .config import _suggest

            problems.append(f"--set {key}: unknown key{_suggest(key, list(TYPES))}")
            continue
        set_dotted(raw, key, value)

    search = _search_section(raw.pop("search", None), problems)
    seeds = _seeds(raw.pop("seeds", None), raw.get("seed", DEFAULTS["seed"]), problems)
    if search["sampler_seed"] is None:
        seed = raw.get("seed", DEFAULTS["seed"])
        search["sampler_seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    merged_base = _merge_defaults(raw)
    params, fixed, space_problems = parse_space(search["space"], merged_base)
    problems += space_problems
    space = SearchSpace(params, fixed)
    method_choices = space.choices("method.name")
    base_method = get_dotted(merged_base, "method.name")
    methods = [m for m in method_choices if isinstance(m, str)] if method_choices else [base_method]

    # the base config, once per method the sweep can run (hyperparameters no candidate method has are reported)
    base_problems: list[str] = []
    cfgs: dict[str, dict] = {}
    hparams = _known_hparams()
    if method_choices:
        block = merged_base.get("method") if isinstance(merged_base.get("method"), dict) else {}
        for key in block:
            if key != "name" and not any(key in hparams.get(m, {}) for m in methods):
                base_problems.append(f"method.{key}: not a hyperparameter of any method the sweep chooses "
                                     f"({methods})")
        for m in methods:
            if m not in hparams:
                continue  # reported below through the method.name choice candidates
            cfg, probs = _build(_with_method(raw, m))
            base_problems += [p for p in probs if p not in base_problems]
            if cfg is not None:
                cfgs[m] = cfg
    else:
        cfg, base_problems = _build(raw)
        if cfg is not None:
            cfgs[base_method] = cfg
    problems += base_problems

    # every value the space can draw (each choice, both ends of each range) must build a valid config
    for param in params:
        values = param.values
        if param.methods:
            method_of = next((m for m in param.methods if space.active(param, {"method.name": m})), param.methods[0])
        else:
            method_of = base_method if base_method in methods else methods[0]
        if param.key == "method.name":
            for m in values:
                if m not in hparams:
                    _, probs = _build(_with_method(raw, m))
                    problems += [f"search.space.method.name: choice {m!r}: {p}" for p in probs
                                 if p not in base_problems]
            continue
        if param.kind in ("uniform", "loguniform"):
            values = tuple(float(v) for v in values)  # what the sampler will draw: floats
        for value in values:
            cand = trial_raw(_with_method(raw, method_of) if method_choices else raw, {param.key: value})
            _, probs = _build(cand)
            new = [p for p in probs if p not in base_problems]
            problems += [f"search.space.{param.key}: value {value!r}: {p}" for p in new]

    base_cfg = cfgs.get(base_method) or next(iter(cfgs.values()), None)
    if base_cfg is not None:
        steps, every = base_cfg["train"]["steps"], base_cfg["train"]["eval_every"]
        rounds = len(set(range(every, steps + 1, every)) | {steps})
        if search["scheduler"] == "asha" and isinstance(search["asha"].get("grace_period"), int) \
                and search["asha"]["grace_period"] >= rounds:
            problems.append(f"search.asha.grace_period: {search['asha']['grace_period']} evaluation rounds is the "
                            f"whole trial ({rounds} rounds of train.eval_every={every} in train.steps={steps}): "
                            f"ASHA could never stop a trial")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), source)

    # absolute paths: trials run in Tune's trial directories, not in this working directory
    raw["storage"] = base_cfg["storage"]
    if get_dotted(raw, "dataset.root"):
        set_dotted(raw, "dataset.root", base_cfg["dataset"]["root"])
    ckpt = get_dotted(raw, "teacher.checkpoint")
    if isinstance(ckpt, str) and ckpt != "fit":
        set_dotted(raw, "teacher.checkpoint", str(resolve_path(ckpt)))
    raw["test_domains"] = list(base_cfg["test_domains"])
    return Plan(source=source, text=text, overrides=over, raw=raw, cfg=base_cfg, seeds=seeds, search=search,
                space=space, methods=methods, results_root=results_root or base_cfg["storage"],
                tracking_uri=tracking.tracking_uri(base_cfg["storage"]))


def _merge_defaults(raw: dict) -> dict:
    from .config import _merge

    return _merge(DEFAULTS, raw)


def describe(plan: Plan, concurrency: str | None = None) -> str:
    d = plan.to_dict()
    res = plan.cfg["resources"]
    search = plan.search
    sched = "none" if search["scheduler"] == "none" else (
        f"ASHA on {METRIC} (grace {search['asha']['grace_period']} evaluation rounds = "
        f"{search['asha']['grace_period'] * plan.cfg['train']['eval_every']} steps, reduction factor "
        f"{search['asha']['reduction_factor']}, max {plan.cfg['train']['steps']} steps)")
    lines = [
        f"sweep {plan.name!r} from {plan.source}" + (f" with {plan.overrides}" if plan.overrides else ""),
        f"  searches (held-out domain x seed): {len(plan.searches())} = {len(plan.test_domains)} domain(s) "
        f"{plan.test_domains} x {len(plan.seeds)} seed(s) {plan.seeds}; run one after another",
        f"  trials per search: {search['num_samples']}   total trials: {d['total_trials']}",
        f"  methods: {plan.methods}   dataset: {plan.cfg['dataset']['name']}   "
        f"student: {plan.cfg['student']['backbone']}   teacher: {plan.cfg['teacher']['arch']}",
        f"  each trial: {plan.cfg['train']['steps']} steps, evaluated every {plan.cfg['train']['eval_every']}; "
        f"{res['num_workers']} worker(s) x ({res['cpus_per_worker']} CPU, {res['gpus_per_worker']} GPU) "
        f"= {plan.resources()} + the trial function {TRIAL_RESOURCES}",
        f"  concurrency: {concurrency or (search['max_concurrent'] or 'as many trials as the cluster holds')}",
        f"  searcher: Optuna TPE (multivariate, group; sampler seed {search['sampler_seed']}) maximising "
        f"{METRIC} (source-domain validation only); scheduler: {sched}; trial retries: {search['max_failures']}",
        "  space:",
        *[f"    {line}" for line in plan.space.describe()],
        f"  storage: {plan.cfg['storage']}",
        f"  sweep dir: {plan.sweep_dir}  (trials.jsonl, results.md/csv/json, plots/)",
        f"  Tune experiments: {plan.tune_root}   Train runs: {plan.train_root}",
        f"  MLflow: {plan.tracking_uri}  experiment {plan.name!r}",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- Tune pieces
class SweepTrial:
    """The Tune function trainable of one search: the sampled params onto the trial config, then one run_trial
    (a TorchTrainer that reports to Tune through TuneReportCallback). Module-level and picklable (Tune stores it
    for restore)."""

    __name__ = "distill_trial"  # Tune names trials after the trainable

    def __init__(self, raw: dict, sweep: str, test_domain: str, seed: int, parent_run_id: str | None,
                 train_storage: str, tracking_uri: str, lodo_dir: str | None = None):
        self.raw, self.sweep, self.test_domain, self.seed = raw, sweep, test_domain, seed
        self.parent_run_id, self.train_storage, self.tracking_uri = parent_run_id, train_storage, tracking_uri
        self.lodo_dir = lodo_dir   # search.lodo: where this search's leave-one-domain-out rows go

    def __call__(self, config: dict) -> None:
        from ray import tune

        from .trial.prepare import trial_steps
        from .train import run_trial

        # Ray started before MLFLOW_TRACKING_URI was set in the driver would not pass it on: set it here
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        trial_id = tune.get_context().get_trial_id()
        cfg = trial_cfg(self.raw, config, self.test_domain, self.seed)
        name = train_run_name(self.sweep, self.test_domain, self.seed, trial_id)
        total = sum(n for _, n in trial_steps(cfg))
        final = finished_metrics(self.tracking_uri, self.sweep, name, total)
        if final is not None:
            # a trial that had finished when the driver died, before Tune recorded it: report its final metrics
            # again instead of starting its TorchTrainer
            tune.report({**final, "replayed": True})
            return
        if self.lodo_dir:
            self.lodo_runs(config, trial_id, name)
        run_trial(cfg, tune=True, parent_run_id=self.parent_run_id, name=name, train_storage=self.train_storage,
                  experiment=self.sweep)

    def lodo_runs(self, config: dict, trial_id: str, name: str) -> None:
        """DomainBed's leave-one-domain-out runs of this trial (same hyperparameters and seed): for every source
        domain V, a model trained with V held out too; its evaluations of V's in-split go to
        `<sweep>/lodo/<search>-<trial>-<V>.json` (one file per run, written once it finished; a rerun skips it)."""
        from .report import LODO_EVENT
        from .train import run_trial
        from .trial.launch import read_checkpoint

        search = search_name(self.test_domain, self.seed)
        base = trial_cfg(self.raw, config, self.test_domain, self.seed)
        for domain in _source_domains(base):
            out = Path(self.lodo_dir) / f"{search}-{trial_id}-{domain}.json"
            if out.is_file():
                continue
            cfg = trial_cfg(self.raw, config, self.test_domain, self.seed, lodo_domain=domain)
            result = run_trial(cfg, parent_run_id=self.parent_run_id, name=f"{name}-lodo-{domain}",
                               train_storage=self.train_storage, experiment=self.sweep)
            with result.checkpoint.as_directory() as d:
                history = read_checkpoint(d)["history"]
            common = {"event": LODO_EVENT, "sweep": self.sweep, "search": search, "test_domain": self.test_domain,
                      "seed": self.seed, "trial_id": trial_id, "lodo_domain": domain,
                      "method": cfg["method"]["name"], "params": dict(config)}
            rows = [{**common, "step": r["step"], "lodo_acc": r.get("lodo_acc"), "selectable": r.get("selectable"),
                     "final": r.get("final")} for r in history]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, default=str))
            tmp.replace(out)


def _source_domains(cfg: dict) -> list[str]:
    from .data.registry import get_spec

    ds = cfg["dataset"]
    spec = get_spec(ds["name"], ds["root"] if ds["name"] != "synth" else None)
    return [d for d in spec.domains if d != cfg["test_domain"]]


def finished_metrics(uri: str, sweep: str, run_name: str, steps: int) -> dict | None:
    """The final metrics of a trial whose MLflow child run finished (run_trial marks it only after fit())."""
    try:
        run = find_run(uri, sweep, run_name)
    except Exception:  # noqa: BLE001 - no store yet: nothing finished
        return None
    if run is None or run.info.status != "FINISHED" or run.data.tags.get(tracking.STATUS_TAG) != "finished":
        return None
    metrics = dict(run.data.metrics)
    return {**metrics, "step": steps, "final": True, "total_steps": steps} if METRIC in metrics else None


def trial_name(trial) -> str:
    """Tune's name and directory of a trial: short and stable (the default puts every sampled value in it)."""
    return f"trial_{trial.trial_id}"


class FinishingASHA(ASHAScheduler):
    """Ray's ASHA, except that a trial's last evaluation (time_attr >= max_t) never gets STOP: the trial ends by
    itself there. A STOP kills the trial's process at once, which would cut run_trial's tail (logging the best
    checkpoint, closing the MLflow run); stops at earlier rungs are real early stops."""

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get("final") or result.get(self._time_attr, -1) >= self._max_t:
            return TrialScheduler.CONTINUE
        return action


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


class TrialLog(Callback):
    """Driver-side Tune callback: every evaluation row a trial reports -> `trials.jsonl` (with the trial's method
    and sampled params), plus an `end` row per trial: completed, early_stopped (ASHA) or error (with the reason).
    Module-level and picklable: Tune stores it with the experiment and uses the stored one after a restore."""

    def __init__(self, path: str, sweep: str, search: str, test_domain: str, seed: int, base_method: str,
                 steps: int):
        self.path, self.sweep, self.search = path, sweep, search
        self.test_domain, self.seed, self.base_method, self.steps = test_domain, seed, base_method, steps

    def _common(self, trial) -> dict:
        params = dict(trial.config or {})
        return {"sweep": self.sweep, "search": self.search, "test_domain": self.test_domain, "seed": self.seed,
                "trial_id": trial.trial_id, "method": params.get("method.name", self.base_method),
                "params": params, "train_run": train_run_name(self.sweep, self.test_domain, self.seed,
                                                               trial.trial_id)}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "step" not in result:
            return
        if result.get("replayed"):
            from .report import read_jsonl

            key = (self.search, trial.trial_id, result["step"])
            if any((r.get("search"), r.get("trial_id"), r.get("step")) == key for r in read_jsonl(self.path)
                   if r.get("event") == "eval"):
                return
        keep = {k: v for k, v in result.items()
                if k in ("step", "val_acc", METRIC, "test_acc", "test_out_acc", "val_loss", "loss", "checkpoint_path",
                         "training_iteration", "time_total_s", "timestamp", "stage", "eval_model", "selectable",
                         "final", "total_steps", "raw_val_acc")
                or k.startswith(("val_acc/", "loss/"))}
        append_jsonl(self.path, {"event": "eval", **self._common(trial), **keep})

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step")
        done = last.get("final") or (step is not None and step >= last.get("total_steps", self.steps))
        status = "completed" if done else "early_stopped"
        append_jsonl(self.path, {"event": "end", **self._common(trial), "status": status, "step": step})

    def on_trial_error(self, iteration, trials, trial, **info):
        append_jsonl(self.path, {"event": "end", **self._common(trial), "status": "error",
                                 "error": _trial_error(trial), "step": (trial.last_result or {}).get("step")})


def error_reason(text: str) -> str:
    """The innermost `SomeError: message` line of a (Ray-wrapped) traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")
    return next((ln for ln in reversed(lines) if pattern.match(ln)), lines[-1])


def _trial_error(trial) -> str:
    try:
        path = trial.error_file
        if path and Path(path).is_file():
            return error_reason(Path(path).read_text())
    except Exception:  # noqa: BLE001
        pass
    return "trial failed (see Tune's error.txt in the trial directory)"


def find_run(uri: str, experiment: str, run_name: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'",
                          max_results=1)
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------------- driver
def concurrency(plan: Plan) -> tuple[int, str]:
    """Trials at once: search.max_concurrent, capped by what a local cluster holds (each trial's workers need
    num_workers x cpus/gpus_per_worker; the trial function itself holds no CPU). On a cluster we connected to
    (RAY_ADDRESS), which may autoscale, max_concurrent is taken as given."""
    import ray

    need = plan.resources()
    have = ray.cluster_resources()
    cap = min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0) if need else 1
    wanted = plan.search["max_concurrent"]
    samples = plan.search["num_samples"]
    external = bool(os.environ.get("RAY_ADDRESS"))
    if cap < 1 and not external:
        raise ConfigError([f"resources: one trial needs {need}, the local Ray cluster has "
                           f"{ {k: have.get(k, 0) for k in need} }"])
    if wanted is None:
        n = max(1, cap)
        why = f"{n} (what the cluster holds now: {need} per trial of {dict((k, have.get(k, 0)) for k in need)})"
    elif external or wanted <= cap:
        n = wanted
        why = f"{n} (search.max_concurrent)"
    else:
        n = max(1, cap)
        why = f"{n} (search.max_concurrent {wanted} capped: the cluster holds {cap} trial(s) of {need})"
    n = min(n, samples)
    return n, why


def _give_trials_the_ray_address() -> None:
    """Ray Train's PlacementGroupCleaner (it frees a trial's workers when Tune kills the trial, e.g. an ASHA stop)
    finds its cluster through RAY_ADDRESS, else by looking for GCS processes on the machine, which fails where
    several Ray instances run (a shared machine): the stopped trial's placement group then leaks and later trials
    wait for its CPUs forever. Tune puts `DEFAULT_ENV_VARS` into every trial actor's runtime_env, which the
    trial's TorchTrainer controller and cleaner inherit: give them the address of this cluster."""
    import ray

    try:
        from ray.tune.execution import class_cache

        class_cache.DEFAULT_ENV_VARS["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except (ImportError, AttributeError) as exc:  # a Ray without this hook: the cleaner looks for itself
        print(f"[distill.tune] note: could not pass RAY_ADDRESS to trials ({exc})", flush=True)


def _parent_run(plan: Plan, sweep_id: str) -> str:
    """The sweep's parent MLflow run, found again by its `distill.sweep_id` tag on resume (never duplicated)."""
    uri = plan.tracking_uri
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(uri, plan.name)
    found = c.search_runs([exp_id], filter_string=f"tags.`distill.sweep_id` = '{sweep_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=f"{plan.name} (sweep)", tags={
        "distill.role": "sweep", "distill.sweep": plan.name, "distill.sweep_id": sweep_id,
        "distill.methods": ",".join(plan.methods), "distill.test_domains": ",".join(plan.test_domains),
        "distill.seeds": ",".join(map(str, plan.seeds)), "distill.git_sha": tracking.git_sha(),
        tracking.RUN_NAME_TAG: f"{plan.name}-sweep-{sweep_id}"})
    from mlflow.entities import Param

    params = {**{f"search.{k}": v for k, v in flatten({k: v for k, v in plan.search.items() if k != "space"}).items()},
              "search.space": "; ".join(plan.space.describe()), "seeds": plan.seeds,
              **{k: v for k, v in flatten({k: v for k, v in plan.cfg.items() if k not in ("storage",)}).items()}}
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def warm_caches(plan: Plan) -> None:
    """prepare() once per held-out domain and per method (and teacher choice) the space can draw: the world, the
    fitted teacher and every teacher-output cache exist before any trial starts, so trials only read them."""
    from .train import prepare

    variants = [{}]
    for key in plan.space.keys():
        choices = plan.space.choices(key)
        if choices and (key == "method.name" or key.startswith(("teacher.", "dataset."))):
            variants = [{**v, key: c} for v in variants for c in choices]
    if len(variants) > 64:  # a huge product: warm each method at least
        variants = [{"method.name": m} for m in plan.methods]
    seen = set()
    for test_domain in plan.test_domains:
        for params in variants:
            try:
                cfg = trial_cfg(plan.raw, params, test_domain, plan.seeds[0])
            except ConfigError:
                continue  # a combination the trials themselves would reject
            key = config_hash({k: v for k, v in cfg.items() if k not in ("train", "student", "seed")})
            if key in seen:
                continue
            seen.add(key)
            t0 = time.time()
            print(f"[distill.tune] preparing {test_domain} / {cfg['method']['name']} "
                  f"{ {k: v for k, v in params.items() if k != 'method.name'} or ''}".rstrip(), flush=True)
            prepare(cfg)
            print(f"[distill.tune]   ready in {time.time() - t0:.1f}s", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def max_trial_steps(plan: Plan) -> int:
    """The most optimiser steps a trial of the sweep can take (every stage of every method it can choose)."""
    from .trial.prepare import trial_steps

    return max(sum(n for _, n in trial_steps(_with_method_cfg(plan.cfg, m))) for m in plan.methods)


def _with_method_cfg(cfg: dict, method: str) -> dict:
    from .methods import get_method

    if cfg["method"]["name"] == method:
        return cfg
    return {**cfg, "method": {"name": method, **get_method(method).hparams}}


def run_search(plan: Plan, test_domain: str, seed: int, parent_run_id: str, n_concurrent: int,
               resume: bool) -> dict:
    """One Tuner + one Optuna study for one (held-out domain, seed); restored from its experiment dir if any."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    name = search_name(test_domain, seed)
    exp_path = _join(plan.tune_root, name)
    sweep_dir = plan.sweep_dir
    trainable = tune.with_resources(
        SweepTrial(plan.raw, plan.name, test_domain, seed, parent_run_id, plan.train_root, plan.tracking_uri,
                   str(sweep_dir / "lodo") if plan.search["lodo"] else None),
        TRIAL_RESOURCES)
    study_name = f"{plan.name}:{name}"
    t0 = time.time()
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"[distill.tune] search {name}: resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        if "://" not in exp_path and Path(exp_path).exists():
            shutil.rmtree(exp_path)  # a search killed before Tune saved any state: start it again
        _drop_rows(sweep_dir / ROWS_FILE, name)  # rows of trials of an attempt that can no longer be resumed
        sampler = optuna.samplers.TPESampler(seed=plan.search["sampler_seed"], multivariate=True, group=True)
        # metric/mode on the searcher too: with a define-by-run space OptunaSearch ignores TuneConfig's. The study
        # lives in memory and is saved with Tune's experiment state, so a restored search gets the study as of its
        # checkpoint (an RDB study runs ahead of it: a trial re-run after a kill could not report to it again)
        searcher = OptunaSearch(space=plan.space, metric=METRIC, mode=MODE, sampler=sampler, study_name=study_name)
        scheduler = None
        if plan.search["scheduler"] == "asha":
            every = plan.cfg["train"]["eval_every"]
            scheduler = FinishingASHA(time_attr="step", max_t=max_trial_steps(plan),
                                      grace_period=plan.search["asha"]["grace_period"] * every,
                                      reduction_factor=plan.search["asha"]["reduction_factor"])
        log = TrialLog(str(sweep_dir / ROWS_FILE), plan.name, name, test_domain, seed, plan.cfg["method"]["name"],
                       max_trial_steps(plan))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=plan.search["num_samples"], max_concurrent_trials=n_concurrent,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=plan.tune_root, callbacks=[log],
                                      failure_config=tune.FailureConfig(max_failures=plan.search["max_failures"]),
                                      verbose=1))
        print(f"[distill.tune] search {name}: {plan.search['num_samples']} trial(s), {n_concurrent} at a time",
              flush=True)
    grid = tuner.fit()
    export_study(exp_path, sweep_dir / "optuna.db", study_name)
    states = [r.metrics.get("trial_id") for r in grid]
    errors = [{"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name.replace("trial_", ""),
               "error": error_reason(str(r.error))} for r in grid if r.error is not None]
    finished = len(grid) >= plan.search["num_samples"] and grid.num_terminated + grid.num_errors == len(grid)
    summary = {"search": name, "test_domain": test_domain, "seed": seed, "trials": len(grid),
               "terminated": grid.num_terminated, "errors": errors, "finished": finished,
               "seconds": round(time.time() - t0, 1), "experiment": exp_path, "study": study_name,
               "trial_ids": states}
    return summary


def export_study(exp_path: str, db: Path, study_name: str) -> None:
    """The search's Optuna study, as Tune saved it with the experiment, copied into `optuna.db` (sqlite) for
    inspection (optuna.load_study, optuna-dashboard). Never read back: the experiment's copy is the searcher's."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    try:
        searcher = OptunaSearch()
        searcher.restore_from_dir(exp_path)
        study = searcher._ot_study
        url = tracking.sqlite_uri(db)
        try:
            optuna.delete_study(study_name=study_name, storage=url)
        except KeyError:
            pass
        exported = optuna.create_study(study_name=study_name, storage=url, directions=study.directions)
        exported.add_trials([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    except Exception as exc:  # noqa: BLE001 - a convenience copy: never fail the sweep for it
        print(f"[distill.tune] could not export the Optuna study {study_name} ({type(exc).__name__}: {exc})",
              flush=True)


def _drop_rows(path: Path, search: str) -> None:
    if not path.exists():
        return
    from .report import read_jsonl

    rows = [r for r in read_jsonl(path) if r.get("search") != search]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    tmp.replace(path)


def _load_state(plan: Plan) -> dict | None:
    return _read_json(plan.sweep_dir / SWEEP_FILE)


def run_sweep(plan: Plan, resume: bool = False) -> dict:
    """The whole sweep; returns report.build's results (also written to the sweep dir)."""
    from . import report
    from .train import ensure_ray

    sweep_dir = plan.sweep_dir
    state = _load_state(plan)
    if state and not resume:
        raise ConfigError([f"{sweep_dir} already holds sweep {plan.name!r}: pass --resume to continue it, or give "
                           f"another name (--set name=...)"])
    if state and state.get("fingerprint") != plan.fingerprint():
        raise ConfigError([f"--resume: {sweep_dir} was started from a different config ({state.get('source')} "
                           f"{state.get('overrides') or ''}); resume with the same file and --set values "
                           f"(only search.max_concurrent may change)"])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "searches").mkdir(exist_ok=True)
    if not state:
        state = {"sweep": plan.name, "sweep_id": uuid.uuid4().hex[:12], "fingerprint": plan.fingerprint(),
                 "source": plan.source, "overrides": plan.overrides, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2, default=str))
    (sweep_dir / "sweep.yaml").write_text(plan.text)
    (sweep_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2, default=str))

    ensure_ray()
    _give_trials_the_ray_address()
    n_concurrent, why = concurrency(plan)
    print(describe(plan, why), flush=True)
    parent = _parent_run(plan, state["sweep_id"])
    tracking.log_artifact(plan.tracking_uri, parent, sweep_dir / "sweep.yaml")
    tracking.log_artifact(plan.tracking_uri, parent, sweep_dir / PLAN_FILE)
    t0 = time.time()
    try:
        warm_caches(plan)
        for test_domain, seed in plan.searches():
            name = search_name(test_domain, seed)
            marker = sweep_dir / "searches" / f"{name}.json"
            done = _read_json(marker)
            if done and done.get("finished"):
                print(f"[distill.tune] search {name}: finished earlier, skipped", flush=True)
                continue
            summary = run_search(plan, test_domain, seed, parent, n_concurrent, resume)
            reconcile_runs(plan, parent)
            marker.write_text(json.dumps(summary, indent=2, default=str))
            if not summary["finished"]:
                raise KeyboardInterrupt(f"search {name} stopped before its trials finished")
            for err in summary["errors"]:
                print(f"[distill.tune] search {name}: trial {err['trial_id']} failed: {err['error'][:300]}",
                      flush=True)
    except KeyboardInterrupt as exc:
        tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "interrupted"})
        tracking.end_run(plan.tracking_uri, parent, "KILLED")
        print(f"[distill.tune] interrupted ({exc or 'Ctrl-C'}); continue with: python -m distill.tune --space "
              f"{plan.source} {' '.join(f'--set {k}={v}' for k, v in plan.overrides.items())} --resume".rstrip(),
              flush=True)
        raise
    except BaseException as exc:
        tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "failed",
                                                     "distill.failure": f"{type(exc).__name__}: {exc}"[:4000]})
        tracking.end_run(plan.tracking_uri, parent, "FAILED")
        raise
    results = finish(plan, parent)
    tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "finished",
                                                 "distill.sweep_seconds": round(time.time() - t0)})
    tracking.end_run(plan.tracking_uri, parent, "FINISHED")
    print(report.render_text(results), flush=True)
    print(f"[distill.tune] sweep {plan.name!r} done in {time.time() - t0:.0f}s: {sweep_dir}/results.md; MLflow "
          f"{plan.tracking_uri} (experiment {plan.name!r}, parent run {parent})", flush=True)
    return results


def child_runs(plan: Plan, parent_run_id: str) -> dict[str, Any]:
    """train run name -> MLflow child run of the sweep."""
    c = tracking.client(plan.tracking_uri)
    exp = c.get_experiment_by_name(plan.name)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                         max_results=50000)
    return {r.data.tags.get(tracking.RUN_NAME_TAG): r for r in runs}


def reconcile_runs(plan: Plan, parent: str, final: bool = False) -> dict[str, Any]:
    """Make each child run's MLflow status say what Tune did with its trial (trials.jsonl's `end` events). A trial
    that ASHA stopped was killed mid-fit (its run may read RUNNING, or FAILED with the ActorDiedError of its
    TorchTrainer): FINISHED, tagged early_stopped. A failed trial's run: FAILED with Tune's reason, unless
    run_trial recorded its own. With `final`, runs still RUNNING belong to no live trial (a killed driver's)."""
    from .report import load_events

    uri = plan.tracking_uri
    c = tracking.client(uri)
    ends = {e.get("train_run"): e for e in load_events(plan.sweep_dir)}
    runs = child_runs(plan, parent)
    for name, run in runs.items():
        end, rid = ends.get(name), run.info.run_id
        status, tags = run.info.status, run.data.tags
        if end and end.get("status") == "early_stopped" and tags.get(tracking.STATUS_TAG) != "early_stopped":
            if "distill.failure" in tags:
                c.delete_tag(rid, "distill.failure")
            tracking.set_tags(uri, rid, {tracking.STATUS_TAG: "early_stopped",
                                         "distill.stopped_at_step": end.get("step")})
            tracking.end_run(uri, rid, "FINISHED")
        elif end and end.get("status") == "error" and status == "RUNNING":
            tracking.set_tags(uri, rid, {tracking.STATUS_TAG: "failed",
                                         "distill.failure": str(end.get("error"))[:4000]})
            tracking.end_run(uri, rid, "FAILED")
        elif final and status == "RUNNING":
            tracking.set_tags(uri, rid, {tracking.STATUS_TAG: "interrupted"})
            tracking.end_run(uri, rid, "KILLED")
    return child_runs(plan, parent)


def finish(plan: Plan, parent: str) -> dict:
    """Selection, report files, plots, MLflow parent artifacts/metrics, model registry."""
    from . import plots, report

    uri = plan.tracking_uri
    sweep_dir = plan.sweep_dir
    runs = reconcile_runs(plan, parent, final=True)
    run_ids = {name: r.info.run_id for name, r in runs.items() if name}
    (sweep_dir / "runs.json").write_text(json.dumps(run_ids, indent=2))
    results = report.build_from_dirs([sweep_dir])
    report.write(results, sweep_dir)
    made = plots.make_all(results, report.load_rows(sweep_dir), sweep_dir / "plots")
    for name in ("results.md", "results.csv", "results.json", ROWS_FILE, "runs.json"):
        if (sweep_dir / name).exists():
            tracking.log_artifact(uri, parent, sweep_dir / name, "results")
    for path in made:
        tracking.log_artifact(uri, parent, path, "plots")
    metrics = {}
    overall = report.overall_group(results)
    for selection, prefix in (("validation", "test_acc"), ("oracle", "oracle_test_acc")):
        row = report.table_row(results, selection, overall)
        if row is None:
            continue
        for domain, cell in row["domains"].items():
            if cell["mean"] is not None:
                metrics[f"{prefix}/{domain}"] = cell["mean"]
        if row["avg"]["mean"] is not None:
            metrics[f"{prefix}_avg"] = row["avg"]["mean"]
    tracking.log_metrics(uri, parent, metrics, 0)
    register_selected(plan, results, run_ids)
    return results


def register_selected(plan: Plan, results: dict, run_ids: dict[str, str]) -> None:
    """The selected model of each held-out domain (per seed): tag its child run, and register its best_checkpoint
    artifact as a version of the registered model `<sweep>-<test domain>` (skipped where the store can't)."""
    from . import report

    uri = plan.tracking_uri
    c = tracking.client(uri)
    overall = report.overall_group(results)
    for sel in results["selected"]["validation"]:
        if sel["method_group"] != overall:
            continue
        run_id = run_ids.get(sel["train_run"])
        if not run_id:
            print(f"[distill.tune] no MLflow run for {sel['train_run']}; not registered", flush=True)
            continue
        tracking.set_tags(uri, run_id, {"distill.selected": "true",
                                        f"distill.selected_for.{sel['test_domain']}.s{sel['seed']}": sel["step"]})
        model = _model_name(f"{plan.name}-{sel['test_domain']}")
        try:
            run = c.get_run(run_id)
            artifacts = {a.path for a in c.list_artifacts(run_id)}
            if "best_checkpoint" not in artifacts:
                _log_checkpoint(uri, run_id, sel.get("checkpoint_path"))
            existing = [v for v in c.search_model_versions(f"name = '{model}'") if v.run_id == run_id]
            if existing:
                continue
            try:
                c.create_registered_model(model, description=f"{plan.name}: selected by source-domain validation "
                                                             f"with {sel['test_domain']} held out")
            except Exception:  # noqa: BLE001 - exists already
                pass
            version = c.create_model_version(
                model, source=f"{run.info.artifact_uri}/best_checkpoint", run_id=run_id,
                tags={"distill.test_domain": sel["test_domain"], "distill.seed": str(sel["seed"]),
                      "distill.step": str(sel["step"]), "distill.method": sel["method"],
                      "distill.val_acc": f"{sel['val_acc']:.4f}", "distill.test_acc": f"{sel['test_acc']:.4f}"})
            print(f"[distill.tune] registered {model} version {version.version} ({sel['method']}, seed "
                  f"{sel['seed']}, step {sel['step']})", flush=True)
        except Exception as exc:  # noqa: BLE001 - the tag above stands for the registry
            print(f"[distill.tune] could not register {model} ({type(exc).__name__}: {exc}); the child run is "
                  f"tagged distill.selected=true instead", flush=True)


def _model_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _log_checkpoint(uri: str, run_id: str, checkpoint_path: str | None) -> None:
    """A trial stopped early (ASHA) never logged its best checkpoint: log the selected step's checkpoint."""
    import tempfile

    from .trial.launch import export_model, read_checkpoint
    from .trial.loop import CHECKPOINT_FILE

    if not checkpoint_path or not (Path(checkpoint_path) / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path} is gone (train.num_checkpoints keeps the best)")
    with tempfile.TemporaryDirectory() as tmp:
        export_model(read_checkpoint(checkpoint_path), tmp)
        tracking.log_artifact(uri, run_id, tmp, "best_checkpoint")


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, metavar="FILE.yaml",
                        help="sweep YAML: the trial schema plus `seeds` and `search` (see search_spaces/demo.yaml)")
    parser.add_argument("--storage", metavar="DIR_OR_URI",
                        help="overrides `storage:` (a directory); a URI (s3://, gs://) puts Tune/Train results there")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value, e.g. --set search.num_samples=8 --set train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep from its storage")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args.space, args.overrides, args.storage)
        if args.dry_run:
            print(describe(plan))
            return 0
        run_sweep(plan, resume=args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    # run the package module's main, not this `__main__` copy: the trainable, the space, the callback and the
    # scheduler Tune pickles must be importable as distill.tune.* by the trial processes and by a later restore
    from distill.tune import main as _main

    sys.exit(_main())
