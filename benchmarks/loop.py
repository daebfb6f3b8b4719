"""The training loop against its limits: ``python benchmarks/loop.py [--device cpu|cuda] [--quick] [--rounds N]``;
``python benchmarks/loop.py --compare A.json B.json`` checks that two runs repeat (each case within ±0.05).

For each student (small_cnn, resnet18, resnet50) and method case (erm; kd with the cached teacher; kd with the
teacher online; scmd), in images per second (3 source domains x batch per step), measured INTERLEAVED in one process:
after a warm-up, rounds of A, B, C, A, B, C, ... so that a load change on a shared machine hits the three alike:

- ``loop`` (A): distill's own step: the real worker loop (``distill.trial.loop``, in-process through Ray Train's local
  mode), batches drawn, augmented on the device, the method's loss, optimiser, averaging; one round = the steps
  between two of its evaluations (the loop's own ``steps_per_s``, evaluation excluded);
- ``bare`` (B): exactly the method's work and nothing else: a copy of the loop's own method object (its forward
  passes and selection: SCMD forwards the whole batch and back-propagates its selected part; KD reads the fixed
  batch's cached teacher embeddings; KD online also runs the teacher's forward on the batch), its backward and an
  optimiser step over its own parameter groups, on ONE fixed device batch drawn by the loop's own feeder (so no
  drawing, augmentation, averaging, scheduling or logging), the same precision and memory format;
- ``reference`` (C): a DomainBed-style loop: PIL decoding and torchvision transforms in DataLoader worker processes,
  fp32, the teacher run online on every batch when the case uses a teacher.

B and C run inside the loop's evaluation hook, so the loop's next round starts right after them. Each ratio is the
median of the per-round ratios (loop/bare and loop/reference of the same round), with its min-max; a case whose
per-round loop/bare spread (max-min over the median) exceeds ``SPREAD_BOUND`` says "unstable" instead of a verdict.
The JSON holds every round. CPU mode (always; small sizes: 32 px, the built-in world, a tiny random CLIP teacher)
takes minutes on two cores; GPU mode (224 px, bf16, channels_last, a ViT-B/16-architecture teacher with random
weights) also measures the host-streamed data path and several small trials sharing the GPU. Prints a table and
writes ``benchmarks/results/loop-<device>.json`` with the machine's load average at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("erm", {}), ("kd", {}), ("kd-online", {"teacher.online": True}), ("scmd", {})]
STUDENTS = ["small_cnn", "resnet18", "resnet50"]
SPREAD_BOUND = 0.10   # per-round loop/bare spread above which a case reports "unstable" instead of a verdict
TARGET = 0.9          # loop/bare the loop should reach
REF_SETTLE = 1.0      # seconds after C's round (untimed) for its DataLoader workers to finish prefetching


def settings(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"size": 224, "store": 256, "batch": 32, "per_class": 24, "arch": "ViT-B-16",
                "steps": {"small_cnn": 60, "resnet18": 40, "resnet50": 20}, "ref_steps": 10,   # per round
                "workers": 8, "amp": "bf16"}
    steps = {"small_cnn": 64, "resnet18": 12, "resnet50": 4}   # per round: ~2.5-4 s each on two cores
    if quick:
        steps = {k: max(2, v // 4) for k, v in steps.items()}
    return {"size": 32, "store": 32, "batch": 32, "per_class": 40, "arch": "distill-tiny-rn", "steps": steps,
            "ref_steps": 3 if quick else 6, "workers": 2, "amp": "off"}


# ----------------------------------------------------------------------------------------------------- the cases
def make_teacher_checkpoint(arch: str, out: Path) -> Path:
    """A teacher of the given architecture with random weights (the benchmark measures speed, not accuracy)."""
    import open_clip

    import distill.models.teachers  # noqa: F401 - registers the built-in architectures

    if not out.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(arch).state_dict(), out)
    return out


def trial_cfg(s: dict, storage: Path, teacher: Path, student: str, case: str, steps: int) -> dict:
    from distill.config import build_config, set_dotted, trial_config

    raw = {"name": "bench", "storage": str(storage),
           "dataset": {"image_size": s["size"], "store_size": s["store"],
                       "world": {"per_class": s["per_class"], "size": s["store"]}},
           "teacher": {"arch": s["arch"], "checkpoint": str(teacher), "prompts": "single"},
           "student": {"backbone": student}, "method": {"name": case.split("-")[0]},
           "train": {"steps": steps, "batch_size": s["batch"], "eval_every": steps // 2, "amp": s["amp"],
                     "optimizer": "adam", "lr": 1e-4}}
    if case.startswith("kd") or case == "scmd":
        set_dotted(raw, "method.teacher_logit_scale", 100.0)
    for key, value in dict(CASES)[case].items():
        set_dotted(raw, key, value)
    return trial_config(build_config(raw), "sketch")


def loop_rate(cfg: dict) -> float:
    """Images per second of the real worker loop, between its two evaluations (the second half: warmed up): the GPU
    extras' one-shot measure."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.trial import loop
    from distill.trial.prepare import prepare

    rows = []
    original = loop.Trainer._report
    loop.Trainer._report = lambda self, metrics, state: rows.append(metrics)
    try:
        TorchTrainer(loop.train_loop, train_loop_config={"cfg": cfg, "assets": prepare(cfg), "mlflow": {}},
                     scaling_config=ray.train.ScalingConfig(num_workers=0)).fit()
    finally:
        loop.Trainer._report = original
    return rows[-1]["steps_per_s"] * 3 * cfg["train"]["batch_size"]


