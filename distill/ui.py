"""``distill ui [STORAGE] [--port N] [--sweep NAME]``: serve the MLflow store a sweep logged to on this machine's
loopback and print the link that opens on each sweep's answer (its selected trials, best first, in MLflow's "Model
training" mode).

The store: ``MLFLOW_TRACKING_URI`` when set, else ``<STORAGE>/mlflow.db`` (STORAGE defaults to ``./distill_runs``,
the configs' default storage). A tracking server (http://...) is not served again: its links are printed."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import tracking

# what the MLflow server's process ignores (PYTHONWARNINGS): its dependencies' deprecations at import
IGNORED_WARNINGS = "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"


def sweeps(uri: str) -> list[tuple[str, str]]:
    """(sweep name, experiment id) of every experiment holding a sweep's parent run, the latest sweep first."""
    c = tracking.client(uri)
    out = []
    for exp in c.search_experiments():
        parents = c.search_runs([exp.experiment_id], "tags.`distill.role` = 'sweep'", max_results=1,
                                order_by=["attributes.start_time DESC"])
        if parents:
            out.append((exp.name, exp.experiment_id, parents[0].info.start_time))
    return [(name, eid) for name, eid, _ in sorted(out, key=lambda t: -t[2])]


def main(argv: list[str] | None = None, prog: str = "python -m distill.ui") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a sweep's MLflow store on 127.0.0.1 and print the link that opens on its "
                               "selected models (no click needed).",
        epilog="examples:\n  distill ui                       # ./distill_runs/mlflow.db on port 5000\n"
               "  distill ui /mnt/shared/distill_runs --port 5001 --sweep pacs-scmd",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("storage", nargs="?", default="./distill_runs",
                        help="the sweep's storage (holds mlflow.db); ignored when MLFLOW_TRACKING_URI is set")
    parser.add_argument("--port", type=int, default=tracking.UI_PORT, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--sweep", help="print only this sweep's link")
    parser.add_argument("--no-serve", action="store_true", help="print the links only (a server already runs)")
    args = parser.parse_args(argv)
    uri = tracking.tracking_uri(args.storage)
    if uri.startswith(tracking.SQLITE) and not Path(uri[len(tracking.SQLITE):]).is_file():
        print(f"error: no MLflow store at {uri[len(tracking.SQLITE):]} (run a sweep with --storage "
              f"{args.storage}, or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    remote = uri.startswith(("http://", "https://"))
    base = uri if remote else f"http://127.0.0.1:{args.port}"
    found = sweeps(uri)
    if args.sweep:
        found = [s for s in found if s[0] == args.sweep]
        if not found:
            print(f"error: no sweep {args.sweep!r} in {uri}", file=sys.stderr)
            return 2
    if not found:
        print(f"{uri} holds no sweep yet; the experiments page: {base}/#/experiments", flush=True)
    for name, eid in found:
        print(f"{name}: {tracking.sweep_link(eid, base)}", flush=True)
    if remote or args.no_serve:
        return 0
    print(f"serving {uri} on 127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]   # one reader of a local store: starts in a quarter the time
    # MLflow's own modules warn of their dependencies' deprecations at import: not the user's concern (Starlette's
    # is a UserWarning, matched by its message)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONWARNINGS": IGNORED_WARNINGS}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
