"""The sweep's search space: the YAML `search.space` -> parameters with distributions and `when` conditions, and the
define-by-run space OptunaSearch samples (conditional parameters only on their branch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import TYPES, get_dotted

METRIC = "val_acc_best"  # = distill.train.BEST_METRIC: best source-validation accuracy so far (never the test domain)
MODE = "max"
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
# keys that define the sweep itself (its outer loop, its paths, its cluster share): never searched
STRUCTURAL = {"name", "storage", "seed", "seeds", "search", "test_domains", "dataset.name", "dataset.root",
              "resources.num_workers", "resources.cpus_per_worker", "resources.gpus_per_worker"}


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
    kind: str  # uniform | loguniform | int | logint (an integer drawn log-uniformly) | choice
    values: tuple  # (lo, hi) or the choices
    when: tuple = ()  # ((dotted key, (allowed values...)), ...)
    methods: tuple | None = None  # method.<hp>: the methods with this hyperparameter; None: no implicit condition

    def suggest(self, trial) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(self.key, float(self.values[0]), float(self.values[1]))
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, float(self.values[0]), float(self.values[1]), log=True)
        if self.kind == "logint":
            return trial.suggest_int(self.key, int(self.values[0]), int(self.values[1]), log=True)
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
    from ..methods import REGISTRY

    return {name: dict(cls.hparams) for name, cls in REGISTRY.items()}


def parse_space(space: Any, base: dict, where: str = "search.space") -> tuple[list[Param], dict[str, Any], list[str]]:
    """The YAML space -> (params in suggestion order, fixed values the conditions need, problems)."""
    from ..config import _suggest  # the config's did-you-mean helper

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
                            f"{{loguniform: [lo, hi]}}, {{int: [lo, hi]}}, {{logint: [lo, hi]}} or {{choice: [...]}}, got {spec!r}")
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
    if kind in ("int", "logint"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
            problems.append(f"{at}: {kind} needs two integers [lo, hi], got {args!r}")
            return None
        if kind == "logint" and lo < 1:
            problems.append(f"{at}: logint needs 1 <= lo, got lo {lo!r}")
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
