"""Model selection and the DomainBed-style table: ``python -m distill.report SWEEP_DIR... [--out DIR]``.

Input: the evaluation rows the sweep driver wrote to ``<storage>/<sweep>/trials.jsonl`` (one row per trial and
evaluation step: ``val_acc`` = mean source-domain validation accuracy, ``test_acc`` = test domain, in-split,
``test_out_acc`` = test domain, its held-out 20%, plus the trial's method and sampled params).

Per (test domain, seed), over every trial and every evaluated step:

- training-domain validation (DomainBed): the (trial, step) with the best ``val_acc``; we report its ``test_acc``.
- oracle: the (trial, step) with the best ``test_out_acc``; we report its ``test_acc``. It looks at the test domain,
  so it is not a model-selection method: it is printed apart, labelled, to show the selection gap.

Ties go to the earlier trial, then the earlier step. Each cell is the mean (± the sample std) over seeds; Avg is the
mean over test domains. When a sweep searched ``method.name``, every method is selected on its own trials and,
in the last row, over all of them. Several sweep dirs are put side by side (one row per method and sweep).
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

SELECTION_METRIC = "val_acc"
ORACLE_METRIC = "test_out_acc"
REPORTED = "test_acc"
SELECTIONS = {"validation": SELECTION_METRIC, "oracle": ORACLE_METRIC}
TITLES = {
    "validation": "Training-domain validation: the (trial, step) with the best source-domain validation accuracy "
                  "(DomainBed's model selection)",
    "oracle": "ORACLE, selected on the test domain (the (trial, step) with the best accuracy on the test domain's "
              "held-out 20%): not a valid model selection, shown to expose the selection gap",
}


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


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """Evaluation rows, one per (search, trial, step): a trial resumed from a checkpoint may report a step again;
    the last report wins. Sorted by search, trial creation order, step."""
    out: dict[tuple, dict] = {}
    for row in rows:
        if row.get("event", "eval") != "eval" or row.get("step") is None:
            continue
        out[(row.get("sweep"), row.get("search"), row.get("trial_id"), row.get("step"))] = row
    return sorted(out.values(), key=lambda r: (str(r.get("sweep")), str(r.get("search")),
                                                trial_order(r.get("trial_id")), r.get("step")))


def load_rows(sweep_dir: str | Path) -> list[dict]:
    return dedupe(read_jsonl(Path(sweep_dir) / "trials.jsonl"))


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


# ----------------------------------------------------------------------------------------------------- selection
def _value(row: dict, metric: str) -> float | None:
    v = row.get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def select(rows: Iterable[dict], metric: str = SELECTION_METRIC) -> dict | None:
    """The row with the highest `metric`; ties: the earlier trial, then the earlier step."""
    best, best_key = None, None
    for row in rows:
        v = _value(row, metric)
        if v is None:
            continue
        key = (-v, trial_order(row.get("trial_id")), row.get("step"))
        if best_key is None or key < best_key:
            best, best_key = row, key
    return best


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


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


def build(sweeps: list[dict]) -> dict:
    """sweeps: [{"name", "rows", "plan" (plan.json or {}), "runs" ({train run: MLflow run id}), "events"}].

    Returns the selections and the table (accuracies as fractions)."""
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
        for g in _groups(rows, sw["name"], methods, bool(plan.get("method_searched"))):
            g["rows"], g["runs"] = [r for r in rows if r.get("method") in g["methods"]], sw.get("runs") or {}
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
        for selection, metric in SELECTIONS.items():
            accs: dict[str, dict[int, float]] = {}
            for (domain, seed), cell_rows in sorted(by_cell.items(), key=lambda kv: (domains.index(kv[0][0])
                                                                                     if kv[0][0] in domains else 99,
                                                                                     kv[0][1])):
                best = select(cell_rows, metric)
                if best is None or _value(best, REPORTED) is None:
                    continue
                accs.setdefault(domain, {})[seed] = float(best[REPORTED])
                selected[selection].append({
                    "method_group": g["label"], "sweep": g["sweep"], "test_domain": domain, "seed": seed,
                    "selection_metric": metric, "trial_id": best.get("trial_id"), "step": best.get("step"),
                    "method": best.get("method"), "params": best.get("params") or {},
                    "val_acc": best.get(SELECTION_METRIC), "test_acc": best.get(REPORTED),
                    "test_out_acc": best.get(ORACLE_METRIC), "checkpoint_path": best.get("checkpoint_path"),
                    "train_run": best.get("train_run"), "mlflow_run_id": g["runs"].get(best.get("train_run"))})
            cells = {d: {**_stats(list(accs[d].values())), "seeds": accs[d]} for d in domains if d in accs}
            avg = {"mean": None, "std": None, "n": 0}
            if cells and all(d in cells for d in domains):
                avg["mean"] = statistics.fmean(c["mean"] for c in cells.values())
                common = set.intersection(*(set(c["seeds"]) for c in cells.values()))
                per_seed = [statistics.fmean(cells[d]["seeds"][s] for d in domains) for s in sorted(common)]
                avg["std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else None
                avg["n"] = len(per_seed)
            table[selection].append({"method": g["label"], "sweep": g["sweep"], "overall": g["overall"],
                                     "domains": cells, "avg": avg})
    trials = {(sw["name"], r.get("search"), r.get("trial_id")) for sw in sweeps for r in sw["rows"]}
    events = [e for sw in sweeps for e in sw.get("events") or []]
    return {
        "sweeps": [sw["name"] for sw in sweeps], "domains": domains, "seeds": seeds,
        "selection_metric": SELECTION_METRIC, "oracle_metric": ORACLE_METRIC, "reported": REPORTED,
        "groups": [{k: v for k, v in g.items() if k not in ("rows", "runs")} for g in groups],
        "table": table, "selected": selected,
        "counts": {"trials": len(trials), "rows": sum(len(sw["rows"]) for sw in sweeps),
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
    return {"name": plan.get("sweep") or path.name, "rows": load_rows(path), "plan": plan,
            "runs": _json(path / "runs.json"), "events": load_events(path)}


def build_from_dirs(paths: Iterable[str | Path]) -> dict:
    return build([load_sweep(p) for p in paths])


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
def _pct(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    return text + (f" ± {100 * cell['std']:.1f}" if cell.get("std") is not None else "")


def _md_table(results: dict, selection: str) -> list[str]:
    domains = results["domains"]
    lines = ["| Method | " + " | ".join(domains) + " | Avg |", "|---" * (len(domains) + 2) + "|"]
    for row in results["table"][selection]:
        label = row["method"] + (" (oracle)" if selection == "oracle" else "")
        lines.append(f"| {label} | " + " | ".join(_pct(row["domains"].get(d)) for d in domains)
                     + f" | {_pct(row['avg'])} |")
    return lines


def render_text(results: dict) -> str:
    """The two tables (selection, oracle), as markdown."""
    n_seeds = len(results["seeds"])
    counts = results["counts"]
    out = [f"## {', '.join(results['sweeps'])}: test-domain accuracy (%), leave-one-domain-out", "",
           f"{counts['trials']} trials, {counts['rows']} evaluation rows"
           + (f", {counts['early_stopped']} stopped early (ASHA)" if counts.get("early_stopped") else "")
           + (f", {counts['failed']} failed" if counts.get("failed") else "")
           + f"; mean ± std over {n_seeds} seed(s) {results['seeds']} (no ± with one seed); "
             f"Avg = mean over test domains.", "",
           f"**{TITLES['validation']}**", "", *_md_table(results, "validation"), "",
           f"**{TITLES['oracle']}**", "", *_md_table(results, "oracle")]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def render_markdown(results: dict) -> str:
    lines = [render_text(results), "", "### Selected (trial, step) per test domain and seed", "",
             "| Selection | Method | Test domain | Seed | Trial | Step | val_acc | test_acc | test_out_acc | Params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for selection, sels in results["selected"].items():
        for s in sels:
            params = ", ".join(f"{k}={_short(v)}" for k, v in (s["params"] or {}).items()) or "–"
            lines.append(f"| {selection} | {s['method_group']} | {s['test_domain']} | {s['seed']} | {s['trial_id']} "
                         f"| {s['step']} | {_fmt(s['val_acc'])} | {_fmt(s['test_acc'])} | "
                         f"{_fmt(s['test_out_acc'])} | {params} |")
    if results.get("failures"):
        lines += ["", "### Failed trials", ""]
        lines += [f"- {f['search']} / {f['trial_id']} ({f['method']}): {f['error']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


CSV_FIELDS = ["selection", "method_group", "sweep", "test_domain", "seed", "trial_id", "step", "method",
              "val_acc", "test_acc", "test_out_acc", "params", "checkpoint_path", "train_run", "mlflow_run_id"]


def render_csv(results: dict) -> str:
    """One line per selected (trial, step): selection, method row, test domain, seed, ..."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for selection, sels in results["selected"].items():
        for s in sels:
            w.writerow({**{k: s.get(k) for k in CSV_FIELDS}, "selection": selection,
                        "params": json.dumps(s.get("params") or {}, sort_keys=True)})
    return buf.getvalue()


def write(results: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.md", out_dir / "results.csv", out_dir / "results.json"]
    paths[0].write_text(render_markdown(results))
    paths[1].write_text(render_csv(results))
    paths[2].write_text(json.dumps(results, indent=2, default=str))
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="SWEEP_DIR", help="<storage>/<sweep name> of finished or "
                                                                      "running sweeps (methods side by side)")
    parser.add_argument("--out", metavar="DIR", help="write results.md/csv/json and plots/ there")
    args = parser.parse_args(argv)
    try:
        results = build_from_dirs(args.paths)
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
