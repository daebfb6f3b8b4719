"""What Ray Tune runs and hears: the trial function (one TorchTrainer per trial, plus its leave-one-domain-out runs),
ASHA that lets a trial's last evaluation finish, and the callback writing every evaluation row to trials.jsonl."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .. import tracking
from ..console import set_verbose
from .plan import search_name, train_run_name, trial_cfg
from .runs import find_run
from ..trial.loop import FAILED
from .searcher import INDEX_KEY, SEARCH_KEY, without_search
from .space import METRIC

class SweepTrial:
    """The Tune function trainable of a sweep: the trial's search (held-out domain, seed) and sampled params onto
    the trial config, then one run_trial (a TorchTrainer that reports to Tune through TuneReportCallback), after its
    leave-one-domain-out runs with `search.lodo`. Module-level and picklable (Tune stores it for restore)."""

    __name__ = "distill_trial"  # Tune names trials after the trainable

    def __init__(self, raw: dict, sweep: str, searches: dict[str, tuple[str, int]], parent_run_id: str | None,
                 train_storage: str, tracking_uri: str, lodo_dir: str | None = None, tags: dict | None = None,
                 verbose: bool = False):
        self.raw, self.sweep, self.searches = raw, sweep, dict(searches)   # search name -> (test domain, seed)
        self.tags = dict(tags or {})   # the driver's MLflow context (user, source) and the sweep's own tags
        self.verbose = verbose
        self.parent_run_id, self.train_storage, self.tracking_uri = parent_run_id, train_storage, tracking_uri
        self.lodo_dir = lodo_dir   # search.lodo: where the leave-one-domain-out rows go

    def __call__(self, config: dict) -> None:
        from ray import tune

        from ..trial.launch import TrialFailed, run_trial
        from ..trial.prepare import trial_steps

        # Ray started before MLFLOW_TRACKING_URI was set in the driver would not pass it on: set it here
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        set_verbose(self.verbose)
        trial_id = tune.get_context().get_trial_id()
        test_domain, seed = self.searches[config[SEARCH_KEY]]
        params = without_search(config)
        cfg = trial_cfg(self.raw, params, test_domain, seed)
        name = train_run_name(self.sweep, test_domain, seed, trial_id)
        total = sum(n for _, n in trial_steps(cfg))
        final = finished_metrics(self.tracking_uri, self.sweep, name, total)
        if final is not None:
            # a trial that had finished when the driver died, before Tune recorded it: report its final metrics
            # again (with its last checkpoint, whose history completes its rows) instead of starting it again
            tune.report({**final, "replayed": True, **last_checkpoint(self.train_storage, name)})
            return
        if self.lodo_dir:
            self.lodo_runs(params, test_domain, seed, trial_id, name)
            # leave-one-domain-out selection may pick any selectable evaluation of this trial: keep every checkpoint
            cfg["train"]["num_checkpoints"] = None
        try:
            search = config[SEARCH_KEY]
            searched = ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "nothing (a fixed config)"
            note = f"A trial of search `{search}` (held-out {test_domain}, seed {seed}) of sweep `{self.sweep}`; " \
                   f"searched: {searched}."
            run_trial(cfg, tune=True, parent_run_id=self.parent_run_id, name=name, train_storage=self.train_storage,
                      experiment=self.sweep, tags={**self.tags, **searched_tags(params), "distill.search": search,
                                                   "mlflow.note.content": note}, verbose=self.verbose)
        except TrialFailed:
            return   # reported to Tune by the workers (FAILED) and in MLflow: ends the trial without a retry

    def lodo_runs(self, params: dict, test_domain: str, seed: int, trial_id: str, name: str) -> None:
        """DomainBed's leave-one-domain-out runs of this trial (same hyperparameters and seed): for every source
        domain V, a model trained with V held out too; its evaluations of V's in-split go to
        `<sweep>/lodo/<search>-<trial>-<V>.json` (one file per run, written once it finished; a rerun skips it)."""
        from ..report import LODO_EVENT
        from ..trial.launch import read_checkpoint, run_trial

        search = search_name(test_domain, seed)
        for domain in _source_domains(trial_cfg(self.raw, params, test_domain, seed)):
            out = Path(self.lodo_dir) / f"{search}-{trial_id}-{domain}.json"
            if out.is_file():
                continue
            cfg = trial_cfg(self.raw, params, test_domain, seed, lodo_domain=domain)
            result = run_trial(cfg, parent_run_id=self.parent_run_id, name=f"{name}-lodo-{domain}",
                               train_storage=self.train_storage, experiment=self.sweep, tags=self.tags,
                               verbose=self.verbose)
            with result.checkpoint.as_directory() as d:
                history = read_checkpoint(d)["history"]
            common = {"event": LODO_EVENT, "sweep": self.sweep, "search": search, "test_domain": test_domain,
                      "seed": seed, "trial_id": trial_id, "lodo_domain": domain,
                      "method": cfg["method"]["name"], "params": params}
            rows = [{**common, "step": r["step"], "lodo_acc": r.get("lodo_acc"), "selectable": r.get("selectable"),
                     "final": r.get("final")} for r in history]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, default=str))
            tmp.replace(out)


def searched_tags(params: dict) -> dict[str, str]:
    """The trial's sampled values as tags (`searched.<key>`) and in one JSON tag: the runs table can show and sort
    on what the searcher chose."""
    return {"distill.searched": json.dumps(params, sort_keys=True, default=str),
            **{f"searched.{k}": str(v) for k, v in params.items()}}


def _source_domains(cfg: dict) -> list[str]:
    from ..data.registry import get_spec

    ds = cfg["dataset"]
    spec = get_spec(ds["name"], ds["root"] if ds["name"] != "synth" else None)
    return [d for d in spec.domains if d != cfg["test_domain"]]


def last_checkpoint(train_storage: str, run_name: str) -> dict:
    """{"checkpoint_path": the latest checkpoint of a Train run, or of an inline run} (empty when there is none)."""
    import ray.train

    from ..trial.session import InlineResult, is_inline_run

    path = _run_path(train_storage, run_name)
    try:
        result = InlineResult(path) if is_inline_run(path) else ray.train.Result.from_path(path)
        checkpoint = result.checkpoint
    except Exception:  # noqa: BLE001 - no run or no checkpoint: nothing to add
        return {}
    return {"checkpoint_path": checkpoint.path} if checkpoint is not None else {}


def _run_path(root: str, name: str) -> str:
    return "/".join([root.rstrip("/"), name]) if "://" in root else str(Path(root, name))


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
        if result.get(FAILED):   # the trial's own failure report: nothing to rank
            return TrialScheduler.CONTINUE
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
    """Driver-side Tune callback: every evaluation row a trial reports -> `trials.jsonl` (with the trial's search,
    method and sampled params), plus an `end` row per trial: completed, early_stopped (ASHA) or error (with the
    reason). Module-level and picklable: Tune stores it with the experiment and uses the stored one after a
    restore."""

    def __init__(self, path: str, sweep: str, searches: dict[str, tuple[str, int]], base_method: str, steps: int,
                 storage: str = "", num_samples: int = 1):
        self.path, self.sweep, self.searches = path, sweep, dict(searches)
        self.base_method, self.steps = base_method, steps
        self.storage = storage   # where the trials' checkpoints may be read from (the sweep's Train runs)
        self.num_samples = num_samples
        self._start_clock()

    def _start_clock(self) -> None:
        """This driver's start and the trials ended before it: elapsed and ETA are this run's own."""
        self.started = time.time()
        self.ended_before = len(self._ends())

    def __setstate__(self, state: dict) -> None:
        """A resumed sweep: `Tuner.restore` unpickles the callback stored with the experiment (no __init__), whose
        clock is the first run's; it starts again here."""
        self.__dict__.update(state)
        self._start_clock()

    def _common(self, trial) -> dict:
        search = (trial.config or {}).get(SEARCH_KEY)
        test_domain, seed = self.searches.get(search, (None, None))
        params = without_search(trial.config)
        return {"sweep": self.sweep, "search": search, "test_domain": test_domain, "seed": seed,
                "trial_id": trial.trial_id, "trial_index": (trial.config or {}).get(INDEX_KEY),
                "method": params.get("method.name", self.base_method),
                "params": params, "train_run": train_run_name(self.sweep, test_domain, seed, trial.trial_id)}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "step" not in result or result.get(FAILED):
            return
        common = self._common(trial)
        if result.get("replayed"):
            from ..report import read_jsonl

            key = (common["search"], trial.trial_id, result["step"])
            if any((r.get("search"), r.get("trial_id"), r.get("step")) == key for r in read_jsonl(self.path)
                   if r.get("event") == "eval"):
                return
        append_jsonl(self.path, {"event": "eval", **common, **keep_fields(result)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step")
        if last.get(FAILED):
            self._reconcile(trial)
            append_jsonl(self.path, {"event": "end", **self._common(trial), "status": "error",
                                     "error": error_reason(last[FAILED]), "step": step})
            print(self.progress(), flush=True)
            return
        done = last.get("final") or (step is not None and step >= last.get("total_steps", self.steps))
        self._reconcile(trial)
        status = "collapsed" if last.get("collapsed") else "completed" if done else "early_stopped"
        append_jsonl(self.path, {"event": "end", **self._common(trial), "status": status, "step": step})
        print(self.progress(), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reconcile(trial)
        append_jsonl(self.path, {"event": "end", **self._common(trial), "status": "error",
                                 "error": _trial_error(trial), "step": (trial.last_result or {}).get("step")})
        print(self.progress(), flush=True)

    def progress(self) -> str:
        """One sweep-wide line: searches and trials done of their totals, the best source-val so far per held-out
        domain, elapsed time and a rough ETA."""
        from ..report import read_jsonl

        rows = read_jsonl(self.path)
        ends = self._ends(rows)
        total = self.num_samples * len(self.searches)
        done_per = {}
        for search, _ in ends:
            done_per[search] = done_per.get(search, 0) + 1
        searches_done = sum(1 for s in self.searches if done_per.get(s, 0) >= self.num_samples)
        best = {}
        for r in rows:
            if r.get("event") == "eval" and r.get("selectable", True) and isinstance(r.get("val_acc"), float):
                best[r["test_domain"]] = max(best.get(r["test_domain"], 0.0), r["val_acc"])
        elapsed = time.time() - self.started
        ended_here = len(ends) - self.ended_before
        eta = elapsed / ended_here * (total - len(ends)) if ended_here > 0 else float("nan")
        best_text = ", ".join(f"{d} {100 * v:.1f}" for d, v in sorted(best.items())) or "–"
        this_run = " (this run)" if self.ended_before else ""
        return (f"[distill.tune] {len(ends)}/{total} trials, {searches_done}/{len(self.searches)} searches done; "
                f"best source-val so far: {best_text}; elapsed {_clock(elapsed)}{this_run}, ETA {_clock(eta)}")

    def _ends(self, rows: list[dict] | None = None) -> set:
        """(search, trial) of every trial ended so far (trials.jsonl's end events)."""
        from ..report import read_jsonl

        rows = read_jsonl(self.path) if rows is None else rows
        return {(r.get("search"), r.get("trial_id")) for r in rows if r.get("event") == "end"}

    def _reconcile(self, trial) -> None:
        """The trial's evaluation rows, made exactly those of the run that produced its last checkpoint (whose
        history it carries): rows a killed driver never wrote are added, rows of a discarded attempt replaced."""
        from ..report import read_jsonl

        common = self._common(trial)
        history = checkpoint_history(self.storage, trial.last_result or {})
        if history is None:
            return
        rows = read_jsonl(self.path)
        kept = [r for r in rows if not (r.get("event") == "eval" and r.get("search") == common["search"]
                                        and r.get("trial_id") == trial.trial_id)]
        # what only Tune knows of a row it relayed (its iteration, time, checkpoint directory) is kept
        tune_only = {r.get("step"): {k: r[k] for k in TUNE_FIELDS if k in r} for r in rows
                     if r.get("event") == "eval" and r.get("trial_id") == trial.trial_id}
        new = [{"event": "eval", **common, **keep_fields(h), **tune_only.get(h.get("step"), {})} for h in history]
        tmp = Path(self.path).with_suffix(".reconcile.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in kept + new))
        tmp.replace(self.path)


ROW_FIELDS = ("step", "val_acc", METRIC, "test_acc", "test_out_acc", "val_loss", "loss", "checkpoint_path",
              "training_iteration", "time_total_s", "timestamp", "stage", "eval_model", "selectable", "final",
              "total_steps", "raw_val_acc", "collapsed", "val_top_share")


TUNE_FIELDS = ("training_iteration", "timestamp", "time_total_s", "checkpoint_path", "trial_index")


def _clock(seconds: float) -> str:
    if seconds != seconds:
        return "–"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def keep_fields(result: dict) -> dict:
    """What a trials.jsonl row keeps of a report."""
    return {k: v for k, v in result.items() if k in ROW_FIELDS or k.startswith(("val_acc/", "loss/"))}


def checkpoint_history(storage: str, result: dict) -> list[dict] | None:
    """Every evaluation of the run that produced a trial's last checkpoint, read from that checkpoint (tensors and
    plain data only, never code) and only inside the sweep's storage: a path in a text file is not trusted."""
    from ..trial.launch import read_checkpoint

    path = result.get("checkpoint_path")
    if not path or not storage or not inside(path, storage):
        return None
    try:
        return list(read_checkpoint(path)["history"])
    except Exception as exc:  # noqa: BLE001 - the rows Tune relayed stay as they are
        print(f"[distill.tune] could not read the evaluation history of {path} ({type(exc).__name__}: {exc})",
              flush=True)
        return None


def inside(path: str, root: str) -> bool:
    """Whether `path` lies inside `root` (after resolving `..` and links)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return False


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


