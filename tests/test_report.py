"""Model selection and the report, on hand-made evaluation rows (no Ray, no training)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from distill import report


def row(trial, step, val, test, test_out=None, domain="photo", seed=0, method="erm", search=None, sweep="sw",
        **params):
    return {"event": "eval", "sweep": sweep, "search": search or f"{domain}-s{seed}", "test_domain": domain,
            "seed": seed, "trial_id": f"abcde_{trial:05d}", "step": step, "val_acc": val, "val_acc_best": val,
            "test_acc": test, "test_out_acc": test if test_out is None else test_out, "method": method,
            "params": {"method.name": method, **params}, "checkpoint_path": f"/ckpt/{trial}/{step}",
            "train_run": f"{sweep}-{domain}-s{seed}-abcde_{trial:05d}"}


def sweep(rows, name="sw", domains=("photo",), seeds=(0,), methods=None, searched=False, runs=None, events=()):
    methods = methods or sorted({r["method"] for r in rows})
    return {"name": name, "rows": report.dedupe(rows), "events": list(events), "runs": runs or {},
            "plan": {"sweep": name, "test_domains": list(domains), "seeds": list(seeds), "methods": methods,
                     "method_searched": searched}}


def cell(results, selection, label, domain):
    return report.table_row(results, selection, label)["domains"][domain]


def test_selection_reports_test_acc_of_best_validation_trial_and_step_not_best_test():
    rows = [
        # trial 0: the best source-validation accuracy (at step 10), poor on the test domain
        row(0, 5, 0.70, 0.60), row(0, 10, 0.90, 0.50), row(0, 15, 0.85, 0.65),
        # trial 1: worse on validation, the best on the test domain (also on its held-out 20%: the oracle's pick)
        row(1, 5, 0.60, 0.80), row(1, 10, 0.80, 0.95), row(1, 15, 0.75, 0.90),
    ]
    results = report.build([sweep(rows)])
    (sel,) = results["selected"]["validation"]
    assert (sel["trial_id"], sel["step"]) == ("abcde_00000", 10)
    assert sel["test_acc"] == 0.50 and sel["val_acc"] == 0.90
    assert sel["checkpoint_path"] == "/ckpt/0/10" and sel["params"] == {"method.name": "erm"}
    assert cell(results, "validation", "erm", "photo")["mean"] == pytest.approx(0.50)
    (orc,) = results["selected"]["oracle"]
    assert (orc["trial_id"], orc["step"]) == ("abcde_00001", 10)
    assert cell(results, "oracle", "erm", "photo")["mean"] == pytest.approx(0.95)


def test_oracle_selects_on_test_out_but_reports_test_in():
    rows = [row(0, 5, 0.9, test=0.70, test_out=0.10), row(1, 5, 0.1, test=0.20, test_out=0.99)]
    results = report.build([sweep(rows)])
    (orc,) = results["selected"]["oracle"]
    assert orc["trial_id"] == "abcde_00001" and orc["test_acc"] == 0.20


def test_ties_go_to_the_earlier_trial_then_the_earlier_step():
    rows = [row(2, 5, 0.8, 0.1), row(1, 10, 0.8, 0.2), row(1, 5, 0.8, 0.3)]
    (sel,) = report.build([sweep(rows)])["selected"]["validation"]
    assert (sel["trial_id"], sel["step"]) == ("abcde_00001", 5)


def test_non_finite_validation_is_never_selected():
    rows = [row(0, 5, float("nan"), 0.99), row(1, 5, 0.5, 0.4), row(2, 5, None, 0.98)]
    (sel,) = report.build([sweep(rows)])["selected"]["validation"]
    assert sel["trial_id"] == "abcde_00001"


def test_mean_std_over_seeds_and_average_over_domains():
    rows = []
    acc = {("photo", 0): 0.6, ("photo", 1): 0.8, ("sketch", 0): 0.4, ("sketch", 1): 0.5}
    for (d, s), a in acc.items():
        rows += [row(0, 5, 0.9, a, domain=d, seed=s), row(1, 5, 0.1, 0.99, domain=d, seed=s)]
    results = report.build([sweep(rows, domains=("photo", "sketch"), seeds=(0, 1))])
    photo = cell(results, "validation", "erm", "photo")
    assert photo["mean"] == pytest.approx(0.7) and photo["std"] == pytest.approx(math.sqrt(0.02)) and photo["n"] == 2
    avg = report.table_row(results, "validation", "erm")["avg"]
    assert avg["mean"] == pytest.approx((0.7 + 0.45) / 2)
    assert avg["std"] == pytest.approx(math.sqrt(((0.5 - 0.575) ** 2 + (0.65 - 0.575) ** 2)))  # per-seed averages
    text = report.render_text(results)
    assert "70.0 ± 14.1" in text and "57.5 ± 10.6" in text


def test_one_seed_has_no_error_bar_and_missing_domain_has_no_average():
    rows = [row(0, 5, 0.9, 0.5, domain="photo")]
    results = report.build([sweep(rows, domains=("photo", "sketch"))])
    r = report.table_row(results, "validation", "erm")
    assert r["domains"]["photo"]["std"] is None and "sketch" not in r["domains"] and r["avg"]["mean"] is None
    line = next(ln for ln in report.render_text(results).splitlines() if ln.startswith("| erm |"))
    assert line == "| erm | 50.0 | – | – |"


def test_searched_method_gives_a_row_per_method_and_an_overall_row():
    rows = [row(0, 5, 0.70, 0.60, method="erm"), row(1, 5, 0.80, 0.55, method="kd", temperature=3.0),
            row(2, 5, 0.75, 0.90, method="erm")]
    results = report.build([sweep(rows, methods=["erm", "kd"], searched=True)])
    labels = [r["method"] for r in results["table"]["validation"]]
    assert labels == ["erm", "kd", "selected over erm/kd"]
    assert cell(results, "validation", "erm", "photo")["mean"] == pytest.approx(0.90)  # trial 2 (val 0.75)
    assert cell(results, "validation", "kd", "photo")["mean"] == pytest.approx(0.55)
    overall = report.overall_group(results)
    assert overall == "selected over erm/kd"
    assert cell(results, "validation", overall, "photo")["mean"] == pytest.approx(0.55)  # kd has the best val
    sel = next(s for s in results["selected"]["validation"] if s["method_group"] == overall)
    assert sel["method"] == "kd" and sel["params"]["temperature"] == 3.0


def test_duplicate_reports_keep_the_last_and_torn_lines_are_skipped(tmp_path):
    d = tmp_path / "sw"
    d.mkdir()
    lines = [json.dumps(row(0, 5, 0.5, 0.1)), json.dumps(row(0, 5, 0.6, 0.2)), json.dumps(row(0, 10, 0.4, 0.3)),
             json.dumps({"event": "end", "search": "photo-s0", "trial_id": "abcde_00000", "status": "completed"}),
             '{"event": "eval", "trial_id": "abcde_0']
    (d / "trials.jsonl").write_text("\n".join(lines))
    rows = report.load_rows(d)
    assert [(r["step"], r["val_acc"]) for r in rows] == [(5, 0.6), (10, 0.4)]
    assert report.load_events(d)[0]["status"] == "completed"


def _write_sweep(path, rows, plan, events=()):
    path.mkdir(parents=True)
    (path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, *events]))
    (path / "plan.json").write_text(json.dumps(plan))


def test_write_files_and_cli_puts_sweeps_side_by_side(tmp_path, capsys):
    a = [row(0, 5, 0.9, 0.5, domain=d, sweep="sw-erm", method="erm") for d in ("photo", "sketch")]
    b = [row(0, 5, 0.9, 0.7, domain=d, sweep="sw-kd", method="kd") for d in ("photo", "sketch")]
    failed = {"event": "end", "search": "photo-s0", "trial_id": "abcde_00003", "method": "kd", "status": "error",
              "error": "FloatingPointError: non-finite loss nan at step 3"}
    plan = {"test_domains": ["photo", "sketch"], "seeds": [0], "method_searched": False}
    _write_sweep(tmp_path / "sw-erm", a, {**plan, "sweep": "sw-erm", "methods": ["erm"]})
    _write_sweep(tmp_path / "sw-kd", b, {**plan, "sweep": "sw-kd", "methods": ["kd"]}, events=[failed])

    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sw-erm"), str(tmp_path / "sw-kd"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| erm | 50.0 | 50.0 | 50.0 |" in printed and "| kd | 70.0 | 70.0 | 70.0 |" in printed
    assert "ORACLE" in printed and "| kd (oracle) |" in printed
    md = (out / "results.md").read_text()
    assert "FloatingPointError" in md and "1 failed" in md
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert {(r["selection"], r["method_group"], r["test_domain"]) for r in lines} == {
        (s, m, d) for s in ("validation", "oracle") for m in ("erm", "kd") for d in ("photo", "sketch")}
    data = json.loads((out / "results.json").read_text())
    assert data["sweeps"] == ["sw-erm", "sw-kd"]
    assert all(s["checkpoint_path"] and s["step"] == 5 for s in data["selected"]["validation"])
    for name in ("accuracy.png", "val_vs_test.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert not (out / "plots" / "history.png").exists()  # one trial per search: no optimisation history to draw


def test_history_plot_only_when_a_search_had_several_trials(tmp_path):
    from distill import plots
    one = [row(0, 5, 0.9, 0.5)]
    two = one + [row(1, 5, 0.8, 0.6)]
    out = tmp_path / "plots"
    made = plots.make_all(report.build([sweep(two)]), two, out)
    assert out / "history.png" in made and (out / "history.png").stat().st_size > 1000
    made = plots.make_all(report.build([sweep(one)]), one, out)  # a re-report of fewer trials drops the stale one
    assert [p.name for p in made] == ["accuracy.png", "val_vs_test.png"] and not (out / "history.png").exists()


def test_same_method_in_two_sweeps_is_labelled_by_sweep(tmp_path):
    rows_a = [row(0, 5, 0.9, 0.5, sweep="a")]
    rows_b = [row(0, 5, 0.9, 0.6, sweep="b")]
    results = report.build([sweep(rows_a, name="a"), sweep(rows_b, name="b")])
    assert [r["method"] for r in results["table"]["validation"]] == ["erm [a]", "erm [b]"]


def test_cli_rejects_a_directory_without_rows(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "trials.jsonl" in capsys.readouterr().err
