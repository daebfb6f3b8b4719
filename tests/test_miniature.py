"""The miniature of the papers' regime: a teacher fitted on a corpus that covers every style of the task and more
(never its images), students pretrained on a photo-only corpus, both shipped inside the package. Reduced fits and
pretrainings (seconds) check determinism; the shipped files must be those of the current recipes."""
import hashlib
import json

import numpy as np
import pytest
import torch

from distill.data import synth
from distill.data.synth import (STUDENT_CORPUS, TEACHER_CORPUS, corpus_hash, corpus_params, ensure_corpus,
                                load_corpus)
from distill.models import pretrain
from distill.models.fit import builtin_recipe, corpus_captioned, ensure_teacher, fit_clip, recipe_hash
from distill.models.students import build_student
from distill.models.weights import sha256, shipped, torch_threads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _pixels(images) -> set[str]:
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


# ---- the corpora -----------------------------------------------------------------------------------------------------

def test_corpora_cover_more_than_the_task_and_hold_none_of_its_images(tmp_path):
    world = synth.generate(tmp_path / "world", seed=0, per_class=100, size=32)   # the demo's world
    from distill.data.images import load_images
    from distill.data.registry import get_spec

    task = _pixels(load_images(world, get_spec("synth", world), 32).images.numpy())
    assert len(task) == 2000
    teacher = load_corpus(ensure_corpus(tmp_path / "c", corpus_params(TEACHER_CORPUS, per_class=2), log=None))
    student = load_corpus(ensure_corpus(tmp_path / "c", corpus_params(STUDENT_CORPUS, per_class=20), log=None))
    for corpus in (teacher, student):
        pixels = _pixels(corpus.images)
        assert len(pixels) == len(corpus.images) and not pixels & task
        assert set(synth.CLASSES) <= set(corpus.classes) and len(corpus.classes) >= 4 * len(synth.CLASSES)
    assert set(synth.DOMAINS) < set(teacher.style_names) and student.style_names == ["photo"]
    # captions name the style, colour, shape, size and position (and the rotation where it is visible)
    row = next(r for r in teacher.rows if r["shape"] == "star" and r["style"] == "sketch")
    caps = row["captions"]
    assert f"a sketch of a {row['colour']} star" in caps and "a star." in caps and "a sketch of a star." in caps
    assert any("rotated by" in c for c in caps) and any(w in caps[0] for w in ("small", "medium", "large"))
    assert "captions" not in student.rows[0] and set(student.labels.tolist()) == set(range(len(student.classes)))


