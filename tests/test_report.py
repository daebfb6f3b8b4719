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
        # trial 1: worse on validation, the best on the test domain (also on its held-out 20%)
        row(1, 5, 0.60, 0.80), row(1, 10, 0.80, 0.95), row(1, 15, 0.75, 0.90),
    ]
    results = report.build([sweep(rows)])
    (sel,) = results["selected"]["validation"]
    assert (sel["trial_id"], sel["step"]) == ("abcde_00000", 10)
    assert sel["test_acc"] == 0.50 and sel["val_acc"] == 0.90
    assert sel["checkpoint_path"] == "/ckpt/0/10" and sel["params"] == {"method.name": "erm"}
    assert cell(results, "validation", "erm", "photo")["mean"] == pytest.approx(0.50)
    # the oracle (DomainBed's) compares the trials' last steps: trial 1 at step 15 (0.90 > trial 0's 0.65), not
    # trial 1's best step 10
    (orc,) = results["selected"]["oracle"]
    assert (orc["trial_id"], orc["step"]) == ("abcde_00001", 15)
    assert cell(results, "oracle", "erm", "photo")["mean"] == pytest.approx(0.90)


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
    assert photo["se"] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))  # = 0.1
    avg = report.table_row(results, "validation", "erm")["avg"]
    assert avg["mean"] == pytest.approx((0.7 + 0.45) / 2)
    avg_std = math.sqrt(((0.5 - 0.575) ** 2 + (0.65 - 0.575) ** 2))  # of the per-seed averages 0.5 and 0.65
    assert avg["std"] == pytest.approx(avg_std) and avg["se"] == pytest.approx(avg_std / math.sqrt(2))
    text = report.render_text(results)  # the default error bar: the standard error
    assert "70.0 ± 10.0" in text and "57.5 ± 7.5" in text and "mean ± standard error over 2 seeds" in text
    text = report.render_text(report.build([sweep(rows, domains=("photo", "sketch"), seeds=(0, 1))], error="std"))
    assert "70.0 ± 14.1" in text and "57.5 ± 10.6" in text and "mean ± std over 2 seeds" in text


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
    assert "Test-domain oracle" in printed and "| kd (oracle) |" in printed
    md = (out / "results.md").read_text()
    assert "FloatingPointError" in md and "1 failed" in md
    with open(out / "selections.csv") as f:
        lines = list(csv.DictReader(f))
    assert {(r["selection"], r["method_group"], r["test_domain"]) for r in lines} == {  # no lodo rows: none selected
        (s, m, d) for s in ("validation", "oracle") for m in ("erm", "kd") for d in ("photo", "sketch")}
    with open(out / "results.csv") as f:   # the table: one line per (selection, method row), then the gap
        table = [(r["selection"], r["method"], r["sweep"], r["photo_mean"], r["avg_mean"]) for r in csv.DictReader(f)]
    assert table == [("validation", "erm", "sw-erm", "0.5", "0.5"), ("validation", "kd", "sw-kd", "0.7", "0.7"),
                     ("lodo", "erm", "sw-erm", "", ""), ("lodo", "kd", "sw-kd", "", ""),
                     ("oracle", "erm", "sw-erm", "0.5", "0.5"), ("oracle", "kd", "sw-kd", "0.7", "0.7"),
                     ("gap", "erm", "sw-erm", "0.0", "0.0"), ("gap", "kd", "sw-kd", "0.0", "0.0")]
    assert "\\begin{tabular}" in (out / "results.tex").read_text()
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


# ------------------------------------------------------------------------------ error bars, oracle, selectable, LODO
def test_standard_error_and_std_over_three_seeds():
    acc = {("photo", 0): 0.5, ("photo", 1): 0.6, ("photo", 2): 0.9,
           ("sketch", 0): 0.3, ("sketch", 1): 0.4, ("sketch", 2): 0.2}
    rows = [row(0, 5, 0.9, a, domain=d, seed=s) for (d, s), a in acc.items()]
    sw = sweep(rows, domains=("photo", "sketch"), seeds=(0, 1, 2))
    # by hand: photo's mean 2/3, sample std sqrt(sum of squared deviations / 2), standard error std / sqrt(3)
    mean = (0.5 + 0.6 + 0.9) / 3
    std = math.sqrt(((0.5 - mean) ** 2 + (0.6 - mean) ** 2 + (0.9 - mean) ** 2) / 2)  # 0.2082
    se = std / math.sqrt(3)  # 0.1202
    # Avg: the per-seed averages over the two domains are 0.40, 0.50, 0.55
    per_seed = [(0.5 + 0.3) / 2, (0.6 + 0.4) / 2, (0.9 + 0.2) / 2]
    avg_mean = sum(per_seed) / 3
    avg_std = math.sqrt(sum((v - avg_mean) ** 2 for v in per_seed) / 2)  # 0.0764
    for error, err, avg_err, text in (("se", se, avg_std / math.sqrt(3), "66.7 ± 12.0 | 30.0 ± 5.8 | 48.3 ± 4.4"),
                                      ("std", std, avg_std, "66.7 ± 20.8 | 30.0 ± 10.0 | 48.3 ± 7.6")):
        results = report.build([sw], error=error)
        photo = cell(results, "validation", "erm", "photo")
        assert photo["mean"] == pytest.approx(mean) and photo["n"] == 3
        assert photo["std"] == pytest.approx(std) and photo["se"] == pytest.approx(se)
        assert photo["err"] == pytest.approx(err)
        avg = report.table_row(results, "validation", "erm")["avg"]
        assert avg["mean"] == pytest.approx(avg_mean) and avg["n"] == 3
        assert avg["std"] == pytest.approx(avg_std) and avg["err"] == pytest.approx(avg_err)
        assert results["error"] == error
        printed = report.render_text(results)
        assert f"| erm | {text} |" in printed
        assert printed.count(f"mean ± {'standard error' if error == 'se' else 'std'} over 3 seeds") == 1   # said once
    single = report.build([sweep([row(0, 5, 0.9, 0.5)])])
    c = cell(single, "validation", "erm", "photo")
    assert (c["std"], c["se"], c["err"], c["n"]) == (None, None, None, 1)


