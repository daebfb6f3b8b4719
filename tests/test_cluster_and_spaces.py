"""cluster.yaml and search_spaces/*.yaml, checked offline and fast (no Ray started, no network, no data).

- cluster.yaml against the autoscaler's JSON schema shipped inside the installed ray wheel (the same private
  functions `ray up` and Ray's own tests use), plus what the schema cannot see: the head type exists, resources are
  integers, and the MLflow/shared-storage wiring the sweep files rely on. Typo keys must be rejected, so the
  validation is shown to be able to fail. The commented GCP and on-prem alternatives are uncommented and validated.
- every sweep file (but demo.yaml, another engineer's) builds with `distill.config.build_config` once its sweep
  sections are set aside and dataset.root points at an empty PACS layout; every distribution of its space is
  well-formed, names a config key or a hyperparameter of a method the file can run, and every value it can draw
  (each choice, both ends of each range) builds a config and constructs the method; and distill.tune's own plan
  (`make_plan`, what `python -m distill.tune --dry-run` runs) accepts it.
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
SPACES_DIR = ROOT / "search_spaces"
NOT_MINE = {"demo.yaml", "compare.yaml"}  # the built-in world's local files: checked by test_local_space_files
SPACE_FILES = sorted(p for p in SPACES_DIR.glob("*.yaml") if p.name not in NOT_MINE)
PER_METHOD = ["erm", "kd", "rise", "scmd", "vl2v", "li"]

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]  # DomainBed's folder names (checked below)
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
SHARED = "/mnt/shared"  # the shared mount cluster.yaml creates on every node

DISTRIBUTIONS = {"uniform", "loguniform", "int", "logint", "choice"}
SEARCH_KEYS = {"num_samples", "max_concurrent", "start_ahead", "scheduler", "asha", "sampler", "sampler_seed",
               "max_failures", "space"}
SWEEP_SECTIONS = ("search", "seeds")


# ------------------------------------------------------------------------------------------------------ cluster.yaml
def _load_cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does before touching a cloud: fill defaults, then check against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _commented_block(name: str) -> dict:
    """The `# --- BEGIN <name> ... # --- END <name> ---` block of cluster.yaml, uncommented and parsed."""
    lines = CLUSTER.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# --- BEGIN {name} "))
    end = next(i for i, line in enumerate(lines) if line.startswith(f"# --- END {name} "))
    body = []
    for line in lines[start + 1:end]:
        assert line.startswith("#"), f"{name} block: every line must be commented out: {line!r}"
        body.append(line[2:] if line.startswith("# ") else line[1:])
    block = yaml.safe_load("\n".join(body))
    assert isinstance(block, dict) and block, f"{name} block is empty"
    return block


def test_cluster_yaml_passes_the_autoscaler_schema():
    prepared = _validate(_load_cluster())
    assert prepared["provider"]["type"] == "aws"


def test_cluster_node_types():
    cfg = _load_cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert "node_config" in node and node["node_config"], name
        assert node["resources"], f"{name}: give resources explicitly (the autoscaler plans with them)"
        for key, value in node["resources"].items():
            assert type(value) is int and value >= 0, f"{name}.resources.{key} must be a non-negative integer"
    workers = [n for k, n in types.items() if k != cfg["head_node_type"]]
    assert any(n["resources"].get("GPU", 0) > 0 for n in workers), "cloud GPU workers by default"
    assert all(n.get("min_workers", 0) <= n.get("max_workers", cfg["max_workers"]) for n in workers)


@pytest.mark.parametrize("mutate, what", [
    (lambda c: c.update(max_worker=4), "typo at the top level"),
    (lambda c: c["available_node_types"]["gpu-worker"].update(min_worker=0), "typo in a node type"),
    (lambda c: c["available_node_types"]["gpu-worker"]["resources"].update(GPU=0.5), "fractional resources"),
    (lambda c: c["docker"].update(imagee="x"), "typo in docker"),
    (lambda c: c.update(head_node_type="no-such-type"), "head_node_type names no node type"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_cluster_validation_rejects_broken_copies(mutate, what):
    # (the schema leaves `provider` open to provider-specific keys: typos there are not caught by anyone)
    cfg = _load_cluster()
    _validate(cfg)  # the original is fine ...
    broken = copy.deepcopy(cfg)
    mutate(broken)
    with pytest.raises(Exception):  # ... and each broken copy is not (jsonschema.ValidationError or ValueError)
        _validate(broken)


def test_cluster_gcp_alternative_validates():
    block = _commented_block("gcp")
    cfg = _load_cluster()
    cfg.update(block)
    cfg["provider"].pop("cache_stopped_nodes", None)
    assert _validate(cfg)["provider"]["type"] == "gcp"


def test_cluster_local_alternative_validates():
    block = _commented_block("local")
    assert "available_node_types" not in block and "head_node_type" not in block
    cfg = _load_cluster()
    cfg.update(block)
    del cfg["available_node_types"], cfg["head_node_type"]
    prepared = _validate(cfg)
    assert prepared["provider"]["head_ip"] and prepared["provider"]["worker_ips"]
    # and the local provider refuses node types, as the comment in cluster.yaml says
    with_types = copy.deepcopy(cfg)
    with_types["available_node_types"] = _load_cluster()["available_node_types"]
    with pytest.raises(BaseException):
        _validate(with_types)


def _all_commands(cfg: dict) -> str:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return "\n".join(cmd for key in keys for cmd in cfg.get(key) or [])


def test_cluster_installs_the_package_from_the_working_copy():
    cfg = _load_cluster()
    remote = next(r for r, local in cfg["file_mounts"].items() if local in (".", "./"))
    install = next(c for c in cfg["setup_commands"] if "pip install" in c and f"-e {remote}" in c)
    # the nodes get the versions CI tests: pyproject holds ranges, constraints.txt the exact pins
    assert f"-c {remote}/constraints.txt" in install, install
    assert {"torch", "torchvision", "ray"} <= set(_constraints())


def _constraints() -> dict[str, str]:
    """constraints.txt as {name: exact version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.split("[")[0].strip().lower()] = version.strip()
    return pins


