"""Sweep plots (matplotlib, Agg): selected accuracy per test domain with the oracle beside it, the teacher's zero-shot
accuracy and the chance level (accuracy.png); source-validation vs test accuracy across trials (val_vs_test.png); the
optimisation history of each search (history.png).

One colour per method in all three (``method_colours``: the same method, the same colour); a row that selects over
several methods is dark grey. The test domain is the marker (val_vs_test.png, history.png).
"""
from __future__ import annotations

import math
from pathlib import Path

from .selection import ERRORS, REPORTED, SELECTION_METRIC, creation_order, select, selectable

OVERALL_COLOUR = "#404040"   # a row selected over several methods
TEACHER_COLOUR = "black"
CHANCE_COLOUR = "#7f7f7f"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
MARKERS = "osD^v<>ph*"
SWEEP_HATCHES = ["", "..", "xx", "oo", "++"]   # the same method in several sweeps: the 2nd, 3rd, ... sweep's bars
TEACHER_STYLES = ["-", "--", "-.", ":"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def method_colours(results: dict, rows: list[dict] = ()) -> dict[str, str]:
    """method -> colour: the methods of the results' rows (plan order), then any other method of `rows`, in turn
    from PALETTE (grey, the chance line's, left out)."""
    methods = [m for g in results.get("groups") or [] for m in g["methods"]] + [r.get("method") for r in rows]
    methods = list(dict.fromkeys(m for m in methods if m is not None))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def row_colour(results: dict, label: str, colours: dict[str, str]) -> str:
    """A table row's colour: its method's, or OVERALL_COLOUR for a row selected over several methods."""
    g = next((g for g in results.get("groups") or [] if g["label"] == label), None)
    methods = (g or {}).get("methods") or []
    return colours.get(methods[0], OVERALL_COLOUR) if len(methods) == 1 else OVERALL_COLOUR


def _domain_marker(domains: list[str], d) -> str:
    return MARKERS[(domains.index(d) if d in domains else len(domains)) % len(MARKERS)]


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- accuracy.png
def accuracy_figure(results: dict, colours: dict[str, str] | None = None):
    """Per test domain (and Avg): the selected model's test accuracy (solid, training-domain validation) and the
    oracle's (hatched) per row, in the row's method colour; error bars: the results' error over seeds. The teacher's
    zero-shot accuracy: a black line over each domain's bars (and over Avg: its mean); the chance level: a grey dotted
    line across the plot. Each labelled in the legend."""
    plt = _plt()
    colours = colours or method_colours(results)
    error = results.get("error", "se")
    domains = results["domains"] + ["Avg"]
    rows = results["table"]["validation"]
    oracle = {r["method"]: r for r in results["table"]["oracle"]}
    n = max(1, len(rows))
    width = 0.8 / (2 * n)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) * max(1, n / 2)), 4))

    def cell(row, d):
        c = row["avg"] if d == "Avg" else row["domains"].get(d)
        if not c or c.get("mean") is None:
            return float("nan"), 0.0
        return 100 * c["mean"], 100 * (c.get(error) or 0.0)

    used: dict[str, int] = {}
    for i, row in enumerate(rows):
        colour = row_colour(results, row["method"], colours)
        hatch = SWEEP_HATCHES[used.get(colour, 0) % len(SWEEP_HATCHES)]
        used[colour] = used.get(colour, 0) + 1
        for j, (src, label) in enumerate(((row, row["method"]),
                                          (oracle.get(row["method"]), f"{row['method']} (oracle)"))):
            if src is None:
                continue
            vals = [cell(src, d) for d in domains]
            xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(domains))]
            ax.bar(xs, [v for v, _ in vals], width, yerr=[e for _, e in vals], color=colour,
                   alpha=1.0 if j == 0 else 0.45, hatch=(hatch + "//") if j else (hatch or None),
                   edgecolor="black", linewidth=0.4, label=label, capsize=2)
    for t, style in zip(results.get("teacher") or [], TEACHER_STYLES * 8):
        label = f"{t['label']}: {t.get('teacher')}"
        for k, d in enumerate(domains):
            acc = t.get("mean") if d == "Avg" else t["zero_shot"].get(d)
            if acc is not None:
                ax.hlines(100 * acc, k - 0.45, k + 0.45, colors=TEACHER_COLOUR, linestyles=style, linewidth=1.6,
                          label=label, zorder=3)
                label = None
    if results.get("chance") is not None:
        ax.axhline(100 * results["chance"], color=CHANCE_COLOUR, linestyle=":", linewidth=1.2, zorder=3,
                   label=f"chance ({100 * results['chance']:.1f}%)")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test-domain accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Selected by source-domain validation (solid) vs oracle on the test domain (hatched)\n"
                 f"error bars: {ERRORS.get(error, error)} over seeds", fontsize=9)
    # below the axes, not over the bars (six methods with their oracles and several teachers fill a corner)
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=7, ncol=max(2, min(6, math.ceil(entries / 4))), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def accuracy_bars(results: dict, path: Path, colours: dict[str, str] | None = None) -> Path:
    return _save(accuracy_figure(results, colours), path)


