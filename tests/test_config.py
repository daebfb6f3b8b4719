"""The config schema: defaults, overrides, and one error that lists every problem."""
import textwrap

import pytest

from distill.config import ConfigError, build_config, load_config, parse_overrides, trial_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, f"""
        storage: {tmp_path}/runs
        method: {{name: kd, temperature: 2.0}}
        train: {{steps: 10}}
    """)
    cfg = load_config(p, ["train.lr=0.01", "method.kd_weight=0.25", "test_domains=[sketch, photo]"])
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["steps"] == 10
    assert cfg["method"] == {"name": "kd", "temperature": 2.0, "kd_weight": 0.25, "teacher_logit_scale": "auto"}
    assert cfg["storage"] == str((tmp_path / "runs").resolve())
    assert cfg["dataset"]["root"] == str((tmp_path / "runs" / "data" / "synth").resolve())
    assert cfg["test_domains"] == ["sketch", "photo"]
    one = trial_config(cfg)
    assert one["test_domain"] == "sketch" and "search" not in one


def test_all_test_domains_by_default(tmp_path):
    cfg = load_config(write(tmp_path, f"storage: {tmp_path}\n"))
    assert cfg["test_domains"] == ["photo", "sketch", "cartoon", "painting"]


def test_every_problem_is_listed(tmp_path):
    p = write(tmp_path, """
        datset: {name: synth}
        seed: one
        test_domains: [sketchy]
        dataset: {holdout_fraction: 1.5}
        student: {backbone: resnet19}
        method: {name: kd, temprature: 3}
        train: {steps: 0, lr: -1, optimizer: rmsprop}
        resources: {num_workers: 0}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(p, ["train.batchsize=4"])
    text = str(err.value)
    for needle in ["unknown key 'datset'", "seed: expected integer", "sketchy", "holdout_fraction: must be in (0, 1)",
                   "resnet19", "did you mean 'resnet18'", "method.temprature", "did you mean 'temperature'",
                   "train.steps: must be >= 1", "train.lr: must be > 0", "rmsprop",
                   "resources.num_workers: must be >= 1", "train.batchsize"]:
        assert needle in text, (needle, text)
    assert len(err.value.problems) == 11


def test_unknown_method_and_bad_hparam_type(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config({"storage": str(tmp_path), "method": {"name": "kdd"}})
    assert "unknown method 'kdd'" in str(err.value) and "did you mean 'kd'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({"storage": str(tmp_path), "method": {"name": "kd", "temperature": "hot"}})
    assert "method.temperature: expected number" in str(err.value)


def test_missing_dataset_root_and_domain(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config({"storage": str(tmp_path), "dataset": {"name": "PACS", "root": str(tmp_path / "nope")},
                      "test_domains": ["sketch"]})
    assert str(tmp_path / "nope") in str(err.value)


def test_parse_overrides():
    values, problems = parse_overrides(["a.b=3", "c=[1, 2]", "d=true", "bad"])
    assert values == {"a.b": 3, "c": [1, 2], "d": True}
    assert problems and "bad" in problems[0]


def test_a_backbone_without_weights_cannot_be_pretrained(tmp_path):
    p = write(tmp_path, "student: {backbone: small_cnn, pretrained: imagenet}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.problems == ["student.pretrained: backbone 'small_cnn' has no pretrained weights; use 'none'"]
    assert load_config(p, ["student.pretrained=none"])["student"]["backbone"] == "small_cnn"


def test_fractional_gpus_with_several_workers_are_refused_naming_the_ray_limitation():
    with pytest.raises(ConfigError, match="Duplicate GPU detected.*48012"):
        build_config({"resources": {"num_workers": 2, "gpus_per_worker": 0.5}})
    assert build_config({"resources": {"num_workers": 1, "gpus_per_worker": 0.25}})["resources"]["gpus_per_worker"] \
        == 0.25
    assert build_config({"resources": {"num_workers": 2, "gpus_per_worker": 1}})


def test_recipe_options_are_checked_before_anything_runs():
    for raw, message in [({"teacher": {"views": 4, "online": True}}, "choose one way"),
                         ({"teacher": {"views": 2}, "train": {"augment": False}}, "need train.augment: true"),
                         ({"teacher": {"views": -1}}, "teacher.views: must be >= 0"),
                         ({"train": {"averaging": "ema"}}, "train.averaging: 'ema' is not one of"),
                         ({"train": {"swad": {"n_converge": 0}}}, "train.swad.n_converge: must be >= 1"),
                         ({"train": {"device_data": "disk"}}, "train.device_data: 'disk' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            build_config(raw)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """`--set train.lr=3e-3` and `lr: 3e-3` in a file are numbers (YAML 1.1 would read strings and fail the schema);
    quoted, or not a number, they stay strings."""
    values, problems = parse_overrides(["train.lr=3e-3", "a=1e4", "b=-2E-5", "c='3e-3'", "d=3e", "e=10", "f=1.0e-3"])
    assert not problems
    assert values == {"train.lr": 0.003, "a": 10000.0, "b": -2e-05, "c": "3e-3", "d": "3e", "e": 10, "f": 0.001}
    assert isinstance(values["e"], int)
    path = tmp_path / "t.yaml"
    path.write_text("dataset: {name: synth}\ntrain: {lr: 3e-3}\n")
    assert load_config(path)["train"]["lr"] == 0.003
