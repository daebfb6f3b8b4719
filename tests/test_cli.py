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


def test_the_package_declares_ranges_and_constraints_pin_what_the_suite_ran_with():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if "==" in d], meta["dependencies"]
    assert meta["scripts"]["distill"] == "distill.cli:main"
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    import mlflow
    import optuna
    import ray
    import torch
    for name, module in (("torch", torch), ("ray", ray), ("optuna", optuna), ("mlflow", mlflow)):
        assert pins[name] == module.__version__.split("+")[0], name
    assert (REPO / "distill" / "py.typed").is_file()
