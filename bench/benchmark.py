"""tlx against the PyTorch transfer-learning tutorial and the backbone's own speed, in one invocation.

    .venv/bin/python bench/benchmark.py [--data ../shared/data/hymenoptera_data] [--quick] [--json OUT]

Measures, on the CPU (``device=cpu``), for EfficientNet-Lite0 (ImageNet weights, the reference
recipe) and ResNet-18 (random weights, as fast as trained ones, from a file so that tlx remembers
the backbone as it does pretrained ones):

- the *floor* of each runtime (torch eager channels-last, ONNX Runtime as :mod:`tlx.extraction.runtimes` runs
  it): pure forward throughput on a decoded batch of real images, best over two layouts (one process
  with a thread per core; a process per core with one thread each, as extraction runs) and batches
  of 1 to 32 images, in two interleaved rounds;
- ``tlx run`` cold: the first-ever run (empty cache: the export is included), then cold runs with
  the exported model cached (the features deleted, ``onnx/`` and ``backbones/`` kept), each right
  after its own floor measurement (three rounds for Lite0, one for ResNet-18; the round with the
  median extraction / eager-torch floor is reported), and one cold run with
  ``extract.runtime=torch``. A run's *wall* is its process (interpreter start included), its
  *total* the ``seconds.total`` of its metrics.

and for Lite0: (b) the run again with every feature cached (three times), ``tlx predict RUN IMG1 IMG2``
and ``tlx eval RUN`` on the cached run (three times each; medians), (c) the tutorial "ConvNet as fixed
feature extractor" algorithm (the frozen backbone rerun on every batch of every one of 25 epochs, batch
size 4, RandomResizedCrop + flip, SGD 0.001/0.9, StepLR(7, 0.1)), compared with (a) = the cold ONNX
Runtime run, export cached; and the peak memory of cold runs on the dataset and on the dataset
replicated 4x (export cached). Where torch sees CUDA, extraction throughput on the GPU too. Each part
runs in its own process; memory is the peak over that process and its children (extraction workers, the
figure helper), sampled every 0.2 s: RSS summed (counts pages shared by forked workers once per process)
and PSS summed (shares them). A full run takes about 25 minutes on 2 cores, most of it the tutorial and
the floors. ``--quick`` runs the tutorial for one epoch instead of 25, one round, batches of 4 and 8 and
short floors, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"
BACKBONE = "tf_efficientnet_lite0.pypi"
#: the backbones measured, and whether with their pretrained weights (else random ones: as fast)
BACKBONES = {BACKBONE: True, "resnet18": False}
#: the runtimes whose floors are measured (``extract.runtime`` values)
RUNTIMES = ("torch", "onnxruntime")
#: images per call in the floor measurement (``--quick``: the second)
BATCHES, QUICK_BATCHES = (1, 2, 4, 8, 16, 32), (4, 8)
#: seconds of floor measurement per runtime (``--quick``: the second)
FLOOR_S, QUICK_FLOOR_S = 24, 1
TUTORIAL_EPOCHS = 25
#: Lite0's rounds of (floor, cold run); warm runs; predict and eval runs: medians are reported
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


def tlx(*args: str | Path) -> dict:
    """``tlx ARGS`` measured in its own process."""
    return measure([sys.executable, "-m", "tlx", *map(str, args)])


def tlx_run(data: Path, cache: Path, out: Path, *overrides: str) -> dict:
    """``tlx run`` of the Lite0 recipe on ``data`` with ``overrides``, on the CPU (compared with the CPU
    floors and the tutorial on the CPU); its figures and metrics."""
    sets = [arg for item in (f"dataset.root={data}", "device=cpu", *overrides) for arg in ("--set", item)]
    result = tlx("run", RECIPE, *sets, "--cache-dir", cache, "--out", out)
    result["metrics"] = json.loads((out / "metrics.json").read_text())
    return result


def cold_run(data: Path, cache: Path, out: Path, *overrides: str) -> dict:
    """:func:`tlx_run` with no feature cached but the exported and remembered backbones kept."""
    shutil.rmtree(cache / "features", ignore_errors=True)
    return tlx_run(data, cache, out, *overrides)


def median_wall(command: tuple[str | Path, ...], times: int) -> dict:
    """The median wall seconds of ``tlx COMMAND`` over ``times`` runs, and each run's."""
    walls = [tlx(*command)["wall_s"] for _ in range(times)]
    return {"median_s": statistics.median(walls), "runs_s": walls}


