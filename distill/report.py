"""Model selection (DomainBed's three methods) and the table: ``python -m distill.report SWEEP_DIR... [--out DIR]
[--selection val|lodo|oracle] [--error se|std]``.

Input: the rows the sweep driver wrote to ``<storage>/<sweep>/trials.jsonl``. Evaluation rows (``event: eval``, one
per trial and evaluation step): ``val_acc`` = mean source-domain validation accuracy (``val_acc/<domain>`` per source
domain), ``test_acc`` = test domain, in-split, ``test_out_acc`` = test domain, its held-out 20%, the trial's method
and sampled params, and the optional ``selectable`` (default true; false: never selected, e.g. a raw-model evaluation
of a trial that delivers a SWAD average, or a first training stage), ``final``, ``stage``, ``eval_model``.
Leave-one-domain-out rows (``event: lodo``, written when the sweep ran with ``search.lodo: true``): for a trial and
step, the accuracy ``lodo_acc`` on the in-split of the source domain ``lodo_domain`` of a model trained with the same
hyperparameters and seed but with that domain held out too.

Per (test domain, seed):

- ``validation`` (CLI ``val``; DomainBed's training-domain validation): among selectable rows, the (trial, step) with
  the best ``val_acc``; we report its ``test_acc``.
- ``lodo`` (DomainBed's leave-one-domain-out validation): among (trial, step)s whose row is selectable and that have a
  selectable lodo row for every source domain, the one with the best mean ``lodo_acc``; we report its ``test_acc``.
  Without such trials the cell is empty.
- ``oracle`` (DomainBed's test-domain validation): each trial's last evaluation (its highest step), then the trial
  whose last evaluation has the best ``test_out_acc``; we report its ``test_acc``. It looks at the test domain, so it
  is not a model-selection method: it is printed apart, labelled, to show the selection gap.

Ties go to the earlier trial, then the earlier step. Each cell is the mean over seeds ± the standard error
(std/sqrt(n), DomainBed's; ``--error std``: the sample std); Avg is the mean over test domains, its error that of the
per-seed averages. When a sweep searched ``method.name``, every method is selected on its own trials and, in the last
row, over all of them. Several sweep dirs are put side by side (one row per method and sweep).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from .selection import (ERRORS, LODO_DIR, LODO_EVENT, LODO_METRIC, ORACLE_METRIC, REPORTED, SELECTION_METRIC,  # noqa: F401
                        SELECTIONS, _json, _value, dedupe, dedupe_lodo, last_rows, load_events, load_lodo_rows,
                        load_rows, lodo_candidates, lodo_index, read_jsonl, select, select_cell, selectable,
                        source_domains, trial_order)

CLI_SELECTIONS = {"val": "validation", "lodo": "lodo", "oracle": "oracle"}  # --selection -> key of SELECTIONS
TITLES = {
    "validation": "Training-domain validation: the (trial, step) with the best source-domain validation accuracy "
                  "(DomainBed's training-domain validation)",
    "lodo": "Leave-one-domain-out validation: the (trial, step) with the best mean accuracy on each source domain "
            "when that domain is also held out of training (DomainBed's leave-one-domain-out validation)",
    "oracle": "ORACLE, selected on the test domain (each trial's last evaluation; the trial whose last evaluation is "
              "the most accurate on the test domain's held-out 20%, DomainBed's test-domain validation): not a valid "
              "model selection, shown to expose the selection gap",
}
NO_LODO = "no leave-one-domain-out runs (`search.lodo: true` produces them)"
LODO_RULE = ("Candidates: the (trial, step)s with a leave-one-domain-out run for every source domain; a cell without "
             "any is empty.")


def _stats(values: list[float], error: str = "se") -> dict:
    """mean, sample std, standard error (std/sqrt(n)), n, and `err`: the one `error` names (None with one value)."""
    if error not in ERRORS:
        raise ValueError(f"unknown error kind {error!r}; one of {sorted(ERRORS)}")
    if not values:
        return {"mean": None, "std": None, "se": None, "n": 0, "err": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    se = std / math.sqrt(len(values)) if std is not None else None
    return {"mean": statistics.fmean(values), "std": std, "se": se, "n": len(values),
            "err": se if error == "se" else std}


def _groups(rows: list[dict], sweep: str, methods: list[str], searched: bool) -> list[dict]:
    """One row per method the sweep could choose (a method whose trials all failed keeps an empty row) and, when
    method.name was searched, the overall row."""
    present = list(dict.fromkeys([*methods, *(r.get("method") for r in rows)]))
    if searched and len(present) > 1:
        groups = [{"label": m, "sweep": sweep, "methods": [m], "overall": False} for m in present]
        groups.append({"label": f"selected over {'/'.join(present)}", "sweep": sweep, "methods": present,
                       "overall": True})
        return groups
    label = present[0] if len(present) == 1 else "/".join(present)
    return [{"label": label, "sweep": sweep, "methods": present, "overall": True}]


def build(sweeps: list[dict], error: str = "se", selection: str = "validation") -> dict:
    """sweeps: [{"name", "rows", "lodo" (lodo rows, optional), "plan" (plan.json or {}), "runs" ({train run: MLflow
    run id}), "events"}]. `error`: the error bar (a key of ERRORS); `selection`: the main table (a key of
    SELECTIONS), recorded for the renderers.

    Returns the three selections and their tables (accuracies as fractions)."""
    if error not in ERRORS:
        raise ValueError(f"unknown error kind {error!r}; one of {sorted(ERRORS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; one of {sorted(SELECTIONS)}")
    groups: list[dict] = []
    domains: list[str] = []
    seeds: list[int] = []
    for sw in sweeps:
        plan = sw.get("plan") or {}
        rows = sw["rows"]
        domains += [d for d in plan.get("test_domains") or [] if d not in domains]
        domains += [r["test_domain"] for r in rows if r.get("test_domain") not in domains]
        domains = list(dict.fromkeys(domains))
        seeds = sorted(set(seeds) | set(plan.get("seeds") or []) | {r.get("seed") for r in rows
                                                                    if r.get("seed") is not None})
        methods = plan.get("methods") or list(dict.fromkeys(r.get("method") for r in rows))
        index = lodo_index(sw.get("lodo") or [])
        for g in _groups(rows, sw["name"], methods, bool(plan.get("method_searched"))):
            g["rows"], g["runs"] = [r for r in rows if r.get("method") in g["methods"]], sw.get("runs") or {}
            g["lodo_index"] = index
            groups.append(g)
    # disambiguate labels across sweeps
    counts: dict[str, int] = {}
    for g in groups:
        counts[g["label"]] = counts.get(g["label"], 0) + 1
    for g in groups:
        if counts[g["label"]] > 1:
            g["label"] = f"{g['label']} [{g['sweep']}]"

    table: dict[str, list] = {s: [] for s in SELECTIONS}
    selected: dict[str, list] = {s: [] for s in SELECTIONS}
    for g in groups:
        by_cell: dict[tuple, list[dict]] = {}
        for r in g["rows"]:
            by_cell.setdefault((r.get("test_domain"), r.get("seed")), []).append(r)
        ordered = sorted(by_cell.items(), key=lambda kv: (domains.index(kv[0][0]) if kv[0][0] in domains else 99,
                                                          kv[0][1]))
        for sel_name, metric in SELECTIONS.items():
            accs: dict[str, dict[int, float]] = {}
            for (domain, seed), cell_rows in ordered:
                best = select_cell(sel_name, cell_rows, g["lodo_index"])
                if best is None or _value(best, REPORTED) is None:
                    continue
                accs.setdefault(domain, {})[seed] = float(best[REPORTED])
                selected[sel_name].append({
                    "method_group": g["label"], "sweep": g["sweep"], "test_domain": domain, "seed": seed,
                    "selection_metric": metric, "trial_id": best.get("trial_id"), "step": best.get("step"),
                    "method": best.get("method"), "params": best.get("params") or {},
                    "val_acc": best.get(SELECTION_METRIC), "test_acc": best.get(REPORTED),
                    "test_out_acc": best.get(ORACLE_METRIC),
                    **({LODO_METRIC: best[LODO_METRIC], "lodo_accs": best["lodo_accs"]} if sel_name == "lodo"
                       else {}),
                    "eval_model": best.get("eval_model"), "stage": best.get("stage"), "final": best.get("final"),
                    "checkpoint_path": best.get("checkpoint_path"),
                    "train_run": best.get("train_run"), "mlflow_run_id": g["runs"].get(best.get("train_run"))})
            cells = {d: {**_stats(list(accs[d].values()), error), "seeds": accs[d]} for d in domains if d in accs}
            avg = _stats([], error)
            if cells and all(d in cells for d in domains):
                common = set.intersection(*(set(c["seeds"]) for c in cells.values()))
                per_seed = [statistics.fmean(cells[d]["seeds"][s] for d in domains) for s in sorted(common)]
                avg = {**_stats(per_seed, error), "mean": statistics.fmean(c["mean"] for c in cells.values())}
            table[sel_name].append({"method": g["label"], "sweep": g["sweep"], "overall": g["overall"],
                                    "domains": cells, "avg": avg})
    trials = {(sw["name"], r.get("search"), r.get("trial_id")) for sw in sweeps for r in sw["rows"]}
    events = [e for sw in sweeps for e in sw.get("events") or []]
    return {
        "sweeps": [sw["name"] for sw in sweeps], "domains": domains, "seeds": seeds,
        "selection_metric": SELECTION_METRIC, "lodo_metric": LODO_METRIC, "oracle_metric": ORACLE_METRIC,
        "reported": REPORTED, "selection_metrics": dict(SELECTIONS), "main_selection": selection,
        "error": error, "error_name": ERRORS[error],
        "groups": [{k: v for k, v in g.items() if k not in ("rows", "runs", "lodo_index")} for g in groups],
        "table": table, "selected": selected,
        "lodo_rows": {sw["name"]: len(sw.get("lodo") or []) for sw in sweeps},
        "counts": {"trials": len(trials), "rows": sum(len(sw["rows"]) for sw in sweeps),
                   "lodo_rows": sum(len(sw.get("lodo") or []) for sw in sweeps),
                   "early_stopped": sum(e.get("status") == "early_stopped" for e in events),
                   "failed": sum(e.get("status") == "error" for e in events)},
        "failures": [{"search": e.get("search"), "trial_id": e.get("trial_id"), "method": e.get("method"),
                      "error": e.get("error")} for e in events if e.get("status") == "error"],
    }


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "trials.jsonl").is_file():
        raise FileNotFoundError(f"{path}: no trials.jsonl (is it a sweep directory, <storage>/<sweep name>?)")
    plan = _json(path / "plan.json")
    raw = read_jsonl(path / "trials.jsonl")
    return {"name": plan.get("sweep") or path.name, "rows": dedupe(raw), "lodo": load_lodo_rows(path), "plan": plan,
            "runs": _json(path / "runs.json"), "events": load_events(path)}


def build_from_dirs(paths: Iterable[str | Path], error: str = "se", selection: str = "validation") -> dict:
    return build([load_sweep(p) for p in paths], error=error, selection=selection)


# ---------------------------------------------------------------------------------------------------- accessors
def overall_group(results: dict) -> str | None:
    """The label of the first sweep's overall row (its only row when one method)."""
    first = results["sweeps"][0] if results["sweeps"] else None
    for g in results["groups"]:
        if g["overall"] and g["sweep"] == first:
            return g["label"]
    return None


