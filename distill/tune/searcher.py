"""All searches of a sweep in one Tune experiment, each still its own search.

Running the searches (held-out domain x seed) one after another leaves a cluster idle at the tail of each: with 16
slots and 20 trials per search, the last 4 trials of every search run while 12 slots wait. Here one Tuner runs every
search at once: ``SweepSearcher`` routes each new trial to the search with the fewest trials so far (its own Optuna
study, TPE seeded as before), and ``PerSearchScheduler`` keeps one ASHA per search, so trials of different held-out
domains are never compared. A free slot therefore never waits while any search has trials left; each search gets
exactly ``num_samples`` trials and is selected on its own trials, as before.
"""
from __future__ import annotations

import pickle

from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from .. import tracking
from ..trial.loop import FAILED
from .space import METRIC, MODE

SEARCH_KEY = "distill.search"   # the key of a trial's config naming its search (not a config key: stripped)
INDEX_KEY = "distill.trial_index"   # the order in which the sweep created its trials, across searches


def without_search(config: dict) -> dict:
    """A trial's sampled hyperparameters, without the routing keys."""
    return {k: v for k, v in (config or {}).items() if k not in (SEARCH_KEY, INDEX_KEY)}


def make_sampler(kind: str, seed: int):
    """search.sampler: `tpe`, Optuna's TPE (multivariate, grouped by the conditional space's branches), or `random`,
    Optuna's RandomSampler (DomainBed's random search); each search's own sampler, seeded with search.sampler_seed."""
    import warnings

    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind != "tpe":
        raise ValueError(f"search.sampler: unknown sampler {kind!r}; one of ['tpe', 'random']")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # multivariate and group
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


class SweepSearcher(Searcher):
    """One OptunaSearch per search; each suggestion goes to the search with the fewest trials (ties: plan order)."""

    def __init__(self, searches: list[str], space, num_samples: int, sampler_seed: int, sweep: str,
                 export_db: str | None = None, sampler: str = "tpe"):
        from ray.tune.search.optuna import OptunaSearch

        super().__init__(metric=METRIC, mode=MODE)
        self.order = list(searches)
        self.num_samples = int(num_samples)
        self.studies = {name: f"{sweep}:{name}" for name in searches}
        # metric/mode on each searcher too: with a define-by-run space OptunaSearch ignores TuneConfig's
        self.subs = {name: OptunaSearch(space=space, metric=METRIC, mode=MODE, study_name=self.studies[name],
                                        sampler=make_sampler(sampler, sampler_seed))
                     for name in searches}
        self.count = {name: 0 for name in searches}
        self.owner: dict[str, str] = {}
        self.index: dict[str, int] = {}
        self.reported: dict[str, int] = {}   # trial -> the last training step told to its study
        self.export_db = export_db   # a copy of each study for inspection, refreshed as its trials finish

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True   # every sub-searcher has its metric, mode and space already

    def suggest(self, trial_id: str):
        if trial_id in self.owner:   # asked again for the same trial (a restored experiment)
            name = self.owner[trial_id]
            return {**self.subs[name].suggest(trial_id), SEARCH_KEY: name, INDEX_KEY: self.index[trial_id]}
        open_searches = [n for n in self.order if self.count[n] < self.num_samples]
        if not open_searches:
            return Searcher.FINISHED
        name = min(open_searches, key=lambda n: (self.count[n], self.order.index(n)))
        config = self.subs[name].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.count[name] += 1
        self.owner[trial_id] = name
        self.index[trial_id] = len(self.index)
        return {**config, SEARCH_KEY: name, INDEX_KEY: self.index[trial_id]}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An evaluation, told to its search's study as an intermediate value at the trial's training step (not at
        Tune's iteration count, which starts again at 1 when a trial resumes from its checkpoint); a step already
        told (a resumed trial replaying its history) is not told again (Optuna would keep the first and warn)."""
        if trial_id not in self.owner or result.get(FAILED):
            return
        step = result.get("step")
        if isinstance(step, int):
            if step <= self.reported.get(trial_id, -1):
                return
            self.reported[trial_id] = step
            result = {**result, "training_iteration": step}
        self.subs[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        name = self.owner[trial_id]
        if result and result.get(FAILED):   # failed once, deterministically: a failed Optuna trial
            result, error = None, True
        self.subs[name].on_trial_complete(trial_id, result=result, error=error)
        if self.export_db:
            export_study(self.study(name), self.export_db, self.studies[name])

    def study(self, name: str):
        return self.subs[name]._ot_study

    # Tune saves the searcher with the experiment (pickle, in Tune's own experiment directory) and reads it back
    # only on `Tuner.restore` (python -m distill.tune --resume)
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def __setstate__(self, state: dict) -> None:
        """Also how `Tuner.restore` unpickles the searcher it saved with the experiment (no __init__): a sweep
        started before an attribute existed gets it empty."""
        self.__dict__.update(state)
        self.__dict__.setdefault("reported", {})


class PerSearchScheduler(TrialScheduler):
    """One scheduler per search (ASHA compares a trial only with the trials of its own search)."""

    def __init__(self, searches: list[str], make):
        super().__init__()
        self.subs = {name: make() for name in searches}

    def _sub(self, trial):
        return self.subs[trial.config[SEARCH_KEY]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all(s.set_search_properties(metric, mode, **spec) for s in self.subs.values())

    def on_trial_add(self, tune_controller, trial):
        self._sub(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._sub(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._sub(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._sub(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._sub(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return next(iter(self.subs.values())).choose_trial_to_run(tune_controller)   # FIFO: the same for all

    def debug_string(self) -> str:
        return "; ".join(f"{name}: {s.debug_string()}" for name, s in self.subs.items())


def export_study(study, db, study_name: str) -> None:
    """A search's Optuna study copied into `optuna.db` (sqlite) for inspection (optuna.load_study,
    optuna-dashboard). Written by the driver as trials finish; never read back (the searcher's own study is the one
    Tune saves with the experiment)."""
    import optuna

    try:
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