def part(name: str, data: Path, *extra: str) -> dict:
    result = measure([sys.executable, __file__, "--part", name, "--data", str(data), *extra])
    result.update(json.loads(result.pop("out").strip().splitlines()[-1]))
    return result


def replicate(data: Path, times: int, dest: Path) -> Path:
    """``data`` with every image ``times`` times: one copy, hard links to it for the others (where the
    file system allows). Never a link to ``data``'s own files: a new link changes an image's ctime, a
    part of its cache key, so every cached feature of ``data`` would be computed again."""
    for src in data.rglob("*"):
        if not src.is_file():
            continue
        rel = src.relative_to(data)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        first = dest / rel.parent / f"{src.stem}-0{src.suffix}"
        shutil.copy2(src, first)
        for k in range(1, times):
            target = dest / rel.parent / f"{src.stem}-{k}{src.suffix}"
            try:
                os.link(first, target)
            except OSError:
                shutil.copy2(first, target)
    return dest


# --- the parts that run in their own process ----------------------------------------------------------


def built(name: str, pretrained: bool = True):
    """The backbone ``name`` from the installed plugins, as ``tlx run`` builds it."""
    from tlx import plugins
    from tlx.extraction.backbone import create_backbone
    from tlx.recipe import BackboneConfig

    return create_backbone(
        plugins.load().backbones.get(name, "backbone"), BackboneConfig(name=name, pretrained=pretrained)
    )


def floor(data: Path, name: str, min_s: float, batches: tuple[int, ...], onnx_dir: Path) -> dict:
    """Each runtime's best forward throughput (images/s) for backbone ``name`` on real images.

    Decoded batches of ``batches`` images run through the backbone as tlx runs it (torch: inference
    mode, channels-last; ONNX Runtime: the exported model in :class:`tlx.extraction.runtimes.OnnxForward`'s
    session) in two layouts: one process with a thread per core,
    and a process per core with one thread each. Two interleaved rounds of at least ``min_s``
    seconds per runtime in all; each measurement leaves out the first batch of each process. A
    runtime's floor is the best of its measurements. ``parity``: the largest difference between the
    runtimes' features on the largest batch, as a fraction of the largest feature.
    """
    import numpy as np
    import torch

    from tlx.extraction.runtimes import OnnxForward, TorchForward
    from tlx.recipe import cpu_cores
    from tlx.tensors import threads_set

    backbone = built(name, pretrained=BACKBONES[name])
    images = decoded(data, backbone.data_config, max(batches))
    cores = cpu_cores()
    sizes = [n for n in batches if n <= len(images)]
    in_torch = TorchForward(backbone.module, "cpu")
    forwards = {  # ONNX Runtime: a model exported for each batch size, as extraction exports it
        n: {"torch": in_torch, "onnxruntime": OnnxForward(exported(backbone, name, onnx_dir, n), n)}
        for n in sizes
    }
    inputs = {
        "torch": torch.from_numpy(images).contiguous(memory_format=torch.channels_last),
        "onnxruntime": images,
    }
    layouts = ["threads", "processes"] if cores > 1 else ["threads"]
    slot = min_s / (2 * len(sizes) * len(layouts))
    rounds = {rt: {layout: {n: [] for n in sizes} for layout in layouts} for rt in RUNTIMES}
    with threads_set(cores):
        features = {rt: forward(inputs[rt][: sizes[-1]], None) for rt, forward in forwards[sizes[-1]].items()}
        for _ in range(2):
            for n in sizes:
                for rt, forward in forwards[n].items():
                    batch = inputs[rt][:n]
                    rounds[rt]["threads"][n].append(_threads_throughput(forward, batch, slot))
                    if "processes" in layouts:
                        rounds[rt]["processes"][n].append(_processes_throughput(forward, batch, slot, cores))
    best = {rt: _best(by_layout) for rt, by_layout in rounds.items()}
    scale = float(np.abs(features["torch"]).max())
    return {
        "cores": cores,
        "runtimes": best,
        "fastest": max(best, key=lambda rt: best[rt]["images_per_s"]),
        "parity": float(np.abs(features["onnxruntime"] - features["torch"]).max()) / scale,
    }


def decoded(data: Path, data_config: dict, count: int):
    """The first ``count`` training images of ``data`` that decode, preprocessed as extraction does."""
    from tlx.data import scan_imagefolder
    from tlx.extraction.pipeline import ImageFiles, first_batch
    from tlx.extraction.preprocess import eval_transform

    samples = scan_imagefolder(data, "train", "val").train.samples
    return first_batch(ImageFiles(samples, eval_transform(data_config)), count)


