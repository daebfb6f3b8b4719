"""Weight averaging for the training loop: ``make_averager(kind, model)`` -> an ``Averager`` or None.

Two rules, each ported from its official code (formulas and quirks kept; the code is our own):

- ``sma``: DomainBed/SCMD's ``MovingAvg`` (SeanLeng1/SCMD ``DomainBed/domainbed/algorithms.py``). Once per optimiser
  step ``global_iter += 1``; from ``global_iter >= start`` on, ``count += 1`` and every floating state_dict entry
  (parameters and float buffers such as BN running stats, never ``num_batches_tracked``) becomes
  ``(avg * count + cur) / (1 + count)``; before that the average is a copy of the current weights. After t >= start
  updates it is the mean of the weights after updates start-1 .. t. The averaged network (a deep copy of the model,
  on its device, eval mode) is evaluated at every evaluation.
- ``swad``: SWAD's ``LossValley`` with ``swa_utils.AveragedModel`` (khanrc/swad ``domainbed/swad.py``, also in
  val-iisc/VL2V-ADiP). A segment average of the parameters (buffers: those of the segment's creation) runs over the
  steps between two evaluations; at an evaluation the finished segment is frozen on CPU with the source-validation
  loss and fed to the loss-valley rule, and a new segment starts. The raw model is what gets evaluated meanwhile; the
  valley average is the stage's final model (BN statistics recomputed, ``update_bn``). ``stop`` is the dead valley
  (the official trainer's early stop).

An ``AveragedModel`` is kept here as ``_Avg``: a state_dict (parameter entries averaged, buffers as copied), ``n``
(``n_averaged``), ``start_step``/``end_step``, and ``end_loss`` once frozen. Networks are materialised only when asked
for (``final_model``), as a deep copy of the model carrying the averaged state.
"""
from __future__ import annotations

import copy
import itertools
from collections import deque
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

KINDS = ("none", "sma", "swad")


def make_averager(kind: str, model: nn.Module, *, start: int = 300, n_converge: int = 3, n_tolerance: int = 6,
                  tolerance_ratio: float = 0.3) -> "Averager | None":
    """The averager of ``kind`` ("none" -> None) for ``model``, made when the stage starts (after the model is on its
    device): SMA deep-copies it, SWAD snapshots it as its first segment (as the official trainer does)."""
    if kind == "none":
        return None
    if kind == "sma":
        return SMA(model, start)
    if kind == "swad":
        return SWAD(model, n_converge, n_tolerance, tolerance_ratio)
    raise ValueError(f"unknown averaging {kind!r}; expected one of {KINDS}")


