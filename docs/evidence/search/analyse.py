"""The search-efficiency figure and JSON from the finished sweeps of run.py (docs/evidence/search/sweeps/*).

Per sweep (variant x sampler seed), its trials in the order the sweep created them: each trial's best source-domain
validation accuracy (selectable evaluations), its seconds (its MLflow run, start to end) and how it ended; then the
best source validation so far against trials and against trial-seconds spent, the selected model's held-out accuracy
(training-domain validation over every trial and evaluation, as the report), and the trial-seconds that went into
collapsed (train.stop_collapsed) or diverged (a non-finite loss) trials.

    python docs/evidence/search/analyse.py       # writes results.json and search.png here, prints the table
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT.parents[2]))
from distill import report  # noqa: E402
from distill.plots import PALETTE, _plt, _save  # noqa: E402

VARIANTS = ("random", "tpe", "tpe-asha")
WASTED = ("collapsed", "error")


def trials(sweep_dir: Path) -> list[dict]:
    rows = report.load_rows(sweep_dir)
    ends = {e["trial_id"]: e for e in report.load_events(sweep_dir)}
    seconds = json.loads((sweep_dir / "trial_seconds.json").read_text())
    by_trial: dict[str, list[dict]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    out = []
    for trial_id, end in ends.items():
        own = by_trial.get(trial_id, [])
        vals = [r["val_acc"] for r in own if report.selectable(r) and isinstance(r.get("val_acc"), float)]
        out.append({"trial_id": trial_id, "trial_index": end.get("trial_index"), "status": end.get("status"),
                    "params": end.get("params"), "best_val": max(vals) if vals else None,
                    "steps": max((r["step"] for r in own), default=0),
                    # the trial's MLflow time (finished or failed), else Tune's time of its last row (early stopped)
                    "seconds": seconds.get(end.get("train_run"),
                                           max((r.get("time_total_s") or 0.0 for r in own), default=0.0))})
    return sorted(out, key=lambda t: (t["trial_index"] is None, t["trial_index"], t["trial_id"]))


def curves(ts: list[dict]) -> dict:
    best, spent, best_so_far, seconds = None, 0.0, [], []
    for t in ts:
        spent += t["seconds"]
        if t["best_val"] is not None:
            best = t["best_val"] if best is None else max(best, t["best_val"])
        best_so_far.append(best)
        seconds.append(round(spent, 1))
    return {"best_val_so_far": best_so_far, "cumulative_seconds": seconds}


def analyse() -> dict:
    sweeps = {}
    for d in sorted((OUT / "sweeps").glob("search-scmd-*")):
        if not (d / "trials.jsonl").exists():
            continue
        variant, seed = d.name.removeprefix("search-scmd-").rsplit("-s", 1)
        ts = trials(d)
        results = json.loads((d / "results.json").read_text())
        sel = next(s for s in results["selected"]["validation"])
        sweeps[d.name] = {
            "variant": variant, "sampler_seed": int(seed), "trials": ts, **curves(ts),
            "selected": {k: sel.get(k) for k in ("trial_id", "step", "val_acc", "test_acc", "params")},
            "seconds": round(sum(t["seconds"] for t in ts), 1),
            "wasted_seconds": round(sum(t["seconds"] for t in ts if t["status"] in WASTED), 1),
            "ended": {s: sum(t["status"] == s for t in ts) for s in ("completed", "early_stopped", "collapsed",
                                                                     "error")}}
    summary = {}
    for v in VARIANTS:
        runs = [s for s in sweeps.values() if s["variant"] == v]
        if not runs:
            continue

        def stat(values):
            values = [x for x in values if x is not None]
            return {"mean": statistics.fmean(values) if values else None,
                    "se": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None,
                    "values": values}

        summary[v] = {"sampler_seeds": [s["sampler_seed"] for s in runs],
                      "best_val": stat([s["best_val_so_far"][-1] for s in runs]),
                      "selected_test_acc": stat([s["selected"]["test_acc"] for s in runs]),
                      "trial_seconds": stat([s["seconds"] for s in runs]),
                      "wasted_seconds": stat([s["wasted_seconds"] for s in runs]),
                      "collapsed_or_diverged": stat([s["ended"]["collapsed"] + s["ended"]["error"] for s in runs])}
    return {"method": "scmd", "held_out": "sketch", "variants": list(VARIANTS), "summary": summary,
            "sweeps": sweeps}


def figure(data: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for colour, v in zip(PALETTE, VARIANTS):
        runs = [s for s in data["sweeps"].values() if s["variant"] == v]
        for i, s in enumerate(runs):
            ys = [100 * y if y is not None else None for y in s["best_val_so_far"]]
            xs = list(range(1, len(ys) + 1))
            label = f"{v} (sampler seeds {', '.join(str(r['sampler_seed']) for r in runs)})" if i == 0 else None
            axes[0].step(xs, ys, where="post", color=colour, alpha=0.8, label=label)
            axes[1].step(s["cumulative_seconds"], ys, where="post", color=colour, alpha=0.8)
    axes[0].set_xlabel("trials")
    axes[1].set_xlabel("trial-seconds spent (sum over trials, 1 CPU each)")
    axes[0].set_ylabel("best source-domain validation so far (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Searching SCMD on the miniature (held-out sketch, 16 trials per search)")
    return _save(fig, path)


def table(data: dict) -> str:
    def f(s, scale=100.0, digits=1):
        if s["mean"] is None:
            return "–"
        se = f" ± {scale * s['se']:.{digits}f}" if s["se"] is not None else ""
        return f"{scale * s['mean']:.{digits}f}{se}"

    lines = ["| search | best source val (%) | selected held-out acc (%) | trial-seconds | in collapsed/diverged "
             "trials (s) | collapsed/diverged trials |", "|---|---|---|---|---|---|"]
    for v, s in data["summary"].items():
        lines.append(f"| {v} (n={len(s['sampler_seeds'])}) | {f(s['best_val'])} | {f(s['selected_test_acc'])} | "
                     f"{f(s['trial_seconds'], 1, 0)} | {f(s['wasted_seconds'], 1, 0)} | "
                     f"{f(s['collapsed_or_diverged'], 1, 1)} |")
    return "\n".join(lines)


def main() -> None:
    data = analyse()
    if not data["sweeps"]:
        raise SystemExit("no finished sweep under docs/evidence/search/sweeps/ yet (run.py)")
    (OUT / "results.json").write_text(json.dumps(data, indent=1))
    figure(data, OUT / "search.png")
    text = table(data)
    (OUT / "results.md").write_text("Mean ± standard error over sampler seeds.\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
