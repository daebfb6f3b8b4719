"""The sweep's plan: a sweep YAML (the trial schema plus `seeds` and `search`) read, validated completely (every
problem in one error, before anything starts) and resolved into the searches (held-out domain x seed) to run."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import (DEFAULTS, TYPES, ConfigError, build_config, config_hash, get_dotted, load_yaml,
                      parse_overrides, resolve_path, set_dotted, trial_config)
from .space import METRIC, MODE, SearchSpace, _is_number, _known_hparams, parse_space

SCHEDULERS = ("none", "asha")
SAMPLERS = ("tpe", "random")
SEARCH_DEFAULTS: dict[str, Any] = {
    "num_samples": 1,  # trials per (held-out domain, seed)
    "max_concurrent": None,  # None: as many as the cluster's CPUs/GPUs hold
    "start_ahead": None,  # trials started before a slot frees; None: one per slot (<= 8) for GPU trials, 0 for CPU
    "scheduler": "none",  # none | asha
    "asha": {"grace_period": 1, "reduction_factor": 2},  # in evaluation rounds (train.eval_every steps)
    "sampler": "tpe",  # tpe (Optuna's TPE, multivariate) | random (Optuna's RandomSampler: DomainBed's protocol)
    "sampler_seed": None,  # None: the config's `seed`
    "max_failures": 1,  # Tune-level retries of a failed trial (it resumes from its last Train checkpoint)
    "lodo": False,  # also train each trial's leave-one-domain-out models (DomainBed's LODO selection; x sources)
    "space": {},
}
# what each Tune trial's own function holds: no CPU (it only waits on its TorchTrainer, whose controller asks for
# none either and whose workers get their own placement group); Tune refuses an all-zero request, so the trial asks
# for a token of memory. Concurrency is then limited by max_concurrent_trials, computed from the cluster.
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 1024 ** 2}
SAMPLER_NAMES = {"tpe": "TPE (multivariate, group)", "random": "random sampling"}
ROWS_FILE = "trials.jsonl"
SWEEP_FILE = "sweep.json"
PLAN_FILE = "plan.json"


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
        """What must not change between a sweep and its --resume (max_concurrent and start_ahead may)."""
        search = {k: v for k, v in self.search.items() if k not in ("max_concurrent", "start_ahead")}
        return config_hash({"raw": self.raw, "seeds": self.seeds, "search": search}, 16)

    def resources(self) -> dict[str, float]:
        res = self.cfg["resources"]
        out = {"CPU": res["num_workers"] * res["cpus_per_worker"]}
        if res["gpus_per_worker"]:
            out["GPU"] = res["num_workers"] * res["gpus_per_worker"]
        return out

    def trial_function_resources(self) -> dict:
        """What a Tune trial's function holds: TRIAL_RESOURCES when a TorchTrainer's workers hold the trial's CPUs
        and GPUs; with `resources.launcher: inline` the function runs the loop itself and holds them (one worker)."""
        return self.resources() if self.cfg["resources"]["launcher"] == "inline" else dict(TRIAL_RESOURCES)

    def to_dict(self) -> dict:
        return {"sweep": self.name, "source": self.source, "overrides": self.overrides,
                "test_domains": self.test_domains, "seeds": self.seeds,
                "searches": [search_name(d, s) for d, s in self.searches()],
                "trials_per_search": self.search["num_samples"],
                "total_trials": self.search["num_samples"] * len(self.searches()),
                "methods": self.methods, "method_searched": "method.name" in self.space.keys(),
                "metric": METRIC, "mode": MODE, "search": self.search, "space": self.space.describe(),
                "resources_per_trial": {"workers": self.cfg["resources"], "total": self.resources(),
                                        "trial_function": self.trial_function_resources()},
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
    from ..config import _suggest

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
    check("start_ahead", lambda v: is_int(v) and v >= 0, "an integer >= 0 or null", allow_none=True)
    check("sampler_seed", is_int, "an integer or null", allow_none=True)
    check("max_failures", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    check("lodo", lambda v: isinstance(v, bool), "true or false")
    if search["scheduler"] is None:
        search["scheduler"] = "none"
    check("scheduler", lambda v: v in SCHEDULERS, f"one of {list(SCHEDULERS)}")
    check("sampler", lambda v: v in SAMPLERS, f"one of {list(SAMPLERS)}")
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
            from ..config import _suggest

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
        if base_cfg["resources"]["launcher"] == "inline" and results_root:
            problems.append(f"resources.launcher inline writes a trial's checkpoints to a directory (shared by the "
                            f"nodes), not to {results_root}: use a shared directory for --storage, or launcher train")
        if base_cfg["resources"]["launcher"] == "inline" and search["start_ahead"]:
            problems.append(f"search.start_ahead: {search['start_ahead']} with resources.launcher inline: an inline "
                            f"trial holds its CPUs/GPUs from its start, so none can start ahead of a free slot "
                            f"(set 0 or null)")
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
    from ..config import _merge

    return _merge(DEFAULTS, raw)


def with_method(cfg: dict, method: str) -> dict:
    """The sweep's config with `method` and its default hyperparameters (unchanged where it is the base method)."""
    from ..methods import get_method

    if cfg["method"]["name"] == method:
        return cfg
    return {**cfg, "method": {"name": method, **get_method(method).hparams}}