def _alias_keys(model: nn.Module) -> set[str]:
    """state_dict keys naming a tensor an earlier key already names (tied weights): never touched on their own."""
    seen, aliases = set(), set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases.add(key)
        seen.add(id(value))
    return aliases


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[torch.Tensor],
              forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> nn.Module:
    """swa_utils.update_bn: every BatchNorm's running_mean zeroed, running_var ones, num_batches_tracked zeroed,
    momentum None (cumulative average over the batches), the model in train mode, one forward pass per batch, then
    momenta and mode restored. A model without BatchNorm statistics is left as it is."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        return model
    momenta = {}
    for bn in bns:
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.zero_()
        momenta[bn], bn.momentum = bn.momentum, None
    was_training = model.training
    model.train()
    run = forward or (lambda m, x: m.predict(x))
    device = bns[0].running_mean.device
    for x in batches:
        run(model, x.to(device))
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    model.train(was_training)
    return model


class Averager:
    """What the loop calls. ``update`` after every optimiser step; ``eval_model`` at an evaluation (None: evaluate the
    raw model); ``observe`` at every evaluation, after that step's ``update``; ``stop`` ends the stage;
    ``final_model`` is the stage's network; ``state_dict``/``load_state_dict`` resume exactly (weights_only-safe)."""

    kind = ""

    def __init__(self, model: nn.Module):
        self._model = model                   # the live model: deep-copied when a network is materialised
        self._skip = _alias_keys(model)

    def update(self, model: nn.Module, step: int) -> None:
        raise NotImplementedError

    def eval_model(self) -> nn.Module | None:
        return None

    def observe(self, step: int, val_acc: float, val_loss: float, model: nn.Module) -> None:
        pass

    @property
    def stop(self) -> bool:
        return False

    def final_model(self, bn_batches: Callable[[int], Iterable[torch.Tensor]] | None = None, bn_steps: int = 500,
                    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> nn.Module:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the model's state_dict (tied aliases left out), on the model's device."""
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in self._skip}

    def _network(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A deep copy of the model carrying ``state``, on the model's device, in eval mode."""
        net = copy.deepcopy(self._model)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self._skip:
            raise RuntimeError(f"averaged state does not fit the model: missing {missing}, unexpected {unexpected}")
        for p in net.parameters():
            p.grad = None
        return net.eval()

    def _check(self, state: dict, **expected) -> None:
        got = {k: state.get(k) for k in expected}
        if state.get("kind") != self.kind or got != expected:
            raise ValueError(f"averager state of kind {state.get('kind')!r} {got} does not fit {self.kind} {expected}")


class SMA(Averager):
    """DomainBed/SCMD's MovingAvg."""

    kind = "sma"

    def __init__(self, model: nn.Module, start: int = 300):
        super().__init__(model)
        self.start, self.global_iter, self.count = int(start), 0, 0
        self._avg = copy.deepcopy(model).eval()
        self._keys = [k for k, v in self._avg.state_dict().items()
                      if k not in self._skip and "num_batches_tracked" not in k and v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self.global_iter += 1
        averaging = self.global_iter >= self.start
        if averaging:
            self.count += 1
        cur, avg = model.state_dict(), self._avg.state_dict()
        for k in self._keys:
            new = cur[k].detach().to(avg[k].device)
            avg[k].copy_((avg[k] * self.count + new) / (1.0 + self.count) if averaging else new)

    def eval_model(self) -> nn.Module:
        return self._avg.eval()

    def final_model(self, bn_batches=None, bn_steps: int = 500, forward=None) -> nn.Module:
        """A copy of the average. SCMD's SMA averages the BN statistics too and recomputes nothing: ``bn_*`` are
        ignored."""
        return copy.deepcopy(self._avg).eval()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "start": self.start, "global_iter": self.global_iter, "count": self.count,
                "avg": {k: v.detach().cpu().clone() for k, v in self._avg.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._check(state, start=self.start)
        self.global_iter, self.count = int(state["global_iter"]), int(state["count"])
        self._avg.load_state_dict(state["avg"])

    def summary(self) -> dict:
        return {"sma_count": self.count, "sma_global_iter": self.global_iter}


class _Avg:
    """One swa_utils.AveragedModel: ``state`` (None: bookkeeping only), ``n`` = n_averaged, start/end steps."""

    __slots__ = ("state", "n", "start_step", "end_step", "end_loss")

    def __init__(self, state, n=0, start_step=-1, end_step=-1, end_loss=None):
        self.state, self.n, self.start_step, self.end_step, self.end_loss = state, n, start_step, end_step, end_loss

    @torch.no_grad()
    def update(self, names: list[str], source: dict | None, step=None, start_step=None, end_step=None) -> None:
        """AveragedModel.update_parameters: the running mean of the parameters ``names`` of ``source`` (a model's
        parameters or another average's state), the first update copying; then the step bookkeeping."""
        if self.state is not None:
            for name in names:
                avg = self.state[name]
                p = source[name].detach().to(avg.device)
                avg.copy_(p if self.n == 0 else avg + (p - avg) / (self.n + 1))
        self.n += 1
        if step is not None:
            start_step = step if start_step is None else start_step
            end_step = step if end_step is None else end_step
        if start_step is not None and self.n == 1:
            self.start_step = start_step
        if end_step is not None:
            self.end_step = end_step

    def copy(self, tensors: bool = True) -> "_Avg":
        state = {k: v.clone() for k, v in self.state.items()} if tensors and self.state is not None else None
        return _Avg(state, self.n, self.start_step, self.end_step, self.end_loss)

    def to_dict(self, clone: bool) -> dict:
        state = {k: (v.detach().cpu().clone() if clone else v) for k, v in self.state.items()}
        return {"state": state, "n": self.n, "start_step": self.start_step, "end_step": self.end_step,
                "end_loss": self.end_loss}

    @classmethod
    def from_dict(cls, d: dict) -> "_Avg":
        return cls(d["state"], int(d["n"]), int(d["start_step"]), int(d["end_step"]), d["end_loss"])


class SWAD(Averager):
    """SWAD: per-evaluation segment averages fed to LossValley(n_converge, n_tolerance, tolerance_ratio)."""

    kind = "swad"

    def __init__(self, model: nn.Module, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        super().__init__(model)
        self.n_converge, self.n_tolerance = int(n_converge), int(n_tolerance)
        self.tolerance_ratio = float(tolerance_ratio)
        self._names = [n for n, _ in model.named_parameters()]    # AveragedModel.parameters(): shared ones once
        self._segment = _Avg(self._snapshot(model))               # the running segment, on the model's device
        self.converge_Q: deque[_Avg] = deque(maxlen=self.n_converge)   # frozen segments (CPU), shared by both queues
        self.smooth_Q: deque[_Avg] = deque(maxlen=self.n_tolerance)
        self.final: _Avg | None = None
        self.converge_step: int | None = None
        self.dead_valley = False
        self.threshold: float | None = None
        self.n_segments = 0                                       # segments fed to the valley rule

    def update(self, model: nn.Module, step: int) -> None:
        self._segment.update(self._names, dict(model.named_parameters()), step=step)

    def observe(self, step: int, val_acc: float, val_loss: float, model: nn.Module) -> None:
        self._update_and_evaluate(self._segment, float(val_loss))
        self._segment = _Avg(self._snapshot(model))

    @property
    def stop(self) -> bool:
        return self.dead_valley

    def _add(self, avg: _Avg, m: _Avg, **steps) -> None:
        avg.update(self._names, m.state, **steps)

    def _update_and_evaluate(self, segment: _Avg, val_loss: float) -> None:
        """LossValley.update_and_evaluate, verbatim logic."""
        if self.dead_valley:
            return
        # frozen on CPU; the running segment is replaced right after, so its tensors may be taken over
        frozen = _Avg({k: v.to("cpu") for k, v in segment.state.items()}, segment.n, segment.start_step,
                      segment.end_step, val_loss)
        self.n_segments += 1
        self.converge_Q.append(frozen)
        self.smooth_Q.append(frozen)
        if self.converge_step is None:
            if len(self.converge_Q) < self.n_converge:
                return
            losses = [m.end_loss for m in self.converge_Q]
            min_idx = losses.index(min(losses))                   # np.argmin: the first minimum
            if min_idx == 0:
                untilmin = self.converge_Q[0]
                self.converge_step = untilmin.end_step
                self.final = _Avg({k: v.clone() for k, v in untilmin.state.items()})   # AveragedModel(untilmin): n=0
                self.threshold = float(np.mean(losses)) * (1.0 + self.tolerance_ratio)
                if self.n_tolerance < self.n_converge:
                    for i in range(self.n_converge - self.n_tolerance):
                        m = self.converge_Q[1 + i]
                        self._add(self.final, m, start_step=m.start_step, end_step=m.end_step)
                elif self.n_tolerance > self.n_converge:
                    Q = list(self.smooth_Q)[: self.n_tolerance - self.n_converge + 1]
                    start_idx = 0
                    for i in reversed(range(len(Q))):
                        if Q[i].end_loss > self.threshold:
                            start_idx = i + 1
                            break
                    for m in Q[start_idx + 1:]:
                        self._add(self.final, m, start_step=m.start_step, end_step=m.end_step)
            return
        if self.smooth_Q[0].end_step < self.converge_step:
            return
        if min(m.end_loss for m in self.smooth_Q) > self.threshold:
            self.dead_valley = True
            return
        m = self.smooth_Q[0]
        self._add(self.final, m, start_step=m.start_step, end_step=m.end_step)

    def _resolve(self, tensors: bool = True) -> _Avg:
        """LossValley.get_final_model without touching the averager's state (so it may be asked any time, and a
        checkpoint written after it still resumes exactly)."""
        if self.converge_step is None:     # official: "not yet converged; return last model instead"
            if self.converge_Q:
                return self.converge_Q[-1]
            if self._segment.n:            # no evaluation yet (official: IndexError): the running segment
                return self._segment
            return _Avg(self._snapshot(self._model) if tensors else None)
        final = self.final.copy(tensors)
        if not self.dead_valley:
            queue = list(self.smooth_Q)[1:]
            while queue:
                if min(m.end_loss for m in queue) > self.threshold:
                    break
                seg = queue.pop(0)
                final.update(self._names, seg.state if tensors else None, step=seg.end_step)
        return final

    def final_model(self, bn_batches=None, bn_steps: int = 500, forward=None) -> nn.Module:
        """get_final_model() as a network on the model's device (eval mode); with ``bn_batches`` (and bn_steps > 0)
        its BatchNorm statistics recomputed on ``bn_steps`` batches (``update_bn``)."""
        net = self._network(self._resolve().state)
        if bn_batches is not None and bn_steps > 0:
            update_bn(net, itertools.islice(bn_batches(bn_steps), bn_steps), forward)
        return net

    def state_dict(self) -> dict:
        frozen = list({id(m): m for m in itertools.chain(self.converge_Q, self.smooth_Q)}.values())
        index = {id(m): i for i, m in enumerate(frozen)}
        return {"kind": self.kind, "config": [self.n_converge, self.n_tolerance, self.tolerance_ratio],
                "segment": self._segment.to_dict(clone=True),
                "frozen": [m.to_dict(clone=False) for m in frozen],      # immutable once frozen: stored as they are
                "converge_Q": [index[id(m)] for m in self.converge_Q],
                "smooth_Q": [index[id(m)] for m in self.smooth_Q],
                "final": self.final.to_dict(clone=True) if self.final is not None else None,
                "converge_step": self.converge_step, "dead_valley": self.dead_valley, "threshold": self.threshold,
                "n_segments": self.n_segments}

    def load_state_dict(self, state: dict) -> None:
        self._check(state, config=[self.n_converge, self.n_tolerance, self.tolerance_ratio])
        seg = _Avg.from_dict(state["segment"])
        for k, v in self._segment.state.items():                  # back onto the model's device
            v.copy_(seg.state[k])
        self._segment.n, self._segment.start_step, self._segment.end_step = seg.n, seg.start_step, seg.end_step
        frozen = [_Avg.from_dict(d) for d in state["frozen"]]
        self.converge_Q = deque((frozen[i] for i in state["converge_Q"]), maxlen=self.n_converge)
        self.smooth_Q = deque((frozen[i] for i in state["smooth_Q"]), maxlen=self.n_tolerance)
        self.final = _Avg.from_dict(state["final"]) if state["final"] is not None else None
        self.converge_step = state["converge_step"]
        self.dead_valley = bool(state["dead_valley"])
        self.threshold = state["threshold"]
        self.n_segments = int(state["n_segments"])

    def summary(self) -> dict:
        """The valley so far and the window the final model would average now (start/end step, n)."""
        final = self._resolve(tensors=False)
        return {"swad_segments": self.n_segments, "swad_converged": int(self.converge_step is not None),
                "swad_converge_step": self.converge_step, "swad_threshold": self.threshold,
                "swad_dead_valley": int(self.dead_valley), "swad_start_step": final.start_step,
                "swad_end_step": final.end_step, "swad_n": final.n}
