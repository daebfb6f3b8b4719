"""The report's renderings of ``distill.report.build``'s results: markdown (results.md, and what the CLI prints), the
results table as CSV (results.csv), the selected (trial, step)s as CSV (selections.csv) and LaTeX (results.tex,
DomainBed's ``collect_results.py --latex`` style). ``distill.report`` re-exports the public names."""
from __future__ import annotations

import csv
import io
import json
from typing import Any

from .selection import ERRORS, LODO_METRIC, SELECTIONS

CLI_SELECTIONS = {"val": "validation", "lodo": "lodo", "oracle": "oracle"}  # --selection -> key of SELECTIONS
LATEX_NAMES = {"validation": "training-domain validation set", "lodo": "leave-one-domain-out cross-validation",
               "oracle": "test-domain validation set (oracle)"}   # DomainBed's names of its selection methods
NO_LODO = "no leave-one-domain-out runs (`search.lodo: true` produces them)"
GAP_TITLE = ("Selection gap: oracle minus training-domain validation, percentage points (the mean over seeds; "
             "positive: validation missed a better model)")


# ----------------------------------------------------------------------------------------------------- markdown
def _pct(cell: dict | None, error: str = "se") -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    err = cell.get(error)
    return text + (f" ± {100 * err:.1f}" if err is not None else "")