def table_row(results: dict, selection: str, label: str | None) -> dict | None:
    return next((r for r in results["table"][selection] if r["method"] == label), None)


# ------------------------------------------------------------------------------------------------------ writing
def _pct(cell: dict | None, error: str = "se") -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    err = cell.get(error)
    return text + (f" ± {100 * err:.1f}" if err is not None else "")


def _error_phrase(results: dict) -> str:
    """E.g. "mean ± standard error over 3 seeds [0, 1, 2]"; names the error bar even with one seed (no ± then)."""
    n = len(results["seeds"])
    name = ERRORS[results.get("error", "se")]
    return (f"mean ± {name} over {n} seed{'s' if n != 1 else ''} {results['seeds']}"
            + (", so no ±" if n == 1 else "") + "; Avg = mean over test domains")


def _md_table(results: dict, selection: str) -> list[str]:
    domains = results["domains"]
    error = results.get("error", "se")
    lines = ["| Method | " + " | ".join(domains) + " | Avg |", "|---" * (len(domains) + 2) + "|"]
    for row in results["table"][selection]:
        label = row["method"] + (" (oracle)" if selection == "oracle" else "")
        lines.append(f"| {label} | " + " | ".join(_pct(row["domains"].get(d), error) for d in domains)
                     + f" | {_pct(row['avg'], error)} |")
    return lines