def method_stages(plan: Plan) -> dict[str, list[tuple[str, int]]]:
    """{method: [(stage, optimiser steps), ...]} for every method the sweep can choose."""
    from ..trial.prepare import trial_steps

    return {m: trial_steps(with_method(plan.cfg, m)) for m in plan.methods}


def _stages(plan: Plan) -> str:
    """' per stage (vl2v: align 400, then distill 400)' where a method the sweep can choose trains in stages."""
    multi = [f"{m}: " + ", then ".join(f"{name} {n}" for name, n in stages)
             for m, stages in method_stages(plan).items() if len(stages) > 1]
    return f" per stage ({'; '.join(multi)})" if multi else ""


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
        f"{plan.test_domains} x {len(plan.seeds)} seed(s) {plan.seeds}; all at once, sharing the cluster",
        f"  trials per search: {search['num_samples']}   total trials: {d['total_trials']}",
        f"  methods: {plan.methods}   dataset: {plan.cfg['dataset']['name']}   "
        f"student: {plan.cfg['student']['backbone']}   teacher: {plan.cfg['teacher']['arch']}",
        f"  each trial: {plan.cfg['train']['steps']} steps{_stages(plan)}, evaluated every "
        f"{plan.cfg['train']['eval_every']}; "
        f"{res['num_workers']} worker(s) x ({res['cpus_per_worker']} CPU, {res['gpus_per_worker']} GPU) "
        + (f"= {plan.resources()}, run in the trial function (launcher inline)"
           if res["launcher"] == "inline" else f"= {plan.resources()} + the trial function {TRIAL_RESOURCES}"),
        f"  concurrency: {concurrency or (search['max_concurrent'] or 'as many trials as the cluster holds')}",
        f"  searcher: Optuna {SAMPLER_NAMES[search['sampler']]} (sampler seed {search['sampler_seed']}) maximising "
        f"{METRIC} (source-domain validation only); scheduler: {sched}; trial retries: {search['max_failures']}",
        "  space:",
        *[f"    {line}" for line in plan.space.describe()],
        f"  storage: {plan.cfg['storage']}",
        f"  sweep dir: {plan.sweep_dir}  (trials.jsonl, results.md/csv/json, plots/)",
        f"  Tune experiments: {plan.tune_root}   Train runs: {plan.train_root}",
        f"  MLflow: {plan.tracking_uri}  experiment {plan.name!r}",
    ]
    return "\n".join(lines)