def _time(fn, steps: int, device, first: int = 0) -> float:
    """Seconds per call of `fn(step)` for steps first .. first + steps - 1 (no warm-up here: the rounds are
    interleaved after one)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        fn(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bare_step(trainer, online: bool):
    """Exactly the method's work on one fixed device batch: a copy of the loop's own method object, its forward
    (selection included) in the loop's precision, backward and an optimiser step over its own parameter groups; with
    the teacher online, the teacher's forward on the batch's views first (as the loop's feeder does). It is called
    with the step numbers of the loop's round it is compared with: a method whose work depends on the step does the
    same work (SCMD selects its hardest samples for the first 1-k of training and uses the full batch after)."""
    import copy

    from distill.trial.loop import make_optimizer

    method = copy.deepcopy(trainer.method)
    opt = make_optimizer(method.param_groups(), trainer.cfg["train"])
    batch = trainer.feed.batch(0)   # drawn once by the loop's own feeder: same views, labels, domains, embeddings
    x01 = trainer.feed.views(batch["idx"])[0] if online else None
    device, amp, feed = trainer.device, trainer.amp, trainer.feed

    def step(index: int):
        b = batch
        if online:
            with torch.no_grad():
                b = {**batch, "image_emb": feed.teacher.encode_images(x01, batch_size=len(x01),
                                                                       amp_dtype=feed.amp_dtype).float()}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = method(b, index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def reference_step(cfg: dict, s: dict, device, online: bool):
    """DomainBed's way, one step: PIL decoding + torchvision transforms in DataLoader workers, fp32, cross-entropy
    (the teacher's forward on the batch when the case has a teacher)."""
    from PIL import Image
    from torchvision import transforms as T

    from distill.data.registry import get_spec
    from distill.models.students import build_student
    from distill.models.teachers import load_teacher

    root = Path(cfg["dataset"]["root"])
    files = [p for d in ("photo", "cartoon", "painting") for p in sorted((root / d).rglob("*.png"))]
    tf = T.Compose([T.RandomResizedCrop(s["size"], scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                    T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    classes = get_spec("synth").classes

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("RGB")), classes.index(files[i].parent.name)

    n = 3 * cfg["train"]["batch_size"]
    loader = torch.utils.data.DataLoader(Files(), batch_size=n, shuffle=True, num_workers=s["workers"],
                                         drop_last=True, persistent_workers=True)
    student = build_student(cfg["student"]["backbone"], embed_dim=64, num_classes=5).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    teacher = load_teacher(s["arch"], checkpoint=cfg["teacher"]["checkpoint"], device=str(device)) if online else None
    it = iter(loader)

    def step(index: int):
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device), y.to(device)
        if teacher is not None:
            teacher.encode_images((x * 0.226 + 0.449).clamp(0, 1), batch_size=n)
        loss = torch.nn.functional.cross_entropy(student(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved(s: dict, storage: Path, teacher: Path, student: str, case: str, device, rounds: int) -> dict:
    """One case, measured in rounds A (the loop), B (bare), C (reference) after a warm-up of each: the real loop
    runs rounds + 1 evaluation intervals; at each of its evaluations (its first is the warm-up) B and C run inside
    the evaluation hook. Returns every round's images/s of the three and the per-round ratios."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.trial import loop
    from distill.trial.prepare import prepare

    per_round = s["steps"][student]
    cfg = trial_cfg(s, storage, teacher, student, case, (rounds + 1) * per_round)
    cfg["train"]["eval_every"] = per_round
    online = case == "kd-online"
    n = 3 * cfg["train"]["batch_size"]
    assets = prepare(cfg)   # the world drawn, the caches: before the reference loop reads the files
    ref = reference_step(cfg, s, device, case != "erm")   # a fork runs its teacher online
    out: dict[str, list[float]] = {"loop": [], "bare": [], "reference": []}
    bare: list = []
    original = loop.Trainer._report

    def hook(self, metrics, state):
        first = int(metrics["step"]) - per_round   # the loop's round just measured: its steps first .. step - 1
        if not bare:   # the loop's first interval was its warm-up: warm B and C up once too
            bare.append(bare_step(self, online))
            _time(bare[0], 2, device, first)
            _time(ref, 1, device)
        else:
            out["loop"].append(metrics["steps_per_s"] * n)
            out["bare"].append(n / _time(bare[0], per_round, device, first))
            out["reference"].append(n / _time(ref, s["ref_steps"], device))
        time.sleep(REF_SETTLE)   # C's DataLoader workers refill their prefetch queue now, not during the next A

    loop.Trainer._report = hook
    try:
        TorchTrainer(loop.train_loop, train_loop_config={"cfg": cfg, "assets": assets, "mlflow": {}, "quiet": True},
                     scaling_config=ray.train.ScalingConfig(num_workers=0)).fit()
    finally:
        loop.Trainer._report = original
    return out


def summarise(student: str, case: str, rounds: dict) -> dict:
    """Medians and min-max of each rate, and the per-round ratios' median and min-max; a verdict on loop/bare only
    when its per-round spread is within SPREAD_BOUND."""
    def stats(values):
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    lb = [a / b for a, b in zip(rounds["loop"], rounds["bare"])]
    lr = [a / c for a, c in zip(rounds["loop"], rounds["reference"])]
    spread = (max(lb) - min(lb)) / statistics.median(lb)
    verdict = ("unstable" if spread > SPREAD_BOUND else
               "meets" if statistics.median(lb) >= TARGET else "below")
    return {"student": student, "case": case, "rounds": len(lb),
            **{f"{k}_img_per_s": stats(v) for k, v in rounds.items()},
            "loop_vs_bare": stats(lb), "loop_vs_reference": stats(lr), "loop_vs_bare_spread": round(spread, 3),
            "verdict": verdict, "every_round": {k: [round(x, 2) for x in v] for k, v in rounds.items()}}


# ------------------------------------------------------------------------------------------------- extra GPU cases
def host_vs_gpu(s: dict, storage: Path, teacher: Path, device) -> dict:
    """resnet50 + cached teacher, with the images on the GPU and streamed from host memory."""
    out = {}
    for mode in ("gpu", "host"):
        cfg = trial_cfg(s, storage, teacher, "resnet50", "kd", s["steps"]["resnet50"])
        cfg["train"]["device_data"] = mode
        out[mode] = round(loop_rate(cfg), 1)
    return out


def shared_gpu(s: dict, storage: Path, teacher: Path, n: int = 4) -> dict:
    """n small_cnn trials at once on one GPU (separate processes, as gpus_per_worker 1/n): summed images/s."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.loop import *; "
            f"s = settings('cuda', False); cfg = trial_cfg(s, {str(storage)!r}, {str(teacher)!r}, 'small_cnn', "
            f"'kd', 300); print('RATE', loop_rate(cfg))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        rates += [float(line.split()[1]) for line in out.splitlines() if line.startswith("RATE")]
    return {"trials": n, "img_per_s_each": [round(r, 1) for r in rates], "img_per_s_sum": round(sum(rates), 1)}


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--students", nargs="*", default=STUDENTS)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case after a warm-up (>= 5)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="measure nothing: compare two runs' loop/bare medians case by case (repeatability)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if args.device == "cpu":
        torch.set_num_threads(1)   # one trial per core, as the sweeps run on a CPU
    s = settings(args.device, args.quick)
    device = torch.device(args.device)
    storage = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    load_start = os.getloadavg()
    t_start = time.time()
    teacher = make_teacher_checkpoint(s["arch"], storage / f"teacher-{s['arch']}.pt")
    cases = []
    for student in args.students:
        for case, _ in CASES:
            t0 = time.time()
            row = summarise(student, case, interleaved(s, storage, teacher, student, case, device, args.rounds))
            row["seconds"] = round(time.time() - t0, 1)
            cases.append(row)
            print(f"{student:10s} {case:10s} loop {row['loop_img_per_s']['median']:8.1f}  bare "
                  f"{row['bare_img_per_s']['median']:8.1f}  ref {row['reference_img_per_s']['median']:8.1f}  "
                  f"loop/bare {_range(row['loop_vs_bare'])} ({row['verdict']})  "
                  f"loop/ref {_range(row['loop_vs_reference'])}", flush=True)
    extra = {}
    if device.type == "cuda":
        extra["host_vs_gpu_resnet50_kd"] = host_vs_gpu(s, storage, teacher, device)
        extra["shared_gpu_small_cnn"] = shared_gpu(s, storage, teacher)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "device_kind": args.device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "settings": s, "rounds": args.rounds,
              "spread_bound": SPREAD_BOUND, "target": TARGET, "cases": cases, "extra": extra,
              "seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    result["median"] = {k: statistics.median(r[k]["median"] for r in cases) for k in ("loop_vs_bare",
                                                                                      "loop_vs_reference")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loop-{args.device}.json"
    path.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {path} ({result['seconds']:.0f}s)")
    return 0


REPEAT_BOUND = 0.05   # two runs of the same cases agree when every case's loop/bare median is within this
CEILING = 1.05        # a loop/bare median above this means the bare step does less work than the loop


def compare(path_a: str, path_b: str) -> int:
    """Two runs' loop/bare medians side by side: each case's difference against REPEAT_BOUND, and any median above
    CEILING. Exit status 0 when both hold for every case, 1 otherwise."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    key = lambda r: (r["student"], r["case"])   # noqa: E731
    rows_b = {key(r): r for r in b["cases"]}
    print(f"A: {path_a} ({a.get('date', '?')}, {a.get('rounds', '?')} rounds, load {a['load_avg_start'][0]:.2f}-"
          f"{a['load_avg_end'][0]:.2f})\nB: {path_b} ({b.get('date', '?')}, {b.get('rounds', '?')} rounds, load "
          f"{b['load_avg_start'][0]:.2f}-{b['load_avg_end'][0]:.2f})")
    print("| student | case | loop/bare A | loop/bare B | B - A | |\n|---|---|---|---|---|---|")
    bad = 0
    for r in a["cases"]:
        other = rows_b.get(key(r))
        if other is None:
            print(f"| {r['student']} | {r['case']} | {_range(r['loop_vs_bare'])} | – | – | not in B |")
            bad += 1
            continue
        diff = other["loop_vs_bare"]["median"] - r["loop_vs_bare"]["median"]
        problems = [f"differs by more than {REPEAT_BOUND}"] if abs(diff) > REPEAT_BOUND + 1e-9 else []
        problems += [f"above {CEILING}"] if max(r["loop_vs_bare"]["median"],
                                                 other["loop_vs_bare"]["median"]) > CEILING else []
        bad += bool(problems)
        print(f"| {r['student']} | {r['case']} | {_range(r['loop_vs_bare'])} | {_range(other['loop_vs_bare'])} | "
              f"{diff:+.3f} | {'; '.join(problems) or 'ok'} |")
    print(f"{len(a['cases']) - bad} of {len(a['cases'])} cases repeat within ±{REPEAT_BOUND} and stay at or below "
          f"{CEILING}")
    return 1 if bad else 0


def _range(r: dict, digits: int = 2) -> str:
    return f"{r['median']:.{digits}f} [{r['min']:.{digits}f}-{r['max']:.{digits}f}]"


def print_table(result: dict) -> None:
    """Medians over the interleaved rounds, [min-max]; loop/bare's verdict against the target, or "unstable" when
    its per-round spread exceeds the bound (the figure cannot meet or miss the target then)."""
    print(f"\n{result['rounds']} interleaved rounds per case; load average {result['load_avg_start'][0]:.2f} at "
          f"start, {result['load_avg_end'][0]:.2f} at end; verdict: loop/bare >= {result['target']} "
          f"unless the per-round spread exceeds {result['spread_bound']:.0%}")
    print("| student | case | loop img/s | bare img/s | reference img/s | loop/bare | verdict | loop/reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["cases"]:
        print(f"| {r['student']} | {r['case']} | {_range(r['loop_img_per_s'], 0)} | {_range(r['bare_img_per_s'], 0)} | "
              f"{_range(r['reference_img_per_s'], 0)} | {_range(r['loop_vs_bare'])} | {r['verdict']} "
              f"(spread {r['loop_vs_bare_spread']:.0%}) | {_range(r['loop_vs_reference'])} |")
    for key, value in result["extra"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
