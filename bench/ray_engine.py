"""The ray engine against the local one: Ray's start-up, and images/s with one and two actors.

    .venv/bin/python bench/ray_engine.py [--data DIR] [--json OUT]

On ants/bees (every train and val image) with ``tf_efficientnet_lite0.pypi``, no feature cache, for each
runtime (``torch``, and ``onnxruntime``: what ``extract.runtime: auto`` runs on a CPU): (1) the local
engine (tlx's default: a decoding process per core, one thread each, batch 4); (2) a local Ray started
with one logical CPU more than the actors need (Ray Data's own tasks), timed as ``ray.init``, once;
(3) the ray engine with one and with two actors of one CPU each, batch 4, timed to the first batch
back (actor start-up: the backbone built and hashed in the actor, and with ONNX Runtime exported and
probed in the node's cache folder by the first actor, recalled by the later ones) and to the last.
The local engine's export is written before its timing starts; its parity probe is timed.
images/s counts the whole extraction (pool start-up included), and the second half of the images
alone (the steady state). Every export goes to a fresh cache folder. Needs
``pip install -e plugins/tlx-ray``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
total_images = 0
DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"


def timed(batches) -> dict[str, float]:
    """Seconds to the first batch and to the last; images/s overall, and over the second half of the
    images (the steady state: every actor started, the pipeline full)."""
    start = time.perf_counter()
    first, half, n, total = None, None, 0, 0
    for _, indices, failures in batches:
        n += len(indices) + len(failures)
        now = time.perf_counter() - start
        first = now if first is None else first
        if half is None and n >= total_images / 2:
            half = (now, n)
    total = time.perf_counter() - start
    assert half is not None
    return {
        "images": n,
        "first_batch_s": round(first or 0.0, 2),
        "total_s": round(total, 2),
        "images_per_s": round(n / total, 1),
        "second_half_images_per_s": round((n - half[1]) / (total - half[0]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import tempfile

    import torch

    # before Ray starts: its actors keep their exports in this node cache folder
    os.environ["TLX_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlx-bench-node-cache-")
    import ray
    from tlx_ray import RayOptions, ray_engine

    from tlx.components import resolve
    from tlx.extraction.device import batch_size
    from tlx.extraction.engines import Job, LocalEngine
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.extraction.pipeline import ImageFiles
    from tlx.extraction.preprocess import eval_transform
    from tlx.extraction.runtimes import Runner
    from tlx.recipe import cpu_cores, make_recipe

    spec = {"dataset": {"root": str(args.data)}, "backbone": {"name": "tf_efficientnet_lite0.pypi"}}
    recipe = make_recipe(spec, source="bench")
    parts = resolve(recipe, "bench")
    root = Path(tempfile.mkdtemp(prefix="tlx-bench-cache-"))
    frozen = FrozenBackbone.of(recipe, parts, root)
    info = frozen.info
    splits = parts.dataset.factory(parts.dataset_options)
    paths = [p for split in (splits.train, splits.test) for p, _ in split.samples]
    cpu = "cpu"
    files = ImageFiles([(p, 0) for p in paths], eval_transform(info.data_config))
    batch = batch_size(None, cpu)
    figures: dict[str, object] = {"images": len(paths), "cores": cpu_cores()}
    global total_images
    total_images = len(paths)

    torch.set_num_threads(1)
    for runtime in ("torch", "onnxruntime"):
        runner = dataclasses.replace(
            frozen, extract=recipe.extract.model_copy(update={"runtime": runtime})
        ).runner(cpu)
        figures[f"local_{runtime}"] = timed(
            LocalEngine().batches(Job(files, runner, batch, recipe.extract.processes, 1))
        )
        print(f"local, {runtime}", figures[f"local_{runtime}"], flush=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    figures["ray_init_s"] = round(time.perf_counter() - t0, 2)
    print("ray.init", figures["ray_init_s"], "s", flush=True)
    for runtime in ("torch", "onnxruntime"):
        extract = recipe.extract.model_copy(update={"runtime": runtime})
        backbone_spec = dataclasses.replace(frozen, extract=extract).spec()
        for actors in (1, 2):
            engine = ray_engine(RayOptions(actors=actors, batch_size=batch), backbone_spec)
            runner = Runner(None, runtime, info)  # the engine sets what its actors ran
            batches = engine.batches(Job(files, runner, batch, recipe.extract.processes))
            name = f"ray_{actors}_actors_{runtime}"
            figures[name] = {**timed(batches), "ran": runner.runtime}
            print(f"ray, {actors} actors, {runtime}", figures[name], flush=True)
    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