def test_cluster_docker_image_matches_the_pinned_ray():
    cfg = _load_cluster()
    version = _constraints()["ray"]
    assert f":{version}-" in cfg["docker"]["image"], (cfg["docker"]["image"], version)


def test_cluster_runs_mlflow_on_the_head_and_points_every_node_at_it():
    cfg = _load_cluster()
    head = "\n".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and '--host "$HEAD_PRIVATE_IP"' in head and "--port 5000" in head
    assert f"--backend-store-uri sqlite:///{SHARED}/" in head  # four slashes: an absolute path
    assert "--artifacts-destination" in head and "--allowed-hosts" in head
    # workers: the head's private IP from the autoscaler; the head: its own private IP (not localhost, which the
    # trial drivers it hands the URI to would resolve to their own node)
    worker_setup = "\n".join(cfg["worker_setup_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_setup
    head_setup = "\n".join(cfg["head_setup_commands"])
    assert "MLFLOW_TRACKING_URI=http://" in head_setup and "localhost" not in head_setup.split("MLFLOW")[1]
    # the env file reaches `ray start` (so every Ray worker inherits it) on both kinds of node
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert ". ~/.distill_env" in start, key


def test_cluster_shares_storage_on_every_node():
    cfg = _load_cluster()
    assert any(f"{SHARED}:{SHARED}" in opt for opt in cfg["docker"]["run_options"])
    commands = _all_commands(cfg)
    assert "mount -t nfs4" in commands and SHARED in commands


# -------------------------------------------------------------------------------------------------- search spaces
@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory) -> Path:
    """A PACS in the DomainBed layout with one tiny image per class and domain (the real one lives on the cluster's
    shared mount; an empty class folder is a config error)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("PACS")
    for domain in PACS_DOMAINS:
        for cls in PACS_CLASSES:
            (root / domain / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / domain / cls / "0.png")
    return root


def _load_space_file(path: Path) -> tuple[dict, dict]:
    """(the single-trial part, the sweep sections)."""
    raw = yaml.safe_load(path.read_text())
    sweep = {k: raw.pop(k) for k in SWEEP_SECTIONS if k in raw}
    return raw, sweep


def _trial_raw(raw: dict, root: Path) -> dict:
    out = copy.deepcopy(raw)
    out.setdefault("dataset", {})["root"] = str(root)
    return out


def _dist_kind(spec: dict) -> str:
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    assert len(kinds) == 1, f"exactly one of {sorted(DISTRIBUTIONS)} per key, got {sorted(spec)}"
    return kinds[0]


def _candidates(spec: dict) -> list:
    kind = _dist_kind(spec)
    args = spec[kind]
    return list(args) if kind == "choice" else [args[0], args[1]]


def _methods_of(raw: dict, space: dict) -> list[str]:
    if "method.name" in space:
        return list(space["method.name"]["choice"])
    return [raw["method"]["name"]]


def _applicable_methods(key: str, spec: dict, raw: dict, space: dict) -> list[str]:
    """Methods a `method.<hp>` distribution is drawn for: its `when: {method.name: ...}`, else the file's methods."""
    from distill.methods import REGISTRY

    methods = _methods_of(raw, space)
    when = (spec.get("when") or {}).get("method.name")
    if when is not None:
        methods = [when] if isinstance(when, str) else list(when)
    hp = key.split(".", 1)[1]
    return [m for m in methods if hp in REGISTRY[m].hparams]


@pytest.fixture(params=SPACE_FILES, ids=lambda p: p.name)
def space_file(request) -> Path:
    return request.param


def test_pacs_layout_matches_the_registry():
    from distill.data.registry import DATASETS

    assert DATASETS["PACS"].domains == PACS_DOMAINS and DATASETS["PACS"].classes == PACS_CLASSES


def test_space_files_exist():
    names = {p.stem for p in SPACE_FILES}
    assert set(PER_METHOD) | {"all"} <= names


def test_space_file_builds(space_file, pacs_root):
    from distill.config import build_config

    raw, sweep = _load_space_file(space_file)
    cfg = build_config(_trial_raw(raw, pacs_root), source=str(space_file))
    assert cfg["dataset"]["name"] == "PACS" and cfg["test_domains"] == PACS_DOMAINS
    assert cfg["dataset"]["image_size"] == 224
    assert cfg["teacher"]["pretrained"] == "openai" and cfg["teacher"]["checkpoint"] is None
    assert cfg["teacher"]["preprocess"] in ("clip", "imagenet")
    assert cfg["student"]["pretrained"] == "imagenet"
    assert cfg["resources"]["gpus_per_worker"] > 0, "the sweeps target the GPU cluster"
    # the file's own paths are on the cluster's shared mount (Tune's storage_path must be shared across nodes)
    assert raw["storage"].startswith(SHARED + "/") and raw["dataset"]["root"].startswith(SHARED + "/")


def test_space_file_sweep_sections(space_file):
    raw, sweep = _load_space_file(space_file)
    assert sweep.get("seeds") == [0, 1, 2]
    search = sweep["search"]
    assert set(search) <= SEARCH_KEYS, f"unknown search keys {sorted(set(search) - SEARCH_KEYS)}"
    assert isinstance(search["num_samples"], int) and search["num_samples"] >= 1
    assert isinstance(search["max_concurrent"], int) and search["max_concurrent"] >= 1
    assert isinstance(search.get("sampler_seed", 0), int)
    assert search.get("scheduler", "none") in ("none", "asha")
    assert search.get("sampler", "tpe") in ("tpe", "random")
    if search.get("scheduler") == "asha":
        asha = search["asha"]
        assert set(asha) <= {"grace_period", "reduction_factor"}
        assert isinstance(asha["grace_period"], int) and asha["grace_period"] >= 1
        assert isinstance(asha["reduction_factor"], (int, float)) and asha["reduction_factor"] > 1
        rounds = raw["train"]["steps"] // raw["train"]["eval_every"]
        assert asha["grace_period"] < rounds, "the grace period must end before the trial does"
    assert isinstance(search["space"], dict) and search["space"]


def test_space_distributions_are_well_formed(space_file):
    from distill.config import DEFAULTS, get_dotted

    raw, sweep = _load_space_file(space_file)
    space = sweep["search"]["space"]
    for key, spec in space.items():
        assert isinstance(spec, dict), key
        assert set(spec) - DISTRIBUTIONS <= {"when"}, f"{key}: unknown fields {sorted(set(spec) - DISTRIBUTIONS)}"
        kind = _dist_kind(spec)
        args = spec[kind]
        if kind == "choice":
            assert isinstance(args, list) and args, f"{key}: choice needs a non-empty list"
            assert len({repr(a) for a in args}) == len(args), f"{key}: repeated choices"
        else:
            assert isinstance(args, list) and len(args) == 2, f"{key}: {kind} needs [low, high]"
            low, high = args
            numbers = (int,) if kind in ("int", "logint") else (int, float)
            assert all(isinstance(v, numbers) and not isinstance(v, bool) for v in args), f"{key}: {args}"
            assert low < high, f"{key}: low must be below high"
            if kind in ("loguniform", "logint"):
                assert low > 0, f"{key}: {kind} needs low > 0"
        if not key.startswith("method.") or key == "method.name":
            assert get_dotted(DEFAULTS, key, default=KeyError) is not KeyError, f"{key}: not a config key"
        for cond_key, cond_value in (spec.get("when") or {}).items():
            assert cond_key != key
            allowed = _candidates(space[cond_key]) if cond_key in space else None
            values = cond_value if isinstance(cond_value, list) else [cond_value]
            if allowed is not None:
                assert set(map(repr, values)) <= set(map(repr, allowed)), f"{key}: when {cond_key}: {values}"
            else:
                assert get_dotted(DEFAULTS, cond_key, default=KeyError) is not KeyError, f"{key}: when {cond_key}"


def test_space_method_keys_are_hyperparameters(space_file):
    """Every `method.<hp>` names a hyperparameter of a method the file can run, and of every method its `when`
    names (a typo or a renamed hyperparameter fails here, not on the cluster)."""
    from distill.methods import REGISTRY

    raw, sweep = _load_space_file(space_file)
    space = sweep["search"]["space"]
    methods = _methods_of(raw, space)
    assert all(m in REGISTRY for m in methods), methods
    for key, spec in space.items():
        if not key.startswith("method.") or key == "method.name":
            continue
        hp = key.split(".", 1)[1]
        having = [m for m in methods if hp in REGISTRY[m].hparams]
        assert having, f"{key}: no method of {space_file.name} ({methods}) has hyperparameter {hp!r}"
        when = (spec.get("when") or {}).get("method.name")
        if when is not None:
            named = [when] if isinstance(when, str) else list(when)
            assert set(named) <= set(methods), f"{key}: when names methods the file cannot run"
            lacking = [m for m in named if hp not in REGISTRY[m].hparams]
            assert not lacking, f"{key}: {lacking} have no hyperparameter {hp!r}"
        elif "method.name" in space:
            # a name several methods share must say for which it is drawn (their ranges mean different things)
            assert len(having) == 1, f"{key}: shared by {having}; add `when: {{method.name: [...]}}`"


TINY_DIM = 16


@functools.lru_cache(maxsize=1)
def _tiny_student():
    from distill.models.students import build_student

    return build_student("resnet18", "none", False, embed_dim=TINY_DIM, num_classes=len(PACS_CLASSES))


def _tiny_method(name: str, hp: dict):
    """Construct a method through its public contract (prompt_sets, __init__) on a small random student (shared:
    constructing a method does not change its student)."""
    import torch

    from distill.methods import REGISTRY, MethodContext

    cls = REGISTRY[name]
    dim = TINY_DIM
    ctx = MethodContext(class_names=list(PACS_CLASSES),
                        source_domains=PACS_DOMAINS[:3], total_steps=100, num_classes=len(PACS_CLASSES),
                        embed_dim=dim, class_prompts=[[f"a photo of a {c}."] for c in PACS_CLASSES])
    full = {**cls.hparams, **hp}
    text = {key: torch.nn.functional.normalize(torch.randn(len(rows), dim), dim=-1)
            for key, rows in cls.prompt_sets(full, ctx).items()}
    return cls(_tiny_student(), full, ctx, text)


def test_every_value_of_the_space_builds(space_file, pacs_root):
    """Each choice and both ends of each range, on each method it is drawn for: the config builds (types, names,
    backbones) and the method accepts the value (its own range checks, e.g. RISE's and Li's loss_type)."""
    from distill.config import build_config, set_dotted

    raw, sweep = _load_space_file(space_file)
    space = sweep["search"]["space"]
    base = _trial_raw(raw, pacs_root)
    checked = 0
    for key, spec in space.items():
        conditions = {k: (v[0] if isinstance(v, list) else v) for k, v in (spec.get("when") or {}).items()
                      if k != "method.name"}
        if key.startswith("method.") and key != "method.name":
            methods = _applicable_methods(key, spec, raw, space)
        elif key == "method.name":
            methods = [None]
        else:
            methods = [raw["method"]["name"]]
        for method in methods:
            for value in _candidates(spec):
                trial = copy.deepcopy(base)
                if method is not None and method != trial["method"]["name"]:
                    trial["method"] = {"name": method}
                for cond_key, cond_value in conditions.items():
                    set_dotted(trial, cond_key, cond_value)
                if key == "method.name":
                    trial["method"] = {"name": value}
                else:
                    set_dotted(trial, key, value)
                cfg = build_config(trial, source=f"{space_file.name}: {key}={value!r}")
                if key.startswith("method."):
                    hp = {k: v for k, v in cfg["method"].items() if k != "name"}
                    _tiny_method(cfg["method"]["name"], hp)
                checked += 1
    assert checked >= len(space)


def test_spaces_together_explore_the_required_axes():
    keys = set()
    for name in PER_METHOD:
        _, sweep = _load_space_file(SPACES_DIR / f"{name}.yaml")
        keys |= set(sweep["search"]["space"])
    required = {"method.temperature", "method.loss_type", "method.selection_ratio", "student.backbone", "train.lr"}
    assert required <= keys, f"missing {sorted(required - keys)}"
    assert any(k.startswith("method.") and k.endswith("_weight") for k in keys), "loss weights"
    backbones = set()
    for name in PER_METHOD:
        _, sweep = _load_space_file(SPACES_DIR / f"{name}.yaml")
        spec = sweep["search"]["space"].get("student.backbone")
        backbones |= set(spec["choice"]) if spec else set()
    assert {"resnet18", "resnet50"} <= backbones


def test_all_yaml_chooses_every_method_with_the_union_of_hyperparameters():
    from distill.methods import REGISTRY

    raw, sweep = _load_space_file(SPACES_DIR / "all.yaml")
    space = sweep["search"]["space"]
    # the papers' methods (each with its own file), then the teacher-free baselines (dg-baselines.yaml) and MIRO
    baselines = ["coral", "mmd", "groupdro", "irm", "mixup", "sagnet", "miro", "miro_teacher"]
    assert space["method.name"]["choice"] == PER_METHOD + baselines
    assert set(space["method.name"]["choice"]) == set(REGISTRY)   # every registered method
    _, dg = _load_space_file(SPACES_DIR / "dg-baselines.yaml")
    assert {k for k in dg["search"]["space"] if k.startswith("method.") and k != "method.name"} <= set(space)
    per_method = set()
    for name in PER_METHOD:
        _, s = _load_space_file(SPACES_DIR / f"{name}.yaml")
        per_method |= {k for k in s["search"]["space"] if k.startswith("method.")}
    # Li's temperature (a contrastive tau) and loss_type (its own ablation rows) share names with RISE/KD/SCMD
    # hyperparameters of another meaning; all.yaml draws those names for the KD-style methods only.
    assert per_method <= set(space), f"all.yaml lacks {sorted(per_method - set(space))}"
    for key, spec in space.items():
        if key.startswith("method.") and key != "method.name":
            assert "method.name" in (spec.get("when") or {}), f"{key}: say which methods it is drawn for"


# ----------------------------------------------------------------------------------------------- distill.tune
def test_space_file_passes_distill_tune_validation(space_file, pacs_root):
    """distill.tune's own plan: the sweep sections, the space's conditions and every value it can draw, exactly as
    `python -m distill.tune --space FILE --dry-run` checks them (no Ray started)."""
    tune = pytest.importorskip("distill.tune")
    plan = tune.make_plan(space_file, overrides=[f"dataset.root={pacs_root}"])
    raw, sweep = _load_space_file(space_file)
    assert plan.seeds == sweep["seeds"]
    assert plan.search["num_samples"] == sweep["search"]["num_samples"]
    assert set(plan.space.keys()) == set(sweep["search"]["space"])
    assert plan.methods == _methods_of(raw, sweep["search"]["space"])
    assert plan.cfg["storage"] == raw["storage"]  # results on the shared mount
    assert plan.resources().get("GPU", 0) > 0


def test_head_shell_drivers_see_a_growing_cluster():
    """distill.tune caps max_concurrent by the GPUs present at the start unless RAY_ADDRESS is set; a cluster that
    starts its GPU workers on demand has none then. The head's shells get RAY_ADDRESS, `ray start` does not."""
    cfg = _load_cluster()
    assert any("RAY_ADDRESS=" in c for c in cfg["head_setup_commands"])
    start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert start.index("unset RAY_ADDRESS") < start.index("ray start")
    tune = pytest.importorskip("distill.tune")
    assert "RAY_ADDRESS" in inspect.getsource(tune.concurrency), "distill.tune changed how it detects a cluster"


@pytest.mark.parametrize("method", ["erm", "kd", "rise", "scmd", "vl2v", "li"])
def test_local_space_files(method, tmp_path):
    """demo.yaml and compare.yaml (built-in world, CPU) pass the sweep validation for every method they can run."""
    from distill import tune

    for name in ("demo.yaml", "compare.yaml"):
        plan = tune.make_plan(SPACES_DIR / name, overrides=[f"storage={tmp_path}", f"method.name={method}"])
        assert plan is not None


def test_cluster_is_closed_by_default():
    """Nothing listens on every interface without authentication: the Ray dashboard (job submission) on the head's
    loopback, MLflow with basic authentication on the head's private address, Ray's token on every node, NFS only to
    the cluster's subnet with root squashed, and no credential in the repository (file_mounts from the user's
    home)."""
    text = CLUSTER.read_text()
    active = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "0.0.0.0" not in active and "no_root_squash" not in active
    cfg = _load_cluster()
    head = "\n".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--app-name basic-auth" in head and "MLFLOW_AUTH_ADMIN_PASSWORD" in head and "NO_PERMISSIONS" in head
    assert "root_squash" in cfg["initialization_commands"][0] and "ipaddress.ip_interface" in \
        cfg["initialization_commands"][0]
    setup = "\n".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and ". ~/.distill/mlflow.env" in setup
    mounts = cfg["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token" and mounts["~/.distill/mlflow.env"].startswith("~/")
    assert not any(p.exists() for p in (ROOT / ".ray", ROOT / ".distill"))   # credentials are not in the repo
