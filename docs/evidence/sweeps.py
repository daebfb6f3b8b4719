"""Running an evidence page's sweeps, resumably, one after another (shared by docs/evidence/*/run.py).

Each sweep is `python -m distill.tune --space FILE --storage STORAGE --set ...` (with --resume when its storage holds
it already). When it has finished, its report inputs (plain text: rows, plan, teacher, results) and each trial's
seconds (its MLflow run's phase/total, or start to end for a failed one) are copied under <page>/sweeps/<sweep>/, to be committed: the page's tables
are built from those copies, and a later run (another session, another machine) skips the sweep. <page>/timings.json
keeps each attempt's wall seconds and the machine's load average at its start and end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEPT = ("trials.jsonl", "plan.json", "runs.json", "teacher.json", "results.json", "results.md", "sweep.yaml")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def done(page: Path, sweep: str) -> bool:
    return (page / "sweeps" / sweep / "trials.jsonl").exists()


def trial_seconds(storage: Path, sweep: str) -> dict[str, float]:
    """Train run name -> seconds from its MLflow run's start to its end: the children of the sweep's latest parent
    run (an earlier, discarded attempt of the same sweep name has its own parent) in the storage's sqlite store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        return {}
    parents = client.search_runs([exp.experiment_id], "tags.`distill.role` = 'sweep'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
                              max_results=50000)
    out = {}
    for r in runs:
        name = r.data.tags.get("distill.run_name")
        if "phase/total" in r.data.metrics:   # a finished trial: its own start-to-done time (the run's end time
            out[name] = round(r.data.metrics["phase/total"], 2)   # moves when its model is registered later)
        elif r.info.status == "FAILED" and r.info.end_time:   # ended by its failure
            out[name] = round((r.info.end_time - r.info.start_time) / 1000, 2)
    return out   # an early-stopped trial is not here: its Tune rows' time_total_s says it


def keep(page: Path, storage: Path, sweep: str) -> None:
    dest = page / "sweeps" / sweep
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (storage / sweep / name).is_file():
            shutil.copy2(storage / sweep / name, dest / name)
    (dest / "trial_seconds.json").write_text(json.dumps(trial_seconds(storage, sweep), indent=1, sort_keys=True))


def run(page: Path, storage: Path, space_file: Path, sweeps: dict[str, list[str]]) -> None:
    """sweeps: name -> its --set values (name=... included). Stops at the first sweep that fails."""
    timings_file = page / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for sweep, values in sweeps.items():
        if done(page, sweep):
            print(f"[evidence] {sweep}: done ({(page / 'sweeps' / sweep).relative_to(REPO)})", flush=True)
            continue
        cmd = [sys.executable, "-m", "distill.tune", "--space", str(space_file), "--storage", str(storage),
               *[a for v in values for a in ("--set", v)]]
        if (storage / sweep / "sweep.json").exists():
            cmd.append("--resume")
        entry = timings.setdefault(sweep, {"attempts": []})
        entry["attempts"].append({"start": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": load()})
        print(f"[evidence] {sweep}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        code = subprocess.call(cmd, cwd=REPO)
        entry["attempts"][-1].update({"seconds": round(time.time() - t0, 1), "load_end": load(), "exit": code})
        timings_file.write_text(json.dumps(timings, indent=1))
        if code != 0:
            raise SystemExit(f"[evidence] {sweep} exited {code}; run the script again to resume it")
        keep(page, storage, sweep)