def exported(backbone, name: str, onnx_dir: Path, batch: int) -> Path:
    """``backbone`` exported to ONNX for batches of ``batch`` as :mod:`tlx.extraction.runtimes` exports it."""
    from tlx.extraction.runtimes import Exported

    model = Exported(onnx_dir, {"benchmark": name, "batch": batch})
    if not model.path.exists():
        model.export(backbone.module, tuple(backbone.data_config["input_size"]), batch)
    return model.path


def _best(by_layout: dict[str, dict[int, list[float]]]) -> dict:
    """The best measurement of one runtime, where it was, and the best of each layout and batch."""
    layout, batch = max(
        ((lay, n) for lay, by in by_layout.items() for n in by), key=lambda k: max(by_layout[k[0]][k[1]])
    )
    return {
        "images_per_s": max(by_layout[layout][batch]),
        "layout": layout,
        "batch": batch,
        "by_layout": {lay: {n: max(r) for n, r in by.items()} for lay, by in by_layout.items()},
    }


def _threads_throughput(forward, batch, seconds: float) -> float:
    """Images/s of ``forward`` on ``batch`` over ``seconds``, in this process (on every core), after one
    warm-up call."""
    forward(batch, None)
    done, started = 0, time.perf_counter()
    while done < 32 or time.perf_counter() - started < seconds:
        forward(batch, None)
        done += len(batch)
    return done / (time.perf_counter() - started)


class _Timed:
    """Dataset item ``k``: one call of ``forward`` on ``batch`` in a worker; (pid, start, end, images)."""

    def __init__(self, forward, batch, count: int) -> None:
        self.forward, self.batch, self.count = forward, batch, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[int, float, float, int]:
        started = time.perf_counter()
        self.forward(self.batch, 1)
        return os.getpid(), started, time.perf_counter(), len(self.batch)


def _processes_throughput(forward, batch, seconds: float, cores: int) -> float:
    """Images/s of ``forward`` on ``batch`` in ``cores`` one-thread worker processes together, as tlx's
    extraction workers run it, over about ``seconds``; each worker's first call is left out."""
    from torch.utils.data import DataLoader

    from tlx.extraction.runtimes import OnnxForward

    per_call = len(batch) / _threads_throughput(forward, batch, 0) * cores  # a one-thread call, roughly
    if isinstance(forward, OnnxForward):
        forward.release()  # each worker builds its own one-thread session, as in extraction
    count = cores * (2 + int(seconds / per_call))
    calls = list(
        DataLoader(_Timed(forward, batch, count), batch_size=None, num_workers=cores, in_order=False)
    )
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
    """Extraction throughput on the first CUDA device of each benchmarked backbone, decoding pipelined
    in one worker per core, after a warm-up pass; and each backbone alone on a repeated batch of 64."""
    import torch

    from tlx.data import scan_imagefolder
    from tlx.extraction.features import extract
    from tlx.extraction.runtimes import Runner
    from tlx.extraction.store import BackboneInfo
    from tlx.recipe import ExtractConfig

    cuda = torch.device("cuda")
    splits = scan_imagefolder(data, "train", "val")
    images = len(splits.train) + len(splits.test)
    result: dict = {"device": torch.cuda.get_device_name(cuda), "images": images}
    for name, pretrained in BACKBONES.items():
        backbone = built(name, pretrained=pretrained)
        runner = Runner.in_torch(backbone.module, BackboneInfo.of(backbone), "cuda")

        def start(runner: Runner = runner) -> tuple[Runner, None]:
            return runner, None

        extract([splits.test], start, ExtractConfig())  # cuDNN picks its kernels
        torch.cuda.synchronize()
        started = time.perf_counter()
        extract([splits.train, splits.test], start, ExtractConfig())
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


# --- the benchmark ---------------------------------------------------------------------------------


