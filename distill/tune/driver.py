"""The sweep driver: prepare every cache once, run the searches on Ray Tune, and finish (selection, report, MLflow)."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path

from .. import tracking
from ..console import say, set_verbose
from ..config import ConfigError, config_hash
from .plan import PLAN_FILE, ROWS_FILE, SWEEP_FILE, Plan, _join, describe, method_stages, search_name, trial_cfg
from .runs import _parent_run, finish, reconcile_runs
from .space import METRIC, MODE
from .searcher import SEARCH_KEY, PerSearchScheduler, SweepSearcher
from ..trial.loop import FAILED
from .trainable import FinishingASHA, SweepTrial, TrialLog, error_reason, trial_name

def concurrency(plan: Plan) -> tuple[int, str]:
    """Trials at once: search.max_concurrent, capped by what a local cluster holds (each trial's workers need
    num_workers x cpus/gpus_per_worker, held by a TorchTrainer's workers, or inline by the trial function). On a
    cluster we connected to (RAY_ADDRESS), which may autoscale, max_concurrent is taken as given."""
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
    n = min(n, samples * len(plan.searches()))
    return n, why


MAX_START_AHEAD = 8


def start_ahead(plan: Plan, running: int) -> tuple[int, str]:
    """Trials started before a slot frees: each runs its preparation, MLflow run and Ray Train controller (processes
    on CPUs the running trials' GPUs do not need), then waits for its workers' resources, so that a GPU freed by a
    trial goes to a started one instead of idling through the next trial's start-up. search.start_ahead; by default
    one per running trial (at most 8) when trials hold GPUs, none for CPU trials, whose start-up would take CPU
    from the running ones (measured: slower on a 2-core machine, docs/performance.md)."""
    total = plan.search["num_samples"] * len(plan.searches())
    given = plan.search.get("start_ahead")
    if plan.cfg["resources"]["launcher"] == "inline":
        return 0, "none started ahead of a free slot (launcher inline: a trial holds its resources from its start)"
    gpus = plan.cfg["resources"]["gpus_per_worker"] > 0
    n = (min(running, MAX_START_AHEAD) if gpus else 0) if given is None else given
    n = max(0, min(n, total - running))
    rule = "search.start_ahead" if given is not None else \
        "default: one per slot for GPU trials" if gpus else "default for CPU trials"
    why = f"{n} started ahead, waiting for a slot ({rule})" if n else f"none started ahead of a free slot ({rule})"
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


def preparation_variants(plan: Plan) -> list[dict]:
    """The combinations of the searched choices that change what a trial prepares (the method, teacher.* and
    dataset.* keys), each only on its branch: a choice whose `when` fails for a variant is not multiplied in
    (an ERM trial never gets VL2V's teacher.online)."""
    variants: list[dict] = [{}]
    for param in plan.space.params:   # in dependency order: a condition's key is set before it is read
        if param.kind != "choice" or not (param.key == "method.name" or
                                          param.key.startswith(("teacher.", "dataset."))):
            continue
        variants = [w for v in variants
                    for w in ([{**v, param.key: c} for c in param.values] if plan.space.active(param, v) else [v])]
    return variants


def warm_caches(plan: Plan) -> None:
    """prepare() once per held-out domain and per method (and teacher choice) the space can draw: the world, the
    fitted teacher and every teacher-output cache exist before any trial starts, so trials only read them."""
    from ..trial.prepare import prepare

    variants = preparation_variants(plan)
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
            what = f"{test_domain} / {cfg['method']['name']} " \
                   f"{ {k: v for k, v in params.items() if k != 'method.name'} or ''}".rstrip()
            say(f"[distill.tune] preparing {what}")
            prepare(cfg)
            print(f"[distill.tune] prepared {what} in {time.time() - t0:.1f}s", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def max_trial_steps(plan: Plan) -> int:
    """The most optimiser steps a trial of the sweep can take (every stage of every method it can choose)."""
    return max(sum(n for _, n in stages) for stages in method_stages(plan).values())


EXPERIMENT = "sweep"   # the one Tune experiment of a sweep, under <sweep>/tune/


def run_searches(plan: Plan, parent_run_id: str, n_concurrent: int, resume: bool, verbose: bool = False) -> dict:
    """Every search of the sweep in one Tune experiment (restored from its directory with --resume). Returns
    {search name: summary}."""
    from ray import tune

    # Tune's new output engine prints its "Configuration for experiment" box whatever the verbosity; the legacy one
    # at verbose=0 prints nothing (the sweep prints its own plan and progress lines)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
    exp_path = _join(plan.tune_root, EXPERIMENT)
    sweep_dir = plan.sweep_dir
    names = {search_name(d, s): (d, s) for d, s in plan.searches()}
    trainable = tune.with_resources(
        SweepTrial(plan.raw, plan.name, names, parent_run_id, plan.train_root, plan.tracking_uri,
                   str(sweep_dir / "lodo") if plan.search["lodo"] else None,
                   tags={**tracking.context_tags(), "distill.sweep": plan.name}, verbose=verbose),
        plan.trial_function_resources())
    t0 = time.time()
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"[distill.tune] resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        if "://" not in exp_path and Path(exp_path).exists():
            shutil.rmtree(exp_path)  # a sweep killed before Tune saved any state: start it again
        (sweep_dir / ROWS_FILE).unlink(missing_ok=True)  # rows of trials of an attempt that can no longer resume
        searcher = SweepSearcher(list(names), plan.space, plan.search["num_samples"], plan.search["sampler_seed"],
                                 plan.name, export_db=str(sweep_dir / "optuna.db"), sampler=plan.search["sampler"])
        scheduler = None
        if plan.search["scheduler"] == "asha":
            scheduler = PerSearchScheduler(list(names), AshaFactory(plan))
        log = TrialLog(str(sweep_dir / ROWS_FILE), plan.name, names, plan.cfg["method"]["name"],
                       max_trial_steps(plan), storage=plan.train_root, num_samples=plan.search["num_samples"])
        total = plan.search["num_samples"] * len(names)
        tuner = tune.Tuner(
            trainable,
            # reuse_actors: a trial function's process (torch, Ray Train and distill imported: ~5 s of CPU) runs
            # the next trial too; a trial whose thread outlives it (2 s) gets a new one
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=total, max_concurrent_trials=n_concurrent, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=plan.tune_root, callbacks=[log],
                                      failure_config=tune.FailureConfig(max_failures=plan.search["max_failures"]),
                                      verbose=1 if verbose else 0))
        print(f"[distill.tune] {len(names)} search(es) x {plan.search['num_samples']} trial(s), {n_concurrent} at a "
              f"time (running or started ahead), sharing the cluster", flush=True)
    grid = tuner.fit()
    seconds = round(time.time() - t0, 1)
    summaries = {}
    for name, (domain, seed) in names.items():
        results = [r for r in grid if (r.config or {}).get(SEARCH_KEY) == name]
        errors = [{"trial_id": Path(r.path).name.replace("trial_", ""),
                   "error": error_reason(str(r.error)) if r.error is not None else (r.metrics or {}).get(FAILED)}
                  for r in results if r.error is not None or (r.metrics or {}).get(FAILED)]
        summaries[name] = {"search": name, "test_domain": domain, "seed": seed, "trials": len(results),
                           "terminated": len(results) - len(errors), "errors": errors,
                           "finished": len(results) >= plan.search["num_samples"],
                           "seconds": seconds, "experiment": exp_path, "study": f"{plan.name}:{name}",
                           "trial_ids": [Path(r.path).name.replace("trial_", "") for r in results]}
    return summaries


class AshaFactory:
    """Builds one FinishingASHA per search (module-level: picklable)."""

    def __init__(self, plan: Plan):
        every = plan.cfg["train"]["eval_every"]
        self.kwargs = {"time_attr": "step", "max_t": max_trial_steps(plan),
                       "grace_period": plan.search["asha"]["grace_period"] * every,
                       "reduction_factor": plan.search["asha"]["reduction_factor"]}

    def __call__(self):
        return FinishingASHA(**self.kwargs)


def teacher_report(plan: Plan) -> dict:
    """The teacher beside the students: its zero-shot accuracy on each held-out domain with the prompts the methods
    use, and chance (report.py puts them in results.md and accuracy.png; the parent MLflow run gets them)."""
    from ..trial.prepare import teacher_zero_shot

    shots = {d: teacher_zero_shot(trial_cfg(plan.raw, {}, d, plan.seeds[0])) for d in plan.test_domains}
    first = next(iter(shots.values()))
    for d, z in shots.items():
        print(f"[distill.tune] teacher zero-shot on {d}: {100 * z['accuracy']:.1f}% (chance "
              f"{100 / z['classes']:.1f}%)", flush=True)
    return {"teacher": first["teacher"], "zero_shot": {d: z["accuracy"] for d, z in shots.items()},
            "prompts": f"teacher.prompts {plan.cfg['teacher']['prompts']!r} over the source domains, e.g. "
                       f"{first['prompts'][:3]}", "chance": 1.0 / first["classes"]}


def mlflow_lines(plan: Plan) -> str:
    """Where the sweep's answer is in MLflow: one link, opening on its selected trials (an sqlite store: served by
    `distill ui` on this machine's loopback; a tracking server: on it)."""
    # (MLFLOW_TRACKING_URI is set in this process by then, whatever the user's shell has: the line names the store)
    uri = plan.tracking_uri
    return f"  MLflow:  {tracking.open_sweep(uri, plan.cfg['storage'], tracking.experiment_id(uri, plan.name))}"


def _load_state(plan: Plan) -> dict | None:
    return _read_json(plan.sweep_dir / SWEEP_FILE)


def resume_command(plan: Plan) -> str:
    sets = "".join(f" --set {k}={v}" for k, v in plan.overrides.items())
    return f"python -m distill.tune --space {plan.source}{sets} --resume"


def run_sweep(plan: Plan, resume: bool = False, verbose: bool = False) -> dict:
    """The whole sweep; returns report.build's results (also written to the sweep dir)."""
    from .. import report
    from ..trial.launch import ensure_ray

    sweep_dir = plan.sweep_dir
    state = _load_state(plan)
    if state and not resume:
        raise ConfigError([f"{sweep_dir} already holds sweep {plan.name!r}: pass --resume to continue it, or give "
                           f"another name (--set name=...)"])
    if state and state.get("fingerprint") != plan.fingerprint():
        raise ConfigError([f"--resume: {sweep_dir} was started from a different config ({state.get('source')} "
                           f"{state.get('overrides') or ''}); resume with the same file and --set values "
                           f"(only search.max_concurrent and search.start_ahead may differ)"])
    set_verbose(verbose)   # before Ray starts: its worker processes inherit DISTILL_VERBOSE
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    import mlflow  # noqa: F401  (imported first: its import sets its loggers' levels)

    # MLflow's store notes, Tune's trainable conversion and result-file notes: with --verbose only
    for name in ("mlflow", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    ensure_ray()
    _give_trials_the_ray_address()
    running, why = concurrency(plan)
    ahead, why_ahead = start_ahead(plan, running)
    n_concurrent = running + ahead
    print(describe(plan, f"{why}; {why_ahead}"), flush=True)
    # everything a trial needs first: a failure here (an unreadable image, an unreachable teacher) leaves nothing
    # that would make the same command ask for --resume
    warm_caches(plan)
    teacher = teacher_report(plan)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "teacher.json").write_text(json.dumps(teacher, indent=1))
    (sweep_dir / "searches").mkdir(exist_ok=True)
    if not state:
        state = {"sweep": plan.name, "sweep_id": uuid.uuid4().hex[:12], "fingerprint": plan.fingerprint(),
                 "source": plan.source, "overrides": plan.overrides, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2, default=str))
    (sweep_dir / "sweep.yaml").write_text(plan.text)
    (sweep_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2, default=str))
    parent = _parent_run(plan, state["sweep_id"])
    tracking.log_artifact(plan.tracking_uri, parent, sweep_dir / "sweep.yaml")
    tracking.log_artifact(plan.tracking_uri, parent, sweep_dir / PLAN_FILE)
    t0 = time.time()
    try:
        summaries = run_searches(plan, parent, n_concurrent, resume, verbose)
        reconcile_runs(plan, parent)
        for name, summary in summaries.items():
            (sweep_dir / "searches" / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
            for err in summary["errors"]:
                print(f"[distill.tune] search {name}: trial {err['trial_id']} failed: {err['error'][:300]}",
                      flush=True)
        unfinished = [name for name, summary in summaries.items() if not summary["finished"]]
        if unfinished:
            raise KeyboardInterrupt(f"search(es) {', '.join(unfinished)} stopped before their trials finished")
    except KeyboardInterrupt as exc:
        tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "interrupted"})
        tracking.end_run(plan.tracking_uri, parent, "KILLED")
        print(f"[distill.tune] interrupted ({exc or 'Ctrl-C'}); continue with: {resume_command(plan)}", flush=True)
        raise
    except BaseException as exc:
        tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "failed",
                                                     "distill.failure": f"{type(exc).__name__}: {exc}"[:4000]})
        tracking.end_run(plan.tracking_uri, parent, "FAILED")
        raise
    results = finish(plan, parent, verbose)
    tracking.set_tags(plan.tracking_uri, parent, {tracking.STATUS_TAG: "finished",
                                                 "distill.sweep_seconds": round(time.time() - t0)})
    tracking.end_run(plan.tracking_uri, parent, "FINISHED")
    print(report.render_text(results), flush=True)
    for line in results["unregistered"]:
        print(f"[distill.tune] error: selected model not registered: {line}", flush=True)
    print(f"[distill.tune] sweep {plan.name!r} done in {time.time() - t0:.0f}s\n"
          f"  results: {sweep_dir}/results.md (.csv, .json, .tex)\n  plots:   {sweep_dir}/plots/\n"
          f"{mlflow_lines(plan)}", flush=True)
    if results["unregistered"]:
        print(f"[distill.tune] {len(results['unregistered'])} selected model(s) not registered (above); once the "
              f"cause is fixed, register them with: {resume_command(plan)}", flush=True)
    return results
