"""The benchmarks' own arithmetic (their timings live in benchmarks/results/, never in tests)."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _loop_module():
    spec = importlib.util.spec_from_file_location("bench_loop", REPO / "benchmarks" / "loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, name, medians):
    cases = [{"student": "small_cnn", "case": c, "loop_vs_bare": {"median": m, "min": m - 0.01, "max": m + 0.01}}
             for c, m in medians.items()]
    path = tmp_path / name
    path.write_text(json.dumps({"date": "d", "rounds": 7, "load_avg_start": [1.0], "load_avg_end": [1.0],
                                "cases": cases}))
    return str(path)


def test_loop_compare_checks_repeatability_and_the_ceiling(tmp_path, capsys):
    loop = _loop_module()
    a = _run(tmp_path, "a.json", {"erm": 0.86, "kd": 0.90})
    assert loop.main(["--compare", a, _run(tmp_path, "b.json", {"erm": 0.90, "kd": 0.95})]) == 0   # 0.04, 0.05
    assert "2 of 2 cases repeat" in capsys.readouterr().out
    assert loop.main(["--compare", a, _run(tmp_path, "c.json", {"erm": 0.92, "kd": 0.90})]) == 1   # 0.06 apart
    assert "differs by more than 0.05" in capsys.readouterr().out
    high = _run(tmp_path, "d.json", {"erm": 1.08, "kd": 0.90})
    assert loop.main(["--compare", high, _run(tmp_path, "e.json", {"erm": 1.06, "kd": 0.90})]) == 1
    out = capsys.readouterr().out
    assert "above 1.05" in out and "1 of 2 cases repeat" in out