def test_oracle_takes_each_trials_last_step_even_when_an_earlier_step_was_better_on_test_out():
    rows = [
        # trial 0: the best test_out_acc of all at step 5, but its last step (10) is poor
        row(0, 5, 0.5, test=0.95, test_out=0.99), row(0, 10, 0.5, test=0.41, test_out=0.40),
        # trial 1: its last step is the best last step
        row(1, 5, 0.5, test=0.55, test_out=0.50), row(1, 10, 0.5, test=0.62, test_out=0.60),
    ]
    results = report.build([sweep(rows)])
    (orc,) = results["selected"]["oracle"]
    assert (orc["trial_id"], orc["step"], orc["test_acc"]) == ("abcde_00001", 10, 0.62)
    assert cell(results, "oracle", "erm", "photo")["mean"] == pytest.approx(0.62)


def test_unselectable_rows_are_never_selected_by_validation_but_a_last_row_counts_for_the_oracle():
    rows = [
        # trial 0: a raw-model evaluation (not selectable) with the best val_acc, then its delivered (SWAD) model
        {**row(0, 5, 0.95, 0.30), "selectable": False, "eval_model": "raw"},
        {**row(0, 10, 0.80, 0.60), "selectable": True, "eval_model": "swad", "final": True},
        # trial 1: a selectable step 5 (no `selectable` field: selectable), and a last row that is not selectable
        row(1, 5, 0.85, 0.70),
        {**row(1, 10, 0.90, 0.97, test_out=0.99), "selectable": False, "final": True},
    ]
    results = report.build([sweep(rows)])
    (sel,) = results["selected"]["validation"]
    assert (sel["trial_id"], sel["step"], sel["test_acc"]) == ("abcde_00001", 5, 0.70)  # 0.85 beats 0.80
    (orc,) = results["selected"]["oracle"]  # last rows: trial 0 step 10 (0.60), trial 1 step 10 (0.99)
    assert (orc["trial_id"], orc["step"], orc["test_acc"]) == ("abcde_00001", 10, 0.97)
    only_unselectable = report.build([sweep([{**row(0, 5, 0.9, 0.5), "selectable": False}])])
    assert only_unselectable["selected"]["validation"] == []
    assert cell(only_unselectable, "oracle", "erm", "photo")["mean"] == pytest.approx(0.5)
    assert "photo" not in report.table_row(only_unselectable, "validation", "erm")["domains"]


SOURCES = ("art", "cartoon", "sketch")


def main_row(trial, step, val, test, seed=0, **kw):
    """An evaluation row of a search held out on photo, with per-source-domain validation accuracies."""
    return {**row(trial, step, val, test, seed=seed, **kw), **{f"val_acc/{d}": val for d in SOURCES}}


def lodo(trial, step, domain, acc, seed=0, sweep="sw", **extra):
    return {"event": "lodo", "sweep": sweep, "search": f"photo-s{seed}", "test_domain": "photo", "seed": seed,
            "trial_id": f"abcde_{trial:05d}", "step": step, "lodo_domain": domain, "lodo_acc": acc,
            "selectable": True, "method": "erm", "params": {"method.name": "erm"}, **extra}


def lodo_all(trial, step, accs, seed=0, **extra):
    return [lodo(trial, step, d, a, seed=seed, **extra) for d, a in zip(SOURCES, accs)]


def lodo_case():
    rows = [main_row(0, 5, 0.9, 0.50), main_row(0, 10, 0.8, 0.55), main_row(1, 5, 0.7, 0.65),
            main_row(2, 5, 0.6, 0.75), {**main_row(2, 10, 0.5, 0.80), "selectable": False},
            main_row(3, 5, 0.4, 0.85)]
    lodo_rows = [
        *lodo_all(0, 5, (0.6, 0.5, 0.4)),     # mean 0.5
        *lodo_all(0, 10, (0.7, 0.6, 0.8)),    # mean 0.7: the pick
        *lodo_all(1, 5, (0.9, 0.9)),          # no sketch run: incomplete (its mean over two would be 0.9)
        *lodo_all(2, 5, (0.8, 0.7, 0.5)),     # mean 0.6667
        *lodo_all(2, 10, (0.95, 0.95, 0.95)),  # its main row is not selectable
        *lodo_all(3, 5, (0.99, 0.99)), lodo(3, 5, "sketch", 0.99, selectable=False),  # one lodo row not selectable
    ]
    return rows, lodo_rows


def test_lodo_picks_the_best_mean_lodo_accuracy_and_reports_the_main_rows_test_acc():
    rows, lodo_rows = lodo_case()
    results = report.build([{**sweep(rows), "lodo": report.dedupe_lodo(lodo_rows)}])
    (sel,) = results["selected"]["lodo"]
    assert (sel["trial_id"], sel["step"], sel["test_acc"]) == ("abcde_00000", 10, 0.55)
    assert sel["lodo_acc"] == pytest.approx((0.7 + 0.6 + 0.8) / 3)
    assert sel["lodo_accs"] == pytest.approx({"art": 0.7, "cartoon": 0.6, "sketch": 0.8})
    assert cell(results, "lodo", "erm", "photo")["mean"] == pytest.approx(0.55)
    (val,) = results["selected"]["validation"]  # training-domain validation is unchanged: trial 0 step 5
    assert (val["trial_id"], val["step"], val["test_acc"]) == ("abcde_00000", 5, 0.50)
    assert "no leave-one-domain-out runs" not in report.render_markdown(results)


