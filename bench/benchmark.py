"""tlx against the PyTorch transfer-learning tutorial, on the same backbone and data, in one invocation.

    .venv/bin/python bench/benchmark.py [--data ../shared/data/hymenoptera_data] [--quick] [--json OUT]

Measures (a) ``tlx run`` with an empty cache, (b) the same run again (features cached), (c) the
tutorial "ConvNet as fixed feature extractor" algorithm (the frozen backbone rerun on every batch of
every one of 25 epochs, batch size 4, RandomResizedCrop + flip, SGD 0.001/0.9, StepLR(7, 0.1)),
(d) the floor: the backbone's forward throughput, measured here, times the image count; and the peak
memory of cold runs on the dataset and on the dataset replicated 4x. The host's speed drifts, so (a)
runs three times, each right after its own floor measurement, and (b) three times; medians are
reported. Each part runs in its own process; memory is the peak over that process and its children
(DataLoader workers, the figure helper), sampled every 0.2 s: RSS summed (counts pages shared by
forked workers once per process) and PSS summed (shares them).
``--quick`` runs the tutorial for one epoch instead of 25 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"
RECIPE = REPO / "recipes" / "hymenoptera-lite0.yaml"
BACKBONE = "efficientnet_lite0"
TUTORIAL_EPOCHS = 25
#: cold runs (each after its own floor measurement) and warm runs; the median is reported
ROUNDS = 3
#: memory sampling interval
SAMPLE_S = 0.2
#: what :func:`measure` adds to a part's own figures
MEASURED = ("wall_s", "peak_rss_mib", "peak_pss_mib")


# --- measuring a child process ------------------------------------------------------------------------


def measure(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``command``; wall seconds, peak RSS and PSS summed over it and its children, its stdout."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            rss = pss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    usage = _rollup(p.pid)
                    rss, pss = rss + usage["Rss"], pss + usage["Pss"]
            except (psutil.Error, OSError):  # a worker exited between listing and reading
                pass
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_mib": peak["rss"] / 2**20,
        "peak_pss_mib": peak["pss"] / 2**20,
        "out": out,
    }


def _rollup(pid: int) -> dict[str, int]:
    """RSS and PSS in bytes from ``/proc/PID/smaps_rollup``: one summary, far cheaper to read than
    ``smaps`` (psutil's ``memory_full_info``), which perturbed the runs being measured."""
    usage = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        if key in ("Rss", "Pss"):
            usage[key] = int(value.split()[0]) * 1024
    return usage


def tlx_run(data: Path, cache: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "tlx", "run", str(RECIPE), "--set", f"dataset.root={data}"]
    command += ["--set", "device=cpu"]  # compared with the CPU floor and the tutorial on the CPU
    result = measure([*command, "--cache-dir", str(cache), "--out", str(out)])
    result["metrics"] = json.loads((out / "metrics.json").read_text())
    return result


def part(name: str, data: Path, *extra: str) -> dict:
    result = measure([sys.executable, __file__, "--part", name, "--data", str(data), *extra])
    result.update(json.loads(result.pop("out").strip().splitlines()[-1]))
    return result


def replicate(data: Path, times: int, dest: Path) -> Path:
    """``data`` with every image ``times`` times (hard links where possible, else copies)."""
    for src in data.rglob("*"):
        if not src.is_file():
            continue
        rel = src.relative_to(data)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        for k in range(times):
            target = dest / rel.parent / f"{src.stem}-{k}{src.suffix}"
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
    return dest


# --- the parts that run in their own process ----------------------------------------------------------


def built(name: str, pretrained: bool = True):
    """The backbone ``name`` from the installed plugins, as ``tlx run`` builds it."""
    from tlx import plugins
    from tlx.backbone import create_backbone
    from tlx.recipe import BackboneConfig

    return create_backbone(
        plugins.load().backbones.get(name, "backbone"), BackboneConfig(name=name, pretrained=pretrained)
    )


def floor(data: Path, min_s: float) -> dict:
    """The backbone's best forward throughput (images/s) on real images, whatever the layout.

    Decoded batches of 4, 8, 16 and 32 images run through the backbone as tlx runs it (inference
    mode, channels-last) in two layouts: one process with a thread per core, and a process per core
    with one thread each. Two interleaved rounds of at least ``min_s`` seconds in all; each
    measurement leaves out the first batch of each process. The floor is the best of them all.
    """
    import torch

    from tlx.data import scan_imagefolder
    from tlx.features import ImageFiles, threads_set
    from tlx.preprocess import eval_transform
    from tlx.recipe import cpu_cores

    backbone = built(BACKBONE)
    samples = scan_imagefolder(data, "train", "val").train.samples
    files = ImageFiles(samples[:32], eval_transform(backbone.data_config))
    images = torch.stack(
        [item[0] for item in map(files.__getitem__, range(len(files))) if item[0] is not None]
    )
    module = backbone.module.to(memory_format=torch.channels_last)
    cores = cpu_cores()
    sizes = [n for n in (4, 8, 16, 32) if n <= len(images)]
    layouts = ["threads", "processes"] if cores > 1 else ["threads"]
    slot = min_s / (2 * len(sizes) * len(layouts))
    rounds: dict[str, dict[int, list[float]]] = {layout: {n: [] for n in sizes} for layout in layouts}
    for _ in range(2):
        for n in sizes:
            batch = images[:n].contiguous(memory_format=torch.channels_last)
            with threads_set(cores):
                rounds["threads"][n].append(_threads_throughput(module, batch, slot))
            if "processes" in layouts:
                rounds["processes"][n].append(_processes_throughput(module, batch, slot, cores))
    best = max(((layout, n) for layout in layouts for n in sizes), key=lambda k: max(rounds[k[0]][k[1]]))
    return {
        "images_per_s": max(rounds[best[0]][best[1]]),
        "cores": cores,
        "layout": best[0],
        "batch": best[1],
        "by_layout": {layout: {n: max(r) for n, r in by.items()} for layout, by in rounds.items()},
    }


def _threads_throughput(module, batch, seconds: float) -> float:
    """Images/s of ``module`` on ``batch`` over ``seconds``, in this process, after one warm-up call."""
    import torch

    with torch.inference_mode():
        module(batch)
        done, started = 0, time.perf_counter()
        while done < 32 or time.perf_counter() - started < seconds:
            module(batch)
            done += len(batch)
    return done / (time.perf_counter() - started)


class _Timed:
    """Dataset item ``k``: one call of ``module`` on ``batch`` in a worker; (pid, start, end, images)."""

    def __init__(self, module, batch, count: int) -> None:
        self.module, self.batch, self.count = module, batch, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[int, float, float, int]:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            self.module(self.batch)
        return os.getpid(), started, time.perf_counter(), len(self.batch)


def _processes_throughput(module, batch, seconds: float, cores: int) -> float:
    """Images/s of ``module`` on ``batch`` in ``cores`` one-thread worker processes together, as tlx's
    extraction workers run it, over about ``seconds``; each worker's first call is left out."""
    from torch.utils.data import DataLoader

    per_call = len(batch) / _threads_throughput(module, batch, 0) * cores  # a one-thread call, roughly
    count = cores * (2 + int(seconds / per_call))
    calls = list(DataLoader(_Timed(module, batch, count), batch_size=None, num_workers=cores, in_order=False))
    firsts = {pid: min(c[1] for c in calls if c[0] == pid) for pid, *_ in calls}
    rest = [c for c in calls if c[1] > firsts[c[0]]]
    return sum(c[3] for c in rest) / (max(c[2] for c in rest) - min(c[1] for c in rest))


def tutorial(data: Path, epochs: int) -> dict:
    """The tutorial's ``train_model`` with ``model_conv``, on the same backbone as tlx.

    As in the tutorial: torchvision ImageFolder, 4 DataLoader workers, shuffled batches of 4, the
    model in train mode for the train phase (the frozen backbone's BatchNorm and dropout too), the
    best validation accuracy kept. The backbone's own mean, std and input size replace ImageNet's.
    """
    import torch
    from torch import nn, optim
    from torch.optim import lr_scheduler
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    backbone = built(BACKBONE)
    size, mean, std = (
        backbone.data_config["input_size"][1],
        backbone.data_config["mean"],
        backbone.data_config["std"],
    )
    data_transforms = {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
    }
    image_datasets = {
        x: datasets.ImageFolder(os.path.join(data, x), data_transforms[x]) for x in ["train", "val"]
    }
    dataloaders = {
        x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=4)
        for x in ["train", "val"]
    }
    sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    model_conv = nn.Sequential()
    model_conv.add_module("features", backbone.module)
    for param in model_conv.features.parameters():
        param.requires_grad = False
    model_conv.add_module("fc", nn.Linear(backbone.feature_dim, len(image_datasets["train"].classes)))
    criterion = nn.CrossEntropyLoss()
    optimizer_conv = optim.SGD(model_conv.fc.parameters(), lr=0.001, momentum=0.9)
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_conv, step_size=7, gamma=0.1)

    started = time.perf_counter()
    best_acc, history = 0.0, []
    for _ in range(epochs):
        for phase in ["train", "val"]:
            model_conv.train() if phase == "train" else model_conv.eval()
            running_corrects = 0
            for inputs, labels in dataloaders[phase]:
                optimizer_conv.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model_conv(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer_conv.step()
                running_corrects += torch.sum(preds == labels.data).item()
            if phase == "train":
                exp_lr_scheduler.step()
            else:
                epoch_acc = running_corrects / sizes["val"]
                history.append(epoch_acc)
                best_acc = max(best_acc, epoch_acc)
    return {
        "final_accuracy": history[-1],
        "best_accuracy": best_acc,
        "epochs": epochs,
        "n_train": sizes["train"],
        "n_test": sizes["val"],
        "loop_s": time.perf_counter() - started,
    }


def gpu(data: Path) -> dict:
    """Extraction throughput on the first CUDA device: ResNet-18 (random weights: the speed is the
    same) and the benchmark's backbone, decoding pipelined in one worker per core, after a warm-up
    pass; and each backbone alone on a repeated batch of 64."""
    import torch

    from tlx.cache import BackboneInfo
    from tlx.data import scan_imagefolder
    from tlx.features import extract
    from tlx.recipe import ExtractConfig
    from tlx.runtimes import Runner

    cuda = torch.device("cuda")
    splits = scan_imagefolder(data, "train", "val")
    images = len(splits.train) + len(splits.test)
    result: dict = {"device": torch.cuda.get_device_name(cuda), "images": images}
    for name, pretrained in (("resnet18", False), (BACKBONE, True)):
        backbone = built(name, pretrained=pretrained)
        runner = Runner.in_torch(backbone.module, BackboneInfo.of(backbone), cuda)
        extract([splits.test], runner, ExtractConfig())  # cuDNN picks its kernels
        torch.cuda.synchronize()
        started = time.perf_counter()
        extract([splits.train, splits.test], runner, ExtractConfig())
        seconds = time.perf_counter() - started
        batch = torch.randn(64, 3, *backbone.data_config["input_size"][1:], device=cuda)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                backbone.module(batch)
            torch.cuda.synchronize()
            alone = time.perf_counter()
            for _ in range(20):
                backbone.module(batch)
            torch.cuda.synchronize()
        result[name] = {
            "images_per_s": images / seconds,
            "backbone_only_images_per_s": 20 * 64 / (time.perf_counter() - alone),
        }
    return result


# --- the report ---------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{len(os.sched_getaffinity(0))} cores ({cpu}), {memory:.0f} GiB, load average "
        f"{os.getloadavg()[0]:.1f} at the start; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
        + (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU")
    )


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an ImageFolder with train/ and val/")
    parser.add_argument(
        "--quick", action="store_true", help="the tutorial for 1 epoch, not 25 (a smoke test)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--part", choices=["floor", "tutorial", "gpu"], help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=TUTORIAL_EPOCHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if args.part:
        parts = {
            "floor": lambda: floor(data, 1 if args.quick else 16),
            "tutorial": lambda: tutorial(data, args.epochs),
            "gpu": lambda: gpu(data),
        }
        print(json.dumps(parts[args.part]()))
        return

    epochs = 1 if args.quick else TUTORIAL_EPOCHS
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tlx-bench-") as tmp:
        work = Path(tmp)
        # the host's speed drifts: each cold run is paired with a floor measured just before it,
        # and the round with the median ratio is reported (all rounds are kept in the JSON)
        rounds = []
        for k in range(1 if args.quick else ROUNDS):
            print(f"round {k + 1}: (d) floor: backbone forward throughput ...", flush=True)
            d = part("floor", data, *(["--quick"] if args.quick else []))
            print(f"round {k + 1}: (a) tlx cold ...", flush=True)
            a = tlx_run(data, work / f"cache-{k}", work / f"a{k}")
            rounds.append((a["metrics"]["seconds"]["extract"] * d["images_per_s"], a, d))
        rounds.sort(key=lambda r: r[0])
        _, a, d = rounds[len(rounds) // 2]
        warm = []
        for k in range(1 if args.quick else ROUNDS):
            print(f"(b) tlx warm, {k + 1} of {ROUNDS} ...", flush=True)
            warm.append(tlx_run(data, work / "cache-0", work / f"b{k}"))
        b = sorted(warm, key=lambda r: r["wall_s"])[len(warm) // 2]
        print("    tlx cold on the dataset replicated 4x ...", flush=True)
        x4 = tlx_run(replicate(data, 4, work / "x4"), work / "cache-x4", work / "a4")
        g = None
        if has_gpu():
            print("    GPU extraction throughput, on the dataset replicated 4x ...", flush=True)
            g = part("gpu", work / "x4")
        print(f"(c) tutorial algorithm, {epochs} epoch(s) ...", flush=True)
        c = part("tutorial", data, "--epochs", str(epochs))

    n_images = a["metrics"]["features"]["computed"]
    floor_s = n_images / d["images_per_s"]
    figures = {
        "machine": machine(),
        "data": str(data),
        "backbone": BACKBONE,
        "images": n_images,
        "tutorial_epochs": epochs,
        "rounds": [
            {
                "floor_images_per_s": d_["images_per_s"],
                "cold_s": a_["wall_s"],
                "extract_s": a_["metrics"]["seconds"]["extract"],
            }
            for _, a_, d_ in rounds
        ],
        "warm_runs_s": [r["wall_s"] for r in warm],
        "floor": {k: d[k] for k in ("images_per_s", "cores", "layout", "batch", "by_layout")}
        | {"seconds": floor_s},
        "cold": {k: a[k] for k in ("wall_s", "peak_rss_mib", "peak_pss_mib")}
        | {"accuracy": a["metrics"]["test_accuracy"], "extract_s": a["metrics"]["seconds"]["extract"]},
        "warm": {k: b[k] for k in ("wall_s", "peak_rss_mib", "peak_pss_mib")}
        | {"accuracy": b["metrics"]["test_accuracy"], "cached": b["metrics"]["features"]["cached"]},
        "cold_x4": {k: x4[k] for k in ("wall_s", "peak_rss_mib", "peak_pss_mib")}
        | {"images": x4["metrics"]["features"]["computed"]},
        "tutorial": {
            k: c[k] for k in ("wall_s", "peak_rss_mib", "peak_pss_mib", "final_accuracy", "best_accuracy")
        },
        "gpu": {k: v for k, v in g.items() if k not in ("wall_s", "peak_rss_mib", "peak_pss_mib")}
        if g
        else None,
        "ratios": {
            "cold_over_floor": a["wall_s"] / floor_s,
            "extract_over_floor": a["metrics"]["seconds"]["extract"] / floor_s,
            "cold_minus_warm_over_floor": (a["wall_s"] - b["wall_s"]) / floor_s,
            "tutorial_over_cold": c["wall_s"] / a["wall_s"],
            "peak_rss_x4_over_x1": x4["peak_rss_mib"] / a["peak_rss_mib"],
            "peak_pss_x4_over_x1": x4["peak_pss_mib"] / a["peak_pss_mib"],
        },
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report(f: dict) -> None:
    r = f["ratios"]
    quick = (
        "" if f["tutorial_epochs"] == TUTORIAL_EPOCHS else f"  (QUICK: {f['tutorial_epochs']} epoch, not 25)"
    )
    rows = [
        ("(a) tlx cold", f["cold"]["wall_s"], f"{f['cold']['accuracy']:.2%}", f["cold"]),
        ("(b) tlx warm", f["warm"]["wall_s"], f"{f['warm']['accuracy']:.2%}", f["warm"]),
        (
            "(c) tutorial algorithm",
            f["tutorial"]["wall_s"],
            f"{f['tutorial']['final_accuracy']:.2%} (best {f['tutorial']['best_accuracy']:.2%})",
            f["tutorial"],
        ),
        ("(d) floor", f["floor"]["seconds"], "", None),
        ("    tlx cold, data 4x", f["cold_x4"]["wall_s"], "", f["cold_x4"]),
    ]
    print(f"\n{f['backbone']} on {f['data']} ({f['images']} images){quick}")
    print(f"{'':24} {'wall s':>8}  {'peak RSS MiB':>12}  {'peak PSS MiB':>12}  final test accuracy")
    for name, wall, acc, mem in rows:
        memory = f"{mem['peak_rss_mib']:12.0f}  {mem['peak_pss_mib']:12.0f}" if mem else f"{'':12}  {'':12}"
        print(f"{name:24} {wall:8.1f}  {memory}  {acc}")
    layouts = "; ".join(
        f"{layout}: " + ", ".join(f"{n}: {v:.1f}" for n, v in by.items())
        for layout, by in f["floor"]["by_layout"].items()
    )
    print(
        f"floor: {f['floor']['images_per_s']:.1f} images/s, {f['floor']['layout']} at batch "
        f"{f['floor']['batch']} ({f['floor']['cores']} cores; images/s by layout and batch size: {layouts})"
    )
    if f["gpu"]:
        for name in ("resnet18", f["backbone"]):
            g = f["gpu"][name]
            print(
                f"GPU extraction ({f['gpu']['device']}, {f['gpu']['images']} images): {name} "
                f"{g['images_per_s']:.0f} images/s with decoding, "
                f"backbone alone {g['backbone_only_images_per_s']:.0f}"
            )
    else:
        print("GPU throughput not measured (no GPU)")
    startup = f["cold"]["wall_s"] - f["cold"]["extract_s"]
    for k, r_ in enumerate(f["rounds"], 1):
        floor_s = f["images"] / r_["floor_images_per_s"]
        print(
            f"round {k}: floor {floor_s:.1f} s, cold {r_['cold_s']:.1f} s, "
            f"extraction {r_['extract_s']:.1f} s = {r_['extract_s'] / floor_s:.2f} x floor"
        )
    print("warm runs: " + ", ".join(f"{w:.2f} s" for w in f["warm_runs_s"]) + " (the median is (b))")
    print(
        f"a/d = {r['cold_over_floor']:.2f}   extraction/d = {r['extract_over_floor']:.2f}   "
        f"(a-b)/d = {r['cold_minus_warm_over_floor']:.2f}   c/a = {r['tutorial_over_cold']:.1f}   "
        f"b = {f['warm']['wall_s']:.2f} s   "
        f"peak memory 4x/1x: RSS {r['peak_rss_x4_over_x1']:.3f}, PSS {r['peak_pss_x4_over_x1']:.3f}"
    )
    verdict = {True: "met", False: "NOT met"}
    checks = [
        (
            f"cold <= 1.2 x floor + start-up: {f['cold']['wall_s']:.1f} s against "
            f"1.2 x {f['floor']['seconds']:.1f} + {startup:.1f} s "
            "(start-up: the cold run outside extraction)",
            r["extract_over_floor"] <= 1.2,
        ),
        (
            f">= 20 x faster than (c) at >= its accuracy: c/a = {r['tutorial_over_cold']:.1f}",
            r["tutorial_over_cold"] >= 20 and f["cold"]["accuracy"] >= f["tutorial"]["final_accuracy"],
        ),
        (f"warm run <= 3 s: {f['warm']['wall_s']:.2f} s", f["warm"]["wall_s"] <= 3),
        (
            f"peak memory 4x within 10% of 1x: RSS {r['peak_rss_x4_over_x1']:.3f}, "
            f"PSS {r['peak_pss_x4_over_x1']:.3f}",
            max(r["peak_rss_x4_over_x1"], r["peak_pss_x4_over_x1"]) <= 1.1,
        ),
    ]
    print("targets:")
    for text, ok in checks:
        print(f"  {verdict[ok]:8} {text}")


if __name__ == "__main__":
    main()
