"""The fixed and the tuned comparison side by side: docs/evidence/tuned/fixed-vs-tuned.{md,json}.

Read from the three result files the reports wrote (nothing is re-run or re-selected): the fixed comparison
(docs/evidence/compare/ and compare-baselines/, every method at ERM's learning rate 3e-3) and the tuned one
(docs/evidence/tuned/results.json, each method searched). Per method: the held-out Avg of each, both paired against
their own ERM (fixed against fixed ERM, tuned against tuned ERM), what tuning changed (tuned minus fixed Avg), the
hyperparameters the selection picked in the 12 (held-out domain, seed) cells, and the trials stopped as collapsed.

    python docs/evidence/tuned/summary.py        # also run by run.py --report
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import median

OUT = Path(__file__).resolve().parent
EVIDENCE = OUT.parent
FIXED = (EVIDENCE / "compare" / "results.json", EVIDENCE / "compare-baselines" / "results.json")
EQUAL_STEPS = "tuned-erm-equal-steps"
README_COLUMNS = 6   # method, fixed Avg and vs ERM, tuned Avg and vs ERM, tuned - fixed


def label(sweep: str) -> str:
    """tuned-rise -> rise; the control row keeps its own name."""
    return "erm (equal steps)" if sweep == EQUAL_STEPS else sweep.split("-", 1)[1]


def _by_method(results: dict) -> dict[str, dict]:
    """method label -> Avg (mean, se), paired Avg against the file's baseline, pairs won / lost, source val."""
    out = {}
    paired = {r["sweep"]: r for r in results["paired"]["rows"]}
    for row in results["table"]["validation"]:
        name = label(row["sweep"])
        p = paired.get(row["sweep"], {})
        out[name] = {"avg": row["avg"]["mean"], "se": row["avg"]["se"], "paired": p.get("avg", {}).get("mean"),
                     "paired_se": p.get("avg", {}).get("se"), "wins": p.get("wins"), "losses": p.get("losses"),
                     "baseline": p.get("is_baseline", False), "source_val": p.get("source_val")}
    return out


def _fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def selected_params(results: dict) -> dict[str, dict[str, str]]:
    """sweep -> hyperparameter -> what training-domain validation picked over the 12 cells: the learning rate's
    median [min-max]; any other hyperparameter's most picked value (how many cells) or its median [min-max]."""
    cells: dict[str, list[dict]] = {}
    for s in results["selected"]["validation"]:
        cells.setdefault(s["sweep"], []).append(s["params"])
    out = {}
    for sweep, params in cells.items():
        keys = [k for k in params[0] if k != "method.name"]
        picked = {}
        for k in keys:
            values = [p[k] for p in params if k in p]
            top, n = Counter(values).most_common(1)[0]
            if isinstance(top, float) and (k == "train.lr" or n < len(values) / 2):
                picked[k] = f"{_fmt_value(median(values))} [{_fmt_value(min(values))}-{_fmt_value(max(values))}]"
            else:
                picked[k] = f"{_fmt_value(top)} ({n}/{len(values)})"
        out[sweep] = picked
    return out


def ends(sweep: str) -> dict[str, int]:
    """How the sweep's trials ended (the last `end` row of each in its kept trials.jsonl): trials, completed,
    collapsed (train.stop_collapsed), early_stopped, failed."""
    from distill.report import ends_by_method
    from distill.selection import load_events

    return ends_by_method([{**e, "method": sweep} for e in load_events(OUT / "sweeps" / sweep)]).get(sweep, {})


def build() -> dict:
    fixed: dict[str, dict] = {}
    for path in FIXED:
        fixed.update(_by_method(json.loads(path.read_text())))
    tuned_results = json.loads((OUT / "results.json").read_text())
    tuned = _by_method(tuned_results)
    params = selected_params(tuned_results)
    sweeps = {label(row["sweep"]): row["sweep"] for row in tuned_results["table"]["validation"]}
    order = list(fixed)   # the fixed comparison's order, the control row after the distillation methods
    order.insert(order.index("li") + 1 if "li" in order else len(order), "erm (equal steps)")
    order += [name for name in sweeps if name not in order]
    rows = []
    for name in order:
        f, t, sweep = fixed.get(name), tuned.get(name), sweeps.get(name)
        if f is None and t is None:
            continue
        rows.append({"method": name, "sweep": sweep, "fixed": f, "tuned": t,   # tuned None: not run yet
                     "change": None if f is None or t is None else t["avg"] - f["avg"],
                     "selected": params.get(sweep, {}), "ends": ends(sweep) if sweep else {}})
    return {"rows": rows, "sources": [str(p.relative_to(EVIDENCE)) for p in (*FIXED, OUT / "results.json")]}


def _pct(v, se=None, sign=False) -> str:
    if v is None:
        return "–"
    text = f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"
    return text + (f" ± {100 * se:.1f}" if se is not None else "")


def _pairs(r: dict | None) -> str:
    if r is None or r["baseline"]:
        return "–"
    return f"{_pct(r['paired'], r['paired_se'], sign=True)} ({r['wins']}/{r['losses']})"


def markdown(summary: dict) -> str:
    lines = ["| method | fixed Avg | vs ERM, fixed (won/lost) | tuned Avg | vs ERM, tuned (won/lost) | "
             "tuned − fixed | selected by source validation (12 cells) | collapsed trials |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        f, t = r["fixed"], r["tuned"]
        picked = "; ".join(f"{k.split('.', 1)[1]} {v}" for k, v in r["selected"].items())
        collapsed = f"{r['ends'].get('collapsed', 0)}/{r['ends'].get('trials', 0)}" if t else "–"
        lines.append(f"| {r['method']} | {_pct(f['avg'], f['se']) if f else '–'} | {_pairs(f)} | "
                     f"{_pct(t['avg'], t['se']) if t else 'not run yet'} | {_pairs(t)} | "
                     f"{_pct(r['change'], sign=True)} | {picked or '–'} | {collapsed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    summary = build()
    (OUT / "fixed-vs-tuned.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (OUT / "fixed-vs-tuned.md").write_text(text)
    print(text, end="")
    print(f"\nThe README's table (its first {README_COLUMNS} columns; tests/test_docs.py checks the two agree):")
    for line in text.splitlines():
        print("| " + " | ".join(c.strip() for c in line.strip().strip("|").split("|")[:README_COLUMNS]) + " |")


if __name__ == "__main__":
    main()
