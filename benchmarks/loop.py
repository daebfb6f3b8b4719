"""The training loop against its limits: ``python benchmarks/loop.py [--device cpu|cuda] [--quick]``.

For each student (small_cnn, resnet18, resnet50) and method case (erm; kd with the cached teacher; kd with the
teacher online; scmd), side by side, in images per second (3 source domains x batch per step):

- ``bare``: the limit: the student's forward, backward and optimiser step on one fixed device tensor, same precision
  and memory format as the loop (plus the teacher's forward on that tensor when the case runs the teacher online);
- ``loop``: distill's own step: the real worker loop (``distill.trial.loop``, in-process through Ray Train's local
  mode), batches drawn, augmented on the device, the method's loss, optimiser; measured between two evaluations;
- ``reference``: a DomainBed-style loop: PIL decoding and torchvision transforms in DataLoader worker processes,
  fp32, the teacher run online on every batch when the case uses a teacher.

CPU mode (always; small sizes: 32 px, the built-in world, a tiny random CLIP teacher) finishes in minutes on two
cores. GPU mode (when CUDA is present: 224 px, bf16, channels_last, a ViT-B/16-architecture teacher with random
weights) is sized for one lent session (< 8 minutes); it also measures the host-streamed data path against the
GPU-resident one and the summed throughput of several small trials sharing the GPU. Prints a table and writes
``benchmarks/results/loop-<device>.json`` (per case: img_per_s, bare_img_per_s, reference_img_per_s, loop_vs_bare,
loop_vs_reference).
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


def settings(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"size": 224, "store": 256, "batch": 32, "per_class": 24, "arch": "ViT-B-16",
                "steps": {"small_cnn": 200, "resnet18": 120, "resnet50": 60}, "bare_steps": 40, "ref_steps": 20,
                "workers": 8, "amp": "bf16"}
    steps = {"small_cnn": 60, "resnet18": 24, "resnet50": 8}
    if quick:
        steps = {k: max(4, v // 4) for k, v in steps.items()}
    return {"size": 32, "store": 32, "batch": 32, "per_class": 40, "arch": "distill-tiny-rn", "steps": steps,
            "bare_steps": max(4, steps["small_cnn"] // 3), "ref_steps": 6 if quick else 12, "workers": 2,
            "amp": "off"}


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
    """Images per second of the real worker loop, between its two evaluations (the second half: warmed up)."""
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


def _time(fn, steps: int, device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bare_rate(cfg: dict, s: dict, device, online: bool, steps: int) -> float:
    """The student's forward + backward + Adam step on a fixed device tensor (+ the teacher's forward if online)."""
    from distill.models.students import build_student
    from distill.models.teachers import load_teacher

    n = 3 * cfg["train"]["batch_size"]
    student = build_student(cfg["student"]["backbone"], embed_dim=64, num_classes=5).to(device)
    x = torch.randn(n, 3, s["size"], s["size"], device=device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (n,), device=device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    amp = torch.bfloat16 if s["amp"] == "bf16" else None
    teacher = load_teacher(s["arch"], checkpoint=cfg["teacher"]["checkpoint"], device=str(device)) if online else None

    def step():
        if teacher is not None:
            teacher.encode_images(x.clamp(0, 1), batch_size=n, amp_dtype=amp)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(student(x)["logits"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n / _time(step, steps, device)


def reference_rate(cfg: dict, s: dict, device, online: bool, steps: int) -> float:
    """DomainBed's way: PIL decoding + torchvision transforms in DataLoader workers, fp32 (teacher online if any)."""
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

    def step():
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
    return n / _time(step, steps, device)


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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if args.device == "cpu":
        torch.set_num_threads(1)   # one trial per core, as the sweeps run on a CPU
    s = settings(args.device, args.quick)
    device = torch.device(args.device)
    storage = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    t_start = time.time()
    teacher = make_teacher_checkpoint(s["arch"], storage / f"teacher-{s['arch']}.pt")
    cases = []
    for student in args.students:
        for case, _ in CASES:
            steps = s["steps"][student]
            cfg = trial_cfg(s, storage, teacher, student, case, steps)
            online = case == "kd-online"
            t0 = time.time()
            loop = loop_rate(cfg)
            bare = bare_rate(cfg, s, device, online, max(3, steps // 3))
            ref = reference_rate(cfg, s, device, case != "erm", s["ref_steps"])   # a fork runs its teacher online
            row = {"student": student, "case": case, "img_per_s": round(loop, 1), "bare_img_per_s": round(bare, 1),
                   "reference_img_per_s": round(ref, 1) if ref else None,
                   "loop_vs_bare": round(loop / bare, 3),
                   "loop_vs_reference": round(loop / ref, 2) if ref else None, "seconds": round(time.time() - t0, 1)}
            cases.append(row)
            print(f"{student:10s} {case:10s} loop {row['img_per_s']:8.1f}  bare {row['bare_img_per_s']:8.1f}  "
                  f"ref {row['reference_img_per_s'] or float('nan'):8.1f}  loop/bare {row['loop_vs_bare']:.3f}  "
                  f"loop/ref {row['loop_vs_reference'] or float('nan'):.2f}", flush=True)
    extra = {}
    if device.type == "cuda":
        extra["host_vs_gpu_resnet50_kd"] = host_vs_gpu(s, storage, teacher, device)
        extra["shared_gpu_small_cnn"] = shared_gpu(s, storage, teacher)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "device_kind": args.device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_avg_start": os.getloadavg(), "settings": s, "cases": cases, "extra": extra,
              "seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    medians = {k: statistics.median(r[k] for r in cases if r[k] is not None)
               for k in ("loop_vs_bare", "loop_vs_reference")}
    result["median"] = medians
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loop-{args.device}.json"
    path.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {path} ({result['seconds']:.0f}s)")
    return 0


def print_table(result: dict) -> None:
    print("\n| student | case | loop img/s | bare img/s | reference img/s | loop/bare | loop/reference |")
    print("|---|---|---|---|---|---|---|")
    for r in result["cases"]:
        ref = f"{r['reference_img_per_s']:.0f}" if r["reference_img_per_s"] else "–"
        lr = f"{r['loop_vs_reference']:.2f}" if r["loop_vs_reference"] else "–"
        print(f"| {r['student']} | {r['case']} | {r['img_per_s']:.0f} | {r['bare_img_per_s']:.0f} | {ref} | "
              f"{r['loop_vs_bare']:.2f} | {lr} |")
    for key, value in result["extra"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
