"""Model selection (DomainBed's three methods) and the table: ``python -m distill.report SWEEP_DIR... [--out DIR]
[--selection val|lodo|oracle] [--error se|std] [--latex]``.

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

Ties (all three) go to the earlier trial, then the earlier step; "earlier trial" is the sweep's creation order: the
rows' ``trial_index`` where they carry it, else the counter at the end of the Tune trial id (``selection.py``). Each
cell is the mean over seeds ± the standard error (std/sqrt(n), DomainBed's; ``--error std``: the sample std); Avg is
the mean over test domains, its error that of the per-seed averages. When a sweep searched ``method.name``, every
method is selected on its own trials and, in the last row, over all of them. Several sweep dirs are put side by side
(one row per method and sweep). The selection gap is the oracle's mean minus training-domain validation's, per test
domain and Avg. A sweep's ``teacher.json`` (``{"teacher", "zero_shot": {domain: accuracy}, "prompts", "chance"}``)
adds the teacher's zero-shot row and the chance level; without it the chance level comes from plan.json's dataset
when it can be known.

Files (``write``): results.md (the tables, the gap, the selected (trial, step)s), results.csv (the table: one line per
(selection, method row)), selections.csv (one line per selected (trial, step)), results.json (everything), results.tex
(the tables in LaTeX). Rendering: ``distill.report_render``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Iterable

from .report_render import (CLI_SELECTIONS, GAP_TITLE, LATEX_NAMES, NO_LODO,  # noqa: F401
                             SELECTED_TITLES, SELECTION_FIELDS, latex_table, lodo_note, render_csv,
                             render_latex, render_markdown, render_selections_csv, render_text, table_fields,
                             teacher_note, tex)
from .selection import (ERRORS, LODO_DIR, LODO_EVENT, LODO_METRIC, ORACLE_METRIC, REPORTED,  # noqa: F401
                        SELECTION_METRIC, SELECTIONS, TEACHER_FILE, TRIAL_INDEX, _json, _value, creation_order, dedupe,
                        dedupe_lodo, last_rows, load_events, load_lodo_rows, load_rows, load_teacher, lodo_candidates,
                        lodo_index, normalise_teacher, plan_chance, read_jsonl, select, select_cell, selectable,
                        source_domains, trial_index, trial_order)


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


def build(sweeps: list[dict], error: str = "se", selection: str = "validation", baseline: str | None = "erm") -> dict:
    """sweeps: [{"name", "rows", "lodo" (lodo rows, optional), "plan" (plan.json or {}), "runs" ({train run: MLflow
    run id}), "events", "teacher" (teacher.json or None, optional)}]. `error`: the error bar (a key of ERRORS);
    `selection`: the main table (a key of SELECTIONS), recorded for the renderers.

    `baseline`: the method row the others are compared with, pair by pair, under the main selection (`paired`; None
    when no row has that label).

    Returns (accuracies as fractions) `table` and `selected` per selection, `gap` (oracle minus validation per method
    row, domain and Avg), `paired` (see `_paired`), `teacher` (a list: one entry per distinct teacher.json, see
    `_teachers`), `chance` (1/#classes or None), the domains, seeds, groups, counts and failures."""
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
                    "selection_metric": metric, "trial_id": best.get("trial_id"),
                    "trial_index": trial_index(best), "step": best.get("step"),
                    "method": best.get("method"), "params": best.get("params") or {},
                    "val_acc": best.get(SELECTION_METRIC), "test_acc": best.get(REPORTED),
                    "test_out_acc": best.get(ORACLE_METRIC),
                    **({LODO_METRIC: best[LODO_METRIC], "lodo_accs": best["lodo_accs"]} if sel_name == "lodo"
                       else {}),
                    "eval_model": best.get("eval_model"), "stage": best.get("stage"), "final": best.get("final"),
                    "checkpoint_path": best.get("checkpoint_path"),
                    "train_run": best.get("train_run"), "mlflow_run_id": g["runs"].get(best.get("train_run"))})
            cells = {d: {**_stats(list(accs[d].values()), error), "seeds": accs[d]}
                     for d in domains if d in accs}
            avg = _stats([], error)
            if cells and all(d in cells for d in domains):
                common = set.intersection(*(set(c["seeds"]) for c in cells.values()))
                per_seed = [statistics.fmean(cells[d]["seeds"][s] for d in domains) for s in sorted(common)]
                avg = {**_stats(per_seed, error), "mean": statistics.fmean(c["mean"] for c in cells.values())}
            table[sel_name].append({"method": g["label"], "sweep": g["sweep"], "overall": g["overall"],
                                    "domains": cells, "avg": avg})
    teachers, chance = _teachers(sweeps, domains)
    trials = {(sw["name"], r.get("search"), r.get("trial_id")) for sw in sweeps for r in sw["rows"]}
    events = [e for sw in sweeps for e in sw.get("events") or []]
    return {
        "sweeps": [sw["name"] for sw in sweeps], "domains": domains, "seeds": seeds,
        "selection_metric": SELECTION_METRIC, "lodo_metric": LODO_METRIC, "oracle_metric": ORACLE_METRIC,
        "reported": REPORTED, "selection_metrics": dict(SELECTIONS), "main_selection": selection,
        "error": error, "error_name": ERRORS[error],
        "groups": [{k: v for k, v in g.items() if k not in ("rows", "runs", "lodo_index")} for g in groups],
        "table": table, "selected": selected, "gap": _gap(table), "teacher": teachers, "chance": chance,
        "paired": _paired(table[selection], selected[selection], baseline, domains, error, selection),
        "lodo_rows": {sw["name"]: len(sw.get("lodo") or []) for sw in sweeps},
        "counts": {"trials": len(trials), "rows": sum(len(sw["rows"]) for sw in sweeps),
                   "lodo_rows": sum(len(sw.get("lodo") or []) for sw in sweeps),
                   "early_stopped": sum(e.get("status") == "early_stopped" for e in events),
                   "collapsed": sum(e.get("status") == "collapsed" for e in events),
                   "failed": sum(e.get("status") == "error" for e in events)},
        "ends_by_method": ends_by_method(events),
        "failures": [{"search": e.get("search"), "trial_id": e.get("trial_id"), "method": e.get("method"),
                      "error": e.get("error")} for e in events if e.get("status") == "error"],
    }


