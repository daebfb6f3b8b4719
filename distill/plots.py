"""Sweep plots (matplotlib, Agg): selected accuracy per test domain with the oracle beside it, source-validation vs
test accuracy across trials, and the optimisation history of each search."""
from __future__ import annotations

from pathlib import Path

from .selection import ERRORS, REPORTED, SELECTION_METRIC, select, selectable, trial_order


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_bars(results: dict, path: Path) -> Path:
    """Per test domain (and Avg): the selected model's test accuracy (solid, training-domain validation) and the
    oracle's (hatched) per row; error bars: the results' error over seeds (standard error or std)."""
    plt = _plt()
    error = results.get("error", "se")
    domains = results["domains"] + ["Avg"]
    rows = results["table"]["validation"]
    oracle = {r["method"]: r for r in results["table"]["oracle"]}
    n = max(1, len(rows))
    width = 0.8 / (2 * n)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) * max(1, n / 2)), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def cell(row, d):
        c = row["avg"] if d == "Avg" else row["domains"].get(d)
        if not c or c.get("mean") is None:
            return float("nan"), 0.0
        return 100 * c["mean"], 100 * (c.get(error) or 0.0)

    for i, row in enumerate(rows):
        colour = colours[i % len(colours)]
        for j, (src, hatch, label) in enumerate(((row, None, row["method"]),
                                                 (oracle.get(row["method"]), "//", f"{row['method']} (oracle)"))):
            if src is None:
                continue
            vals = [cell(src, d) for d in domains]
            xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(domains))]
            ax.bar(xs, [v for v, _ in vals], width, yerr=[e for _, e in vals], color=colour,
                   alpha=1.0 if j == 0 else 0.45, hatch=hatch, edgecolor="black", linewidth=0.4, label=label,
                   capsize=2)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test-domain accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Selected by source-domain validation (solid) vs oracle on the test domain (hatched)\n"
                 f"error bars: {ERRORS.get(error, error)} over seeds", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def val_vs_test(results: dict, rows: list[dict], path: Path) -> Path:
    """One point per trial, at its best selectable source-validation step: val_acc vs test_acc, per test domain."""
    plt = _plt()
    trials: dict[tuple, list[dict]] = {}
    for r in rows:
        trials.setdefault((r.get("sweep"), r.get("search"), r.get("trial_id")), []).append(r)
    domains = results["domains"]
    methods = list(dict.fromkeys(r.get("method") for r in rows))
    markers = "osD^v<>ph*"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    seen = set()
    for key, trs in trials.items():
        best = select([r for r in trs if selectable(r)], SELECTION_METRIC)
        if best is None or best.get(REPORTED) is None:
            continue
        d, m = best.get("test_domain"), best.get("method")
        label = f"{d} / {m}" if len(methods) > 1 else d
        ax.scatter(100 * best[SELECTION_METRIC], 100 * best[REPORTED],
                   color=colours[(domains.index(d) if d in domains else 0) % len(colours)],
                   marker=markers[methods.index(m) % len(markers)], s=30, alpha=0.8,
                   label=None if label in seen else label)
        seen.add(label)
    for s in results["selected"]["validation"]:
        if s.get("val_acc") is not None and s.get("test_acc") is not None:
            ax.scatter(100 * s["val_acc"], 100 * s["test_acc"], s=140, facecolors="none", edgecolors="black",
                       linewidths=1.2)
    lims = [0, 100]
    ax.plot(lims, lims, color="grey", lw=0.8, ls="--")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_xlabel("source-domain validation accuracy (%)")
    ax.set_ylabel("test-domain accuracy (%)")
    ax.set_title("Trials at their best validation step (circled: selected)", fontsize=9)
    if seen:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


MAX_LEGEND = 16  # searches named in the history's legend; more would cover the plot


def history(rows: list[dict], path: Path) -> Path | None:
    """Per search: each trial's val_acc_best (what Optuna saw) in trial order, and the best so far. None (nothing
    drawn) when no search has more than one trial: there is no optimisation to show."""
    plt = _plt()
    searches: dict[str, dict[str, float]] = {}
    several = len({r.get("sweep") for r in rows}) > 1
    for r in rows:
        v = r.get("val_acc_best", r.get(SELECTION_METRIC))
        if v is None:
            continue
        s = searches.setdefault(f"{r.get('search')}" + (f" [{r.get('sweep')}]" if several else ""), {})
        s[r.get("trial_id")] = max(s.get(r.get("trial_id"), float("-inf")), v)
    if not any(len(trials) > 1 for trials in searches.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, trials) in enumerate(sorted(searches.items())):
        ids = sorted(trials, key=trial_order)
        ys = [100 * trials[t] for t in ids]
        best, run = float("-inf"), []
        for y in ys:
            best = max(best, y)
            run.append(best)
        xs = list(range(1, len(ys) + 1))
        colour = colours[i % len(colours)]
        ax.plot(xs, ys, "o", color=colour, alpha=0.6, ms=4)
        ax.step(xs, run, where="post", color=colour, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order Optuna proposed it)")
    ax.set_ylabel("val_acc_best (%)")
    title = "Optimisation history per search (points: trials; line: best so far)"
    if len(searches) <= MAX_LEGEND:
        ax.legend(fontsize=7, ncol=2)
    else:
        title += f"\n{len(searches)} searches, legend omitted (see results.md)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_all(results: dict, rows: list[dict], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [accuracy_bars(results, out / "accuracy.png"), val_vs_test(results, rows, out / "val_vs_test.png")]
    drawn = history(rows, out / "history.png")
    if drawn is None:
        (out / "history.png").unlink(missing_ok=True)  # a stale one from an earlier report of more trials
    else:
        made.append(drawn)
    return made

