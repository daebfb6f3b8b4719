"""The ``distill`` command: the console script, ``python -m distill``, every subcommand's help and ``--version``."""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distill import cli

REPO = Path(__file__).resolve().parent.parent


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, check=False, env={**os.environ, "RAY_ADDRESS": ""})


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_a_one_line_description_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distill {name} ")          # the dispatcher's name, not python -m ...
    description = out.split("\n\n")[1]
    assert description.strip().endswith(".") and "`" not in description, description
    assert f"\n  distill {name} " in out.split("examples:")[1], out   # at least one example of this command


def test_python_m_distill_lists_the_subcommands_and_the_version():
    top = run("--help")
    assert top.returncode == 0
    for name in cli.COMMANDS:
        assert f"  {name} " in top.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"distill {cli.version()}"
    assert cli.version() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_unknown_subcommands_and_bad_options_fail_with_a_usage_error():
    bad = run("tunee")
    assert bad.returncode == 2 and "invalid choice: 'tunee'" in bad.stderr
    opt = run("report", "some_sweep", "--no-such-flag")
    assert opt.returncode == 2 and "unrecognized arguments: --no-such-flag" in opt.stderr


def test_the_installed_console_script_is_the_dispatcher():
    script = shutil.which("distill", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed with its scripts here (pip install -e .)")
    proc = subprocess.run([script, "data", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: distill data ")


def _ranges_and_pins():
    from packaging.requirements import Requirement

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in meta["dependencies"]}
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return meta, ranges, {k.lower().replace("_", "-"): v.strip() for k, v in pins.items()}


def test_the_package_declares_ranges_that_hold_the_installed_and_the_pinned_versions():
    """pyproject.toml declares ranges (the suite passes with any version inside them); constraints.txt pins one
    version of each inside its range; whatever is installed lies inside the ranges."""
    from importlib.metadata import version

    meta, ranges, pins = _ranges_and_pins()
    assert not [d for d in meta["dependencies"] if "==" in d], meta["dependencies"]
    assert meta["scripts"]["distill"] == "distill.cli:main"
    for name, req in ranges.items():
        assert name in pins, f"constraints.txt pins no version of {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} is " \
                                                                      f"outside pyproject's {req}"
        installed = version(req.name).split("+")[0]
        assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} outside {req}"
    assert (REPO / "distill" / "py.typed").is_file()


@pytest.mark.skipif(os.environ.get("DISTILL_PINNED") != "1",
                    reason="the environment was not installed from constraints.txt (.ci/run sets DISTILL_PINNED=1)")
def test_an_environment_installed_from_constraints_runs_the_pinned_versions():
    import mlflow
    import optuna
    import ray
    import torch

    _, _, pins = _ranges_and_pins()
    for name, module in (("torch", torch), ("ray", ray), ("optuna", optuna), ("mlflow", mlflow)):
        assert pins[name] == module.__version__.split("+")[0], name


def test_the_docs_reference_tables_list_every_config_key_and_every_methods_hyperparameters():
    """The docs site's generated pages (docs/hooks/reference.py -> distill/reference.py): a row per key of the
    schema and of the sweep's search section, a row per hyperparameter of every registered method, with its
    default, its registry distribution and the comment beside it in the source."""
    from distill import config, reference
    from distill.methods import REGISTRY
    from distill.tune.plan import SEARCH_DEFAULTS

    table = reference.config_table()
    keys = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert set(keys) == (set(config.TYPES) - {"search"}) | {f"search.{k}" for k in SEARCH_DEFAULTS if k != "asha"} \
        | {"search.asha.grace_period", "search.asha.reduction_factor"}
    assert "| `train.steps` | integer | `300` | optimiser steps (per stage, for staged methods) |" in table
    assert "| `train.lr` | number | `0.001` | learning rate |" in table
    assert "One of `tpe`, `random`." in table and "One of `train`, `inline`." in table
    for name, cls in REGISTRY.items():
        text = reference.hparams_table(name)
        rows = [line for line in text.splitlines() if line.startswith("| `")]
        assert [r.split("|")[1].strip().strip("`") for r in rows] == list(cls.hparams), name
    scmd = reference.hparams_table("scmd")
    assert "| `selection_ratio` | `0.2` | `choice` [0.2, 0.25, 0.3] | p: fraction of the batch kept (the hardest) |" \
        in scmd
    assert "z_T = scale * cos(v_T, t_c); auto: the teacher's own logit_scale.exp(), as the official code (100 for " \
           "OpenAI CLIP); a number overrides" in scmd   # a comment wrapped over two lines, joined