def ends_by_method(events: list[dict]) -> dict[str, dict[str, int]]:
    """method -> {trials, completed, early_stopped (ASHA), collapsed (train.stop_collapsed), failed}: how each
    method's trials ended (the last `end` event of each)."""
    out: dict[str, dict[str, int]] = {}
    for e in events:
        counts = out.setdefault(str(e.get("method")), {"trials": 0, "completed": 0, "early_stopped": 0,
                                                        "collapsed": 0, "failed": 0})
        counts["trials"] += 1
        status = "failed" if e.get("status") == "error" else e.get("status")
        if status in counts:
            counts[status] += 1
    return dict(sorted(out.items()))


def _gap(table: dict[str, list]) -> list[dict]:
    """Per method row: the oracle's mean minus training-domain validation's, per test domain both have and for Avg
    (None where either is missing). Fractions."""
    out = []
    for val in table["validation"]:
        orc = next(r for r in table["oracle"] if r["method"] == val["method"])
        doms = {d: orc["domains"][d]["mean"] - c["mean"] for d, c in val["domains"].items() if d in orc["domains"]}
        avg = (orc["avg"]["mean"] - val["avg"]["mean"]
               if orc["avg"]["mean"] is not None and val["avg"]["mean"] is not None else None)
        out.append({"method": val["method"], "sweep": val["sweep"], "overall": val["overall"], "domains": doms,
                    "avg": avg})
    return out


