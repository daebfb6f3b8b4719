"""The recipe around the losses: no test-domain information reaches a trial (prompts), the teacher's own logit scale,
SCMD's optimiser groups, and the teacher seeing exactly the student's view (online and stored views)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distill.config import build_config, trial_config
from distill.data.registry import get_spec
from distill.methods import REGISTRY
from distill.models.prompts import TEMPLATES, as_prompt_set
from distill.trial.prepare import method_context, prompt_sets

SENTINEL = "zqxjv"   # a held-out domain renamed to a word no template contains


def _all_prompts(dataset: str, held_out: str, method: str, templates, rename: bool) -> list[str]:
    spec = get_spec(dataset)
    if rename:   # the held-out domain's name is replaced by a sentinel everywhere in the dataset's description
        spec.domain_names = [SENTINEL if d == held_out else n for d, n in zip(spec.domains, spec.domain_names)]
    cfg = trial_config(build_config({"method": {"name": method}, "teacher": {"prompts": templates}}), "photo"
                       if dataset == "synth" else "sketch")
    splits = SimpleNamespace(source_domains=[d for d in spec.domains if d != held_out])
    ctx = method_context(cfg, spec, splits, embed_dim=8)
    return [p for value in prompt_sets(cfg, ctx).values() for row in as_prompt_set(value).lists() for p in row]


@pytest.mark.parametrize("dataset", ["synth", "PACS"])
def test_no_prompt_of_any_method_names_the_held_out_domain(dataset):
    """Every {d} template expands over the source domains only: renaming the held-out domain changes no prompt and
    the new name appears nowhere; where the real name is not a word of the fixed templates themselves (every paper
    template says "photo"), it appears in no prompt either."""
    spec = get_spec(dataset)
    template_words = " ".join(t for ts in TEMPLATES.values() for t in ts)
    for held_out, name in zip(spec.domains, spec.domain_names):
        for method in REGISTRY:
            for templates in list(TEMPLATES) + [["a {d} of the {c}", "art of {c}"]]:
                prompts = _all_prompts(dataset, held_out, method, templates, rename=True)
                assert prompts and not any(SENTINEL in p for p in prompts), (held_out, method, templates)
                assert prompts == _all_prompts(dataset, held_out, method, templates, rename=False)
                if name not in template_words:
                    assert not any(name in p for p in prompts), (held_out, method, templates)
        # the domain set, which a trial expands over the sources, does name the other domains
        prompts = _all_prompts(dataset, held_out, "kd", "domain", rename=False)
        others = [n for d, n in zip(spec.domains, spec.domain_names) if d != held_out]
        assert all(any(f"a {n} of a" in p for p in prompts) for n in others)


def test_scmd_logit_scale_has_its_own_optimiser_group():
    """SCMD's official optimiser: the logit scale at lr 1e-4, everything else at train.lr; every parameter once."""
    from distill.models.students import build_student
    from distill.trial.loop import make_optimizer

    cfg = trial_config(build_config({"method": {"name": "scmd", "teacher_logit_scale": 100.0},
                                     "train": {"lr": 5e-5}}), "photo")
    ctx = SimpleNamespace(total_steps=10, class_names=["a", "b"])
    m = REGISTRY["scmd"](build_student("small_cnn", embed_dim=8, num_classes=2), {"teacher_logit_scale": 100.0},
                         ctx, {"classes": torch.randn(2, 8)})
    opt = make_optimizer(m.param_groups(), cfg["train"])
    lrs = [(g["lr"], len(g["params"])) for g in opt.param_groups]
    assert lrs[0][0] == 5e-5 and lrs[1] == (1e-4, 1) and opt.param_groups[1]["params"][0] is m.logit_scale
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in m.parameters() if p.requires_grad])


# ------------------------------------------------------------------------- the teacher sees the student's view
def _feed_setup(fitted_teacher, tmp_path, **teacher):
    """A trial config on the session's fitted teacher and world, its prepared caches, and the worker-side pieces."""
    from distill.models.teachers import load_teacher
    from distill.trial.prepare import load_task, prepare, teacher_outputs

    raw = {"storage": str(tmp_path), "dataset": {"root": str(fitted_teacher["root"]), "world": {"per_class": 40}},
           "teacher": {"checkpoint": str(fitted_teacher["checkpoint"]), **teacher},
           "method": {"name": "kd"}, "train": {"batch_size": 6}}
    cfg = trial_config(build_config(raw), "sketch")
    assets = prepare(cfg)
    spec, images, splits = load_task(cfg)
    ctx = method_context(cfg, spec, splits, assets["embed_dim"])
    outputs = teacher_outputs(cfg, images, ctx, assets["teacher"], teacher_id=assets["teacher_id"])
    return cfg, images, splits, outputs, load_teacher("distill-tiny-rn", checkpoint=fitted_teacher["checkpoint"])