def _order(results: dict, selection: str | None) -> list[str]:
    main = selection or results.get("main_selection") or "validation"
    if main not in SELECTIONS:
        main = CLI_SELECTIONS.get(main, main)
    if main not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; one of {sorted(CLI_SELECTIONS)}")
    return [main, *(s for s in SELECTIONS if s != main)]


def lodo_note(results: dict) -> str | None:
    """Which sweeps have no leave-one-domain-out rows (None when every sweep has some)."""
    without = [name for name, n in (results.get("lodo_rows") or {}).items() if not n]
    if not without:
        return None
    if len(results["sweeps"]) == 1:
        return f"The sweep has {NO_LODO}: its leave-one-domain-out cells are empty."
    return (f"{'Sweep' if len(without) == 1 else 'Sweeps'} {', '.join(without)}: {NO_LODO}; "
            f"{'its' if len(without) == 1 else 'their'} leave-one-domain-out cells are empty.")


def render_text(results: dict, selection: str | None = None) -> str:
    """The three tables as markdown: `selection` (default: the results' main selection, else validation) first."""
    counts = results["counts"]
    out = [f"## {', '.join(results['sweeps'])}: test-domain accuracy (%), leave-one-domain-out", "",
           f"{counts['trials']} trials, {counts['rows']} evaluation rows"
           + (f", {counts['lodo_rows']} leave-one-domain-out rows" if counts.get("lodo_rows") else "")
           + (f", {counts['early_stopped']} stopped early (ASHA)" if counts.get("early_stopped") else "")
           + (f", {counts['failed']} failed" if counts.get("failed") else "")
           + f"; {_error_phrase(results)}."]
    for i, sel in enumerate(_order(results, selection)):
        out += ["", f"**{'Main table. ' if i == 0 else ''}{TITLES[sel]}**",
                f"Test-domain accuracy (%), {_error_phrase(results)}.", ""]
        if sel == "lodo":
            out += [LODO_RULE + (f" {lodo_note(results)}" if lodo_note(results) else ""), ""]
        out += _md_table(results, sel)
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