def cold_runs(data: Path, work: Path, name: str, rounds: int, quick: bool) -> dict:
    """Backbone ``name`` cold: the first-ever run (export included), ``rounds`` rounds of a floor
    measurement and a cold run with the export cached (the median by extraction / eager-torch floor
    is reported), and a cold run in torch."""
    cache = work / f"cache-{name}"
    backbone = [f"backbone.name={name}"]
    if not BACKBONES[name]:
        backbone.append(f"backbone.weights={random_weights(name, work)}")
    first = tlx_run(data, cache, work / f"{name}-first", *backbone)
    pairs = []
    for k in range(rounds):
        print(f"    {name} round {k + 1}: floors, then a cold run ...", flush=True)
        options = ["--backbone", name, "--onnx-dir", str(work / "onnx"), *(["--quick"] if quick else [])]
        d = part("floor", data, *options)
        pairs.append((cold_run(data, cache, work / f"{name}-cold-{k}", *backbone), d))
    ratio = [extraction(a) / floor_s(a, d, "torch") for a, d in pairs]
    a, d = pairs[sorted(range(rounds), key=ratio.__getitem__)[rounds // 2]]
    in_torch = cold_run(data, cache, work / f"{name}-torch", *backbone, "extract.runtime=torch")
    return {
        "cache": str(cache),
        "run": str(work / f"{name}-cold-0"),
        "floor": {k: d[k] for k in ("cores", "runtimes", "fastest", "parity")},
        "rounds": [
            {**summary(a_), "floor_s": {rt: floor_s(a_, d_, rt) for rt in RUNTIMES}} for a_, d_ in pairs
        ],
        "first": summary(first),
        "cold": {**summary(a), "floor_s": {rt: floor_s(a, d, rt) for rt in RUNTIMES}},
        "torch": summary(in_torch),
        "ratios": {
            "extract_over_fastest_floor": extraction(a) / floor_s(a, d, d["fastest"]),
            "extract_over_torch_floor": extraction(a) / floor_s(a, d, "torch"),
            "torch_extract_over_torch_floor": extraction(in_torch) / floor_s(a, d, "torch"),
        },
    }


def random_weights(name: str, work: Path) -> Path:
    """A file of random weights for backbone ``name``: tlx remembers a backbone whose weights come from
    files, so its cold runs with the export cached neither build the model nor export it again."""
    import torch

    path = work / f"{name}-random.pth"
    torch.save(built(name, pretrained=False).module.state_dict(), path)
    return path


def extraction(run: dict) -> float:
    return run["metrics"]["seconds"]["extract"]


def floor_s(run: dict, floors: dict, runtime: str) -> float:
    """Seconds the floor of ``runtime`` takes for the images ``run`` computed."""
    return run["metrics"]["features"]["computed"] / floors["runtimes"][runtime]["images_per_s"]


def summary(run: dict) -> dict:
    """What the report keeps of one ``tlx run``."""
    m = run["metrics"]
    return {k: run[k] for k in MEASURED} | {
        "total_s": m["seconds"]["total"],
        "extract_s": m["seconds"]["extract"],
        "runtime": m["features"]["runtime"],
        "computed": m["features"]["computed"],
        "cached": m["features"]["cached"],
        "accuracy": m["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an ImageFolder with train/ and val/")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round, short floors, the tutorial for 1 epoch (a smoke test)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--part", choices=["floor", "tutorial", "gpu"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", choices=list(BACKBONES), default=BACKBONE, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=TUTORIAL_EPOCHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if args.part:
        parts = {
            "floor": lambda: floor(
                data,
                args.backbone,
                QUICK_FLOOR_S if args.quick else FLOOR_S,
                QUICK_BATCHES if args.quick else BATCHES,
                args.onnx_dir,
            ),
            "tutorial": lambda: tutorial(data, args.epochs),
            "gpu": lambda: gpu(data),
        }
        print(json.dumps(parts[args.part]()))
        return

    epochs, rounds = (1, 1) if args.quick else (TUTORIAL_EPOCHS, ROUNDS)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tlx-bench-") as tmp:
        work = Path(tmp)
        backbones = {}
        for name in BACKBONES:
            print(f"(a) {name}: the first-ever run, floors and cold runs ...", flush=True)
            backbones[name] = cold_runs(data, work, name, rounds if name == BACKBONE else 1, args.quick)
        lite0 = backbones[BACKBONE]
        cache, run = Path(lite0["cache"]), Path(lite0["run"])
        print(f"(b) tlx warm, {rounds} time(s) ...", flush=True)
        warm = [summary(tlx_run(data, cache, work / f"warm-{k}")) for k in range(rounds)]
        print(f"    tlx predict and tlx eval, {rounds} time(s) each ...", flush=True)
        images = [path for path, _ in scan(data)[:2]]
        predict = median_wall(("predict", run, *images, "--cache-dir", cache), rounds)
        evaluate = median_wall(("eval", run, "--cache-dir", cache), rounds)
        print("    tlx cold on the dataset replicated 4x ...", flush=True)
        x4 = summary(cold_run(replicate(data, 4, work / "x4"), cache, work / "x4-run"))
        g = None
        if has_gpu():
            print("    GPU extraction throughput, on the dataset replicated 4x ...", flush=True)
            g = part("gpu", work / "x4")
        print(f"(c) tutorial algorithm, {epochs} epoch(s) ...", flush=True)
        c = part("tutorial", data, "--epochs", str(epochs))

    a = lite0["cold"]
    b = sorted(warm, key=lambda r: r["wall_s"])[len(warm) // 2]
    figures = {
        "machine": machine(),
        "data": str(data),
        "images": a["computed"],
        "tutorial_epochs": epochs,
        "backbones": backbones,
        "warm": b,
        "warm_runs_s": [r["wall_s"] for r in warm],
        "predict": predict,
        "eval": evaluate,
        "cold_x4": x4,
        "tutorial": {k: c[k] for k in (*MEASURED, "final_accuracy", "best_accuracy")},
        "gpu": {k: v for k, v in g.items() if k not in MEASURED} if g else None,
        "ratios": {
            "tutorial_over_cold": c["wall_s"] / a["wall_s"],
            "peak_rss_x4_over_x1": x4["peak_rss_mib"] / a["peak_rss_mib"],
            "peak_pss_x4_over_x1": x4["peak_pss_mib"] / a["peak_pss_mib"],
        },
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def scan(data: Path) -> list[tuple[Path, int]]:
    """The test images of ``data``."""
    from tlx.data import scan_imagefolder

    return scan_imagefolder(data, "train", "val").test.samples


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


def report(f: dict) -> None:
    r = f["ratios"]
    quick = (
        "" if f["tutorial_epochs"] == TUTORIAL_EPOCHS else f"  (QUICK: {f['tutorial_epochs']} epoch, not 25)"
    )
    print(f"\n{f['data']} ({f['images']} images), on the CPU{quick}")
    print("floors: images/s of the forward pass alone, best over layouts and batch sizes")
    for name, bb in f["backbones"].items():
        fl = bb["floor"]
        best = "   ".join(
            f"{rt} {v['images_per_s']:.1f} ({v['layout']}, batch {v['batch']})"
            for rt, v in fl["runtimes"].items()
        )
        print(
            f"  {name}: {best}; fastest {fl['fastest']}; features differ by {fl['parity']:.1e} of the largest"
        )
        for rt, v in fl["runtimes"].items():
            for layout, by in v["by_layout"].items():
                print(f"    {rt:12} {layout:9} " + ", ".join(f"{n}: {ips:.1f}" for n, ips in by.items()))
    print(
        f"\n{'tlx run':44} {'runtime':>11} {'wall s':>7} {'total s':>7} {'extract s':>9} "
        f"{'RSS MiB':>8} {'PSS MiB':>8}  test accuracy"
    )
    for name, bb in f["backbones"].items():
        rows = [
            ("first-ever (export)", bb["first"]),
            ("(a) cold, export cached", bb["cold"]),
            ("cold, runtime torch", bb["torch"]),
        ]
        for label, run in rows:
            _run_row(f"{name} {label}", run)
    _run_row(f"{BACKBONE} (b) warm", f["warm"])
    _run_row(f"{BACKBONE} cold, data 4x", f["cold_x4"])
    t = f["tutorial"]
    print(
        f"(c) tutorial algorithm: {t['wall_s']:.1f} s, peak RSS {t['peak_rss_mib']:.0f} MiB, PSS "
        f"{t['peak_pss_mib']:.0f} MiB, test accuracy {t['final_accuracy']:.2%} "
        f"(best {t['best_accuracy']:.2%})"
    )
    for name, bb in f["backbones"].items():
        for k, rd in enumerate(bb["rounds"], 1):
            floors = ", ".join(f"{rt} {s:.1f} s" for rt, s in rd["floor_s"].items())
            print(
                f"{name} round {k}: floors {floors}; cold {rd['wall_s']:.1f} s, "
                f"extraction {rd['extract_s']:.1f} s"
            )
        q = bb["ratios"]
        print(
            f"{name}: extraction / fastest floor {q['extract_over_fastest_floor']:.2f}, / torch floor "
            f"{q['extract_over_torch_floor']:.2f} (in torch: {q['torch_extract_over_torch_floor']:.2f}); "
            f"cold wall - extraction {bb['cold']['wall_s'] - bb['cold']['extract_s']:.2f} s, "
            f"total - extraction {bb['cold']['total_s'] - bb['cold']['extract_s']:.2f} s"
        )
    print("warm runs: " + ", ".join(f"{w:.2f} s" for w in f["warm_runs_s"]) + " (the median is (b))")
    for command in ("predict", "eval"):
        runs = ", ".join(f"{s:.2f}" for s in f[command]["runs_s"])
        print(f"tlx {command}: median {f[command]['median_s']:.2f} s ({runs} s)")
    print(
        f"c/a = {r['tutorial_over_cold']:.1f}   peak memory 4x/1x: RSS {r['peak_rss_x4_over_x1']:.3f}, "
        f"PSS {r['peak_pss_x4_over_x1']:.3f}"
    )
    if f["gpu"]:
        for name in BACKBONES:
            g = f["gpu"][name]
            print(
                f"GPU extraction ({f['gpu']['device']}, {f['gpu']['images']} images): {name} "
                f"{g['images_per_s']:.0f} images/s with decoding, "
                f"backbone alone {g['backbone_only_images_per_s']:.0f}"
            )
    else:
        print("GPU throughput not measured (no GPU)")
    print("targets:")
    for text, ok in targets(f):
        print(f"  {'met' if ok else 'NOT met':8} {text}")


def _run_row(label: str, run: dict) -> None:
    print(
        f"{label:44} {run['runtime'] or '-':>11} {run['wall_s']:7.1f} {run['total_s']:7.1f} "
        f"{run['extract_s']:9.1f} {run['peak_rss_mib']:8.0f} {run['peak_pss_mib']:8.0f}  "
        f"{run['accuracy']:.2%}"
    )


def targets(f: dict) -> list[tuple[str, bool]]:
    """Issue 12's targets and the earlier ones that still apply: (what was measured, whether met)."""
    lite0, r = f["backbones"][BACKBONE], f["ratios"]
    a, q = lite0["cold"], lite0["ratios"]
    overhead = a["wall_s"] - a["extract_s"]
    return [
        (
            f"Lite0 cold extraction <= 0.6 x the eager-torch floor: {q['extract_over_torch_floor']:.2f} x "
            f"({a['runtime']})",
            q["extract_over_torch_floor"] <= 0.6,
        ),
        (
            f"Lite0 cold run <= extraction + 2.5 s, export cached: process wall {a['wall_s']:.1f} s = "
            f"extraction {a['extract_s']:.1f} s + {overhead:.1f} s (metrics total: + "
            f"{a['total_s'] - a['extract_s']:.1f} s; torch is imported during the extraction, so the "
            f"wall against the fastest floor is the fairer sum: + "
            f"{a['wall_s'] - a['floor_s'][lite0['floor']['fastest']]:.1f} s)",
            overhead <= 2.5,
        ),
        (
            f"tlx predict RUN IMG1 IMG2 <= 3 s: {f['predict']['median_s']:.2f} s",
            f["predict"]["median_s"] <= 3,
        ),
        (f"tlx eval on a cached run <= 4 s: {f['eval']['median_s']:.2f} s", f["eval"]["median_s"] <= 4),
        (
            f"Lite0 cold extraction <= 1.2 x the fastest floor: {q['extract_over_fastest_floor']:.2f} x "
            f"({lite0['floor']['fastest']})",
            q["extract_over_fastest_floor"] <= 1.2,
        ),
        (
            f">= 20 x faster than (c) at >= its accuracy: c/a = {r['tutorial_over_cold']:.1f}, "
            f"{a['accuracy']:.2%} against {f['tutorial']['final_accuracy']:.2%}",
            r["tutorial_over_cold"] >= 20 and a["accuracy"] >= f["tutorial"]["final_accuracy"],
        ),
        (f"warm run <= 3 s: {f['warm']['wall_s']:.2f} s", f["warm"]["wall_s"] <= 3),
        (
            f"peak memory 4x within 10% of 1x: RSS {r['peak_rss_x4_over_x1']:.3f}, "
            f"PSS {r['peak_pss_x4_over_x1']:.3f}",
            max(r["peak_rss_x4_over_x1"], r["peak_pss_x4_over_x1"]) <= 1.1,
        ),
    ]


if __name__ == "__main__":
    main()