def _student_pixels(batch):
    """The student's view in [0, 1], recovered from its ImageNet-normalised input."""
    from distill.data.augment import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return batch["x"] * std + mean


@pytest.mark.parametrize("mode", ["views", "online", "online-bf16"])
def test_the_teacher_embeds_exactly_the_view_the_student_trains_on(fitted_teacher, tmp_path, mode):
    """Re-encode the rendered student views of a batch with the teacher: equal to the embeddings the method
    receives (within fp16 storage for cached views, bf16 for a bf16 teacher). The centre-view cache is not."""
    from distill.trial.feed import Feeder

    teacher_cfg = {"views": 4} if mode == "views" else {"online": True}
    cfg, images, splits, outputs, teacher = _feed_setup(fitted_teacher, tmp_path, **teacher_cfg)
    amp = torch.bfloat16 if mode == "online-bf16" else None
    feed = Feeder(cfg, images, splits, outputs, True, torch.device("cpu"), 0,
                  teacher if mode != "views" else None, amp)
    assert feed.mode == mode.split("-")[0]
    for step in (0, 5):
        batch = feed.batch(step)
        again = teacher.encode_images(_student_pixels(batch))
        cos = (again * batch["image_emb"]).sum(-1)
        tol = {"views": 2e-3, "online": 1e-5, "online-bf16": 2e-2}[mode]
        assert cos.min() > 1 - tol, (mode, cos.min())
        assert torch.allclose(batch["image_emb"], again, atol=tol * 5)
    if mode == "views":   # every stored view is one the student can be shown, and the draws vary over views
        assert outputs.views.params.shape[:2] == (len(images), 4) and outputs.views.emb.shape[:2] == (len(images), 4)
        _, emb = feed.views(torch.zeros(32, dtype=torch.long))   # one image, 32 draws: its 4 stored views
        assert 1 < len({tuple(e[:4].tolist()) for e in emb}) <= 4
    # the centre view's cached embedding is not the augmented view's: the comparison above can fail
    centre_cfg, images, splits, centre_out, _ = _feed_setup(fitted_teacher, tmp_path)
    centre = Feeder(centre_cfg, images, splits, centre_out, True, torch.device("cpu"))
    batch = centre.batch(0)
    assert (teacher.encode_images(_student_pixels(batch)) * batch["image_emb"]).sum(-1).min() < 1 - 2e-2