def _acc(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _error_phrase(results: dict) -> str:
    """E.g. "mean ± standard error over 3 seeds [0, 1, 2]"; names the error bar even with one seed (no ± then)."""
    n = len(results["seeds"])
    name = ERRORS[results.get("error", "se")]
    return (f"mean ± {name} over {n} seed{'s' if n != 1 else ''} {results['seeds']}"
            + (", so no ±" if n == 1 else "") + "; Avg = mean over test domains")


def _teacher_rows(results: dict) -> list[tuple[str, list[float | None], float | None]]:
    """(label, accuracy per test domain, their mean) of each teacher."""
    return [(t["label"], [t["zero_shot"].get(d) for d in results["domains"]], t.get("mean"))
            for t in results.get("teacher") or []]


def _md_table(results: dict, selection: str) -> list[str]:
    domains = results["domains"]
    error = results.get("error", "se")
    lines = ["| Method | " + " | ".join(domains) + " | Avg |", "|---" * (len(domains) + 2) + "|"]
    for row in results["table"][selection]:
        label = row["method"] + (" (oracle)" if selection == "oracle" else "")
        lines.append(f"| {label} | " + " | ".join(_pct(row["domains"].get(d), error) for d in domains)
                     + f" | {_pct(row['avg'], error)} |")
    for label, accs, mean in _teacher_rows(results):
        lines.append(f"| {label} | " + " | ".join(_acc(a) for a in accs) + f" | {_acc(mean)} |")
    return lines


def _gap_table(results: dict) -> list[str]:
    domains = results["domains"]

    def pp(v):
        return "–" if v is None else f"{100 * v:+.1f}"

    lines = ["| Method | " + " | ".join(domains) + " | Avg |", "|---" * (len(domains) + 2) + "|"]
    for g in results.get("gap") or []:
        lines.append(f"| {g['method']} | " + " | ".join(pp(g["domains"].get(d)) for d in domains)
                     + f" | {pp(g['avg'])} |")
    return lines


def _paired_table(results: dict) -> list[str]:
    domains = results["domains"]

    def pp(v):
        return "–" if v is None else f"{100 * v:+.1f}"

    lines = ["| Method | " + " | ".join(domains) + " | Avg | wins / losses of pairs | source val |",
             "|---" * (len(domains) + 4) + "|"]
    for r in results["paired"]["rows"]:
        sv = _acc(r["source_val"])
        if r["is_baseline"]:
            lines.append(f"| {r['method']} (baseline) | " + " | ".join("0" for _ in domains) + f" | 0 | – | {sv} |")
            continue
        avg = r["avg"]
        cell = pp(avg["mean"]) + (f" ± {100 * avg['err']:.1f}" if avg["err"] is not None else "")
        lines.append(f"| {r['method']} | " + " | ".join(pp(r["domains"].get(d)) for d in domains)
                     + f" | {cell} | {r['wins']} / {r['losses']} of {r['pairs']} | {sv} |")
    return lines


def chance_phrase(results: dict, pct: str = "%") -> str | None:
    """E.g. "chance level 14.3% (1/7 classes)"; None when unknown."""
    chance = results.get("chance")
    if chance is None:
        return None
    n = 1 / chance
    return f"chance level {100 * chance:.1f}{pct}" + (f" (1/{round(n)} classes)" if abs(n - round(n)) < 1e-6 else "")


def teacher_note(results: dict) -> str | None:
    """The teacher(s) and the chance level, one sentence; None when neither is known."""
    parts = []
    for t in results.get("teacher") or []:
        parts.append(f"{t['label']}: `{t.get('teacher')}`"
                     + (f", prompts: {t['prompts']}" if t.get("prompts") else "")
                     + (f" (sweep{'s' if len(t['sweeps']) > 1 else ''} {', '.join(t['sweeps'])})"
                        if len(results["sweeps"]) > 1 else ""))
    if chance_phrase(results):
        parts.append(chance_phrase(results))
    if not parts:
        return None
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


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


DOCS = "docs/selection.md"   # the docs site's page on model selection (in the repository; `mkdocs serve` shows it)
ANCHORS = {"validation": "training-domain-validation", "lodo": "leave-one-domain-out", "oracle": "test-domain-oracle",
           "paired": "paired-comparison"}
HEADS = {"validation": "Training-domain validation",
         "lodo": "Leave-one-domain-out validation",
         "oracle": "Test-domain oracle (not a model selection)"}
RULES = {"validation": "the (trial, step) with the best source-domain validation accuracy.",
         "lodo": "the (trial, step) whose leave-one-domain-out models (each source domain also held out of training) "
                 "are the most accurate on the held-out source, on average.",
         "oracle": "each trial's last evaluation, the most accurate on the held-out domain's 20%: it shows how much a "
                   "valid selection leaves on the table."}


def _doc(key: str) -> str:
    return f"(`{DOCS}#{ANCHORS[key]}`)"


def _all_empty(results: dict, selection: str) -> bool:
    return all(row["avg"]["mean"] is None and not row["domains"] for row in results["table"][selection])


def _counts_line(results: dict) -> str:
    counts = results["counts"]
    collapsed = ", ".join(f"{m} {c['collapsed']}/{c['trials']}" for m, c in results.get("ends_by_method", {}).items()
                          if c["collapsed"])
    return (f"{counts['trials']} trials, {counts['rows']} evaluation rows"
            + (f", {counts['lodo_rows']} leave-one-domain-out rows" if counts.get("lodo_rows") else "")
            + (f", {counts['early_stopped']} stopped early (ASHA)" if counts.get("early_stopped") else "")
            + (f", {counts['collapsed']} collapsed (stopped at chance: {collapsed})" if counts.get("collapsed")
               else "")
            + (f", {counts['failed']} failed" if counts.get("failed") else "") + ".")


def render_text(results: dict, selection: str | None = None, main_only: bool = False) -> str:
    """The tables as markdown, the main one first: `selection` (default: the results' main selection, else
    training-domain validation) with the paired comparison under it, then the other selections and the selection
    gap. Each selection says its rule in one line, with the docs page that explains it; a table whose every cell is
    empty (no leave-one-domain-out runs) is left out, and one line says why and how to get it. `main_only`: the
    main table and the paired comparison only (the sweep's MLflow experiment description)."""
    order = _order(results, selection)
    out = [f"## {', '.join(results['sweeps'])}: test-domain accuracy (%)", "",
           f"Cells: {_error_phrase(results)}. {_counts_line(results)}"]
    for i, sel in enumerate(order):
        if _all_empty(results, sel):
            why = ("no leave-one-domain-out runs in this sweep: `search.lodo: true` trains the models it needs"
                   if sel == "lodo" and lodo_note(results) else "no model could be selected")
            out += ["", f"**{HEADS[sel]}**: no table ({why}) {_doc(sel)}."]
            continue
        out += ["", f"**{HEADS[sel]}**{' (the main table)' if i == 0 else ''}: {RULES[sel]} {_doc(sel)}", ""]
        if sel == "lodo" and lodo_note(results):
            out += [lodo_note(results), ""]
        out += _md_table(results, sel)
        if i == 0 and main_only:
            if results.get("paired"):
                out += ["", f"**Paired against {results['paired']['baseline']}** (percentage points; wins / losses of "
                            f"the (domain, seed) pairs; source val %)", ""] + _paired_table(results)
            break
        if i == 0 and results.get("paired"):
            base = results["paired"]["baseline"]
            out += ["", f"**Paired against {base}**: each method's selected model minus {base}'s on the same held-out "
                        f"domain and seed (percentage points); Avg ± {results.get('error_name', 'standard error')} "
                        f"over seeds; wins / losses of the (domain, seed) pairs; source val: the selected models' mean "
                        f"source-domain validation (%). {_doc('paired')}", ""] + _paired_table(results)
    if results.get("gap") and any(g["avg"] is not None or any(v is not None for v in g["domains"].values())
                                  for g in results["gap"]):
        out += ["", f"**{GAP_TITLE}**", ""] + _gap_table(results)
    if teacher_note(results):
        out += ["", teacher_note(results)]
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


# ---------------------------------------------------------------------------------------------------------- CSV
SELECTION_FIELDS = ["selection", "method_group", "sweep", "test_domain", "seed", "trial_id", "trial_index", "step",
                    "method", "val_acc", "lodo_acc", "test_acc", "test_out_acc", "params", "checkpoint_path",
                    "train_run", "mlflow_run_id"]


def render_selections_csv(results: dict) -> str:
    """selections.csv: one line per selected (trial, step): selection (validation / lodo / oracle), method row, test
    domain, seed, trial (id and creation index), step, its accuracies (fractions), params (JSON), checkpoint, runs."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SELECTION_FIELDS)
    w.writeheader()
    for selection, sels in results["selected"].items():
        for s in sels:
            w.writerow({**{k: s.get(k) for k in SELECTION_FIELDS}, "selection": selection,
                        "params": json.dumps(s.get("params") or {}, sort_keys=True)})
    return buf.getvalue()


def _num(v: float | None) -> float | None:
    """A fraction for the CSV: rounded to 6 decimals (0.0001 percentage points), so 0.85 is not 0.8500000000000001."""
    return None if v is None else round(v, 6)


def table_fields(results: dict) -> list[str]:
    return ["selection", "method", "sweep", *(f"{d}_{k}" for d in results["domains"] for k in ("mean", "err")),
            "avg_mean", "avg_err", "n_seeds", "error"]


def render_csv(results: dict) -> str:
    """results.csv, the results table: one line per (selection, method row), selections validation, lodo, oracle
    (each row: per-domain mean and error over seeds, Avg's, n_seeds = the seeds with a selected model in some test
    domain, the error kind se|std), then `gap` lines (oracle mean minus validation mean; no error) and, with a
    teacher.json, `zero-shot` lines (the teacher's accuracies). Accuracies as fractions rounded to 6 decimals; an
    empty field: no value."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=table_fields(results))
    w.writeheader()
    error = results.get("error", "se")
    for selection in SELECTIONS:
        for row in results["table"][selection]:
            line = {"selection": selection, "method": row["method"], "sweep": row["sweep"], "error": error,
                    "avg_mean": _num(row["avg"]["mean"]), "avg_err": _num(row["avg"].get("err")),
                    "n_seeds": len({s for c in row["domains"].values() for s in c["seeds"]})}
            for d, c in row["domains"].items():
                line[f"{d}_mean"], line[f"{d}_err"] = _num(c["mean"]), _num(c.get("err"))
            w.writerow(line)
    for g in results.get("gap") or []:
        w.writerow({"selection": "gap", "method": g["method"], "sweep": g["sweep"], "avg_mean": _num(g["avg"]),
                    **{f"{d}_mean": _num(v) for d, v in g["domains"].items()}})
    for t in results.get("teacher") or []:
        w.writerow({"selection": "zero-shot", "method": t["label"], "sweep": " ".join(t["sweeps"]),
                    "avg_mean": _num(t.get("mean")),
                    **{f"{d}_mean": _num(t["zero_shot"][d]) for d in results["domains"] if d in t["zero_shot"]}})
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- LaTeX
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "−": "--"}


def tex(text: Any) -> str:
    return "".join(_TEX.get(c, c) for c in str(text))


def _tex_cell(cell: dict | None, error: str) -> str:
    """DomainBed's format_mean: "mean $\\pm$ err" in %, one decimal; no error with one seed; X: no value."""
    if not cell or cell.get("mean") is None:
        return "X"
    err = cell.get(error)
    return f"{100 * cell['mean']:.1f}" + (f" $\\pm$ {100 * err:.1f}" if err is not None else "")


def latex_table(results: dict, selection: str) -> list[str]:
    """One table (booktabs, in an adjustbox as DomainBed's): method rows, the teacher's after a rule."""
    domains, error = results["domains"], results.get("error", "se")
    n = len(results["seeds"])
    caption = (f"{tex(', '.join(results['sweeps']))}: test-domain accuracy (\\%). Model selection: "
               f"{LATEX_NAMES[selection]}. Mean $\\pm$ {ERRORS[error]} over {n} seed{'s' if n != 1 else ''}"
               + (" (no error with one seed)" if n == 1 else "") + "; Avg: mean over test domains."
               + (f" {tex(chance_phrase(results)).capitalize()}." if chance_phrase(results) else "")
               + (f" {tex(lodo_note(results).replace('`', ''))}" if selection == "lodo" and lodo_note(results)
                  else ""))
    lines = ["\\begin{table}[ht]", "\\centering", f"\\caption{{{caption}}}",
             f"\\label{{tab:{selection}}}", "\\adjustbox{max width=\\textwidth}{%",
             "\\begin{tabular}{l" + "c" * (len(domains) + 1) + "}", "\\toprule",
             " & ".join(f"\\textbf{{{tex(c)}}}" for c in ["Method", *domains, "Avg"]) + " \\\\", "\\midrule"]
    for row in results["table"][selection]:
        label = row["method"] + (" (oracle)" if selection == "oracle" else "")
        cells = [_tex_cell(row["domains"].get(d), error) for d in domains] + [_tex_cell(row["avg"], error)]
        lines.append(" & ".join([tex(label), *cells]) + " \\\\")
    teachers = _teacher_rows(results)
    if teachers:
        lines.append("\\midrule")
    for label, accs, mean in teachers:
        cells = [_tex_cell({"mean": a}, error) for a in [*accs, mean]]
        lines.append(" & ".join([tex(label), *cells]) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]


def render_latex(results: dict, selection: str | None = None) -> str:
    """A LaTeX document (article, booktabs, adjustbox) with one table per selection, `selection` first (as the
    markdown); the tables can be pasted into a paper whose preamble loads booktabs and adjustbox."""
    counts = results["counts"]
    lines = ["\\documentclass{article}", "\\usepackage{booktabs}", "\\usepackage{adjustbox}",
             "\\begin{document}",
             f"% distill.report: {', '.join(results['sweeps'])}; {counts['trials']} trials, {counts['rows']} rows"]
    for sel in _order(results, selection):
        lines += ["", *latex_table(results, sel)]
    return "\n".join([*lines, "", "\\end{document}"]) + "\n"
