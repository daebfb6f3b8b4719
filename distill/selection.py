"""Reading a sweep's rows and DomainBed's three model-selection rules (training-domain validation, leave-one-domain-out,
test-domain oracle), as data-in, row-out functions: ``distill.report`` builds the tables from them, ``distill.plots``
marks the selected points with them.

Every rule picks the row with the highest metric; ties go to the earlier trial, then the earlier step. "Earlier
trial" is the order in which the sweep created its trials (``creation_order``): the rows' ``trial_index`` (an integer
the sweep driver numbers its trials with, across searches) where they carry it, else the creation counter at the end
of Tune's trial id (``trial_order``); rows with a ``trial_index`` come before rows without. A row with
``selectable: false`` (an evaluation that is not the trial's model) is never selected by validation or
leave-one-domain-out; the oracle takes each trial's last row.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

SELECTION_METRIC = "val_acc"
LODO_METRIC = "lodo_acc"
ORACLE_METRIC = "test_out_acc"
REPORTED = "test_acc"
LODO_EVENT = "lodo"   # the `event` of a leave-one-domain-out row
TRIAL_INDEX = "trial_index"   # optional: the order in which the sweep created the trial (0, 1, ...; across searches)
SELECTIONS = {"validation": SELECTION_METRIC, "lodo": LODO_METRIC, "oracle": ORACLE_METRIC}
ERRORS = {"se": "standard error", "std": "std"}   # the error bars a table may show (DomainBed: se)


# ------------------------------------------------------------------------------------------------------- reading
def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a driver killed mid-write) is skipped."""
    rows = []
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trial_order(trial_id: str) -> tuple:
    """Tune trial ids end in a creation counter (`abc12_00003`)."""
    head, _, tail = str(trial_id).rpartition("_")
    return (int(tail), head) if tail.isdigit() else (math.inf, str(trial_id))


def trial_index(row: dict) -> int | None:
    """The row's `trial_index` (an integer; a bool, a float or a string is not one), else None."""
    v = row.get(TRIAL_INDEX)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def creation_order(row: dict) -> tuple:
    """The sort key of "the earlier trial": (0, trial_index, trial_order) where the row carries a `trial_index`, else
    (1, 0, trial_order(trial_id)); so `trial_index` decides where present and Tune's id counter otherwise."""
    index = trial_index(row)
    return (0, index, trial_order(row.get("trial_id"))) if index is not None else \
        (1, 0, trial_order(row.get("trial_id")))


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """Evaluation rows, one per (search, trial, step): a trial resumed from a checkpoint may report a step again;
    the last report wins. Other events (`end`, `lodo`) are left out. Sorted by sweep, search, trial creation order
    (`creation_order`), step."""
    out: dict[tuple, dict] = {}
    for row in rows:
        if row.get("event", "eval") != "eval" or row.get("step") is None:
            continue
        out[(row.get("sweep"), row.get("search"), row.get("trial_id"), row.get("step"))] = row
    return sorted(out.values(), key=lambda r: (str(r.get("sweep")), str(r.get("search")),
                                                creation_order(r), r.get("step")))


def dedupe_lodo(rows: Iterable[dict]) -> list[dict]:
    """Leave-one-domain-out rows (`event: lodo`), one per (sweep, search, trial, step, lodo_domain); the last report
    wins. Sorted like `dedupe`, then by held-out domain."""
    out: dict[tuple, dict] = {}
    for row in rows:
        if row.get("event") != LODO_EVENT or row.get("step") is None or row.get("lodo_domain") is None:
            continue
        out[(row.get("sweep"), row.get("search"), row.get("trial_id"), row.get("step"), row.get("lodo_domain"))] = row
    return sorted(out.values(), key=lambda r: (str(r.get("sweep")), str(r.get("search")),
                                                creation_order(r), r.get("step"),
                                                str(r.get("lodo_domain"))))


def load_rows(sweep_dir: str | Path) -> list[dict]:
    return dedupe(read_jsonl(Path(sweep_dir) / "trials.jsonl"))


LODO_DIR = "lodo"   # <sweep>/lodo/<search>-<trial>-<domain>.json: the rows of one leave-one-domain-out run


