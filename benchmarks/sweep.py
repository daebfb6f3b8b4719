"""Does a sweep keep its cluster full? ``python benchmarks/sweep.py [--nodes 2] [--trials 4] [--steps 300]
[--launcher train|inline]``.

Starts a simulated multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with no CPU for
trials, plus ``--nodes`` nodes of one CPU each), runs a sweep of short ``small_cnn`` trials over several searches
(each held-out domain of the built-in world x one seed, ``--trials`` per search, as many at once as the cluster
holds), and measures:

- ``wall_s``: the searches' wall time (from the first trial's start to the last trial's end);
- ``ideal_s``: the trials' own training-loop time summed, over the slots: the wall time of a cluster that never
  idles and pays no per-trial start-up;
- ``utilisation`` = ideal_s / wall_s;
- ``fixed_s_per_trial``: each trial's fixed cost (everything but its training loop: Ray Train start-up, data,
  teacher outputs, MLflow, checkpoints, shutdown), from the phase breakdown every trial logs.

It also checks the sweep's results against the rules of the sequential order: every search ran exactly its
trials, and each held-out domain's model was selected among its own search's trials. The whole sweep is run
``--repeats`` times (3 by default, each on a fresh simulated cluster and storage, one after another); the table has a
row per run and the median [min-max] of each figure, and the JSON keeps every run with the machine's load average at
its start and end. Writes ``benchmarks/results/sweep-cpu[-inline][-start-ahead-N].json`` (``--launcher inline``: each trial runs in its reused
Tune trial process instead of a TorchTrainer's four new processes; ``--start-ahead N``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sweep_yaml(storage: Path, trials: int, steps: int, nodes: int, start_ahead: int | None = None,
               launcher: str = "train") -> dict:
    return {"name": "bench-sweep", "storage": str(storage), "seeds": [0], "test_domains": None,
            "dataset": {"world": {"per_class": 40}}, "teacher": {"prompts": "single"},
            "student": {"backbone": "small_cnn", "pretrained": "builtin"}, "method": {"name": "erm"},
            "train": {"steps": steps, "batch_size": 32, "eval_every": steps // 2, "amp": "off",
                      "lr_schedule": "cosine", "lr": 3e-3},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "launcher": launcher},
            "search": {"num_samples": trials, "max_concurrent": nodes, "start_ahead": start_ahead,
                       "sampler_seed": 0,
                       "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}}}


def one_run(args) -> dict:
    """One sweep on a fresh simulated cluster and storage: its figures."""
    import ray
    from ray.cluster_utils import Cluster

    from distill import report, tracking
    from distill.tune import make_plan, run_sweep, start_ahead

    storage = Path(tempfile.mkdtemp(prefix="distill-sweep-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = tracking.sqlite_uri(storage / "mlflow.db")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    os.environ["RAY_ADDRESS"] = cluster.address
    load_start = os.getloadavg()
    try:
        path = storage / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep_yaml(storage, args.trials, args.steps, args.nodes, args.start_ahead,
                                                   args.launcher)))
        plan = make_plan(path)
        t0 = time.time()
        results = run_sweep(plan)
        total_s = time.time() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()

    rows = report.load_rows(plan.sweep_dir)
    client = tracking.client(plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.name)
    children = [r for r in client.search_runs([exp.experiment_id], max_results=10000)
                if r.data.tags.get("distill.role") != "sweep"]
    phases = [{k[len("phase/"):]: v for k, v in r.data.metrics.items() if k.startswith("phase/")} for r in children]
    loops = [p["training"] - p.get("evaluations", 0.0) for p in phases if "training" in p]
    starts = [r["timestamp"] - r["time_total_s"] for r in rows if "timestamp" in r and "time_total_s" in r]
    ends = [r["timestamp"] for r in rows if "timestamp" in r]
    # a trial's span: from its Tune start to its last report (Tune's timestamps), over every trial
    wall = max(ends) - min(starts) if starts else total_s
    ideal = sum(loops) / args.nodes
    per_search = {}
    for r in rows:
        per_search.setdefault(r["search"], set()).add(r["trial_id"])
    selected_own = all(s["trial_id"] in per_search.get(f"{s['test_domain']}-s{s['seed']}", set())
                       for s in results["selected"]["validation"])
    return {"device": platform.processor() or "cpu", "cpu_count": os.cpu_count(), "nodes": args.nodes,
           "slots": args.nodes, "searches": len(per_search), "trials": len(loops),
           "trials_per_search": {k: len(v) for k, v in sorted(per_search.items())},
           "steps_per_trial": args.steps, "wall_s": round(wall, 1), "sweep_s": round(total_s, 1),
           "ideal_s": round(ideal, 1), "utilisation": round(ideal / wall, 3) if wall else None,
           "launcher": args.launcher, "start_ahead": start_ahead(plan, args.nodes)[0],
           "fixed_s_per_trial": round(statistics.mean(p["fixed"] for p in phases if "fixed" in p), 1),
           # what each trial cost its slot beyond its loop: the slots' time over the wall, less the loops, per trial
           "slot_s_beyond_loop_per_trial": round((wall * args.nodes - sum(loops)) / len(loops), 1),
           "loop_s_per_trial": round(statistics.mean(loops), 1),
           "phases_mean_s": {k: round(statistics.mean(p[k] for p in phases if k in p), 2)
                             for k in sorted({k for p in phases for k in p})},
           "every_search_ran_its_trials": all(len(v) == args.trials for v in per_search.values()),
           "each_domain_selected_among_its_own_search": selected_own,
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("``")[0].strip())
    parser.add_argument("--nodes", type=int, default=2,
                        help="simulated worker nodes of 1 CPU each (more than the machine's cores oversubscribes)")
    parser.add_argument("--trials", type=int, default=4, help="trials per search (4 searches)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per trial")
    parser.add_argument("--start-ahead", type=int, default=None,
                        help="search.start_ahead (default: the sweep's default, none for these CPU trials; N: "
                             "N trials started before a slot frees)")
    parser.add_argument("--launcher", choices=["train", "inline"], default="train",
                        help="resources.launcher: a TorchTrainer per trial (train), or each trial in its reused "
                             "Tune trial process (inline)")
    parser.add_argument("--repeats", type=int, default=3, help="whole sweeps run one after another (median, spread)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    runs = []
    for k in range(args.repeats):
        print(f"[sweep benchmark] run {k + 1} of {args.repeats}", flush=True)
        runs.append(one_run(args))
    figures = ("wall_s", "utilisation", "fixed_s_per_trial", "slot_s_beyond_loop_per_trial", "loop_s_per_trial")
    out = {**{k: runs[0][k] for k in ("device", "cpu_count", "nodes", "slots", "searches", "steps_per_trial",
                                      "launcher", "start_ahead")},
           "trials_per_search": args.trials, "repeats": len(runs),
           "summary": {f: {"median": statistics.median(r[f] for r in runs), "min": min(r[f] for r in runs),
                           "max": max(r[f] for r in runs)} for f in figures},
           "every_search_ran_its_trials": all(r["every_search_ran_its_trials"] for r in runs),
           "each_domain_selected_among_its_own_search": all(r["each_domain_selected_among_its_own_search"]
                                                            for r in runs),
           "runs": runs, "date": time.strftime("%Y-%m-%d %H:%M")}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    name = "sweep-cpu" + ("-inline" if args.launcher == "inline" else "") + \
        (f"-start-ahead-{args.start_ahead}" if args.start_ahead else "")
    (dest / f"{name}.json").write_text(json.dumps(out, indent=1))
    print("\n| run | launcher | nodes x CPU | searches x trials | started ahead | wall s | ideal s | utilisation | "
          "fixed s/trial | slot s beyond the loop/trial | loop s/trial | load at start, end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in enumerate(runs, 1):
        print(f"| {k} | {args.launcher} | {args.nodes} x 1 | {r['searches']} x {args.trials} | {r['start_ahead']} | "
              f"{r['wall_s']} | {r['ideal_s']} | {r['utilisation']} | {r['fixed_s_per_trial']} | "
              f"{r['slot_s_beyond_loop_per_trial']} | {r['loop_s_per_trial']} | "
              f"{r['load_avg_start'][0]:.2f}, {r['load_avg_end'][0]:.2f} |")
    summary = out["summary"]
    print("median [min-max]: " + "; ".join(f"{f} {v['median']} [{v['min']}-{v['max']}]" for f, v in summary.items()))
    print(f"every search ran its trials: {out['every_search_ran_its_trials']}; each domain selected among its own "
          f"search: {out['each_domain_selected_among_its_own_search']}")
    print(f"wrote {dest / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
