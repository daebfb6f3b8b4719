"""The sweep driver: validation of sweep YAMLs, the define-by-run space (sampled with real Optuna studies), the plan,
and end to end on a real local Ray (2 CPUs) with a real MLflow sqlite store: a tiny sweep, and a driver killed
mid-sweep then resumed."""
from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image

from distill import report, tune
from distill.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "search_spaces" / "demo.yaml"
ALL = REPO / "search_spaces" / "all.yaml"


def tiny(storage, name, **sweep) -> dict:
    """A sweep over the tiny built-in world (the same world and teacher as tests/test_train.py)."""
    return {
        "name": name,
        "storage": str(storage),
        "test_domains": ["sketch"],
        "dataset": {"world": {"per_class": 20}},
        "student": {"backbone": "resnet18"},
        "method": {"name": "erm"},
        "train": {"steps": 10, "batch_size": 8, "eval_every": 5, "max_failures": 0, "amp": "off"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "seeds": [0],
        **sweep,
    }


def write(tmp_path, data, name="sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_pacs(root: Path) -> Path:
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        for c in ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(root / d / c / "0.png")   # an empty class folder is a config error
    return root


def sample(space, n, seed=0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `group` is experimental
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    drawn = []
    for i in range(n):
        trial = study.ask()
        space(trial)
        study.tell(trial, (hash(str(sorted(trial.params.items()))) % 1000) / 1000)
        drawn.append(dict(trial.params))
    return drawn


# ---------------------------------------------------------------------------------------------------- validation
def test_a_bad_sweep_yaml_is_rejected_with_every_problem(tmp_path, capsys):
    data = tiny(tmp_path, "bad")
    data["train"]["lr"] = -1.0  # a single-trial problem (config.validate)
    data["seeds"] = [0, 0]
    data["search"] = {
        "num_samples": 0,
        "max_concurent": 2,
        "start_ahead": -1,
        "scheduler": "hyperband",
        "asha": {"grace_period": 0},
        "space": {
            "method.name": {"choice": ["erm", "kd", "dino"]},
            "train.lr": {"loguniform": [0.0, 1.0e-3]},
            "train.weight_decay": {"uniform": [0.1, 0.01]},
            "train.steps": {"int": [20, 20]},
            "train.optimiser": {"choice": ["adam"]},
            "method.selection_ratio": {"choice": [0.2, 0.3]},
            "student.backbone": {"choice": ["resnet18", "resnet7"]},
            "teacher.arch": {"choice": ["distill-tiny-rn", "ViT-Q-99"]},
            "train.batch_size": {"uniform": [4, 8]},
            "method.temperature": {"uniform": [1.0, 4.0], "when": {"method.nme": "kd"}},
            "method.kd_weight": {"uniform": [0.1, 0.9], "when": {"method.name": "rise"}},
            "test_domains": {"choice": ["photo", "sketch"]},
            "train.momentum": {"normal": [0.9, 0.1]},
        },
    }
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        tune.make_plan(path)
    text = "\n".join(err.value.problems)
    expected = [
        "train.lr: must be > 0",
        "seeds: [0, 0] lists a seed twice",
        "search.num_samples: expected an integer >= 1",
        "search.max_concurent: unknown key (did you mean 'max_concurrent'?)",
        "search.start_ahead: expected an integer >= 0 or null, got -1",
        "search.scheduler: expected one of ['none', 'asha']",
        "search.asha.grace_period",
        "choice 'dino'",
        "search.space.train.lr: loguniform needs 0 < lo",
        "search.space.train.weight_decay: empty or inverted range",
        "search.space.train.steps: empty or inverted range",
        "search.space.train.optimiser: unknown key (did you mean 'train.optimizer'?)",
        "search.space.method.selection_ratio: 'selection_ratio' is a hyperparameter of ['scmd']",
        "search.space.student.backbone: value 'resnet7'",
        "search.space.teacher.arch: value 'ViT-Q-99'",
        "search.space.train.batch_size: value 4.0: train.batch_size: expected integer",
        "search.space.method.temperature.when: unknown key 'method.nme'",
        "search.space.method.kd_weight.when: method.name never takes ['rise']",
        "search.space.test_domains: cannot be searched",
        "search.space.train.momentum: unknown field(s) ['normal']",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"not reported: {missing}\n--- got:\n{text}"
    # the CLI prints the same single error and starts nothing
    assert tune.main(["--space", str(path), "--dry-run"]) == 2
    err_text = capsys.readouterr().err
    assert f"{len(err.value.problems)} problem(s)" in err_text and "resnet7" in err_text


def test_the_shipped_sweep_files_validate(tmp_path):
    demo = tune.make_plan(DEMO, storage=str(tmp_path))
    assert demo.methods == ["erm", "vl2v"] and len(demo.searches()) == 4 and demo.search["num_samples"] >= 2
    full = tune.make_plan(ALL, [f"dataset.root={fake_pacs(tmp_path / 'PACS')}"], str(tmp_path))
    assert full.methods == ["erm", "kd", "rise", "scmd", "vl2v", "li", "coral", "mmd", "groupdro", "irm", "mixup",
                            "sagnet", "miro", "miro_teacher"] and len(full.searches()) == 12
    baselines = tune.make_plan(REPO / "search_spaces" / "dg-baselines.yaml",
                               [f"dataset.root={tmp_path / 'PACS'}"], str(tmp_path))
    assert baselines.methods == ["erm", "coral", "mmd", "groupdro", "irm", "mixup", "sagnet", "miro"]
    assert baselines.search["sampler"] == "random" and baselines.search["num_samples"] == 160


def test_preparation_follows_the_space_branches(tmp_path):
    """The driver prepares each (method, teacher/dataset choice) a trial can draw, on its branch only: the demo's
    ERM trials are not prepared with VL2V's online teacher and prompts; unconditioned choices multiply."""
    from distill.tune.driver import preparation_variants

    demo = tune.make_plan(DEMO, storage=str(tmp_path))
    assert preparation_variants(demo) == [
        {"method.name": "erm"}, {"method.name": "vl2v", "teacher.online": True, "teacher.prompts": "single"}]
    crossed = tune.make_plan(DEMO, ["search.space={method.name: {choice: [erm, kd]}, "
                                    "teacher.prompts: {choice: [domain, single]}}"], str(tmp_path))
    assert len(preparation_variants(crossed)) == 4


def test_a_staged_method_sets_the_longest_trial(tmp_path):
    """The demo's ERM trains 400 steps, VL2V aligns 400 then distils 400: ASHA's max_t is VL2V's 800."""
    from distill.tune.driver import max_trial_steps
    from distill.tune.plan import method_stages

    demo = tune.make_plan(DEMO, storage=str(tmp_path))
    assert method_stages(demo) == {"erm": [("train", 400)], "vl2v": [("align", 400), ("distill", 400)]}
    assert max_trial_steps(demo) == 800
    erm_only = tune.make_plan(DEMO, ["search.space={method.name: {choice: [erm]}}"], str(tmp_path))
    assert max_trial_steps(erm_only) == 400


def test_dry_run_prints_the_plan_without_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill.tune", "--space", str(DEMO), "--dry-run",
                           "--storage", str(tmp_path / "runs"), "--set", "search.num_samples=3"],
                          capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("searches (held-out domain x seed): 4", "trials per search: 3", "total trials: 12",
                   "{'CPU': 1}", "method.lam: choice[0.3]  when method.name in ['vl2v']",
                   "400 steps per stage (vl2v: align 400, then distill 400)",
                   f"storage: {tmp_path / 'runs'}", f"MLflow: sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"):
        assert needle in out, f"{needle!r} not in:\n{out}"
    assert "Started a local Ray instance" not in out + proc.stderr
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------- the space
def test_method_hyperparameters_are_only_suggested_for_their_methods(tmp_path):
    # demo.yaml: method.lam has no `when`; it is implicitly vl2v's (erm has no lam); VL2V's recipe keys are
    # explicitly its own: an ERM trial keeps the file's values
    plan = tune.make_plan(DEMO, storage=str(tmp_path))
    drawn = sample(plan.space, 60)
    recipe = {"train.lr", "method.lam", "teacher.online", "teacher.prompts", "student.freeze_bn", "train.averaging"}
    for params in drawn:
        assert set(params) == {"method.name"} | (recipe if params["method.name"] == "vl2v" else set()), params
    assert {p["method.name"] for p in drawn} == {"erm", "vl2v"}
    # the demo's sampler seed: its two trials per held-out domain are one ERM and one VL2V
    assert {p["method.name"] for p in sample(plan.space, 2, seed=plan.search["sampler_seed"])} == {"erm", "vl2v"}

    # all.yaml: six methods, explicit `when` on top of the implicit method condition
    plan = tune.make_plan(ALL, [f"dataset.root={fake_pacs(tmp_path / 'PACS')}"], str(tmp_path))
    drawn = sample(plan.space, 600)
    seen = collections.defaultdict(set)
    for params in drawn:
        seen[params["method.name"]] |= set(params)
    common = {"method.name", "student.backbone", "train.lr"}
    assert seen == {
        "erm": common,
        "kd": common | {"method.temperature", "method.kd_weight"},
        "rise": common | {"method.temperature", "method.kd_weight", "method.distance_weight", "method.loss_type"},
        "scmd": common | {"method.temperature", "method.kd_weight", "method.cm_weight", "method.k",
                          "method.selection_ratio"},
        "vl2v": common | {"method.lam"},
        "li": common | {"method.filter_misclassified"},
        "coral": common | {"method.mmd_gamma"},
        "mmd": common | {"method.mmd_gamma"},
        "groupdro": common | {"method.groupdro_eta"},
        "irm": common | {"method.irm_lambda", "method.irm_penalty_anneal_iters"},
        "mixup": common | {"method.mixup_alpha"},
        "sagnet": common | {"method.sag_w_adv"},
        "miro": common | {"method.ld"},
        "miro_teacher": common | {"method.ld"},
    }


def test_conditions_on_choices_and_fixed_values(tmp_path):
    data = tiny(tmp_path, "cond", search={"space": {
        "train.optimizer": {"choice": ["adam", "sgd"]},
        "train.momentum": {"uniform": [0.5, 0.99], "when": {"train.optimizer": "sgd"}},
        "train.weight_decay": {"loguniform": [1e-6, 1e-3], "when": {"train.augment": True}},  # fixed: holds
        "method.temperature": {"uniform": [1.0, 2.0]},  # erm is fixed: no temperature
    }})
    with pytest.raises(ConfigError) as err:
        tune.make_plan(write(tmp_path, data))
    assert any("method.temperature: 'temperature' is a hyperparameter of ['kd'" in p for p in err.value.problems)
    del data["search"]["space"]["method.temperature"]
    plan = tune.make_plan(write(tmp_path, data))
    for params in sample(plan.space, 40):
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd")
        assert "train.weight_decay" in params
    data["search"]["space"]["train.weight_decay"]["when"] = {"train.augment": False}
    with pytest.raises(ConfigError, match="never holds: train.augment is not searched and is fixed to True"):
        tune.make_plan(write(tmp_path, data))


@pytest.mark.parametrize("kind", ["tpe", "random"])
def test_the_sampler_choice_draws_what_optuna_draws_on_a_conditional_space(tmp_path, kind):
    """search.sampler: every search of the sweep samples the conditional space with Optuna's TPE or RandomSampler
    (seeded by search.sampler_seed): the searcher's draws, told the same values, are exactly those of a lone Optuna
    study with that sampler, and a conditional hyperparameter appears only on its branch."""
    import optuna

    from distill.tune.searcher import SweepSearcher, without_search

    space = ("search.space={method.name: {choice: [erm, kd]}, train.lr: {loguniform: [1.0e-3, 5.0e-3]}, "
             "method.temperature: {uniform: [2.0, 6.0]}}")   # continuous, and conditional (temperature: kd's)
    plan = tune.make_plan(DEMO, [f"search.sampler={kind}", "search.sampler_seed=7", space], str(tmp_path))
    assert plan.search["sampler"] == kind
    assert {"random": "searcher: Optuna random sampling (sampler seed 7)",
            "tpe": "searcher: Optuna TPE (multivariate, group) (sampler seed 7)"}[kind] in tune.describe(plan)
    value = lambda params: (hash(str(sorted(params.items()))) % 1000) / 1000   # noqa: E731
    searcher = SweepSearcher(["photo-s0"], plan.space, 30, 7, "s", sampler=kind)
    got = []
    for i in range(30):   # past TPE's 10 random start-up trials
        params = without_search(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {tune.METRIC: value(params)})
        got.append(params)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = (optuna.samplers.RandomSampler(seed=7) if kind == "random" else
                   optuna.samplers.TPESampler(seed=7, multivariate=True, group=True))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    lone = []
    for _ in range(30):
        trial = study.ask()
        plan.space(trial)
        study.tell(trial, value(trial.params))
        lone.append(dict(trial.params))
    assert [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in p.items()} for p in got] == lone
    for params in got:   # method.temperature is kd's only
        assert ("method.temperature" in params) == (params["method.name"] == "kd"), params
    assert {p["method.name"] for p in got} == {"erm", "kd"}
    with pytest.raises(ConfigError, match=r"search.sampler: expected one of \['tpe', 'random'\], got 'grid'"):
        tune.make_plan(DEMO, ["search.sampler=grid"], str(tmp_path))


def test_logint_draws_integers_log_uniformly_and_irm_searches_with_it(tmp_path):
    """`logint: [lo, hi]` (DomainBed's int(10**U(a, b)), e.g. IRM's irm_penalty_anneal_iters): integers in range,
    as many draws below the range's geometric middle as above it (a plain `int` puts ~99% above 100 of [1, 10000])."""
    data = tiny(tmp_path, "logint", method={"name": "irm"},
                search={"space": {"method.irm_penalty_anneal_iters": {"logint": [1, 10000]}}})
    plan = tune.make_plan(write(tmp_path, data))
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(400):
        trial = study.ask()
        plan.space(trial)
        study.tell(trial, 0.0)
        drawn.append(trial.params["method.irm_penalty_anneal_iters"])
    assert all(isinstance(v, int) and 1 <= v <= 10000 for v in drawn)
    assert 150 <= sum(v < 100 for v in drawn) <= 250   # log-uniform: half below 10**2
    data["search"]["space"]["method.irm_penalty_anneal_iters"] = {"logint": [0, 100]}
    with pytest.raises(ConfigError, match="logint needs 1 <= lo"):
        tune.make_plan(write(tmp_path, data))


def test_the_space_pickles_and_resamples_identically(tmp_path):
    plan = tune.make_plan(DEMO, storage=str(tmp_path))
    clone = pickle.loads(pickle.dumps(plan.space))
    assert sample(clone, 15, seed=3) == sample(plan.space, 15, seed=3)
    assert pickle.loads(pickle.dumps(tune.SweepTrial(plan.raw, "demo", {"photo-s0": ("photo", 0)}, None, "/x",
                                                     "sqlite:////x")))


def test_trial_config_takes_each_methods_own_defaults(tmp_path):
    plan = tune.make_plan(ALL, [f"dataset.root={fake_pacs(tmp_path / 'PACS')}"], str(tmp_path))
    from distill.methods import REGISTRY

    rise = tune.trial_cfg(plan.raw, {"method.name": "rise", "method.temperature": 2.5, "train.lr": 1e-4},
                          "photo", 2)
    assert rise["method"] == {**REGISTRY["rise"].hparams, "name": "rise", "temperature": 2.5}
    assert (rise["test_domain"], rise["seed"], rise["train"]["lr"]) == ("photo", 2, 1e-4)
    assert "search" not in rise and "seeds" not in rise
    assert tune.trial_cfg(plan.raw, {"method.name": "erm"}, "sketch", 0)["method"] == {"name": "erm"}
    assert Path(rise["storage"]).is_absolute() and Path(rise["dataset"]["root"]).is_absolute()


def test_resume_guards(tmp_path):
    path = write(tmp_path, tiny(tmp_path, "guard", search={"num_samples": 2}))
    plan = tune.make_plan(path)
    plan.sweep_dir.mkdir(parents=True)
    (plan.sweep_dir / tune.SWEEP_FILE).write_text(json.dumps({"fingerprint": plan.fingerprint()}))
    with pytest.raises(ConfigError, match="pass --resume"):
        tune.run_sweep(plan)
    other = tune.make_plan(path, ["search.num_samples=3"])
    with pytest.raises(ConfigError, match="different config"):
        tune.run_sweep(other, resume=True)


# ------------------------------------------------------------------------------------------------------ end to end
def _sampler_seed_with_a_failing_trial(plan, n):
    """A sampler seed whose first n draws hold a good erm, a good kd and one trial at lr 1e30 (a non-finite loss)."""
    for seed in range(200):
        drawn = sample(plan.space, n, seed=seed)
        kinds = [(p["method.name"], p["train.lr"]) for p in drawn]
        if ("erm", 2e-3) in kinds and ("kd", 2e-3) in kinds and sum(lr == 1e30 for _, lr in kinds) == 1:
            return seed, drawn
    raise AssertionError("no seed found")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["train", "inline"])
def test_tiny_sweep_end_to_end(ray_session, session_storage, tmp_path, monkeypatch, launcher, capfd):
    import mlflow
    import optuna
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    uri = f"sqlite:///{session_storage / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sweep = "tiny" if launcher == "train" else f"tiny-{launcher}"
    data = tiny(session_storage, sweep, search={
        "num_samples": 3, "max_concurrent": 2, "start_ahead": 1 if launcher == "train" else None,
        "scheduler": "asha", "asha": {"grace_period": 1}, "max_failures": 0,
        "space": {"method.name": {"choice": ["erm", "kd"]},
                  "method.temperature": {"choice": [2.0, 4.0]},
                  "train.lr": {"choice": [2e-3, 1e30]}}})  # 1e30: the weights overflow, the loss is not finite
    data["resources"]["launcher"] = launcher
    controllers = sum(a.class_name == "TrainController" for a in list_actors(limit=10000))
    plan = tune.make_plan(write(tmp_path, data))
    seed, drawn = _sampler_seed_with_a_failing_trial(plan, 3)
    data["search"]["sampler_seed"] = seed
    plan = tune.make_plan(write(tmp_path, data))

    t0 = time.time()
    results = tune.run_sweep(plan)
    print(f"tiny sweep: {time.time() - t0:.0f}s")
    sweep_dir = plan.sweep_dir
    rows = report.load_rows(sweep_dir)
    ends = {e["trial_id"]: e for e in report.load_events(sweep_dir)}
    assert len(ends) == 3
    # the same draws Optuna gave the sampler directly
    assert sorted(json.dumps(e["params"], sort_keys=True) for e in ends.values()) == \
        sorted(json.dumps(p, sort_keys=True) for p in drawn)

    # a NaN trial fails alone, with its reason in Tune's results, the rows' events and its MLflow run
    failed = [e for e in ends.values() if e["status"] == "error"]
    assert [e["params"]["train.lr"] for e in failed] == [1e30]
    assert "FloatingPointError" in failed[0]["error"] or "non-finite" in failed[0]["error"]
    summary = json.loads((sweep_dir / "searches" / "sketch-s0.json").read_text())
    assert summary["finished"] and len(summary["errors"]) == 1 and summary["trials"] == 3
    ok = [e for e in ends.values() if e["status"] != "error"]
    assert len(ok) == 2 and all(e["status"] in ("completed", "early_stopped") for e in ok)
    for e in ok:
        steps = [r["step"] for r in rows if r["trial_id"] == e["trial_id"]]
        assert steps == ([5, 10] if e["status"] == "completed" else [5])

    # MLflow: one parent run, nested children with the per-step and per-domain metrics
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep)
    parents = client.search_runs([exp.experiment_id], "tags.`distill.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {"test_acc/sketch", "test_acc_avg", "oracle_test_acc/sketch"} <= set(parent.data.metrics)
    assert parent.data.params["search.sampler"] == "tpe" and parent.data.params["search.sampler_seed"] == str(seed)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.md", "results/results.json", "results/trials.jsonl"} <= arts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/accuracy.png", "plots/val_vs_test.png", "plots/history.png"}
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    by_name = {c.data.tags["distill.run_name"]: c for c in children}
    for e in ends.values():
        child = by_name[e["train_run"]]
        if e["status"] == "error":
            assert child.info.status == "FAILED"
            assert "non-finite" in child.data.tags["distill.failure"] or "FloatingPoint" in \
                child.data.tags["distill.failure"]
            continue
        assert child.info.status == "FINISHED"
        assert {"val_acc", "val_acc_best", "test_acc", "test_out_acc", "val_acc/photo", "val_acc/cartoon",
                "val_acc/painting", "loss"} <= set(child.data.metrics)
        history = sorted(h.step for h in client.get_metric_history(child.info.run_id, "val_acc"))
        reported = [r["step"] for r in rows if r["trial_id"] == e["trial_id"]]
        if e["status"] == "completed":
            assert history == reported
        else:  # an ASHA-stopped trial's worker may log one more round before Tune's stop reaches it
            assert set(reported) <= set(history) and child.data.tags["distill.status"] == "early_stopped"

    # selection on the real rows: the (trial, step) with the best source-validation accuracy, its test accuracy
    best = max(rows, key=lambda r: r["val_acc"])
    sel = next(s for s in results["selected"]["validation"] if s["method_group"] == report.overall_group(results))
    assert sel["val_acc"] == best["val_acc"] and sel["test_acc"] == pytest.approx(
        next(r["test_acc"] for r in rows if (r["trial_id"], r["step"]) == (sel["trial_id"], sel["step"])))
    on_disk = json.loads((sweep_dir / "results.json").read_text())
    assert on_disk["selected"]["validation"][-1]["checkpoint_path"]
    for name in ("results.md", "results.csv", "plots/accuracy.png", "plots/history.png", "plots/val_vs_test.png"):
        assert (sweep_dir / name).exists(), name
    # the selected model, registered (or at least tagged)
    selected = by_name[sel["train_run"]]
    assert client.get_run(selected.info.run_id).data.tags.get("distill.selected") == "true"
    versions = client.search_model_versions(f"name = '{sweep}-sketch'")
    assert [v.run_id for v in versions] == [selected.info.run_id]

    # the searcher saw source validation only: each Optuna value is the trial's best val_acc, each intermediate
    # value its val_acc_best at that round, never a test-domain accuracy
    study = optuna.load_study(study_name=f"{sweep}:sketch-s0", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    vals = {}
    for r in rows:
        vals.setdefault(json.dumps(r["params"], sort_keys=True), []).append(r)
    reported = 0
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        trs = vals[json.dumps(t.params, sort_keys=True)]
        assert t.value == pytest.approx(max(r["val_acc"] for r in trs))
        # (a result on which ASHA stops the trial reaches Optuna as the final value, not as an intermediate one)
        by_step = {r["step"]: r["val_acc_best"] for r in trs}   # Optuna hears each evaluation at its training step
        for k, v in t.intermediate_values.items():
            assert v == pytest.approx(by_step[k])
            reported += 1
    assert reported >= 2
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2

    # no placement group left behind; inline, no TorchTrainer started at all
    time.sleep(2)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    started = sum(a.class_name == "TrainController" for a in list_actors(limit=10000)) - controllers
    assert started == 0 if launcher == "inline" else started >= 3
    # a quiet console (--verbose has the rest): a progress line per finished trial, the failure in full; no per-step
    # line of the trials, no cache-reuse line, no Train controller line, no Optuna study line, no Tune box
    printed = "".join(capfd.readouterr())
    assert printed.count("[distill.tune] 3/3 trials") == 1 and "trial phases" not in printed
    # the closing lines and distill report give the one link that opens on the selected trials
    from distill import tracking

    link = tracking.sweep_link(exp.experiment_id)
    assert f"MLflow:  distill ui {session_storage}   then open {link}" in printed
    assert report.mlflow_links([sweep_dir]) == [f"MLflow ({sweep}): distill ui {session_storage}   then open {link}"]
    assert "non-finite loss at step 1" in printed
    for noise in ("step 5/10", "reusing", "teacher cache:", "Requesting resources",
                  "Attempting to start training worker group", "A new study created", "Configuration for experiment"):
        assert noise not in printed, noise
    if launcher == "inline":   # the selected checkpoint is an inline run's, in the sweep's Train storage
        finished = [c for c in children if c.info.status == "FINISHED"]
        assert finished and all(c.data.metrics["phase/workers_start"] < 1.0 for c in finished)   # no process
        assert Path(sel["checkpoint_path"]).parent.name == sel["train_run"]
        assert Path(sel["checkpoint_path"]).is_relative_to(Path(plan.train_root))

    # the searcher state Tune saved is read back only by --resume: a pickle planted there (shared storage anyone can
    # write) runs no code when the sweep's results are rebuilt and registered again
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    exp = sweep_dir / "tune" / "sweep"
    for old in exp.glob("searcher-state-*.pkl"):
        old.write_bytes(pickle.dumps(Evil()))
    (exp / "searcher-state-zzz.pkl").write_bytes(pickle.dumps(Evil()))
    report.build_from_dirs([sweep_dir])
    again = tune.finish(plan, parent.info.run_id)
    assert not marker.exists()
    assert results["unregistered"] == [] and again["unregistered"] == []   # registered once, not twice
    assert [v.run_id for v in client.search_model_versions(f"name = '{sweep}-sketch'")] == [selected.info.run_id]

    # a selected model that cannot be registered is an error of the sweep, named on its parent run, not a log line
    client.delete_registered_model(f"{sweep}-sketch")
    import shutil

    shutil.rmtree(sel["checkpoint_path"])
    lost = tune.finish(plan, parent.info.run_id)
    assert len(lost["unregistered"]) == 1 and f"{sweep}-sketch (seed 0" in lost["unregistered"][0]
    assert "is gone" in client.get_run(parent.info.run_id).data.tags["distill.unregistered"]


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_session, session_storage, tmp_path):
    import mlflow
    import ray

    uri = f"sqlite:///{session_storage / 'mlflow.db'}"
    data = tiny(session_storage, "resume", test_domains=["photo"], search={
        "num_samples": 2, "max_concurrent": 2, "space": {"train.lr": {"loguniform": [1e-3, 3e-3]}}})
    path = write(tmp_path, data)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "distill.tune", "--space", str(path)]
    sweep_dir = Path(session_storage) / "resume"
    rows_file = sweep_dir / "trials.jsonl"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    first = None
    try:
        while time.time() - t0 < 400 and proc.poll() is None:
            ends = [e for e in report.read_jsonl(rows_file) if e.get("event") == "end"] if rows_file.exists() else []
            if ends:
                first = ends[0]
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)  # the driver dies; Ray ends its job's actors and placement groups
        proc.wait()
        log.close()
    assert first is not None and first["status"] == "completed", (tmp_path / "first.log").read_text()[-3000:]
    rows_before = [r for r in report.read_jsonl(rows_file) if r["trial_id"] == first["trial_id"]]

    t1 = time.time()
    second = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    print(f"resume: {time.time() - t1:.0f}s")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]

    raw = report.read_jsonl(rows_file)
    evals = [r for r in raw if r.get("event") == "eval"]
    # the finished trial was not run again: its rows are exactly those it wrote before the kill
    assert [r for r in raw if r["trial_id"] == first["trial_id"] and r["event"] == "eval"] == \
        [r for r in rows_before if r["event"] == "eval"]
    assert sorted(r["step"] for r in evals if r["trial_id"] == first["trial_id"]) == [5, 10]
    others = {r["trial_id"] for r in evals} - {first["trial_id"]}
    assert len(others) == 1
    # the other trial finished too (if the kill cut it, it resumed from its last checkpoint); selection sees every
    # evaluation, whatever died when: exactly one row per (trial, step), none lost, none duplicated
    steps = [r["step"] for r in evals if r["trial_id"] in others]
    assert sorted(steps) == [5, 10]
    keys = [(r["trial_id"], r["step"]) for r in evals]
    assert len(keys) == len(set(keys)) == 4

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    parents = client.search_runs([exp.experiment_id], "tags.`distill.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # found again, not duplicated
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    done = next(c for c in children if c.data.tags["distill.run_name"] == first["train_run"])
    steps = [h.step for h in client.get_metric_history(done.info.run_id, "val_acc")]
    assert sorted(steps) == [5, 10]  # not evaluated twice
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["counts"]["trials"] == 2


def test_lodo_sweep_trains_each_trials_leave_one_domain_out_models_and_selects_on_them(ray_session, session_storage,
                                                                                       tmp_path, monkeypatch):
    """search.lodo: true: each trial also trains, for every source domain, a model with that domain held out too
    (same hyperparameters and seed); `distill.report --selection lodo` then selects on their held-out accuracy."""
    uri = f"sqlite:///{session_storage / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = tiny(session_storage, "lodo", search={"num_samples": 1, "max_concurrent": 1, "lodo": True})
    data["train"].update({"steps": 6, "eval_every": 2})
    data["student"]["backbone"] = "small_cnn"
    results = tune.run_sweep(tune.make_plan(write(tmp_path, data)))
    sweep_dir = session_storage / "lodo"
    lodo = report.load_lodo_rows(sweep_dir)
    assert sorted({r["lodo_domain"] for r in lodo}) == ["cartoon", "painting", "photo"]
    assert sorted((r["lodo_domain"], r["step"]) for r in lodo) == [(d, s) for d in ("cartoon", "painting", "photo")
                                                                  for s in (2, 4, 6)]
    main = report.load_rows(sweep_dir)
    # the LODO choice, computed here: per step, the mean of the three held-out source accuracies
    by_step = {s: sum(r["lodo_acc"] for r in lodo if r["step"] == s) / 3 for s in (2, 4, 6)}
    step = max(sorted(by_step), key=lambda s: by_step[s])
    sel = results["selected"]["lodo"][0]
    assert sel["step"] == step and sel["test_acc"] == next(r["test_acc"] for r in main if r["step"] == step)
    # any selectable evaluation may be LODO's choice: the main trial kept every checkpoint (one per evaluation; 2 by default)
    run_dir = Path(sel["checkpoint_path"]).parent
    assert len([p for p in run_dir.glob("checkpoint_*") if (p / "checkpoint.pt").is_file()]) == 3
    assert "leave-one-domain-out" in (sweep_dir / "results.md").read_text().lower()


def test_one_experiment_routes_each_new_trial_to_the_least_advanced_search(tmp_path):
    """All searches share the cluster: each suggestion goes to the search with the fewest trials so far (its own
    Optuna study), every search gets exactly num_samples trials, then the searcher is finished."""
    from ray.tune.search import Searcher

    from distill.tune.searcher import SEARCH_KEY, SweepSearcher, without_search

    data = tiny(tmp_path, "route", test_domains=["photo", "sketch", "cartoon"], search={
        "num_samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}})
    plan = tune.make_plan(write(tmp_path, data))
    names = [tune.search_name(d, s) for d, s in plan.searches()]
    searcher = SweepSearcher(names, plan.space, 2, 0, "route")
    got = [searcher.suggest(f"t{i}") for i in range(6)]
    assert [g[SEARCH_KEY] for g in got] == names + names           # round robin over the least advanced
    assert searcher.suggest("t6") == Searcher.FINISHED
    assert all(set(without_search(g)) == {"train.lr"} for g in got)
    searcher.on_trial_complete("t0", {tune.METRIC: 0.5})              # told to its own study only
    assert len(searcher.study(names[0]).get_trials()) == 2 and \
        [t.state.name for t in searcher.study(names[0]).get_trials()] == ["COMPLETE", "RUNNING"]
    assert [t.state.name for t in searcher.study(names[1]).get_trials()] == ["RUNNING", "RUNNING"]
    # the same sampler seed in every search: each search's first draw is the one a lone study would make
    assert got[0]["train.lr"] == got[1]["train.lr"] == got[2]["train.lr"]
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.count == searcher.count and restored.owner == searcher.owner


def test_searcher_tells_optuna_each_training_step_once(tmp_path):
    """A resumed trial starts Tune's iteration count again at 1 and replays steps already told: Optuna hears each
    evaluation once, keyed by the trial's training step, with no 'already reported' warning."""
    from distill.tune.searcher import SweepSearcher

    data = tiny(tmp_path, "steps", search={"num_samples": 1, "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}})
    plan = tune.make_plan(write(tmp_path, data))
    name = tune.search_name(*plan.searches()[0])
    searcher = SweepSearcher([name], plan.space, 1, 0, "steps")
    searcher.suggest("t0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        searcher.on_trial_result("t0", {tune.METRIC: 0.5, "step": 50, "training_iteration": 1})
        searcher.on_trial_result("t0", {tune.METRIC: 0.6, "step": 100, "training_iteration": 2})
        restored = pickle.loads(pickle.dumps(searcher))   # the driver killed and the sweep resumed
        restored.on_trial_result("t0", {tune.METRIC: 0.6, "step": 100, "training_iteration": 1})   # replayed
        restored.on_trial_result("t0", {tune.METRIC: 0.7, "step": 150, "training_iteration": 2})
    assert restored.study(name).get_trials()[0].intermediate_values == {50: 0.5, 100: 0.6, 150: 0.7}
    # a sweep started before the searcher kept `reported` resumes (Tuner.restore unpickles it without __init__)
    del searcher.reported
    older = pickle.loads(pickle.dumps(searcher))
    older.on_trial_result("t0", {tune.METRIC: 0.8, "step": 200, "training_iteration": 1})
    assert older.study(name).get_trials()[0].intermediate_values[200] == 0.8


def test_progress_line_times_this_run_only(tmp_path):
    """A resumed sweep's elapsed time and ETA count from its own start and the trials it ended, not from the first
    session's start (the gap between sessions is not work)."""
    from distill.tune.trainable import TrialLog

    path = tmp_path / "trials.jsonl"
    old = time.time() - 7200   # an earlier session, two hours ago
    rows = [{"event": "eval", "search": "photo-s0", "trial_id": f"a{i}", "test_domain": "photo", "val_acc": 0.9,
             "timestamp": old, "time_total_s": 60} for i in range(2)]
    rows += [{"event": "end", "search": "photo-s0", "trial_id": f"a{i}"} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = TrialLog(str(path), "s", {"photo-s0": ("photo", 0)}, "erm", 100, num_samples=6)
    assert "ETA –" in log.progress() and "(this run)" in log.progress()   # nothing ended in this run yet
    log.started -= 100   # this run has been going for 100 s and ends one trial: 3 left at 100 s each
    with path.open("a") as f:
        f.write(json.dumps({"event": "end", "search": "photo-s0", "trial_id": "b0"}) + "\n")
    line = log.progress()
    assert "3/6 trials" in line and "elapsed 1m40s (this run), ETA 5m00s" in line, line
    # on --resume, Tune uses the callback it stored with the experiment: unpickled, its clock is this run's
    log.started = old
    resumed = pickle.loads(pickle.dumps(log))
    assert resumed.ended_before == 3 and "elapsed 0m00s (this run), ETA –" in resumed.progress(), resumed.progress()
    fresh = TrialLog(str(tmp_path / "new.jsonl"), "s", {"photo-s0": ("photo", 0)}, "erm", 100, num_samples=6)
    assert "(this run)" not in fresh.progress()