def load_lodo_rows(sweep_dir: str | Path) -> list[dict]:
    """Leave-one-domain-out rows: those in trials.jsonl and the per-run files the sweep's trials write (one JSON
    list per LODO run, written whole when the run finished)."""
    rows = read_jsonl(Path(sweep_dir) / "trials.jsonl")
    for path in sorted((Path(sweep_dir) / LODO_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    return dedupe_lodo(rows)


def load_events(sweep_dir: str | Path) -> list[dict]:
    """The last `end` event of each trial (completed / early_stopped / error)."""
    ends: dict[tuple, dict] = {}
    for row in read_jsonl(Path(sweep_dir) / "trials.jsonl"):
        if row.get("event") == "end":
            ends[(row.get("search"), row.get("trial_id"))] = row
    return list(ends.values())


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


TEACHER_FILE = "teacher.json"   # {"teacher", "zero_shot": {held-out domain: accuracy}, "prompts", "chance"}


def _fraction(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def load_teacher(sweep_dir: str | Path) -> dict | None:
    """The sweep's teacher.json (the sweep driver writes it): {"teacher": id, "zero_shot": {domain: accuracy as a
    fraction}, "prompts": text, "chance": 1/#classes}; None without one. Non-numeric accuracies are left out."""
    return normalise_teacher(_json(Path(sweep_dir) / TEACHER_FILE))


def normalise_teacher(data: dict | None) -> dict | None:
    """teacher.json's content with its accuracies checked (finite numbers) and `chance` in (0, 1] or None."""
    if not isinstance(data, dict) or not data:
        return None
    zero_shot = data.get("zero_shot") if isinstance(data.get("zero_shot"), dict) else {}
    chance = _fraction(data.get("chance"))
    return {"teacher": data.get("teacher"), "prompts": data.get("prompts"),
            "zero_shot": {str(d): a for d, a in ((d, _fraction(a)) for d, a in zero_shot.items()) if a is not None},
            "chance": chance if chance is not None and 0 < chance <= 1 else None}


def plan_chance(plan: dict) -> float | None:
    """1/#classes of the dataset in plan.json's `base_config` (a registered dataset, or `folder` with its root
    present); None when it cannot be known (no base_config, an unknown name, a root that does not match)."""
    dataset = ((plan or {}).get("base_config") or {}).get("dataset") or {}
    if not isinstance(dataset, dict) or not dataset.get("name"):
        return None
    try:
        # imports torch (via distill.data): only when a plan names a dataset and no teacher.json gave the chance
        from .data.registry import get_spec

        n = len(get_spec(dataset["name"], dataset.get("root")).classes)
    except Exception:   # noqa: BLE001  (an unknown dataset, an unreadable root: no chance level)
        return None
    return 1.0 / n if n else None


# ----------------------------------------------------------------------------------------------------- selection
def _value(row: dict, metric: str) -> float | None:
    v = row.get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def selectable(row: dict) -> bool:
    """`selectable` is optional (missing or null: true)."""
    return row.get("selectable") not in (False, "false", "False")


def select(rows: Iterable[dict], metric: str = SELECTION_METRIC) -> dict | None:
    """The row with the highest finite `metric`. Ties: the earlier trial (`creation_order`: `trial_index` where the
    rows carry it, else the counter of the Tune trial id), then the earlier step. None when no row has the metric."""
    best, best_key = None, None
    for row in rows:
        v = _value(row, metric)
        if v is None:
            continue
        key = (-v, creation_order(row), row.get("step"))
        if best_key is None or key < best_key:
            best, best_key = row, key
    return best


def _trial_key(row: dict) -> tuple:
    return row.get("sweep"), row.get("search"), row.get("trial_id")


def last_rows(rows: Iterable[dict]) -> list[dict]:
    """Each trial's last evaluation (its highest step), selectable or not."""
    last: dict[tuple, dict] = {}
    for row in rows:
        k = _trial_key(row)
        if k not in last or row.get("step") > last[k].get("step"):
            last[k] = row
    return list(last.values())


def source_domains(rows: Iterable[dict]) -> list[str]:
    """The source domains of a search: the `val_acc/<domain>` keys of its evaluation rows."""
    prefix = SELECTION_METRIC + "/"
    found = [k[len(prefix):] for r in rows for k in r if k.startswith(prefix)]
    return sorted(d for d in set(found) if d not in {r.get("test_domain") for r in rows})


def lodo_index(lodo_rows: Iterable[dict]) -> dict[tuple, dict[str, dict]]:
    """(sweep, search, trial, step) -> {held-out source domain: lodo row}."""
    index: dict[tuple, dict[str, dict]] = {}
    for r in lodo_rows:
        index.setdefault((*_trial_key(r), r.get("step")), {})[r["lodo_domain"]] = r
    return index


def lodo_candidates(rows: list[dict], index: dict[tuple, dict[str, dict]]) -> list[dict]:
    """The selectable rows that have a selectable lodo row with a finite accuracy for every source domain of their
    search, each with `lodo_acc` (the mean over the source domains) and `lodo_accs` (per domain) added."""
    domains = source_domains(rows)
    out = []
    if not domains:
        return out
    for row in rows:
        if not selectable(row):
            continue
        held = index.get((*_trial_key(row), row.get("step")), {})
        accs = {}
        for d in domains:
            lr = held.get(d)
            if lr is None or not selectable(lr) or _value(lr, LODO_METRIC) is None:
                break
            accs[d] = _value(lr, LODO_METRIC)
        else:
            out.append({**row, LODO_METRIC: statistics.fmean(accs.values()), "lodo_accs": accs})
    return out


def select_cell(selection: str, rows: list[dict], index: dict[tuple, dict[str, dict]] | None = None) -> dict | None:
    """The selected row of one (test domain, seed) under `selection` (a key of SELECTIONS):

    - validation: among selectable rows, the highest `val_acc`;
    - oracle: among each trial's last row (its highest step, selectable or not), the highest `test_out_acc`;
    - lodo: among selectable rows with a selectable leave-one-domain-out row for every source domain, the highest
      mean `lodo_acc`.

    Ties (all three): the earlier trial in creation order (`creation_order`), then the earlier step."""
    if selection == "validation":
        return select([r for r in rows if selectable(r)], SELECTION_METRIC)
    if selection == "oracle":
        return select(last_rows(rows), ORACLE_METRIC)
    if selection == "lodo":
        return select(lodo_candidates(rows, index or {}), LODO_METRIC)
    raise ValueError(f"unknown selection {selection!r}; one of {sorted(SELECTIONS)}")