def test_lodo_ignores_trials_with_incomplete_lodo_rows():
    rows, lodo_rows = lodo_case()
    # without trial 0's and trial 2's step-5 runs, only incomplete or unselectable (trial, step)s are left
    kept = [r for r in lodo_rows if (r["trial_id"], r["step"]) not in {("abcde_00000", 5), ("abcde_00000", 10),
                                                                       ("abcde_00002", 5)}]
    results = report.build([{**sweep(rows), "lodo": report.dedupe_lodo(kept)}])
    assert results["selected"]["lodo"] == [] and "photo" not in report.table_row(results, "lodo", "erm")["domains"]
    # seed 1: only trial 1 has all three runs, with a lower mean than trial 0's two-domain one
    rows1 = [main_row(0, 5, 0.9, 0.3, seed=1), main_row(1, 5, 0.8, 0.6, seed=1)]
    lodo1 = [*lodo_all(0, 5, (0.99, 0.99), seed=1), *lodo_all(1, 5, (0.2, 0.3, 0.4), seed=1)]
    results = report.build([{**sweep(rows1, seeds=(1,)), "lodo": report.dedupe_lodo(lodo1)}])
    (sel,) = results["selected"]["lodo"]
    assert (sel["trial_id"], sel["test_acc"]) == ("abcde_00001", 0.6) and sel["lodo_acc"] == pytest.approx(0.3)


def test_no_lodo_rows_gives_empty_cells_and_a_note():
    rows = [row(0, 5, 0.9, 0.5, domain="photo"), row(0, 5, 0.9, 0.6, domain="sketch")]
    results = report.build([sweep(rows, domains=("photo", "sketch"))])
    r = report.table_row(results, "lodo", "erm")
    assert r["domains"] == {} and r["avg"]["mean"] is None and results["selected"]["lodo"] == []
    assert results["lodo_rows"] == {"sw": 0}
    text = report.render_text(results)
    # the all-empty table is not printed: one line says why and how to get it
    assert "| erm | – | – | – |" not in text
    assert "**Leave-one-domain-out validation**: no table (no leave-one-domain-out runs in this sweep: `search.lodo: " \
           "true` trains the models it needs) (`docs/selection.md#leave-one-domain-out`)." in text
    md = report.render_markdown(results)
    assert "The sweep has no leave-one-domain-out runs (`search.lodo: true` produces them)" in md
    assert "| erm | 50.0 | 60.0 | 55.0 |" in md  # the validation table is unaffected