def _paired(rows: list[dict], selected: list[dict], baseline: str | None, domains: list[str], error: str,
            selection: str) -> dict | None:
    """Each method row against the `baseline` row, on the same (test domain, seed) pairs (a paired comparison: the
    split, the world and the seed are shared, so the pair's difference is the method's effect there). Per row:
    `domains` (mean difference per test domain), `avg` (stats over seeds of the per-seed Avg difference, seeds
    with every domain on both sides), `wins` / `losses` / `pairs` (pairs where the row is above / below the
    baseline), and `source_val` (the mean source-domain validation accuracy of the row's selected models; the
    baseline row carries it too). Fractions. None without a baseline row."""
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is None:
        return None
    vals: dict[str, list[float]] = {}
    for s in selected:
        if isinstance(s.get("val_acc"), (int, float)):
            vals.setdefault(s["method_group"], []).append(float(s["val_acc"]))
    out = []
    for r in rows:
        diffs = {(d, seed): acc - base["domains"][d]["seeds"][seed]
                 for d in domains if d in r["domains"] and d in base["domains"]
                 for seed, acc in r["domains"][d]["seeds"].items() if seed in base["domains"][d]["seeds"]}
        seeds = sorted({seed for _, seed in diffs})
        full = [seed for seed in seeds if all((d, seed) in diffs for d in domains)]
        out.append({
            "method": r["method"], "sweep": r["sweep"], "is_baseline": r is base,
            "domains": {d: statistics.fmean(v for (dd, _), v in diffs.items() if dd == d)
                        for d in domains if any(dd == d for dd, _ in diffs)},
            "avg": _stats([statistics.fmean(diffs[(d, seed)] for d in domains) for seed in full], error),
            "wins": sum(v > 1e-12 for v in diffs.values()), "losses": sum(v < -1e-12 for v in diffs.values()),
            "pairs": len(diffs),
            "source_val": statistics.fmean(vals[r["method"]]) if vals.get(r["method"]) else None})
    return {"baseline": baseline, "selection": selection, "rows": out}


def _teachers(sweeps: list[dict], domains: list[str]) -> tuple[list[dict], float | None]:
    """The sweeps' teachers (one entry per distinct teacher.json content, naming its sweeps), each with `label`
    ("teacher (zero-shot)", the sweeps in brackets when several differ), `teacher`, `prompts`, `zero_shot`
    ({domain: accuracy}) and `mean` (over the table's test domains, None unless it has them all); and the chance
    level: teacher.json's `chance`, else 1/#classes of plan.json's dataset; None when unknown or when the sweeps
    disagree."""
    teachers: list[dict] = []
    chances = set()
    for sw in sweeps:
        t = normalise_teacher(sw.get("teacher"))
        chance = (t or {}).get("chance") or plan_chance(sw.get("plan") or {})
        if chance is not None:
            chances.add(round(chance, 12))
        if not t:
            continue
        same = next((e for e in teachers if (e["teacher"], e["prompts"], e["zero_shot"])
                     == (t.get("teacher"), t.get("prompts"), t["zero_shot"])), None)
        if same:
            same["sweeps"].append(sw["name"])
            continue
        ds = domains or list(t["zero_shot"])
        mean = statistics.fmean(t["zero_shot"][d] for d in ds) if ds and all(d in t["zero_shot"] for d in ds) \
            else None
        teachers.append({"label": "teacher (zero-shot)", "teacher": t.get("teacher"), "prompts": t.get("prompts"),
                         "zero_shot": t["zero_shot"], "mean": mean, "sweeps": [sw["name"]]})
    if len(teachers) > 1:
        for e in teachers:
            e["label"] = f"teacher (zero-shot) [{', '.join(e['sweeps'])}]"
    return teachers, (chances.pop() if len(chances) == 1 else None)


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "trials.jsonl").is_file():
        raise FileNotFoundError(f"{path}: no trials.jsonl (is it a sweep directory, <storage>/<sweep name>?)")
    plan = _json(path / "plan.json")
    raw = read_jsonl(path / "trials.jsonl")
    return {"name": plan.get("sweep") or path.name, "rows": dedupe(raw), "lodo": load_lodo_rows(path), "plan": plan,
            "runs": _json(path / "runs.json"), "events": load_events(path), "teacher": load_teacher(path)}


