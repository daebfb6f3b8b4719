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
    """A finished tiny sweep (2 held-out domains x 1 trial) in its own MLflow store."""
    from distill import tracking
    from distill.tune import make_plan, run_sweep

    tmp = tmp_path_factory.mktemp("ui")
    uri = tracking.sqlite_uri(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    sweep = {"name": "ui", "storage": str(session_storage), "test_domains": ["sketch", "cartoon"], "seeds": [0],
             "dataset": {"world": {"per_class": 20}},
             "student": {"backbone": "small_cnn"}, "method": {"name": "kd"},
             "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "amp": "off"},
             "search": {"num_samples": 1, "space": {"train.lr": {"loguniform": [1e-3, 3e-3]}}}}
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
    assert len(children) == 2
    note = parent.data.tags["mlflow.note.content"]
    assert "searches (held-out domain x seed)" in note and "| kd |" in note       # the plan and the table
    assert "train.lr" not in parent.data.params and "method.temperature" in parent.data.params  # searched: no
    assert {"test_acc/sketch", "test_acc/cartoon", "teacher_zero_shot/sketch", "chance"} <= set(parent.data.metrics)
    for run in [parent, *children]:                                           # "Created by", "Source"
        assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.source.name")
    for child in children:
        assert child.data.tags["distill.method"] == "kd" and "searched.train.lr" in child.data.tags
        assert {"selected_test_acc", "selected_val_acc", "selected_step"} <= set(child.data.metrics)
        assert child.data.params["train.lr"] == child.data.tags["searched.train.lr"]


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


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_mlflow_ui_shows_the_sweep_in_a_real_browser(finished_sweep):
    """`mlflow ui` on 127.0.0.1 against the finished sweep's store; headless Chromium (driven by Playwright) opens
    the experiment: its runs page lists the parent run, expanding it shows the child runs, and the per-domain
    accuracy columns (the parent's test_acc/<domain>, each trial's selected_test_acc) can be put in the table. Saves
    the screenshot the README shows (DISTILL_UPDATE_SCREENSHOT=1 copies it to docs/mlflow-ui.png)."""
    import mlflow

    playwright = pytest.importorskip("playwright.sync_api")
    uri, tmp = finished_sweep["uri"], finished_sweep["tmp"]
    exp_id = mlflow.MlflowClient(uri).get_experiment_by_name("ui").experiment_id
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    shot = tmp / "mlflow-ui.png"
    try:
        deadline = time.time() + 90
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
            page = browser.new_page(viewport={"width": 2200, "height": 700})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs", timeout=60000)
            page.wait_for_selector("text=Training runs", timeout=60000)             # opens on its runs
            parent = page.locator('[role="row"]', has_text="ui (sweep)").first
            parent.wait_for(timeout=60000)
            parent.locator("button").first.click()                                  # expand the parent
            page.wait_for_selector("text=ui-sketch-s0", timeout=30000)
            assert page.locator("text=ui-cartoon-s0").count() >= 1
            assistant = page.locator('xpath=//*[normalize-space(.)="MLflow Assistant"]/following::button[3]')
            if assistant.count():
                assistant.first.click()                                             # close the side panel
            page.get_by_role("button", name="Columns").click()
            for column in ("Dataset", "Models"):                                    # room for the metrics
                page.get_by_placeholder("Search columns").fill(column)
                page.locator(f"xpath=//*[normalize-space(.)='{column}' and not(self::strong)]").last.click()
            for column in ("selected_test_acc", "selected_step", "test_acc/sketch", "test_acc/cartoon"):
                page.get_by_placeholder("Search columns").fill(column)
                # the entry whose whole text is the column (a search highlights matches inside longer names too)
                page.locator(f"xpath=//*[normalize-space(.)='{column}' and not(self::strong)]").last.click()
                page.wait_for_timeout(300)
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
            headers = " ".join(page.locator('[role="columnheader"]').all_inner_texts())
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert "selected_test_acc" in headers and "test_acc/sketch" in headers, headers
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("DISTILL_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "mlflow-ui.png")