def test_corpus_is_a_pure_function_of_its_parameters_drawn_once(tmp_path):
    params = corpus_params(TEACHER_CORPUS, per_class=1, styles=["photo", "mosaic"], classes=["star", "heart"],
                           boost={"photo": 2})
    a = ensure_corpus(tmp_path / "a", params, log=None)
    b = ensure_corpus(tmp_path / "b", params, log=None)
    assert a.name == b.name == f"teacher-{corpus_hash(params)}"
    assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    assert (a / "captions.jsonl").read_text() == (b / "captions.jsonl").read_text()
    stamp = (a / "corpus.json").stat().st_mtime_ns
    assert ensure_corpus(tmp_path / "a", params, log=None) == a and (a / "corpus.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]          # no temporary folder left behind
    assert len(load_corpus(a).labels) == 2 * 2 + 2 * 1
    other = corpus_params(params, seed=1)
    assert corpus_hash(other) != corpus_hash(params)
    with pytest.raises(ValueError, match="unknown"):
        corpus_params(TEACHER_CORPUS, classes=["dodecahedron"])


# ---- reduced fits and pretrainings are deterministic ---------------------------------------------------------------

def test_reduced_builtin_fit_is_deterministic(tmp_path):
    rec = builtin_recipe(steps=3, per_class=1)
    data = corpus_captioned(ensure_corpus(tmp_path, rec["corpus"], log=None))
    args = {k: rec[k] for k in ("lr", "weight_decay", "warmup", "crop", "flip", "rotate", "freeze_token_embedding")}
    a = fit_clip(data, arch=rec["arch"], steps=3, batch_size=16, seed=0, log=None, **args).state_dict()
    b = fit_clip(data, arch=rec["arch"], steps=3, batch_size=16, seed=0, log=None, **args).state_dict()
    c = fit_clip(data, arch=rec["arch"], steps=3, batch_size=16, seed=1, log=None, **args).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert recipe_hash(rec) != recipe_hash(builtin_recipe(steps=4, per_class=1))


def test_reduced_pretraining_is_deterministic(tmp_path):
    rec = pretrain.recipe("small_cnn", 32, steps=3, batch_size=16, per_class=3)
    corpus = ensure_corpus(tmp_path, rec["corpus"], log=None)
    a, summary = pretrain.pretrain(rec, corpus, log=None)
    b, _ = pretrain.pretrain(rec, corpus, log=None)
    c, _ = pretrain.pretrain({**rec, "seed": 1}, corpus, log=None)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert set(a) == set(build_student("small_cnn").backbone.state_dict())
    assert summary["classes"][:5] == synth.CLASSES


def test_ensure_student_pretrains_once_and_the_cli_prints_progress(tmp_path, capsys):
    from distill.student import main

    args = ["pretrain", "--backbone", "small_cnn", "--storage", str(tmp_path), "--steps", "2", "--batch-size", "8",
            "--per-class", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pretrain small_cnn step 2/2" in out and "loss" in out and "acc" in out and "elapsed" in out
    path = pretrain.ensure_student(tmp_path, "small_cnn", 32, steps=2, batch_size=8, per_class=2, log=None)
    assert path.parent == tmp_path / "students" and path.name.startswith("small_cnn-")
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["source"] == "pretrained" and info["recipe_hash"] in path.name
    state = torch.load(path, weights_only=True)
    student = build_student("small_cnn", pretrained="builtin", weights_path=path, embed_dim=8, num_classes=5)
    assert all(torch.equal(v, student.backbone.state_dict()[k]) for k, v in state.items())


# ---- shipped weights -----------------------------------------------------------------------------------------------

def test_shipped_weights_are_those_of_the_current_recipes():
    """A recipe change (corpus, architecture, hyperparameters) without shipping the weights again fails here:
    re-run the command recorded in the JSON."""
    teacher = shipped("teacher-distill-tiny-rn")
    assert teacher is not None, "the package ships no built-in teacher"
    assert teacher["recipe_hash"] == recipe_hash(builtin_recipe()), f"stale teacher: {teacher['command']}"
    student = shipped(pretrain.shipped_name("small_cnn", 32))
    assert student is not None, "the package ships no pretrained small_cnn"
    assert student["recipe_hash"] == pretrain.recipe_hash(pretrain.recipe("small_cnn", 32)), student["command"]
    for rec in (teacher, student):
        assert sha256(rec["path"]) == rec["sha256"] and rec["command"].startswith("python -m distill.")
        assert rec["bytes"] < 8e6


def test_builtin_student_loads_the_shipped_weights(tmp_path):
    path = pretrain.ensure_student(tmp_path, "small_cnn", 32, log=None)            # no pretraining: shipped
    assert json.loads(path.with_name(path.name + ".json").read_text())["source"] == "shipped"
    ship = torch.load(shipped(pretrain.shipped_name("small_cnn", 32))["path"], weights_only=True)
    student = build_student("small_cnn", pretrained="builtin", weights_path=path, embed_dim=8, num_classes=5)
    got = student.backbone.state_dict()
    assert all(torch.equal(v.float() if v.is_floating_point() else v, got[k]) for k, v in ship.items())
    assert not torch.equal(got["features.0.weight"], build_student("small_cnn").backbone.state_dict()[
        "features.0.weight"])
    with pytest.raises(ValueError, match="weights_path"):
        build_student("small_cnn", pretrained="builtin")


def test_ensure_teacher_uses_the_shipped_teacher(tmp_path):
    world = synth.ensure_world(tmp_path / "data" / "synth", seed=0, per_class=20, size=32)
    path = ensure_teacher(tmp_path, world, log=None)                                # no fit: shipped
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["source"] == "shipped" and info["recipe_hash"] in path.name
    rec = shipped("teacher-distill-tiny-rn")
    for prompts in ("domain, held out", "single"):                                # the demo world, as measured
        assert min(rec["zero_shot"][prompts][d] for d in synth.DOMAINS) >= 0.9, rec["zero_shot"]


def test_teacher_fit_warns_when_near_chance(tmp_path, capsys):
    from distill.teacher import main

    world = synth.ensure_world(tmp_path / "world", seed=0, per_class=4, size=32)
    assert main(["fit", "--data", str(world), "--storage", str(tmp_path), "--steps", "1", "--per-class", "1",
                 "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot [domain, held out]" in out and "WARNING: the fitted teacher is near chance" in out


@pytest.mark.parametrize("backbone", sorted(pretrain.RECIPES))
def test_config_accepts_builtin_students(backbone):
    from distill.config import build_config

    cfg = build_config({"student": {"backbone": backbone, "pretrained": "builtin"}})
    assert cfg["student"]["pretrained"] == "builtin"
    from distill.config import reference_problems

    other = {**cfg, "dataset": {**cfg["dataset"], "name": "PACS"}}     # the corpus holds the world's shapes only
    assert any("'builtin'" in p and "synth" in p for p in reference_problems(other))
    rec = pretrain.recipe(backbone, 32)
    assert rec["corpus"]["styles"] == ["photo"] and len(rec["corpus"]["classes"]) >= 20
