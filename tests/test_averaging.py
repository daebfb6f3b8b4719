"""distill.trial.averaging: SMA (SCMD's MovingAvg) and SWAD (LossValley + AveragedModel) against hand-computed values.

SWAD scenarios drive a model whose parameter equals the step number (evaluations after every 4 steps), so segment j
averages steps 4j..4j+3 (value 4j + 1.5) and its buffers are those at its creation (step 4j - 1; -1 for segment 0).
The segments the official rule averages are written out by hand per scenario, in the order it adds them.
"""
import pytest
import torch
from torch import nn

from distill.trial.averaging import make_averager, update_bn

torch.set_num_threads(1)

K = 4   # steps per SWAD segment in the scripted scenarios


class Net(nn.Module):
    """Linear + BatchNorm1d + head, with the Method interface the averager uses (predict)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.lin(x)))

    def predict(self, x):
        return self(x)


class Scripted(nn.Module):
    """A parameter and a buffer the test sets to known values."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.register_buffer("b", torch.full((1,), -1.0, dtype=torch.float64))

    def predict(self, x):
        return x * self.w.sum()


def sgd_step(model, opt, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def floating(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


# ------------------------------------------------------------------------------------------------------------ SMA
def test_sma_is_the_mean_of_the_weights_from_update_start_minus_1():
    torch.manual_seed(0)
    model, start, steps = Net(), 5, 30
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    av = make_averager("sma", model, start=start)
    assert av.kind == "sma" and not av.stop
    nbt0 = model.bn.num_batches_tracked.clone()
    recorded = []
    for s in range(steps):
        sgd_step(model, opt, s)
        av.update(model, s)
        recorded.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        got = av.eval_model().state_dict()
        if s + 1 < start:       # global_iter < start: a copy of the current weights
            for k, v in floating(recorded[s]).items():
                assert torch.equal(got[k], v), k
        else:                   # the mean of the weights after updates start-1 .. s+1 (0-based steps start-2 .. s)
            window = recorded[start - 2: s + 1]
            for k in floating(recorded[s]):
                expected = sum(r[k] for r in window) / len(window)
                assert torch.allclose(got[k], expected, atol=1e-6), (s, k)
            assert any(not torch.equal(got[k], recorded[s][k]) for k in floating(got))
        assert torch.equal(got["bn.num_batches_tracked"], nbt0)   # never averaged
    avg = av.eval_model()
    assert not avg.training and avg is not model
    assert av.summary()["sma_count"] == steps - start + 1
    final = av.final_model()
    assert final is not avg and not final.training
    for k, v in avg.state_dict().items():
        assert torch.equal(final.state_dict()[k], v)
    assert av.observe(0, 0.5, 1.0, model) is None and not av.stop


def test_none_and_unknown_kinds():
    assert make_averager("none", Net()) is None
    with pytest.raises(ValueError):
        make_averager("ema", Net())


# ------------------------------------------------------------------------------------------------------------ SWAD
def seg_value(j):
    return K * j + 1.5                   # mean of steps 4j .. 4j+3


def seg_buffer(j):
    return -1.0 if j == 0 else K * j - 1.0


def drive(losses, on_eval=None, **kw):
    """Evaluations after steps 3, 7, 11, ... with scripted val losses; stops (as the loop does) on a dead valley."""
    model = Scripted()
    av = make_averager("swad", model, **kw)
    stops = []
    for e, loss in enumerate(losses):
        for step in range(K * e, K * e + K):
            with torch.no_grad():
                model.w.fill_(step)
                model.b.fill_(step)
            av.update(model, step)
        assert av.eval_model() is None
        av.observe(step, 0.5, loss, model)
        stops.append(av.stop)
        if on_eval:
            on_eval(e, av)
        if av.stop:
            break
    return av, model, stops


def check_final(av, chosen, start, end, buffer_seg):
    """chosen: the segments in the order the rule adds them (the first add copies), equal weights."""
    net = av.final_model()
    expected = sum(seg_value(j) for j in chosen) / len(chosen)
    assert torch.allclose(net.w, torch.full((2,), expected, dtype=torch.float64)), (net.w, expected)
    assert net.b.item() == seg_buffer(buffer_seg)      # the buffers of the segment the average was made from
    s = av.summary()
    assert (s["swad_start_step"], s["swad_end_step"], s["swad_n"]) == (start, end, len(chosen))
    assert not net.training and net.w.device == torch.device("cpu")


def test_swad_converges_at_the_first_possible_evaluation():
    losses = [1.0, 1.1, 1.2, 1.05, 1.1, 1.0, 1.1, 1.2]
    av, _, stops = drive(losses)
    assert not any(stops)
    s = av.summary()
    assert s["swad_converged"] == 1 and s["swad_converge_step"] == 3          # segment 0's end step
    assert s["swad_threshold"] == pytest.approx(1.1 * 1.3)
    # eval 2: AveragedModel(s0) (n=0), tolerance-window scan over [s0, s1, s2] (none above 1.43) adds s1 (copies:
    # s0's weights are dropped, its buffers kept), s2. Evals 3, 4, 5: smooth_Q[0] is still s0 (the queue is not full
    # yet): s0 added three times. Eval 6: s1; eval 7: s2. get_final_model: popleft (s2), then s3..s7 (step=end_step).
    check_final(av, [1, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7], start=4, end=31, buffer_seg=0)


def test_swad_later_convergence_uses_the_tolerance_window_scan():
    losses = [3.0, 2.5, 2.0, 1.1, 1.0, 0.8, 0.9, 1.0, 1.05, 1.1, 0.95]
    mid = {}

    def on_eval(e, av):
        if e < 7:
            assert av.summary()["swad_converged"] == 0
        if e == 7:      # converged: converge_Q = [s5, s6, s7], smooth_Q = [s2 .. s7], threshold 0.9 * 1.3 = 1.17
            s = av.summary()
            assert s["swad_converge_step"] == 23 and s["swad_threshold"] == pytest.approx(1.17)
            # scan of Q = [s2 2.0, s3 1.1, s4 1.0, s5 0.8] from the back: s2 > 1.17 -> start_idx 1 -> adds Q[2:] =
            # s4 (copy), s5 (s3 is left out: the official `start_idx + 1`). Asked now, get_final_model adds the
            # tail smooth_Q[1:] = s3 .. s7.
            check_final(av, [4, 5, 3, 4, 5, 6, 7], start=16, end=31, buffer_seg=5)
            mid["asked"] = True

    av, _, stops = drive(losses, on_eval)
    assert mid and not any(stops)
    # eval 8, 9: smooth_Q[0] = s3, s4 end before the converge step (23): nothing. Eval 10: s5.
    # get_final_model: popleft (s5), then s6 .. s10.
    check_final(av, [4, 5, 5, 6, 7, 8, 9, 10], start=16, end=43, buffer_seg=5)


def test_swad_dead_valley_stops_and_keeps_the_valley():
    losses = [1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    av, model, stops = drive(losses)
    # eval 8: smooth_Q = [s3 .. s8], min 1.3 <= 1.43 -> s3 added; eval 9: [s4 .. s9], min 1.5 > 1.43 -> dead
    assert stops == [False] * 9 + [True]
    check_final(av, [1, 2, 0, 0, 0, 1, 2, 3], start=4, end=15, buffer_seg=0)   # no tail after a dead valley
    before = av.summary()
    av.observe(40, 0.9, 0.1, model)               # after the valley died nothing changes
    assert av.summary() == before and av.stop
    check_final(av, [1, 2, 0, 0, 0, 1, 2, 3], start=4, end=15, buffer_seg=0)


def test_swad_never_converged_returns_the_last_segment():
    av, _, stops = drive([5.0, 4.0, 3.0, 2.0, 1.0])
    assert not any(stops) and av.summary()["swad_converged"] == 0
    check_final(av, [4] * 4, start=16, end=19, buffer_seg=4)   # segment 4 itself: n = its 4 steps


@pytest.mark.parametrize("n_tolerance, mid_start", [
    (2, 4),   # n_tolerance < n_converge: converge_Q[1] = s1 added (copies) at convergence; eval 3: s2, eval 4: s3
    (3, 7),   # equal: nothing added at convergence (n stays 0); eval 3: s1 (copies), eval 4: s2
])
def test_swad_other_window_branches(n_tolerance, mid_start):
    def on_eval(e, av):
        # just converged; get_final_model's tail smooth_Q[1:] is [s2] (n_tol 2) or [s1, s2] (n_tol 3), added with
        # step=end_step: with n_tol 3 the first add copies s1 and sets start_step to s1's END step (7)
        if e == 2:
            check_final(av, [1, 2], start=mid_start, end=11, buffer_seg=0)

    av, _, _ = drive([1.0, 1.1, 1.2, 1.05, 1.1], on_eval, n_tolerance=n_tolerance)
    check_final(av, [1, 2, 3, 4], start=4, end=19, buffer_seg=0)   # tail: s3, s4


def test_swad_before_any_evaluation_gives_the_running_segment():
    model = Scripted()
    av = make_averager("swad", model)
    assert torch.equal(av.final_model().w, model.w)
    for step in range(3):
        with torch.no_grad():
            model.w.fill_(step)
        av.update(model, step)
    assert torch.allclose(av.final_model().w, torch.full((2,), 1.0, dtype=torch.float64))
    assert av.summary()["swad_n"] == 3


# ------------------------------------------------------------------------------------------------------------ BN
def test_swad_final_model_recomputes_batchnorm_statistics():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    av = make_averager("swad", model)
    for s in range(12):
        sgd_step(model, opt, s)
        av.update(model, s)
        if s % 3 == 2:
            av.observe(s, 0.5, [1.0, 1.1, 1.2, 1.3][s // 3], model)
    raw_stats = model.bn.running_mean.clone()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(16, 3, generator=g) * 2 + 1 for _ in range(7)]
    asked, calls = [], []

    def bn_batches(n):
        asked.append(n)
        yield from batches

    def forward(m, x):
        calls.append(x.shape)
        return m(x)

    plain = av.final_model()
    net = av.final_model(bn_batches=bn_batches, bn_steps=7, forward=forward)
    assert asked == [7] and len(calls) == 7
    with torch.no_grad():
        feats = [net.lin(x) for x in batches]
    mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(net.bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(net.bn.running_var, var, atol=1e-5)
    assert not torch.allclose(plain.bn.running_mean, mean, atol=1e-3)
    assert net.bn.momentum == 0.1 and net.bn.num_batches_tracked.item() == 7 and not net.training
    assert torch.equal(net.lin.weight, plain.lin.weight)                       # only statistics change
    assert torch.equal(model.bn.running_mean, raw_stats)                       # the live model is untouched
    # bn_steps 0: no recomputation
    assert torch.equal(av.final_model(bn_batches=bn_batches, bn_steps=0).bn.running_var, plain.bn.running_var)


def test_update_bn_restores_the_mode_and_skips_models_without_bn():
    net = Net().train()
    net.bn.momentum = 0.3
    update_bn(net, [torch.randn(5, 3) for _ in range(2)])
    assert net.training and net.bn.momentum == 0.3 and net.bn.num_batches_tracked.item() == 2
    net.eval()
    update_bn(net, [torch.randn(5, 3)])
    assert not net.training and net.bn.num_batches_tracked.item() == 1
    lin = nn.Linear(3, 2)
    assert update_bn(lin, []) is lin


# ------------------------------------------------------------------------------------------------------------ resume
def run_training(kind, steps, tmp_path, split=None):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    av = make_averager(kind, model, start=5)
    losses = [1.0, 1.1, 1.2, 1.05, 1.1, 1.0]
    for s in range(steps):
        if s == split:
            state = av.state_dict()
            if kind == "swad":   # segments shared by both queues are stored once
                assert len(state["frozen"]) == 3 and state["converge_Q"] == state["smooth_Q"] == [0, 1, 2]
            torch.save({"av": state, "model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
            ck = torch.load(tmp_path / "ck.pt", weights_only=True)
            torch.manual_seed(123)
            model = Net()
            model.load_state_dict(ck["model"])
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(ck["opt"])
            av = make_averager(kind, model, start=5)
            av.load_state_dict(ck["av"])
        sgd_step(model, opt, s)
        av.update(model, s)
        if (s + 1) % 6 == 0:
            av.observe(s, 0.5, losses[(s + 1) // 6 - 1], model)
    return av


@pytest.mark.parametrize("kind", ["sma", "swad"])
def test_resume_mid_averaging_is_exact(kind, tmp_path):
    straight = run_training(kind, 36, tmp_path)
    resumed = run_training(kind, 36, tmp_path, split=20)     # mid-segment, after SWAD converged (eval at step 17)
    a, b = straight.final_model().state_dict(), resumed.final_model().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.summary() == resumed.summary()
    if kind == "swad":
        assert straight.summary()["swad_converged"] == 1
    with pytest.raises(ValueError):
        make_averager(kind, Net(), start=7, n_converge=4).load_state_dict(straight.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["sma", "swad"])
def test_cuda_model(kind, tmp_path):
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    av = make_averager(kind, model, start=2)
    for s in range(12):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 3, generator=g).cuda(), torch.randint(0, 2, (8,), generator=g).cuda()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        av.update(model, s)
        if s % 3 == 2:
            av.observe(s, 0.5, [1.0, 1.1, 1.2, 1.3][s // 3], model)
    if kind == "swad":
        assert all(v.device.type == "cpu" for m in av.smooth_Q for v in m.state.values())
    torch.save(av.state_dict(), tmp_path / "av.pt")
    fresh = make_averager(kind, model, start=2)
    fresh.load_state_dict(torch.load(tmp_path / "av.pt", weights_only=True))
    net = fresh.final_model(bn_batches=lambda n: (torch.randn(8, 3) for _ in range(n)), bn_steps=3)
    assert all(p.is_cuda for p in net.parameters()) and all(b.is_cuda for b in net.buffers())
    ref = av.final_model().state_dict()
    for k, v in net.state_dict().items():
        if "bn." not in k or kind == "sma":
            assert torch.equal(v, ref[k]), k


def test_tied_weights_are_averaged_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

        def predict(self, x):
            return self.b(self.a(x))

    # sma with start 1 averages the weights at construction (10) and after updates 1..4 (0, 1, 2, 3): 16 / 5;
    # swad without an evaluation: the running segment, the mean of 0..3
    for kind, expected in (("sma", 3.2), ("swad", 1.5)):
        model = Tied()
        with torch.no_grad():
            model.a.weight.fill_(10.0)
        av = make_averager(kind, model, start=1)
        for step in range(4):
            with torch.no_grad():
                model.a.weight.fill_(step)
            av.update(model, step)
        net = av.final_model()
        assert torch.allclose(net.a.weight, torch.full((2, 2), expected)), kind
        assert net.b.weight is net.a.weight
