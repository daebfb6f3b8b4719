"""What a researcher sees of a finished sweep: the MLflow UI in a real (headless) browser, the registered model
loaded back with mlflow.pytorch, and the runs' tags, metrics and descriptions. Chromium comes from Debian's package
(`.ci/run` installs it); without it the browser test is skipped."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_sweep(ray_session, session_storage, tmp_path_factory):
    """A finished tiny sweep (2 held-out domains x 2 trials) in its own MLflow store."""
    from distill import tracking
    from distill.tune import make_plan, run_sweep

    tmp = tmp_path_factory.mktemp("ui")
    uri = tracking.sqlite_uri(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    sweep = {"name": "ui", "storage": str(session_storage), "test_domains": ["sketch", "cartoon"], "seeds": [0],
             "dataset": {"world": {"per_class": 20}},
             "student": {"backbone": "small_cnn"}, "method": {"name": "kd"},
             "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "amp": "off"},
             "search": {"num_samples": 2, "space": {"train.lr": {"loguniform": [1e-3, 3e-3]}}}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    plan = make_plan(path)
    try:
        results = run_sweep(plan)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"plan": plan, "results": results, "uri": uri, "tmp": tmp}


def test_the_sweep_reads_well_in_mlflow(finished_sweep):
    import mlflow

    uri = finished_sweep["uri"]
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("ui")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # opens on its runs, not GenAI views
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("distill.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    note = parent.data.tags["mlflow.note.content"]
    assert "searches (held-out domain x seed)" in note and "| kd |" in note       # the plan and the table
    assert "train.lr" not in parent.data.params and "method.temperature" in parent.data.params  # searched: no
    assert {"test_acc/sketch", "test_acc/cartoon", "teacher_zero_shot/sketch", "chance"} <= set(parent.data.metrics)
    for run in [parent, *children]:                                           # "Created by", "Source"
        assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.source.name")
    for child in children:
        assert child.data.tags["distill.method"] == "kd" and "searched.train.lr" in child.data.tags
        assert child.data.params["train.lr"] == child.data.tags["searched.train.lr"]
    selected = [ch for ch in children if ch.data.tags.get("distill.selected") == "true"]
    assert len(selected) == 2   # one per held-out domain
    for child in selected:
        assert {"selected_test_acc", "selected_val_acc", "selected_step"} <= set(child.data.metrics)


def test_a_registered_model_loads_and_predicts_class_logits(finished_sweep):
    """mlflow.pytorch.load_model('models:/<sweep>-<domain>/<v>'): normalised images [B, 3, H, W] -> logits [B, C],
    the selected method's predict, as accurate on the held-out domain as the selection says."""
    import mlflow
    import torch

    from distill.config import build_config, trial_config
    from distill.data.augment import IMAGENET_MEAN, IMAGENET_STD, center, normalize
    from distill.trial.prepare import load_task

    mlflow.set_tracking_uri(finished_sweep["uri"])
    model = mlflow.pytorch.load_model("models:/ui-sketch/1")
    sel = next(s for s in finished_sweep["results"]["selected"]["validation"] if s["test_domain"] == "sketch")
    cfg = trial_config(build_config({**finished_sweep["plan"].raw, "train": {**finished_sweep["plan"].raw["train"],
                                                                            **{"lr": sel["params"]["train.lr"]}}}),
                       "sketch", 0)
    _, images, splits = load_task(cfg)
    x = normalize(center(images.images[splits.test_in], 32), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(splits.test_in), 5)
    accuracy = (logits.argmax(1) == images.labels[splits.test_in]).float().mean().item()
    assert accuracy == pytest.approx(sel["test_acc"], abs=1e-6)
    info = mlflow.models.get_model_info("models:/ui-sketch/1")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)
    assert "normalised with mean" in info.metadata["input"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_sweep_page_holds_its_answer(finished_sweep):
    """The experiment's description is the main table and the paired comparison; the parent run logs them as MLflow
    tables and each search's Optuna figures (PNG) under search/; a child run says its search and what was
    searched."""
    import mlflow

    uri = finished_sweep["uri"]
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("ui")
    note = exp.tags["mlflow.note.content"]
    assert "**Training-domain validation** (the main table)" in note and "| kd |" in note
    assert "Test-domain oracle" not in note and "(#/experiments/" in note   # the main table only, and the link
    parent = c.search_runs([exp.experiment_id], "tags.`distill.role` = 'sweep'")[0]
    table = c.load_table(exp.experiment_id, "tables/main.json", run_ids=[parent.info.run_id])
    assert list(table["method"]) == ["kd"] and set(table.columns) >= {"sketch", "cartoon", "Avg"}
    assert len(table) == 1   # one row per method, written whole (not appended again by a second finish)
    row = next(r for r in finished_sweep["results"]["table"]["validation"] if r["method"] == "kd")
    assert table["Avg"][0] == pytest.approx(round(100 * row["avg"]["mean"], 2))
    searches = {a.path for a in c.list_artifacts(parent.info.run_id, "search")}
    assert searches == {"search/sketch-s0", "search/cartoon-s0"}
    for search in searches:
        pngs = {a.path.rsplit("/", 1)[1] for a in c.list_artifacts(parent.info.run_id, search)}
        assert pngs == {"history.png", "importances.png", "parallel.png"}, pngs
    child = c.search_runs([exp.experiment_id], "tags.`distill.search` = 'sketch-s0'")[0]
    assert "A trial of search `sketch-s0` (held-out sketch, seed 0)" in child.data.tags["mlflow.note.content"]
    assert "searched: train.lr=" in child.data.tags["mlflow.note.content"]


def test_distill_ui_prints_the_link_to_each_sweeps_selected_trials(finished_sweep, capsys):
    import mlflow

    from distill import ui

    exp_id = mlflow.MlflowClient(finished_sweep["uri"]).get_experiment_by_name("ui").experiment_id
    assert ui.main([str(finished_sweep["tmp"]), "--port", "5123", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert f"ui: http://127.0.0.1:5123/#/experiments/{exp_id}/runs?workflowType=machine_learning&searchFilter=" \
           f"metrics.selected_val_acc%20%3E%200&orderByKey=metrics.%60selected_val_acc%60&orderByAsc=false" in out
    assert ui.main([str(finished_sweep["tmp"] / "nowhere")]) == 2
    assert "no MLflow store at" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_printed_link_opens_on_the_selected_trials_in_a_real_browser(finished_sweep):
    """`distill ui STORAGE --port N` serves the finished sweep's store on 127.0.0.1 and prints the link; headless
    Chromium (driven by Playwright) opens it with no click and finds the selected trials' run names, the model
    training views (no GenAI overview) and the per-trial columns. Saves the screenshot the docs show
    (DISTILL_UPDATE_SCREENSHOT=1 copies it to docs/mlflow-ui.png)."""
    playwright = pytest.importorskip("playwright.sync_api")
    tmp = finished_sweep["tmp"]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "distill.ui", str(tmp), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    shot = tmp / "mlflow-ui.png"
    selected = {s["train_run"] for s in finished_sweep["results"]["selected"]["validation"]}
    try:
        link = ""
        while not link.startswith("ui: "):
            link = server.stdout.readline()
            assert link, "distill ui printed no link"
        link = link.split(" ", 1)[1].strip()
        import threading

        log: list[str] = []   # the server's console (read as it comes: never a full pipe)
        threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1800, "height": 800})
            page.goto(link, timeout=60000)
            for name in selected:                                                    # no click: listed at once
                page.wait_for_selector(f"text={name}", timeout=60000)
            body = page.inner_text("body")
            rows = page.locator('[role="row"]').all_inner_texts()
            assistant = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
            if assistant.count():
                assistant.first.click()                         # for the screenshot: close the side panel (docs)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert "Training runs" in body or "Runs" in body
    assert "Detect Issues in Your Traces" not in body and "token usage" not in body.lower()
    # the filter lists the selected trials flat (not the parent, not the other trials), best first
    assert not [r for r in rows if "ui (sweep)" in r]
    listed = [name for r in rows for name in [n for n in selected if n in r]]
    assert sorted(listed) == sorted(selected), rows
    for s in finished_sweep["results"]["selected"]["validation"]:   # each says its method and accuracies
        assert any(f"{s['test_domain']} {100 * s['test_acc']:.1f} · kd · val {100 * s['val_acc']:.1f} · step "
                   f"{s['step']} · {s['train_run']}" in r for r in rows), rows
    assert shot.is_file() and shot.stat().st_size > 10_000
    # the console a user reads: MLflow's INFO lines, no warning (its dependencies' deprecations are silenced)
    assert log and not [line for line in log if "Warning" in line or "WARNING" in line], "".join(log)
    if os.environ.get("DISTILL_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "mlflow-ui.png")