# ------------------------------------------------------------------------- every method x every recipe option
def run_in_process(cfg: dict, monkeypatch) -> list[dict]:
    """The real worker loop, in this process (Ray Train's local mode, num_workers=0): the rows it reports."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.trial import loop
    from distill.trial.prepare import prepare

    rows = []
    monkeypatch.setattr(loop.Trainer, "_report", lambda self, metrics, state: rows.append(metrics))
    TorchTrainer(loop.train_loop, train_loop_config={"cfg": cfg, "assets": prepare(cfg), "mlflow": {}},
                 scaling_config=ray.train.ScalingConfig(num_workers=0)).fit()
    return rows


OPTIONS = {"views": {"teacher.views": 4}, "online": {"teacher.online": True}, "sma": {"train.averaging": "sma"},
           "swad": {"train.averaging": "swad"}}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_runs_with_every_recipe_option(fitted_teacher, tmp_path_factory, monkeypatch, method, option):
    from distill.config import set_dotted

    raw = {"storage": str(fitted_teacher["storage"]), "dataset": {"root": str(fitted_teacher["root"]),
                                                                 "world": {"per_class": 40}},
           "teacher": {"checkpoint": str(fitted_teacher["checkpoint"])}, "student": {"backbone": "small_cnn"},
           "method": {"name": method},
           "train": {"steps": 8, "batch_size": 4, "eval_every": 2, "averaging_start": 3, "amp": "off",
                     "swad": {"bn_steps": 3}}}
    for key, value in OPTIONS[option].items():
        set_dotted(raw, key, value)
    cfg = trial_config(build_config(raw), "cartoon")
    rows = run_in_process(cfg, monkeypatch)
    stages = 2 if method == "vl2v" else 1
    last = rows[-1]
    assert last["final"] and last["total_steps"] == 8 * stages and all(not r["final"] for r in rows[:-1])
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    if option != "swad":   # SWAD may stop a stage early at a dead loss valley, as its trainer does
        assert [r["step"] for r in rows] == list(range(2, 8 * stages + 1, 2))
    expected_model = {"sma": "sma", "swad": "swad"}.get(option, "raw")
    assert last["eval_model"] == expected_model and last["selectable"]
    assert [r["stage"] for r in rows if r["selectable"]] and all(r["stage"] == last["stage"] for r in rows
                                                                 if r["selectable"])
    if option == "swad":
        assert all(not r["selectable"] for r in rows[:-1] if r["stage"] == last["stage"])
    for r in rows:
        assert all(v == v for k, v in r.items() if k.startswith(("loss", "val_acc", "test_acc"))), r


def test_vl2v_distill_starts_from_aligns_best_source_validation_evaluation(fitted_teacher, monkeypatch):
    """As the official run_stage2.sh loads stage 1's best training-domain-validation checkpoint."""
    from distill.trial import loop

    handoffs = []
    original = loop.Trainer._hand_off

    def spy(self, k):
        end_of_align = {n: v.clone() for n, v in self.method.state_dict().items()}
        original(self, k)
        handoffs.append((dict(self.handoff), {n: v.clone() for n, v in self.method.state_dict().items()},
                         end_of_align))

    monkeypatch.setattr(loop.Trainer, "_hand_off", spy)
    scripted = iter([0.30, 0.60, 0.50, 0.60, 0.40])   # Align's five evaluations: the best is the second (step 4)
    scores = loop.Trainer._scores

    def scripted_scores(self, model):
        res, val_acc, val_loss = scores(self, model)
        return res, next(scripted, val_acc), val_loss

    monkeypatch.setattr(loop.Trainer, "_scores", scripted_scores)
    raw = {"storage": str(fitted_teacher["storage"]), "dataset": {"root": str(fitted_teacher["root"]),
                                                                 "world": {"per_class": 40}},
           "teacher": {"checkpoint": str(fitted_teacher["checkpoint"])}, "student": {"backbone": "small_cnn"},
           "method": {"name": "vl2v", "align_steps": 10, "distill_steps": 4},
           "train": {"steps": 8, "batch_size": 4, "eval_every": 2, "lr": 0.05, "amp": "off"}}
    rows = run_in_process(trial_config(build_config(raw), "cartoon"), monkeypatch)
    align = [r for r in rows if r["stage"] == "align"]
    assert [r["step"] for r in align] == [2, 4, 6, 8, 10] and [r["step"] for r in rows[5:]] == [12, 14]
    assert [r["val_acc"] for r in align] == [0.30, 0.60, 0.50, 0.60, 0.40]
    assert len(handoffs) == 1
    handoff, weights, end_of_align = handoffs[0]
    assert not torch.equal(weights["student.proj.weight"], end_of_align["student.proj.weight"])
    assert handoff["step"] == 4 and handoff["val_acc"] == 0.60   # the first best, not the last evaluation
    assert all(torch.equal(weights[n], v.to(weights[n].device)) for n, v in handoff["state"].items())


def test_host_streamed_images_give_the_same_batches_on_a_domainnet_sized_index(tmp_path):
    """train.device_data: host gathers each step's images from the memory-mapped cache (and queues the next step's):
    the batches equal those of the device-resident path, also for a DomainNet-sized index (586,575 images, mapped
    from disk, never read whole)."""
    import numpy as np

    from distill.data.splits import make_splits
    from distill.trial.feed import Feeder

    n, size = 586_575, 8
    path = tmp_path / "images.u8"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))[::997] = 200
    mapped = torch.from_numpy(np.load(path, mmap_mode="r"))      # not read into memory
    spec = get_spec("DomainNet")
    domains = torch.arange(n) % len(spec.domains)
    images = SimpleNamespace(images=mapped, labels=torch.arange(n) % len(spec.classes), domains=domains,
                             paths=[f"{spec.domains[d]}/x/{i}.jpg" for i, d in enumerate(domains.tolist())],
                             spec=spec, domain_indices=lambda dom: torch.nonzero(domains == spec.domains.index(dom))
                             .flatten())
    splits = make_splits(images, "sketch", 0.2, seed=0)
    outputs = SimpleNamespace(image_emb=None, views=None)
    feeds = {}
    for mode in ("gpu", "host"):
        cfg = trial_config(build_config({"dataset": {"image_size": size}, "train": {"batch_size": 16,
                                                                                     "device_data": mode}}), "sketch")
        feeds[mode] = Feeder(cfg, images, splits, outputs, False, torch.device("cpu"))
    assert feeds["host"].host and not feeds["gpu"].host
    for step in (0, 1, 2, 7, 8):   # consecutive steps come from the prefetch, 7 after a jump
        a, b = feeds["gpu"].batch(step), feeds["host"].batch(step)
        assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert feeds["host"]._next[0] == 9