SELECTED_TITLES = {"validation": "training-domain validation (best val_acc)",
                   "lodo": "leave-one-domain-out validation (best mean lodo_acc)",
                   "oracle": "ORACLE (each trial's last step; best test_out_acc)"}


def render_markdown(results: dict, selection: str | None = None) -> str:
    lines = [render_text(results, selection)]
    for sel in _order(results, selection):
        sels = results["selected"][sel]
        lines += ["", f"### Selected (trial, step) per test domain and seed: {SELECTED_TITLES[sel]}", ""]
        if not sels:
            lines.append("None" + (f": {lodo_note(results)}" if sel == "lodo" and lodo_note(results) else "."))
            continue
        lines += ["| Method | Test domain | Seed | Trial | Step | val_acc | lodo_acc | test_acc | test_out_acc "
                  "| Params |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in sels:
            params = ", ".join(f"{k}={_short(v)}" for k, v in (s["params"] or {}).items()) or "–"
            lines.append(f"| {s['method_group']} | {s['test_domain']} | {s['seed']} | {s['trial_id']} "
                         f"| {s['step']} | {_fmt(s['val_acc'])} | {_fmt(s.get(LODO_METRIC))} "
                         f"| {_fmt(s['test_acc'])} | {_fmt(s['test_out_acc'])} | {params} |")
    if results.get("failures"):
        lines += ["", "### Failed trials", ""]
        lines += [f"- {f['search']} / {f['trial_id']} ({f['method']}): {f['error']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


CSV_FIELDS = ["selection", "method_group", "sweep", "test_domain", "seed", "trial_id", "step", "method",
              "val_acc", "test_acc", "test_out_acc", "params", "checkpoint_path", "train_run", "mlflow_run_id"]


def render_csv(results: dict) -> str:
    """One line per selected (trial, step): selection (validation / lodo / oracle), method row, test domain, seed,
    ..."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for selection, sels in results["selected"].items():
        for s in sels:
            w.writerow({**{k: s.get(k) for k in CSV_FIELDS}, "selection": selection,
                        "params": json.dumps(s.get("params") or {}, sort_keys=True)})
    return buf.getvalue()


def write(results: dict, out_dir: str | Path, selection: str | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.md", out_dir / "results.csv", out_dir / "results.json"]
    paths[0].write_text(render_markdown(results, selection))
    paths[1].write_text(render_csv(results))
    paths[2].write_text(json.dumps(results, indent=2, default=str))
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="SWEEP_DIR", help="<storage>/<sweep name> of finished or "
                                                                      "running sweeps (methods side by side)")
    parser.add_argument("--out", metavar="DIR", help="write results.md/csv/json and plots/ there")
    parser.add_argument("--selection", choices=list(CLI_SELECTIONS), default="val",
                        help="the main table, printed first: training-domain validation (val, default), "
                             "leave-one-domain-out validation (lodo) or the test-domain oracle (oracle); "
                             "results.md/json/csv hold all three")
    parser.add_argument("--error", choices=list(ERRORS), default="se",
                        help="the ± over seeds: standard error std/sqrt(n) (se, default, DomainBed's) or the "
                             "sample std (std)")
    args = parser.parse_args(argv)
    try:
        results = build_from_dirs(args.paths, error=args.error, selection=CLI_SELECTIONS[args.selection])
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_text(results))
    if args.out:
        from . import plots

        rows = [r for p in args.paths for r in load_rows(p)]
        write(results, args.out)
        plots.make_all(results, rows, Path(args.out) / "plots")
        print(f"\nwrote {args.out}/results.md, results.csv, results.json, plots/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