# ---------------------------------------------------------------------------------------------- val_vs_test.png
def val_vs_test_figure(results: dict, rows: list[dict], colours: dict[str, str] | None = None):
    """One point per trial, at its best selectable source-validation step: val_acc vs test_acc; colour: the method,
    marker: the test domain. Circled: the (trial, step) that training-domain validation selected for the overall row
    of each (test domain, seed) (a sweep's only row, or the row selected over all its methods)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    colours = colours or method_colours(results, rows)
    trials: dict[tuple, list[dict]] = {}
    for r in rows:
        trials.setdefault((r.get("sweep"), r.get("search"), r.get("trial_id")), []).append(r)
    domains = results["domains"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn_domains, drawn_methods = [], []
    for trs in trials.values():
        best = select([r for r in trs if selectable(r)], SELECTION_METRIC)
        if best is None or best.get(REPORTED) is None:
            continue
        d, m = best.get("test_domain"), best.get("method")
        ax.scatter(100 * best[SELECTION_METRIC], 100 * best[REPORTED], color=colours.get(m, OVERALL_COLOUR),
                   marker=_domain_marker(domains, d), s=30, alpha=0.8)
        drawn_domains += [d] if d not in drawn_domains else []
        drawn_methods += [m] if m not in drawn_methods else []
    overall = {g["label"] for g in results.get("groups") or [] if g["overall"]}
    for s in results["selected"]["validation"]:
        if s["method_group"] in overall and s.get("val_acc") is not None and s.get("test_acc") is not None:
            ax.scatter(100 * s["val_acc"], 100 * s["test_acc"], s=140, facecolors="none", edgecolors="black",
                       linewidths=1.2, gid="selected")
    lims = [0, 100]
    ax.plot(lims, lims, color="grey", lw=0.8, ls="--")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_xlabel("source-domain validation accuracy (%)")
    ax.set_ylabel("test-domain accuracy (%)")
    ax.set_title("Trials at their best validation step (circled: selected)", fontsize=9)
    handles = [Line2D([], [], ls="", marker=_domain_marker(domains, d), color="grey", label=str(d))
               for d in drawn_domains]
    handles += [Line2D([], [], ls="", marker="s", color=colours.get(m, OVERALL_COLOUR), label=str(m))
                for m in drawn_methods]
    if handles:
        ax.legend(handles=handles, fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def val_vs_test(results: dict, rows: list[dict], path: Path, colours: dict[str, str] | None = None) -> Path:
    return _save(val_vs_test_figure(results, rows, colours), path)


# -------------------------------------------------------------------------------------------------- history.png
MAX_LEGEND = 16  # searches named in the history's legend; more would cover the plot


def history_series(rows: list[dict]) -> dict[str, list[dict]]:
    """search label (with the sweep when several) -> its trials in creation order (`creation_order`: trial_index
    where the rows carry it, else the Tune id's counter), each {"trial_id", "value": its best val_acc_best,
    "method", "test_domain", "seed"}."""
    several = len({r.get("sweep") for r in rows}) > 1
    searches: dict[str, dict[str, dict]] = {}
    for r in rows:
        v = r.get("val_acc_best", r.get(SELECTION_METRIC))
        if v is None:
            continue
        s = searches.setdefault(f"{r.get('search')}" + (f" [{r.get('sweep')}]" if several else ""), {})
        t = s.setdefault(r.get("trial_id"), {"trial_id": r.get("trial_id"), "value": v, "order": creation_order(r),
                                             "method": r.get("method"), "test_domain": r.get("test_domain"),
                                             "seed": r.get("seed")})
        t["value"], t["order"] = max(t["value"], v), min(t["order"], creation_order(r))
    return {name: [{k: v for k, v in t.items() if k != "order"} for t in sorted(ts.values(), key=lambda t: t["order"])]
            for name, ts in sorted(searches.items())}


def history_figure(rows: list[dict], colours: dict[str, str] | None = None, domains: list[str] | None = None):
    """Per search: each trial's val_acc_best (what Optuna saw) in creation order (points: the trial's method colour
    and the search's test-domain marker) and the best so far (a line in the method's colour, dark grey when the search
    has several methods; line style per seed). None when no search has more than one trial: there is no optimisation
    to show."""
    series = history_series(rows)
    if not any(len(trials) > 1 for trials in series.values()):
        return None
    plt = _plt()
    colours = colours or method_colours({}, rows)
    domains = domains or list(dict.fromkeys(r.get("test_domain") for r in rows))
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4))
    handles = []   # per search: its line (colour, seed's style) with its domain's marker
    for name, trials in series.items():
        ys = [100 * t["value"] for t in trials]
        best, run = float("-inf"), []
        for y in ys:
            best = max(best, y)
            run.append(best)
        xs = list(range(1, len(ys) + 1))
        methods = {t["method"] for t in trials}
        marker = _domain_marker(domains, trials[0]["test_domain"])
        ax.scatter(xs, ys, c=[colours.get(t["method"], OVERALL_COLOUR) for t in trials], marker=marker, s=16,
                   alpha=0.6)
        line = colours.get(next(iter(methods)), OVERALL_COLOUR) if len(methods) == 1 else OVERALL_COLOUR
        style = TEACHER_STYLES[seeds.index(trials[0]["seed"]) % len(TEACHER_STYLES)]
        ax.step(xs, run, where="post", color=line, linestyle=style)
        handles.append(Line2D([], [], color=line, linestyle=style, marker=marker, markersize=4, label=name))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order the sweep created it)")
    ax.set_ylabel("val_acc_best (%)")
    title = "Optimisation history per search (points: trials; line: best so far; colour: method)"
    if len(series) <= MAX_LEGEND:
        methods = list(dict.fromkeys(t["method"] for trials in series.values() for t in trials))
        if len(methods) > 1:   # the points' colours
            handles += [Line2D([], [], ls="", marker="o", color=colours.get(m, OVERALL_COLOUR), label=str(m))
                        for m in methods]
        ax.legend(handles=handles, fontsize=7, ncol=2)
    else:
        title += f"\n{len(series)} searches, legend omitted (see results.md)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def history(rows: list[dict], path: Path, colours: dict[str, str] | None = None,
            domains: list[str] | None = None) -> Path | None:
    """history.png (see `history_figure`); None, nothing written, when there is no optimisation to show."""
    fig = history_figure(rows, colours, domains)
    return None if fig is None else _save(fig, path)


def make_all(results: dict, rows: list[dict], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = method_colours(results, rows)
    made = [accuracy_bars(results, out / "accuracy.png", colours),
            val_vs_test(results, rows, out / "val_vs_test.png", colours)]
    drawn = history(rows, out / "history.png", colours, results["domains"])
    if drawn is None:
        (out / "history.png").unlink(missing_ok=True)  # a stale one from an earlier report of more trials
    else:
        made.append(drawn)
    return made


SEARCH_FIGURES = {"history": "plot_optimization_history", "importances": "plot_param_importances",
                  "parallel": "plot_parallel_coordinate"}


def search_figures(optuna_db: str | Path, out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Each search's Optuna figures (matplotlib, no browser needed) from the sweep's `optuna.db`: optimisation
    history, hyperparameter importances and parallel coordinates, as `<out_dir>/<search>/<figure>.png`. Returns the
    files made and a note per figure that the study cannot give (importances need two finished trials that differ
    in a searched value; a search of one trial has no history to speak of)."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as ovm

    from .tracking import sqlite_uri

    plt = _plt()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    made, skipped = [], []
    storage = sqlite_uri(optuna_db)
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        search = summary.study_name.split(":", 1)[-1]
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        for name, fn in SEARCH_FIGURES.items():
            if len(finished) < 2 or (name != "history" and not any(t.params for t in finished)):
                skipped.append(f"{search}/{name}: {len(finished)} finished trial(s)")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # the matplotlib backend is "experimental"
                    ax = getattr(ovm, fn)(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(8, 5)
                (Path(out_dir) / search).mkdir(parents=True, exist_ok=True)
                made.append(_save(fig, Path(out_dir) / search / f"{name}.png"))
            except Exception as exc:  # noqa: BLE001 - e.g. importances of values that never vary
                plt.close("all")
                skipped.append(f"{search}/{name}: {type(exc).__name__}: {exc}")
    return made, skipped
