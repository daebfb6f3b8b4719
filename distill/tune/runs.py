"""The sweep in MLflow: its parent run, the children's statuses reconciled with what Tune did, the results and plots
logged, and the selected models registered."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import flatten
from .plan import ROWS_FILE, Plan

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
        **tracking.context_tags(), "distill.role": "sweep", "distill.sweep": plan.name, "distill.sweep_id": sweep_id,
        "distill.methods": ",".join(plan.methods), "distill.test_domains": ",".join(plan.test_domains),
        "distill.seeds": ",".join(map(str, plan.seeds)), "distill.git_sha": tracking.git_sha(),
        tracking.RUN_NAME_TAG: f"{plan.name}-sweep-{sweep_id}"})
    from mlflow.entities import Param

    params = {**{f"search.{k}": v for k, v in flatten({k: v for k, v in plan.search.items() if k != "space"}).items()},
              "search.space": "; ".join(plan.space.describe()), "seeds": plan.seeds, **fixed_params(plan)}
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id



def fixed_params(plan: Plan) -> dict:
    """The config values every trial of the sweep shares: not the searched keys (a trial's own run has its values),
    nor, when the method is searched, any method hyperparameter, nor the sweep's per-search structure."""
    searched = set(plan.space.keys())
    out = {}
    for key, value in flatten({k: v for k, v in plan.cfg.items() if k not in ("storage", "test_domain")}).items():
        if key in searched or (key.startswith("method.") and "method.name" in searched) or key == "seed":
            continue
        out[key] = value
    return out


def find_run(uri: str, experiment: str, run_name: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'",
                          max_results=1)
    return found[0] if found else None

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
    from ..report import load_events

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


def finish(plan: Plan, parent: str, verbose: bool = False) -> dict:
    """Selection, report files, plots, MLflow parent artifacts/metrics, model registry."""
    from .. import plots, report

    uri = plan.tracking_uri
    sweep_dir = plan.sweep_dir
    runs = reconcile_runs(plan, parent, final=True)
    run_ids = {name: r.info.run_id for name, r in runs.items() if name}
    (sweep_dir / "runs.json").write_text(json.dumps(run_ids, indent=2))
    results = report.build_from_dirs([sweep_dir])
    report.write(results, sweep_dir)
    made = plots.make_all(results, report.load_rows(sweep_dir), sweep_dir / "plots")
    for name in ("results.md", "results.csv", "selections.csv", "results.json", "results.tex", "teacher.json",
                 ROWS_FILE, "runs.json"):
        if (sweep_dir / name).exists():
            tracking.log_artifact(uri, parent, sweep_dir / name, "results")
    for path in made:
        tracking.log_artifact(uri, parent, path, "plots")
    log_answer(plan, parent, results)
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
    for teacher in results.get("teacher") or []:
        metrics.update({f"teacher_zero_shot/{d}": v for d, v in teacher["zero_shot"].items() if v is not None})
        if teacher.get("mean") is not None:
            metrics["teacher_zero_shot_avg"] = teacher["mean"]
    if results.get("chance"):
        metrics["chance"] = results["chance"]
    tracking.log_metrics(uri, parent, metrics, 0)
    from .plan import describe

    # the parent run's description (its page's "Description"): the plan and the results
    tracking.set_tags(uri, parent, {"mlflow.note.content": f"```\n{describe(plan)}\n```\n\n"
                                                          f"{report.render_text(results)}"[:60000]})
    results["unregistered"] = register_selected(plan, results, run_ids, verbose)
    if results["unregistered"]:
        tracking.set_tags(uri, parent, {"distill.unregistered": "; ".join(results["unregistered"])[:4000]})
    elif "distill.unregistered" in tracking.client(uri).get_run(parent).data.tags:   # registered by --resume
        tracking.client(uri).delete_tag(parent, "distill.unregistered")
    return results


def log_answer(plan: Plan, parent: str, results: dict) -> None:
    """What makes the sweep's MLflow page read on its own: the experiment's description (shown above its runs) is the
    main table and the paired comparison; the parent run logs them as MLflow tables (`tables/*.json`, shown by the
    UI's artifact view and `mlflow.load_table`), and each search's Optuna figures under `search/<search>/`."""
    from .. import plots
    from ..report_render import render_text

    uri = plan.tracking_uri
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(uri, plan.name)
    page = tracking.sweep_link(exp_id).split("#", 1)[1]   # relative: the same UI, whatever its host and port
    c.set_experiment_tag(exp_id, "mlflow.note.content",
                         (f"{render_text(results, main_only=True)}\n\n[The selected trials, best first](#{page}); "
                          f"the rest in the parent run `{plan.name} (sweep)`: its description, and its artifacts "
                          f"`results/`, `plots/`, `tables/`, `search/` (each search's Optuna figures).")[:60000])
    rows = results["table"][results.get("main_selection") or "validation"]
    domains = results["domains"]
    _log_table(c, parent, {"method": [r["method"] for r in rows],
                              **{d: [_pct(r["domains"].get(d)) for r in rows] for d in domains},
                              "Avg": [_pct(r["avg"]) for r in rows]}, "main.json")
    if results.get("paired"):
        prow = results["paired"]["rows"]
        _log_table(c, parent, {"method": [r["method"] for r in prow],
                                  **{d: [_pp(r["domains"].get(d)) for r in prow] for d in domains},
                                  "Avg": [_pp(r["avg"]["mean"]) if r.get("avg") else 0.0 for r in prow],
                                  "wins": [r.get("wins") for r in prow], "losses": [r.get("losses") for r in prow],
                                  "source_val": [_pp(r.get("source_val")) for r in prow]},
                   "paired.json")
    db = plan.sweep_dir / "optuna.db"
    if db.is_file():
        made, _ = plots.search_figures(db, plan.sweep_dir / "search")
        for path in made:
            tracking.log_artifact(uri, parent, path, f"search/{path.parent.name}")


def _log_table(c, run_id: str, data: dict, name: str) -> None:
    """`data` (column -> values) as an MLflow table `tables/<name>` (the JSON of `MlflowClient.log_table`, and its
    run tag, so that `mlflow.load_table` and the UI find it), written whole: a sweep finished again (--resume)
    replaces it instead of appending its rows a second time, as log_table would."""
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        pd.DataFrame(data).to_json(path, orient="split", index=False)
        c.log_artifact(run_id, str(path), "tables")
    logged = json.loads(c.get_run(run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
    entry = {"path": f"tables/{name}", "type": "table"}
    if entry not in logged:
        c.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps(logged + [entry]))


def _pct(cell: dict | None) -> float | None:
    return None if not cell or cell.get("mean") is None else round(100 * cell["mean"], 2)


def _pp(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def register_selected(plan: Plan, results: dict, run_ids: dict[str, str], verbose: bool = False) -> list[str]:
    """The selected model of each held-out domain (per seed): its child run gets the selected step's metrics
    (`selected_test_acc`, `selected_val_acc`, `selected_step`: the runs table sorts and compares on them) and the tag
    `distill.selected`, and the selected (trial, step)'s weights are logged with mlflow.pytorch as a module that maps
    normalised images to class logits, registered as a version of `<sweep>-<test domain>` (one per seed).

    Returns what could not be registered, one line each (the sweep's summary shows them as errors and its exit
    status says so; `--resume` tries them again); an empty list when every selected model is registered."""
    from .. import report
    from ..trial.export import log_predictor, predictor
    from .plan import trial_cfg

    uri = plan.tracking_uri
    c = tracking.client(uri)
    overall = report.overall_group(results)
    failures = []
    for sel in results["selected"]["validation"]:
        if sel["method_group"] != overall:
            continue
        model = _model_name(f"{plan.name}-{sel['test_domain']}")
        run_id = run_ids.get(sel["train_run"])
        if not run_id:
            failures.append(f"{model} (seed {sel['seed']}): no MLflow run for {sel['train_run']}")
            continue
        tracking.set_tags(uri, run_id, {"distill.selected": "true",
                                        f"distill.selected_for.{sel['test_domain']}.s{sel['seed']}": sel["step"]})
        tracking.log_metrics(uri, run_id, {"selected_test_acc": sel["test_acc"], "selected_val_acc": sel["val_acc"],
                                           "selected_step": sel["step"]}, 0)
        # the runs page's default columns show a run's name: the selected one's says what was selected and how well
        # (the answer first: the column shows ~20 characters)
        c.update_run(run_id, name=f"{sel['test_domain']} {100 * sel['test_acc']:.1f} · {sel['method']} · val "
                                  f"{100 * sel['val_acc']:.1f} · step {sel['step']} · {sel['train_run']}")
        try:
            if [v for v in c.search_model_versions(f"name = '{model}'") if v.run_id == run_id]:
                continue   # registered by an earlier finish of this sweep
            state = read_selected_checkpoint(sel.get("checkpoint_path"), plan.train_root)
            cfg = trial_cfg(plan.raw, sel.get("params") or {}, sel["test_domain"], sel["seed"])
            with _quiet(verbose):   # MLflow prints "Successfully registered model ...": the line below says it
                info = log_predictor(uri, run_id, predictor(cfg, state["model"]), registered_name=model)
            version = info.registered_model_version
            if version is not None:
                c.set_model_version_tag(model, str(version), "distill.step", str(sel["step"]))
                for key in ("test_domain", "seed", "method"):
                    c.set_model_version_tag(model, str(version), f"distill.{key}", str(sel[key]))
            print(f"[distill.tune] registered {model} version {version} ({sel['method']}, seed {sel['seed']}, step "
                  f"{sel['step']}): mlflow.pytorch.load_model('models:/{model}/{version}')", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported with the others at the end of the sweep
            failures.append(f"{model} (seed {sel['seed']}, {sel['train_run']} step {sel['step']}): "
                            f"{type(exc).__name__}: {exc}")
    return failures


def _quiet(verbose: bool):
    """stdout and stderr swallowed unless verbose (an exception still propagates)."""
    import contextlib
    import io

    if verbose:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _model_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def read_selected_checkpoint(checkpoint_path: str | None, root: str) -> dict:
    """A selected (trial, step)'s checkpoint. The path comes from trials.jsonl, a text file: only a checkpoint inside
    the sweep's own Train runs is read (and only its tensors and plain data)."""
    from ..trial.launch import read_checkpoint
    from ..trial.loop import CHECKPOINT_FILE
    from .trainable import inside

    if checkpoint_path and not inside(checkpoint_path, root):
        raise PermissionError(f"checkpoint {checkpoint_path} is outside the sweep's Train runs ({root}): not read")
    if not checkpoint_path or not (Path(checkpoint_path) / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path} is gone (train.num_checkpoints keeps the best)")
    return read_checkpoint(checkpoint_path)