def test_lodo_rows_are_loaded_deduped_and_ignored_by_the_other_loaders(tmp_path):
    d = tmp_path / "sw"
    d.mkdir()
    rows, lodo_rows = lodo_case()
    stale = lodo(0, 10, "art", 0.10)  # reported again after a resume: the last report wins
    lines = [*rows, stale, *lodo_rows, {"event": "end", "search": "photo-s0", "trial_id": "abcde_00000",
                                        "status": "completed"}]
    (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [(r["trial_id"], r["step"]) for r in report.load_rows(d)] == [(r["trial_id"], r["step"]) for r in rows]
    loaded = report.load_lodo_rows(d)
    assert len(loaded) == len(lodo_rows)
    assert next(r for r in loaded if (r["trial_id"], r["step"], r["lodo_domain"]) == ("abcde_00000", 10, "art"))[
        "lodo_acc"] == 0.7
    (sel,) = report.build_from_dirs([d])["selected"]["lodo"]
    assert (sel["trial_id"], sel["step"], sel["test_acc"]) == ("abcde_00000", 10, 0.55)


def _cli_sweep(path):
    """photo held out (sources art, sketch), seeds 0 and 1. Per seed: trial 0 wins training-domain validation,
    trial 1 wins leave-one-domain-out validation, trial 2 (no lodo runs) wins the oracle."""
    tests = {(0, 0): 0.40, (0, 1): 0.50, (1, 0): 0.60, (1, 1): 0.80, (2, 0): 0.95, (2, 1): 0.95}
    vals = {0: 0.9, 1: 0.5, 2: 0.1}
    rows, lodos = [], []
    for (trial, seed), test in tests.items():
        rows.append({**row(trial, 5, vals[trial], test, seed=seed), "val_acc/art": vals[trial],
                     "val_acc/sketch": vals[trial]})
        if trial < 2:
            lodos += [lodo(trial, 5, dom, 0.3 + 0.4 * trial, seed=seed) for dom in ("art", "sketch")]
    _write_sweep(path, rows, {"sweep": "sw", "test_domains": ["photo"], "seeds": [0, 1], "methods": ["erm"],
                              "method_searched": False}, events=lodos)


def _first_row(printed, label="| erm |"):
    return next(ln for ln in printed.splitlines() if ln.startswith(label))


def test_cli_selection_and_error_flags_change_what_is_printed_and_files_hold_all_three(tmp_path, capsys):
    _cli_sweep(tmp_path / "sw")
    # validation: 0.40, 0.50 -> mean 45.0, std sqrt(0.005) = 7.1, se 7.07 / sqrt(2) = 5.0
    # lodo: 0.60, 0.80 -> mean 70.0, std sqrt(0.02) = 14.1, se 10.0;  oracle: 0.95, 0.95 -> 95.0 ± 0.0
    assert report.main([str(tmp_path / "sw")]) == 0
    printed = capsys.readouterr().out
    assert _first_row(printed) == "| erm | 45.0 ± 5.0 | 45.0 ± 5.0 |"
    assert printed.index("**Training-domain validation** (the main table): the (trial, step) with the best " \
                         "source-domain validation accuracy. (`docs/selection.md#training-domain-validation`)") \
        < printed.index("**Paired against erm**") < printed.index("**Leave-one-domain-out validation**") \
        < printed.index("**Test-domain oracle")
    assert "mean ± standard error over 2 seeds" in printed and "mean ± std over" not in printed
    assert "| erm | 70.0 ± 10.0 | 70.0 ± 10.0 |" in printed
    assert "| erm (oracle) | 95.0 ± 0.0 | 95.0 ± 0.0 |" in printed

    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sw"), "--selection", "lodo", "--error", "std", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert _first_row(printed) == "| erm | 70.0 ± 14.1 | 70.0 ± 14.1 |"
    assert "**Leave-one-domain-out validation** (the main table)" in printed
    assert printed.index("Leave-one-domain-out validation") < printed.index("Training-domain validation") \
        < printed.index("Test-domain oracle")
    assert "mean ± std over 2 seeds" in printed and "standard error" not in printed
    assert "| erm | 45.0 ± 7.1 | 45.0 ± 7.1 |" in printed

    md = (out / "results.md").read_text()
    for title in ("Training-domain validation", "Leave-one-domain-out validation", "Test-domain oracle"):
        assert f"{title}" in md
    assert md.count("### Selected (trial, step)") == 3
    # trial 1's lodo_acc: 0.3 + 0.4 = 0.7 on both source domains
    assert "| erm | photo | 0 | abcde_00001 | 5 | 50.0 | 70.0 | 60.0 | 60.0 |" in md
    data = json.loads((out / "results.json").read_text())
    assert set(data["table"]) == set(data["selected"]) == {"validation", "lodo", "oracle"}
    assert data["error"] == "std" and data["main_selection"] == "lodo"
    assert [(s["trial_id"], s["seed"]) for s in data["selected"]["lodo"]] == [("abcde_00001", 0), ("abcde_00001", 1)]
    assert [(s["trial_id"], s["seed"]) for s in data["selected"]["oracle"]] == [("abcde_00002", 0),
                                                                                 ("abcde_00002", 1)]
    with open(out / "selections.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(r["selection"], r["trial_id"], r["seed"], r["step"], r["test_acc"], r["lodo_acc"]) for r in lines] == [
        ("validation", "abcde_00000", "0", "5", "0.4", ""), ("validation", "abcde_00000", "1", "5", "0.5", ""),
        ("lodo", "abcde_00001", "0", "5", "0.6", "0.7"), ("lodo", "abcde_00001", "1", "5", "0.8", "0.7"),
        ("oracle", "abcde_00002", "0", "5", "0.95", ""), ("oracle", "abcde_00002", "1", "5", "0.95", "")]
    assert list(lines[0]) == report.SELECTION_FIELDS
    assert lines[0]["trial_index"] == "" and json.loads(lines[0]["params"]) == {"method.name": "erm"}
    assert lines[0]["checkpoint_path"] == "/ckpt/0/5" and lines[0]["method_group"] == "erm"
    # results.csv, the table (--error std): validation 0.40, 0.50 -> std sqrt(0.005); lodo 0.60, 0.80 -> std
    # sqrt(0.02); oracle 0.95, 0.95 -> std 0; one domain, so Avg = photo; gap = 0.95 - 0.45 = 0.50
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["selection", "method", "sweep", "photo_mean", "photo_err", "avg_mean", "avg_err",
                              "n_seeds", "error"]
    expected = {"validation": (0.45, math.sqrt(0.005)), "lodo": (0.70, math.sqrt(0.02)), "oracle": (0.95, 0.0)}
    for line in table[:3]:
        mean, err = expected[line["selection"]]
        assert (line["method"], line["sweep"], line["n_seeds"], line["error"]) == ("erm", "sw", "2", "std")
        for k in ("photo", "avg"):
            assert float(line[f"{k}_mean"]) == pytest.approx(mean, abs=1e-6)   # rounded to 6 decimals
            assert float(line[f"{k}_err"]) == pytest.approx(err, abs=1e-6)
    assert [line["selection"] for line in table] == ["validation", "lodo", "oracle", "gap"]
    gap = table[3]
    assert float(gap["photo_mean"]) == pytest.approx(0.50) and float(gap["avg_mean"]) == pytest.approx(0.50)
    assert gap["photo_err"] == gap["avg_err"] == gap["n_seeds"] == gap["error"] == ""
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000


# ------------------------------------------- the table as CSV and LaTeX, the selection gap, the teacher, plots, order
def two_methods():
    """photo and sketch held out, seeds 0 and 1, method.name searched: per search one erm trial (val 0.8) and one kd
    trial (val 0.9, so the overall row's validation always picks kd). test_out = test, one step each."""
    tests = {"erm": {("photo", 0): 0.60, ("photo", 1): 0.70, ("sketch", 0): 0.40, ("sketch", 1): 0.50},
             "kd": {("photo", 0): 0.80, ("photo", 1): 0.90, ("sketch", 0): 0.20, ("sketch", 1): 0.30}}
    rows = [row(trial, 5, 0.8 if m == "erm" else 0.9, a, domain=d, seed=s, method=m)
            for trial, m in enumerate(("erm", "kd")) for (d, s), a in tests[m].items()]
    return sweep(rows, domains=("photo", "sketch"), seeds=(0, 1), methods=["erm", "kd"], searched=True)


def test_results_csv_is_the_table_one_line_per_selection_and_method_row():
    results = report.build([two_methods()])
    table = list(csv.DictReader(report.render_csv(results).splitlines()))
    assert list(table[0]) == ["selection", "method", "sweep", "photo_mean", "photo_err", "sketch_mean", "sketch_err",
                              "avg_mean", "avg_err", "n_seeds", "error"]
    overall = "selected over erm/kd"
    assert [(r["selection"], r["method"]) for r in table] == [
        (s, m) for s in ("validation", "lodo", "oracle", "gap") for m in ("erm", "kd", overall)]
    # by hand: erm photo 0.60, 0.70 -> mean 0.65, std sqrt(0.005), se = std / sqrt(2) = 0.05; sketch 0.45 ± 0.05;
    # the per-seed averages 0.50, 0.60 -> Avg 0.55 ± 0.05. kd: 0.85, 0.25, Avg (0.50, 0.60) 0.55, all ± 0.05.
    # The overall row's validation picks kd; its oracle picks kd on photo (0.85) and erm on sketch (0.45): per-seed
    # averages (0.8 + 0.4) / 2 = 0.60 and (0.9 + 0.5) / 2 = 0.70 -> Avg 0.65 ± 0.05.
    expected = {("validation", "erm"): (0.65, 0.45, 0.55), ("validation", "kd"): (0.85, 0.25, 0.55),
                ("validation", overall): (0.85, 0.25, 0.55), ("oracle", "erm"): (0.65, 0.45, 0.55),
                ("oracle", "kd"): (0.85, 0.25, 0.55), ("oracle", overall): (0.85, 0.45, 0.65)}
    for line in table:
        key = (line["selection"], line["method"])
        if key in expected:
            means = [float(line[f"{k}_mean"]) for k in ("photo", "sketch", "avg")]
            assert means == pytest.approx(list(expected[key]))
            assert [float(line[f"{k}_err"]) for k in ("photo", "sketch", "avg")] == pytest.approx([0.05] * 3)
            assert (line["sweep"], line["n_seeds"], line["error"]) == ("sw", "2", "se")
        elif line["selection"] == "lodo":   # no lodo rows: empty cells, no seeds
            assert line["photo_mean"] == line["avg_mean"] == "" and line["n_seeds"] == "0"
    # the selection gap, oracle minus validation: 0 for the per-method rows, (0, 0.20, 0.10) for the overall row
    gaps = {line["method"]: [float(line[f"{k}_mean"]) for k in ("photo", "sketch", "avg")]
            for line in table if line["selection"] == "gap"}
    assert gaps == {"erm": pytest.approx([0, 0, 0]), "kd": pytest.approx([0, 0, 0]),
                    overall: pytest.approx([0.0, 0.20, 0.10])}


def test_selection_gap_in_json_and_markdown():
    results = report.build([two_methods()])
    gap = {g["method"]: g for g in results["gap"]}
    overall = gap["selected over erm/kd"]
    assert overall["domains"] == pytest.approx({"photo": 0.0, "sketch": 0.45 - 0.25})
    assert overall["avg"] == pytest.approx(0.65 - 0.55) and overall["overall"] is True
    assert gap["erm"]["avg"] == pytest.approx(0.0)
    md = report.render_markdown(results)
    assert "**Selection gap: oracle minus training-domain validation" in md
    part = md[md.index("**Selection gap"):]
    assert "| selected over erm/kd | +0.0 | +20.0 | +10.0 |" in part and "| erm | +0.0 | +0.0 | +0.0 |" in part
    json.dumps(results)   # results.json holds it
    # a missing validation cell: no gap for that domain, nor for Avg
    only_oracle = report.build([sweep([{**row(0, 5, 0.9, 0.5), "selectable": False}])])
    assert only_oracle["gap"] == [{"method": "erm", "sweep": "sw", "overall": True, "domains": {}, "avg": None}]


def test_latex_tables_for_two_methods(tmp_path, capsys):
    results = report.build([two_methods()])
    tex = report.render_latex(results)
    lines = tex.splitlines()
    assert lines[:4] == ["\\documentclass{article}", "\\usepackage{booktabs}", "\\usepackage{adjustbox}",
                         "\\begin{document}"] and lines[-1] == "\\end{document}"
    for marker in ("\\begin{table}[ht]", "\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}}"):
        assert tex.count(marker) == 3   # one table per selection, no teacher here
    assert tex.count("\\begin{tabular}{lccc}") == 3
    assert tex.count("\\textbf{Method} & \\textbf{photo} & \\textbf{sketch} & \\textbf{Avg} \\\\") == 3
    captions = [ln for ln in lines if ln.startswith("\\caption{")]
    assert [c[c.index("Model selection: "):].split(".")[0] for c in captions] == [
        "Model selection: training-domain validation set", "Model selection: leave-one-domain-out cross-validation",
        "Model selection: test-domain validation set (oracle)"]
    assert all("Mean $\\pm$ standard error over 2 seeds" in c for c in captions)
    validation = tex[:tex.index("\\end{table}")]
    assert "erm & 65.0 $\\pm$ 5.0 & 45.0 $\\pm$ 5.0 & 55.0 $\\pm$ 5.0 \\\\" in validation
    assert "kd & 85.0 $\\pm$ 5.0 & 25.0 $\\pm$ 5.0 & 55.0 $\\pm$ 5.0 \\\\" in validation
    lodo_table = tex[tex.index("leave-one-domain-out cross-validation"):tex.index("(oracle)")]
    assert "erm & X & X & X \\\\" in lodo_table   # DomainBed's X: no value
    assert "selected over erm/kd (oracle) & 85.0 $\\pm$ 5.0 & 45.0 $\\pm$ 5.0 & 65.0 $\\pm$ 5.0 \\\\" in tex
    assert "±" not in tex and "–" not in tex
    # the main selection comes first; names are escaped; std named in the caption
    std = report.build([two_methods()], error="std", selection="oracle")
    tex = report.render_latex(std)
    assert tex.index("(oracle)") < tex.index("training-domain validation set")
    assert "Mean $\\pm$ std over 2 seeds" in tex and "65.0 $\\pm$ 7.1" in tex
    assert report.tex("art_painting 50% & $x#") == "art\\_painting 50\\% \\& \\$x\\#"
    # the CLI: --latex prints it, --out writes results.tex either way
    d = tmp_path / "sw"
    sw = two_methods()
    _write_sweep(d, sw["rows"], sw["plan"])
    assert report.main([str(d), "--latex"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("| Method |") < printed.index("\\begin{tabular}") and printed.count("\\begin{table}") == 3
    assert report.main([str(d), "--out", str(tmp_path / "out")]) == 0
    assert "\\begin{tabular}" not in capsys.readouterr().out
    assert (tmp_path / "out" / "results.tex").read_text() == report.render_latex(report.build_from_dirs([d]))


TEACHER = {"teacher": "clip-vit-b16", "zero_shot": {"photo": 0.80, "sketch": 0.60, "art": 0.9},
           "prompts": "a {style} of a {class}", "chance": 0.2}


def _legend(fig) -> dict[str, object]:
    handles, labels = fig.axes[0].get_legend_handles_labels()
    return dict(zip(labels, handles))


def test_teacher_row_and_chance_in_markdown_json_latex_and_accuracy_plot(tmp_path):
    from distill import plots

    sw = two_methods()
    d = tmp_path / "sw"
    _write_sweep(d, sw["rows"], sw["plan"])
    (d / "teacher.json").write_text(json.dumps(TEACHER))
    out = tmp_path / "out"
    assert report.main([str(d), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    # its mean over the table's test domains (photo, sketch; art is not one): (0.80 + 0.60) / 2 = 0.70
    assert md.count("| teacher (zero-shot) | 80.0 | 60.0 | 70.0 |") == 2   # in each printed table (no LODO runs)
    assert "Teacher (zero-shot): `clip-vit-b16`, prompts: a {style} of a {class}; chance level 20.0% (1/5 classes)." \
        in md
    data = json.loads((out / "results.json").read_text())
    (t,) = data["teacher"]
    assert (t["teacher"], t["prompts"], t["sweeps"], t["label"]) == ("clip-vit-b16", "a {style} of a {class}", ["sw"],
                                                                     "teacher (zero-shot)")
    assert t["zero_shot"] == {"photo": 0.80, "sketch": 0.60, "art": 0.9} and t["mean"] == pytest.approx(0.70)
    assert data["chance"] == pytest.approx(0.2)
    tex = (out / "results.tex").read_text()
    assert tex.count("teacher (zero-shot) & 80.0 & 60.0 & 70.0 \\\\") == 3 and "Chance level 20.0\\%" in tex
    with open(out / "results.csv") as f:
        (zs,) = [r for r in csv.DictReader(f) if r["selection"] == "zero-shot"]
    assert (zs["method"], zs["photo_mean"], zs["sketch_mean"], zs["photo_err"]) == ("teacher (zero-shot)", "0.8",
                                                                                   "0.6", "")
    assert float(zs["avg_mean"]) == pytest.approx(0.70)
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000
    # the plot: a labelled line per domain and over Avg (the teacher), one across the plot (chance)
    fig = plots.accuracy_figure(report.build_from_dirs([d]))
    legend = _legend(fig)
    assert "teacher (zero-shot): clip-vit-b16" in legend and "chance (20.0%)" in legend
    teacher = [c for c in fig.axes[0].collections if c.get_label() == "teacher (zero-shot): clip-vit-b16"]
    (segments,) = [c.get_segments() for c in teacher]
    assert [round(float(s[0][1]), 6) for s in segments] == [80.0]
    ys = sorted(round(float(seg[0][1]), 6) for c in fig.axes[0].collections for seg in c.get_segments()
                if c.get_label() in ("", "_nolegend_") or c.get_label().startswith("_"))
    assert {60.0, 70.0} <= set(ys)   # sketch and Avg, drawn without a second legend entry
    chance = next(ln for ln in fig.axes[0].lines if ln.get_label() == "chance (20.0%)")
    assert list(chance.get_ydata()) == [20.0, 20.0]
    # the legend sits below the axes, covering no bar
    fig.canvas.draw()
    box, axes_box = fig.axes[0].get_legend().get_window_extent(), fig.axes[0].get_window_extent()
    assert box.y1 <= axes_box.y0
    plots._plt().close(fig)


def test_without_teacher_json_chance_comes_from_the_plans_dataset_or_is_left_out(tmp_path):
    from distill import plots

    sw = two_methods()
    results = report.build([sw])
    assert results["teacher"] == [] and results["chance"] is None
    md = report.render_markdown(results)
    assert "teacher (zero-shot)" not in md and "chance level" not in md
    fig = plots.accuracy_figure(results)
    assert not [k for k in _legend(fig) if k.startswith(("teacher", "chance"))]
    plots._plt().close(fig)
    # plan.json's base_config names PACS (7 classes)
    pacs = {**sw, "plan": {**sw["plan"], "base_config": {"dataset": {"name": "PACS", "root": None}}}}
    results = report.build([pacs])
    assert results["chance"] == pytest.approx(1 / 7) and results["teacher"] == []
    assert "Chance level 14.3% (1/7 classes)." in report.render_text(results)
    fig = plots.accuracy_figure(results)
    assert "chance (14.3%)" in _legend(fig)
    plots._plt().close(fig)
    out = tmp_path / "plots"
    assert (out / "accuracy.png") in plots.make_all(results, pacs["rows"], out)
    # an unknown dataset: no chance level
    unknown = {**sw, "plan": {**sw["plan"], "base_config": {"dataset": {"name": "NoSuchSet"}}}}
    assert report.build([unknown])["chance"] is None


def test_one_colour_per_method_in_every_plot_and_only_the_overall_selection_circled(tmp_path):
    from matplotlib.colors import to_rgb

    from distill import plots

    sw = two_methods()
    rows = sw["rows"] + [row(2, 5, 0.85, 0.5, domain=d, seed=s, method="erm") for d in ("photo", "sketch")
                         for s in (0, 1)]   # a second erm trial per search, so history.png is drawn
    sw = {**sw, "rows": report.dedupe(rows)}
    results = report.build([sw])
    colours = plots.method_colours(results, rows)
    assert list(colours) == ["erm", "kd"] and colours["erm"] != colours["kd"]
    # accuracy.png: a method row's bars in its method's colour, the overall row's dark grey
    fig = plots.accuracy_figure(results, colours)
    bars = {c.get_label(): to_rgb(c.patches[0].get_facecolor()) for c in fig.axes[0].containers
            if hasattr(c, "patches")}
    assert bars["erm"] == bars["erm (oracle)"] == to_rgb(colours["erm"])
    assert bars["kd"] == to_rgb(colours["kd"])
    assert bars["selected over erm/kd"] == to_rgb(plots.OVERALL_COLOUR)
    plots._plt().close(fig)
    # val_vs_test.png: trial points coloured by method, the domain as marker; circled: the overall row's selection
    # per (domain, seed) only: 2 domains x 2 seeds = 4 circles (not one per method row too)
    fig = plots.val_vs_test_figure(results, rows, colours)
    ax = fig.axes[0]
    circled = [c for c in ax.collections if c.get_gid() == "selected"]
    assert len(circled) == 4
    overall = {(s["test_domain"], s["seed"]): (100 * s["val_acc"], 100 * s["test_acc"])
               for s in results["selected"]["validation"] if s["method_group"] == "selected over erm/kd"}
    def at(c):
        return tuple(round(float(v), 6) for v in c.get_offsets()[0])

    assert sorted(at(c) for c in circled) == sorted(tuple(round(v, 6) for v in xy) for xy in overall.values())
    assert sorted(at(c) for c in circled) == [(90.0, 20.0), (90.0, 30.0), (90.0, 80.0), (90.0, 90.0)]  # kd's trials
    points = [c for c in ax.collections if c.get_gid() != "selected"]
    assert {to_rgb(c.get_facecolor()[0]) for c in points} == {to_rgb(colours["erm"]), to_rgb(colours["kd"])}
    (kd,) = [c for c in points if at(c) == (90.0, 80.0)]   # kd, photo, seed 0
    (erm,) = [c for c in points if at(c) == (80.0, 60.0)]   # erm's first trial, photo, seed 0
    (erm_sketch,) = [c for c in points if at(c) == (80.0, 40.0)]   # erm's first trial, sketch, seed 0
    assert to_rgb(kd.get_facecolor()[0]) == to_rgb(colours["kd"]) and to_rgb(erm.get_facecolor()[0]) == to_rgb(
        colours["erm"])
    # the marker is the domain's: erm and kd on photo share one, erm on sketch has another
    assert kd.get_paths()[0].vertices.tobytes() == erm.get_paths()[0].vertices.tobytes()
    assert erm.get_paths()[0].vertices.tobytes() != erm_sketch.get_paths()[0].vertices.tobytes()
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"photo", "sketch", "erm", "kd"}
    plots._plt().close(fig)
    # history.png: the points in their method's colour (per search: erm, kd, erm in creation order), the best-so-far
    # line dark grey (each search has both methods)
    fig = plots.history_figure(rows, colours, results["domains"])
    ax = fig.axes[0]
    assert len(ax.collections) == 4   # one per search
    for c in ax.collections:
        assert [to_rgb(f) for f in c.get_facecolors()] == [to_rgb(colours[m]) for m in ("erm", "kd", "erm")]
    assert {to_rgb(ln.get_color()) for ln in ax.lines} == {to_rgb(plots.OVERALL_COLOUR)}
    plots._plt().close(fig)
    made = plots.make_all(results, rows, tmp_path / "plots")
    assert [p.name for p in made] == ["accuracy.png", "val_vs_test.png", "history.png"]


def test_trial_index_decides_the_earlier_trial_for_every_selection_and_the_history():
    # trial abcde_00007 was created first (trial_index 0), abcde_00002 later (trial_index 5): a tie goes to 00007
    first, later = {"trial_index": 0}, {"trial_index": 5}
    rows = [{**main_row(7, 5, 0.8, 0.30), **first}, {**main_row(2, 5, 0.8, 0.60), **later}]
    lodo_rows = [*lodo_all(7, 5, (0.5, 0.5, 0.5), trial_index=0), *lodo_all(2, 5, (0.5, 0.5, 0.5), trial_index=5)]
    results = report.build([{**sweep(rows), "lodo": report.dedupe_lodo(lodo_rows)}])
    for selection in ("validation", "lodo"):   # equal val_acc, equal mean lodo_acc (0.5)
        (sel,) = results["selected"][selection]
        assert (sel["trial_id"], sel["trial_index"], sel["test_acc"]) == ("abcde_00007", 0, 0.30), selection
    # the oracle: equal test_out_acc on both trials' last rows
    tie = [{**row(7, 5, 0.8, 0.30, test_out=0.5), **first}, {**row(2, 5, 0.8, 0.60, test_out=0.5), **later}]
    (orc,) = report.build([sweep(tie)])["selected"]["oracle"]
    assert (orc["trial_id"], orc["test_acc"]) == ("abcde_00007", 0.30)
    # without trial_index: Tune's id counter, 00002 before 00007
    plain = [row(7, 5, 0.8, 0.30, test_out=0.5), row(2, 5, 0.8, 0.60, test_out=0.5)]
    res = report.build([sweep(plain)])
    assert res["selected"]["validation"][0]["trial_id"] == res["selected"]["oracle"][0]["trial_id"] == "abcde_00002"
    assert res["selected"]["validation"][0]["trial_index"] is None
    plain_lodo = [*lodo_all(7, 5, (0.5, 0.5, 0.5)), *lodo_all(2, 5, (0.5, 0.5, 0.5))]
    res = report.build([{**sweep([main_row(7, 5, 0.8, 0.3), main_row(2, 5, 0.8, 0.6)]),
                         "lodo": report.dedupe_lodo(plain_lodo)}])
    assert res["selected"]["lodo"][0]["trial_id"] == "abcde_00002"
    # a bool or a string is not a trial_index
    assert report.trial_index({"trial_index": True}) is None and report.trial_index({"trial_index": "3"}) is None
    # the rows' order and the history's x order follow trial_index
    from distill import plots

    hist = [{**row(9, 5, 0.5, 0.1), "trial_index": 1}, {**row(3, 5, 0.7, 0.1), "trial_index": 2},
            {**row(1, 5, 0.6, 0.1), "trial_index": 3}, {**row(1, 10, 0.65, 0.1), "trial_index": 3}]
    assert [(r["trial_id"], r["step"]) for r in report.dedupe(hist)] == [
        ("abcde_00009", 5), ("abcde_00003", 5), ("abcde_00001", 5), ("abcde_00001", 10)]
    (series,) = plots.history_series(report.dedupe(hist)).values()
    assert [(t["trial_id"], t["value"]) for t in series] == [("abcde_00009", 0.5), ("abcde_00003", 0.7),
                                                            ("abcde_00001", 0.65)]
    (series,) = plots.history_series([{k: v for k, v in r.items() if k != "trial_index"} for r in hist]).values()
    assert [t["trial_id"] for t in series] == ["abcde_00001", "abcde_00003", "abcde_00009"]


def test_selections_csv_and_json_carry_the_trial_index(tmp_path):
    rows = [{**row(4, 5, 0.9, 0.5), "trial_index": 11}, {**row(1, 5, 0.2, 0.9), "trial_index": 12}]
    d = tmp_path / "sw"
    _write_sweep(d, rows, {"sweep": "sw", "test_domains": ["photo"], "seeds": [0], "methods": ["erm"]})
    report.write(report.build_from_dirs([d]), tmp_path / "out")
    with open(tmp_path / "out" / "selections.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(r["selection"], r["method_group"], r["test_domain"], r["seed"], r["trial_id"], r["trial_index"],
             r["step"], r["val_acc"], r["test_acc"], r["test_out_acc"]) for r in lines] == [
        ("validation", "erm", "photo", "0", "abcde_00004", "11", "5", "0.9", "0.5", "0.5"),
        ("oracle", "erm", "photo", "0", "abcde_00001", "12", "5", "0.2", "0.9", "0.9")]
    assert lines[0]["train_run"] == "sw-photo-s0-abcde_00004" and lines[0]["mlflow_run_id"] == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results.csv", "results.json", "results.md", "results.tex", "selections.csv"]


# ------------------------------------------------------------------------------- paired comparison with a baseline
def test_paired_table_against_the_baseline_by_hand(tmp_path, capsys):
    """Three seeds, two held-out domains, erm and kd in separate sweeps. By hand, kd minus erm per (domain, seed):
    photo +0.10, +0.20, -0.05; sketch 0.00, +0.10, +0.30 -> photo mean +0.0833, sketch +0.1333; per-seed Avg
    differences 0.05, 0.15, 0.125 -> mean 0.10833, sample std 0.05204, se 0.03005; wins 4, losses 1 (the tie is
    neither) of 6 pairs."""
    erm = {("photo", 0): 0.50, ("photo", 1): 0.60, ("photo", 2): 0.55,
           ("sketch", 0): 0.30, ("sketch", 1): 0.40, ("sketch", 2): 0.20}
    kd = {("photo", 0): 0.60, ("photo", 1): 0.80, ("photo", 2): 0.50,
          ("sketch", 0): 0.30, ("sketch", 1): 0.50, ("sketch", 2): 0.50}
    sweeps = []
    for name, accs, val in (("erm", erm, 0.8), ("kd", kd, 0.7)):
        rows = [row(0, 5, val, a, domain=d, seed=s, method=name, sweep=f"c-{name}") for (d, s), a in accs.items()]
        sweeps.append(sweep(rows, name=f"c-{name}", domains=("photo", "sketch"), seeds=(0, 1, 2)))
    results = report.build(sweeps)
    paired = results["paired"]
    assert paired["baseline"] == "erm" and paired["selection"] == "validation"
    base, got = paired["rows"]
    assert base["is_baseline"] and base["source_val"] == pytest.approx(0.8) and base["wins"] == base["losses"] == 0
    assert got["domains"] == pytest.approx({"photo": 0.25 / 3, "sketch": 0.40 / 3})
    assert got["avg"]["mean"] == pytest.approx(0.325 / 3)
    assert got["avg"]["std"] == pytest.approx(0.0520416, abs=1e-6)
    assert got["avg"]["err"] == pytest.approx(0.0520416 / math.sqrt(3), abs=1e-6)
    assert (got["wins"], got["losses"], got["pairs"]) == (4, 1, 6) and got["source_val"] == pytest.approx(0.7)
    md = report.render_text(results)
    part = md[md.index("**Paired against erm"):]
    assert "| kd | +8.3 | +13.3 | +10.8 ± 3.0 | 4 / 1 of 6 | 70.0 |" in part
    assert "| erm (baseline) | 0 | 0 | 0 | – | 80.0 |" in part
    json.dumps(results)
    # no erm row: no paired table; another baseline by name
    assert report.build(sweeps[1:])["paired"] is None
    assert "Paired against" not in report.render_text(report.build(sweeps[1:]))
    assert report.build(sweeps, baseline="kd")["paired"]["rows"][0]["domains"] == pytest.approx(
        {"photo": -0.25 / 3, "sketch": -0.40 / 3})


def test_cli_baseline_flag(tmp_path, capsys):
    paths = []
    for name in ("erm", "kd"):
        d = tmp_path / f"c-{name}"
        _write_sweep(d, [row(0, 5, 0.8, 0.5 if name == "erm" else 0.6, method=name, sweep=f"c-{name}")],
                     {"sweep": f"c-{name}", "test_domains": ["photo"], "seeds": [0], "methods": [name]})
        paths.append(str(d))
    assert report.main(paths) == 0
    assert "| kd | +10.0 | +10.0 | 1 / 0 of 1 | 80.0 |" in capsys.readouterr().out
    assert report.main([*paths, "--baseline", "none"]) == 0
    assert "Paired against" not in capsys.readouterr().out
    assert report.main([*paths, "--baseline", "rise"]) == 2
    assert "--baseline 'rise' is not a method row of these sweeps; one of ['erm', 'kd']" in capsys.readouterr().err


def test_how_each_methods_trials_ended_is_counted_and_collapsed_trials_are_named():
    rows = [row(1, 10, 0.5, 0.4, method="erm"), row(2, 10, 0.6, 0.5, method="scmd"), row(3, 5, 0.2, 0.2, method="scmd")]
    end = lambda trial, method, status: {"event": "end", "search": "photo-s0", "trial_id": f"abcde_{trial:05d}",  # noqa
                                         "method": method, "status": status}
    events = [end(1, "erm", "completed"), end(2, "scmd", "early_stopped"), end(3, "scmd", "collapsed"),
              end(4, "scmd", "error")]
    results = report.build([sweep(rows, searched=True, events=events)])
    assert results["ends_by_method"] == {
        "erm": {"trials": 1, "completed": 1, "early_stopped": 0, "collapsed": 0, "failed": 0},
        "scmd": {"trials": 3, "completed": 0, "early_stopped": 1, "collapsed": 1, "failed": 1}}
    assert results["counts"]["collapsed"] == 1
    assert "1 collapsed (stopped at chance: scmd 1/3)" in report.render_text(results)