def build_from_dirs(paths: Iterable[str | Path], error: str = "se", selection: str = "validation",
                    baseline: str | None = "erm") -> dict:
    return build([load_sweep(p) for p in paths], error=error, selection=selection, baseline=baseline)


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
def write(results: dict, out_dir: str | Path, selection: str | None = None) -> list[Path]:
    """results.md, results.csv (the table), selections.csv (the selected (trial, step)s), results.json, results.tex."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {"results.md": render_markdown(results, selection), "results.csv": render_csv(results),
             "selections.csv": render_selections_csv(results),
             "results.json": json.dumps(results, indent=2, default=str),
             "results.tex": render_latex(results, selection)}
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return [out_dir / name for name in texts]


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None, prog: str = "python -m distill.report") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Select models (training-domain validation, leave-one-domain-out, oracle) and build the "
                               "DomainBed tables and plots of one or more sweeps.",
        epilog="examples:\n  distill report distill_runs/demo\n"
               "  distill report distill_runs/compare-* --out docs/evidence/compare --latex",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="SWEEP_DIR", help="<storage>/<sweep name> of finished or "
                                                                      "running sweeps (methods side by side)")
    parser.add_argument("--out", metavar="DIR", help="write results.md, results.csv (the table), selections.csv, "
                                                     "results.json, results.tex and plots/ there")
    parser.add_argument("--selection", choices=list(CLI_SELECTIONS), default="val",
                        help="the main table, printed first: training-domain validation (val, default), "
                             "leave-one-domain-out validation (lodo) or the test-domain oracle (oracle); "
                             "the files hold all three")
    parser.add_argument("--error", choices=list(ERRORS), default="se",
                        help="the ± over seeds: standard error std/sqrt(n) (se, default, DomainBed's) or the "
                             "sample std (std)")
    parser.add_argument("--latex", action="store_true",
                        help="also print the tables as LaTeX (DomainBed's collect_results.py --latex: booktabs, one "
                             "table per selection); --out writes results.tex either way")
    parser.add_argument("--baseline", metavar="METHOD", default=None,
                        help="the method row the others are compared with pair by pair (same held-out domain and "
                             "seed: mean difference, wins/losses, source validation); default erm when the table "
                             "has an erm row; none: no paired table")
    args = parser.parse_args(argv)
    baseline = None if args.baseline == "none" else (args.baseline or "erm")
    try:
        results = build_from_dirs(args.paths, error=args.error, selection=CLI_SELECTIONS[args.selection],
                                  baseline=baseline)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.baseline not in (None, "none") and results["paired"] is None:
        labels = [r["method"] for r in results["table"]["validation"]]
        print(f"error: --baseline {args.baseline!r} is not a method row of these sweeps; one of {labels}",
              file=sys.stderr)
        return 2
    print(render_text(results))
    if args.latex:
        print("\n" + render_latex(results), end="")
    if args.out:
        from . import plots

        rows = [r for p in args.paths for r in load_rows(p)]
        write(results, args.out)
        plots.make_all(results, rows, Path(args.out) / "plots")
        print(f"\nwrote {args.out}/results.md, results.csv, selections.csv, results.json, results.tex, plots/")
    for line in mlflow_links(args.paths):
        print(line)
    return 0


def mlflow_links(paths) -> list[str]:
    """Each sweep's MLflow link (its plan.json names the store), where the store is here to ask for the experiment:
    `distill ui STORAGE`, then the page that opens on the selected trials."""
    from . import tracking

    lines = []
    for path in paths:
        plan = _json(Path(path) / "plan.json")
        uri, name = plan.get("tracking_uri"), plan.get("sweep")
        if not uri or not name or (uri.startswith(tracking.SQLITE) and not Path(uri[len(tracking.SQLITE):]).is_file()):
            continue
        try:
            exp = tracking.client(uri).get_experiment_by_name(name)
        except Exception:  # noqa: BLE001 - an unreachable store: no link
            continue
        if exp is None:
            continue
        lines.append(f"MLflow ({name}): {tracking.open_sweep(uri, str(plan.get('storage')), exp.experiment_id)}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
