"""The per-worker training loop of a trial (run by Ray Train's TorchTrainer on every worker, or in the launching
process with ``resources.launcher: inline``: ``session``).

A trial is one or more stages (``Method.stages``: one stage of ``train.steps`` for most methods, Align then Distill
for VL2V), each with a fresh optimiser and schedule; a stage after the first starts from the previous stage's best
source-validation evaluation. Every ``train.eval_every`` steps of a stage (and at its end) the workers evaluate
the source domains' validation splits and the test domain, report (``session``: Ray Train, or the inline run)
with a checkpoint, and log to MLflow. With ``train.averaging`` the evaluated (and reported, checkpointed, selected)
model is the weight average: SMA at every evaluation; SWAD's loss-valley average at the stage's end (intermediate
SWAD rows evaluate the raw model, as SWAD's trainer does, and are marked ``selectable: false``).

Nothing is read back from the device at every step: loss terms are summed on the device and read every
``min(50, eval_every)`` steps; a non-finite loss is recorded on the device with its step and raised at that read.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from .. import tracking
from ..console import set_verbose
from . import session
from .averaging import make_averager
from .evaluation import evaluate
from .feed import Feeder, teacher_view
from .prepare import load_task, method_context, method_hparams, teacher_outputs

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 2
SELECTION_METRIC = "val_acc"   # mean source-domain validation accuracy: the only metric selection may use
BEST_METRIC = "val_acc_best"   # best selectable val_acc so far in the trial: what Optuna and ASHA see
COLLAPSED_SHARE = 0.95   # train.stop_collapsed: "constant predictions" (the share of the most predicted class)
SCORE_METRIC = "checkpoint_score"   # val_acc of a selectable new best, -1 otherwise: which checkpoints are kept


def make_optimizer(groups: list[dict], tc: dict):
    """The optimiser over the method's parameter groups; a group's `lr_mult` (MIRO's encoders) scales train.lr."""
    groups = [{**{k: v for k, v in g.items() if k != "lr_mult"}, "lr": tc["lr"] * g["lr_mult"]} if "lr_mult" in g
              else g for g in groups]
    if tc["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=tc["lr"], momentum=tc["momentum"], weight_decay=tc["weight_decay"])
    cls = torch.optim.AdamW if tc["optimizer"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=tc["lr"], weight_decay=tc["weight_decay"])


def make_schedule(optimizer, tc: dict, steps: int):
    if tc["lr_schedule"] == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    elif tc["lr_schedule"] == "step":
        fn = lambda s: 0.1 if s >= int(0.8 * steps) else 1.0  # noqa: E731
    else:
        fn = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def amp_dtype(device, mode: str):
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@torch.no_grad()
def _average_bn_across_ranks(model, world: int) -> None:
    """After SWAD's per-rank BatchNorm recomputation: every rank gets the mean statistics."""
    if world <= 1:
        return
    import torch.distributed as dist

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= world


# Errors that running the same trial again reproduces (a non-finite loss, a bad value found in the worker): the trial
# fails once, reported as such, instead of being retried by Train's and Tune's max_failures. A dead worker or node
# (infrastructure) still is retried from the last checkpoint.
DETERMINISTIC = (FloatingPointError, ValueError, TypeError, KeyError, NotImplementedError)
FAILED = "failed"   # the report of a trial that failed deterministically carries its reason under this key


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function (or the inline run's). ``config``: {"cfg": trial config, "assets":
    prepare(), "mlflow": {...}}."""
    entered = time.time()
    set_verbose(bool(config.get("verbose")))
    if not config.get("verbose"):   # Train's per-report and per-checkpoint lines: with --verbose only
        import logging

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        try:   # Train's worker context logs every report under its file's path, not under "ray.train"
            from ray.train.v2._internal.execution import context as train_context

            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass
    trainer = None
    try:
        trainer = Trainer(config, entered)
        trainer.run()
    except DETERMINISTIC as exc:
        _report_failure(config, trainer, f"{type(exc).__name__}: {exc}")
    finally:
        if trainer is not None and trainer.logger is not None:
            trainer.logger.close()


def slot_wait_seconds() -> float:
    """How long this trial's workers waited for free resources (their placement group's creation latency, as Ray's
    GCS recorded it): a trial started ahead of a free slot waits there, ready, instead of idling the slot later."""
    try:
        import ray.util

        pg = ray.util.get_current_placement_group()
        stats = (ray.util.placement_group_table(pg).get("stats") or {}) if pg is not None else {}
        return round(float(stats.get("end_to_end_creation_latency_ms", 0.0)) / 1000, 3)
    except Exception:  # noqa: BLE001  (a Ray without these stats: the wait counts as start-up)
        return 0.0


def _report_failure(config: dict, trainer, reason: str) -> None:
    """Say why in the MLflow run (rank 0) and in one last report (every rank), then end normally: no retry."""
    rank, _ = session.world()
    ml = config.get("mlflow") or {}
    if rank == 0:
        print(f"[distill] trial failed: {reason}", flush=True)
        if ml.get("run_id"):
            tracking.set_tags(ml["uri"], ml["run_id"], {tracking.STATUS_TAG: "failed",
                                                        "distill.failure": reason[:4000]})
    step = trainer.history[-1]["step"] if trainer is not None and trainer.history else 0
    session.report({FAILED: reason, "step": step, "final": True, BEST_METRIC: float("nan"), SCORE_METRIC: -1.0})


class Trainer:
    """One worker's trial: the model, its stages, evaluations, checkpoints and reports."""

    def __init__(self, config: dict, entered: float | None = None):
        from ..methods import get_method
        from ..models.students import build_student

        # wall-clock time points of the worker's start (the driver turns them into the trial's phase breakdown)
        self.phases = {"worker_entered": entered or time.time(), "worker_imported": time.time()}
        self.slot_wait = 0.0 if session.inline() else slot_wait_seconds()   # inline: no workers to wait for

        self.cfg, self.assets, self.ml = config["cfg"], config["assets"], config.get("mlflow") or {}
        self.label = f"distill {config['name']}" if config.get("name") else "distill"   # whose line it is
        # per-evaluation lines: a single trial's progress; in a sweep (its console says one line per finished
        # trial) only with --verbose
        self.progress = bool(config.get("verbose") or not config.get("quiet"))
        cfg, tc = self.cfg, self.cfg["train"]
        self.rank, self.world = session.world()
        self.device = session.device(cfg)
        self.amp = amp_dtype(self.device, tc["amp"])
        if self.device.type == "cpu":   # as many threads as the worker's CPUs: more only fight over the cores
            torch.set_num_threads(max(1, int(cfg["resources"]["cpus_per_worker"])))
        torch.manual_seed(cfg["seed"])
        self.logger = (tracking.MetricsLogger(self.ml["uri"], self.ml["run_id"])
                       if self.rank == 0 and self.ml.get("run_id") else None)

        spec, self.images, self.splits = load_task(cfg)
        if self.splits.split_hash != self.assets["split_hash"]:
            raise RuntimeError("the data this worker sees differs from the driver's (split hash mismatch): "
                               "is the storage directory shared by every node?")
        self.phases["data_loaded"] = time.time()
        ctx = method_context(cfg, spec, self.splits, self.assets["embed_dim"])
        outputs = teacher_outputs(cfg, self.images, ctx, self.assets["teacher"], teacher_id=self.assets["teacher_id"])
        self.phases["teacher_outputs_loaded"] = time.time()
        method_cls = get_method(cfg["method"]["name"])
        hp = method_hparams(cfg, self.assets.get("teacher_logit_scale"))
        student = build_student(cfg["student"]["backbone"], cfg["student"]["pretrained"], cfg["student"]["freeze_bn"],
                                embed_dim=self.assets["embed_dim"], num_classes=len(spec.classes),
                                weights_path=self.assets.get("student_weights"))
        self.method = method_cls(student, hp, ctx, outputs.text).to(self.device)
        if self.device.type == "cuda":   # convolutional students: channels_last (the feeder gives such inputs)
            self.method.student.to(memory_format=torch.channels_last)
        if tc["compile"]:
            self.method.student.backbone.compile()   # in place: parameter names (checkpoints, averages) unchanged
        teacher = None
        if teacher_view(cfg, method_cls.needs_image_embeddings) == "online":
            from ..models.teachers import load_teacher_spec

            teacher = load_teacher_spec(self.assets["teacher"], device=str(self.device))
        self.feed = Feeder(cfg, self.images, self.splits, outputs, method_cls.needs_image_embeddings, self.device,
                           self.rank, teacher, self.amp)
        self.model = self.method
        if self.world > 1:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(self.method,
                                                       parallel_strategy_kwargs={"find_unused_parameters": True})
        self.stages = method_cls.stages(hp, tc["steps"])
        self.total = sum(n for _, n in self.stages)
        self.eval_sets = {**{f"val/{d}": self.splits.val[d] for d in self.splits.source_domains},
                          "test_in": self.splits.test_in, "test_out": self.splits.test_out}
        if getattr(self.splits, "lodo_in", None) is not None:
            self.eval_sets["lodo_in"] = self.splits.lodo_in
        self.images_dev = self.feed.images   # on the device, or the host's mapped cache (train.device_data)
        self.labels_dev = self.images.labels.to(self.device)
        self.history: list[dict] = []
        self.best = {"selectable": None, "any": None}
        self.phases["ready"] = time.time()
        self.eval_seconds = 0.0   # evaluating, checkpointing, reporting and logging (the loop's own overhead)
        self.logged_until = -1   # MLflow steps already logged by an earlier attempt of this trial

    # ------------------------------------------------------------------------------------------- stage machinery
    def _new_stage(self, k: int):
        tc = self.cfg["train"]
        self.optimizer = make_optimizer(self.method.param_groups(), tc)
        self.scheduler = make_schedule(self.optimizer, tc, self.stages[k][1])
        sw = tc["swad"]
        self.averager = make_averager(tc["averaging"], self.method, start=tc["averaging_start"],
                                      n_converge=sw["n_converge"], n_tolerance=sw["n_tolerance"],
                                      tolerance_ratio=sw["tolerance_ratio"])
        self.handoff = None   # {"state", "val_acc", "step"}: the best evaluation of a non-last stage

    def run(self) -> None:
        stage, start, state = 0, 0, None
        checkpoint = session.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=self.device, weights_only=True)
            if state.get("version") != CHECKPOINT_VERSION:
                raise RuntimeError("this trial's checkpoint was written by an older distill; start it fresh "
                                   "(python -m distill.train ... --fresh)")
            self.history, self.best = list(state["history"]), dict(state["best"])
            self.logged_until = int(state["step"])
            if state.get("done"):   # a finished trial run again: report its last evaluation again, train nothing
                self._report_again(state)
                return
            stage, start = int(state["stage"]), int(state["stage_step"])
            self.method.load_state_dict(state.get("train_model") or state["model"])
            self.feed.load_state_dict(state["feed"])
            if self.rank == 0:
                print(f"[distill] resumed from the checkpoint at step {state['step']}", flush=True)
        for k in range(stage, len(self.stages)):
            self._new_stage(k)
            if state is not None and k == stage:
                if start >= self.stages[k][1] or state.get("stage_stopped"):   # killed at a stage boundary
                    self.handoff = state.get("handoff")
                    self._hand_off(k)
                    continue
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                if self.averager is not None:
                    self.averager.load_state_dict(state["averager"])
                self.handoff = state.get("handoff")
                self._stage(k, start)
            else:
                self._stage(k, 0)
            if k < len(self.stages) - 1:
                self._hand_off(k)

    def _hand_off(self, k: int) -> None:
        """The next stage starts from this stage's best source-validation evaluation."""
        if self.handoff is not None:
            self.method.load_state_dict(self.handoff["state"])
            if self.rank == 0 and self.progress:   # a sweep's trial: with --verbose only
                print(f"[distill] stage {self.stages[k][0]} -> {self.stages[k + 1][0]}: from the evaluation at step "
                      f"{self.handoff['step']} (val_acc {self.handoff['val_acc']:.3f})", flush=True)

    def _stage(self, k: int, start: int) -> None:
        name, steps = self.stages[k]
        tc = self.cfg["train"]
        offset = sum(n for _, n in self.stages[:k])
        evals = set(range(tc["eval_every"], steps + 1, tc["eval_every"])) | {steps}
        log_every = max(1, min(50, tc["eval_every"]))
        sums: dict[str, torch.Tensor] = {}
        n_sum, t0, t_last = 0, time.time(), time.time()
        bad = torch.full((), -1, dtype=torch.long, device=self.device)   # first step with a non-finite loss
        bad_terms: torch.Tensor | None = None
        for s in range(start, steps):
            step = offset + s
            batch = self.feed.batch(step)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, terms = self.model(batch, step)
            values = torch.stack([loss.detach().float(), *(v.detach().float().reshape(()) for v in terms.values())])
            first = (bad < 0) & ~torch.isfinite(values[0])
            bad = torch.where(first, step, bad)
            bad_terms = values if bad_terms is None else torch.where(first, values, bad_terms)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), tc["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            if self.averager is not None:
                self.averager.update(self.method, s)
            self._maybe_die(step + 1)
            for key, v in zip(["loss", *(f"loss/{t}" for t in terms)], values):
                sums[key] = sums[key] + v if key in sums else v.clone()
            n_sum += 1
            done = s + 1
            if done % log_every == 0 or done in evals:
                if self.world > 1:   # every rank fails at the same read, whichever saw the bad step first
                    import torch.distributed as dist

                    marker = torch.where(bad >= 0, bad, torch.full_like(bad, -1))
                    dist.all_reduce(marker, op=dist.ReduceOp.MAX)
                    bad = marker
                if int(bad) >= 0:
                    names = ["loss", *terms]
                    detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, bad_terms.tolist()))
                    raise FloatingPointError(f"non-finite loss at step {int(bad)} ({detail}); lower train.lr or "
                                             f"check the method's hyperparameters")
                means = self._mean_terms(sums, n_sum)
                if done in evals:
                    stop = self._evaluate(k, done, means, n_sum / max(time.time() - t_last, 1e-9),
                                          time.time() - t0)
                    sums, n_sum, t_last = {}, 0, time.time()
                    if stop:
                        return
                elif step + 1 > self.logged_until:
                    self._log(means | {"lr": self.scheduler.get_last_lr()[0]}, step + 1, name)

    def _mean_terms(self, sums: dict, n: int) -> dict:
        """The loss terms' means since the last read, averaged over the ranks (every rank reports the same)."""
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys]) / n
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= self.world
        return dict(zip(keys, values.tolist()))

    def _maybe_die(self, step: int) -> None:
        """Fault injection for the fault-tolerance tests (``assets["inject_fault"] = {"step", "marker"}``): the
        worker process dies at that step once, as a killed node's would; Ray Train restarts it from the last
        checkpoint. Inline (the process is the caller's) the loop raises instead, and is retried the same way, unless
        the fault says ``"process": true`` (the inline run's own process dies)."""
        fault = self.assets.get("inject_fault")
        if fault and step == fault["step"] and self.rank == fault.get("rank", 0):
            marker = Path(fault["marker"])
            if not marker.exists():
                marker.write_text(str(step))
                if session.inline() and not fault.get("process"):
                    raise RuntimeError(f"injected fault at step {step}")
                os._exit(1)

    # ------------------------------------------------------------------------------------------- evaluations
    def _scores(self, model) -> tuple[dict, float, float]:
        """The evaluations of `model`, its source-validation accuracy and loss (means over the source domains);
        `res["val_top_share"]`: the share of the source-validation images predicted as the most predicted class."""
        res = evaluate(model, self.images_dev, self.labels_dev, self.eval_sets, self.cfg["dataset"]["image_size"],
                       self.device, self.rank, self.world, self.amp, num_classes=self.method.ctx.num_classes)
        val = {d: res[f"val/{d}"] for d in self.splits.source_domains}
        val_acc = sum(a for a, _, _ in val.values()) / len(val)
        val_loss = sum(loss for _, loss, _ in val.values()) / len(val)
        predicted = sum(counts for _, _, counts in val.values())
        res["val_top_share"] = float(predicted.max() / predicted.sum()) if predicted.sum() else float("nan")
        return res, val_acc, val_loss

    def _evaluate(self, k: int, done: int, train_terms: dict, steps_per_s: float, elapsed: float) -> bool:
        """Evaluate, report, checkpoint. Returns True when the stage stops here (its last step, or SWAD's dead
        valley)."""
        t_eval = time.time()
        self.phases.setdefault("first_eval", t_eval)
        name, steps = self.stages[k]
        last_stage = k == len(self.stages) - 1
        step = sum(n for _, n in self.stages[:k]) + done
        avg = self.averager
        evaluated = (avg.eval_model() if avg is not None else None) or self.method
        res, val_acc, val_loss = self._scores(evaluated)
        if avg is not None:
            avg.observe(done - 1, val_acc, val_loss, self.method)
        collapsed = last_stage and self._collapsed(done, val_acc, res["val_top_share"])
        stage_ends = done >= steps or (avg is not None and avg.stop) or collapsed
        if not last_stage and (self.handoff is None or val_acc > self.handoff["val_acc"]):
            self.handoff = {"state": {n: v.detach().cpu().clone() for n, v in evaluated.state_dict().items()},
                            "val_acc": val_acc, "step": step}
        eval_model, raw_val = ("raw" if avg is None or avg.kind == "swad" else avg.kind), None
        if stage_ends and avg is not None and avg.kind == "swad":
            freeze = self.cfg["student"]["freeze_bn"]
            bn_steps = self.cfg["train"]["swad"]["bn_steps"]
            evaluated = avg.final_model(bn_batches=None if freeze or not bn_steps else self.feed.bn_batches,
                                        bn_steps=bn_steps)
            _average_bn_across_ranks(evaluated, self.world)
            raw_val = val_acc
            res, val_acc, val_loss = self._scores(evaluated)
            eval_model = "swad"
        selectable = last_stage and eval_model != "raw" if self.cfg["train"]["averaging"] == "swad" else last_stage
        # the checkpoint score: val_acc only where this evaluation is the trial's first at a new best, the one step
        # of the trial that validation selection can pick (its ties go to the earlier step): the keep rule then
        # always holds it, whatever later evaluations tie with it
        new_best = selectable and (self.best["selectable"] is None or val_acc > self.best["selectable"])
        for key, value in (("selectable", val_acc if selectable else None), ("any", val_acc)):
            if value is not None and (self.best[key] is None or value > self.best[key]):
                self.best[key] = value
        metrics = {
            "step": step, SELECTION_METRIC: val_acc,
            BEST_METRIC: self.best["selectable"] if self.best["selectable"] is not None else self.best["any"],
            **{f"val_acc/{d}": res[f"val/{d}"][0] for d in self.splits.source_domains}, "val_loss": val_loss,
            "test_acc": res["test_in"][0], "test_out_acc": res["test_out"][0], **train_terms,
            "steps_per_s": steps_per_s, "stage": name, "eval_model": eval_model, "selectable": selectable,
            "final": bool(last_stage and stage_ends), "total_steps": self.total, "val_top_share": res["val_top_share"],
            SCORE_METRIC: val_acc if new_best else -1.0,
        }
        if collapsed:
            metrics["collapsed"] = True
        if "lodo_in" in res:
            metrics["lodo_acc"] = res["lodo_in"][0]
        if raw_val is not None:
            metrics["raw_val_acc"] = raw_val
        if avg is not None:
            metrics.update({f"averaging/{key}": v for key, v in avg.summary().items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.history.append(metrics)
        if step > self.logged_until:
            self._log({key: v for key, v in metrics.items() if key != "step"}, step, name)
        state = None
        if self.rank == 0:
            if self.progress:
                stage_text = f" [{name}]" if len(self.stages) > 1 else ""
                print(f"[{self.label}] step {step}/{self.total}{stage_text}: loss "
                      f"{train_terms.get('loss', float('nan')):.4f}  val_acc {val_acc:.3f}  test_acc "
                      f"{metrics['test_acc']:.3f}  [{eval_model}]  ({steps_per_s:.2f} steps/s, {elapsed:.0f}s)",
                      flush=True)
            train_state = self.method.state_dict()
            state = {"version": CHECKPOINT_VERSION, "model": evaluated.state_dict(), "stage": k, "stage_step": done,
                     "stage_stopped": bool(stage_ends and done < steps), "step": step,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "averager": avg.state_dict() if avg is not None else None, "handoff": self.handoff,
                     "feed": self.feed.state_dict(), "metrics": metrics, "history": self.history,
                     "best": self.best, "done": metrics["final"]}
            if evaluated is not self.method:
                state["train_model"] = train_state
        if self.logger is not None:
            self.logger.flush()   # durable before Tune hears of this evaluation (ASHA may stop the trial at once)
        self.eval_seconds += time.time() - t_eval
        metrics.update({f"time/{key}": v for key, v in self.phases.items()})
        metrics.update({"time/eval_seconds": self.eval_seconds, "time/slot_wait_seconds": self.slot_wait,
                        "time/reported": time.time()})
        self._report(metrics, state)
        return stage_ends

    def _collapsed(self, done: int, val_acc: float, top_share: float) -> bool:
        """train.stop_collapsed = N: after the last stage's N-th evaluation round, a trial has collapsed (a diverged
        or degenerate student) when its best source-validation accuracy in that stage is at most 1.5 x chance, or
        when at every evaluation of the stage so far it predicted one class for at least 95% of the source-validation
        images (constant predictions score the share of that class, above chance on an unbalanced split). It stops
        there instead of spending the rest of its budget. The stage's earlier evaluations come from the history (a
        resumed trial decides the same); every rank decides the same (the counts are all-reduced)."""
        n = self.cfg["train"]["stop_collapsed"]
        rounds = done // self.cfg["train"]["eval_every"]
        if not n or rounds < n:
            return False
        stage = self.stages[-1][0]
        earlier = [h for h in self.history if h.get("stage") == stage]
        best = max([h[SELECTION_METRIC] for h in earlier] + [val_acc])
        constant = all(share >= COLLAPSED_SHARE for share in [h.get("val_top_share", 0.0) for h in earlier]
                       + [top_share])
        collapsed = best <= 1.5 / self.method.ctx.num_classes or constant
        if collapsed and self.rank == 0:
            why = (f"one class predicted for >= {COLLAPSED_SHARE:.0%} of the source-validation images" if constant
                   else f"source-val accuracy at most {best:.3f} (<= 1.5 x chance)")
            print(f"[{self.label}] collapsed: {why} after {rounds} evaluation rounds; the trial stops here "
                  f"(train.stop_collapsed)", flush=True)
        return collapsed

    def _report(self, metrics: dict, state: dict | None) -> None:
        if self.assets.get("report_log"):   # every rank's reports, for the tests that compare ranks
            with open(Path(self.assets["report_log"]) / f"rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in metrics.items() if not k.startswith("time/")}) + "\n")
        if state is None:   # ranks > 0 report the same number of times, without a checkpoint
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            session.report(metrics, tmp)

    def _report_again(self, state: dict) -> None:
        """A finished trial run again (the same run name): its last evaluation, as it was, with its checkpoint."""
        if self.rank == 0:
            print(f"[distill] trial already finished at step {state['step']}: reporting its last evaluation again",
                  flush=True)
        self._report(dict(state["metrics"]), state if self.rank == 0 else None)

    def _log(self, metrics: dict, step: int, stage: str) -> None:
        """MLflow (rank 0): metrics of a first stage carry its name as a prefix (`align/val_acc`); the last stage's
        are the trial's own."""
        if self.logger is None:
            return
        prefix = f"{stage}/" if len(self.stages) > 1 and stage != self.stages[-1][0] else ""
        self.logger.log({f"{prefix}{k}": v for k, v in metrics.items()
                         if k != SCORE_METRIC and not k.startswith("time/")}, step)
