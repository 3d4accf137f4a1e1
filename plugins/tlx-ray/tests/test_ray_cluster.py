"""The ray engine on a three-node ``ray.cluster_utils.Cluster``: a node removed mid-job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import RECORD  # noqa: E402
from PIL import Image  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from tlx_ray import RayOptions, ray_engine  # noqa: E402

from tlx.components import resolve  # noqa: E402
from tlx.data import Split  # noqa: E402
from tlx.extraction.features import extract  # noqa: E402
from tlx.extraction.frozen import FrozenBackbone  # noqa: E402
from tlx.recipe import make_recipe  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs (it runs no actor) and two workers of one CPU: one actor and a spare node."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_job_completes_when_the_node_of_its_actor_is_removed(cluster: Cluster, tmp_path: Path) -> None:
    paths = []
    for i in range(24):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (10 * i, 80, 160)).save(paths[-1])
    spec = {"dataset": {"root": "."}, "backbone": {"name": "slow"}, "extract": {"runtime": "torch"}}
    recipe = make_recipe(spec, source="test")
    frozen = FrozenBackbone.of(recipe, resolve(recipe, "test"), tmp_path / "cache")
    runner = frozen.runner("cpu")
    engine = ray_engine(RayOptions(actors=1, batch_size=2), frozen.spec())
    removed: list[str] = []

    def remove_the_actors_node() -> None:
        while not any(RECORD.iterdir()):
            time.sleep(0.05)
        node_id = next(RECORD.iterdir()).read_text()
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        cluster.remove_node(node)
        removed.append(node_id)

    remover = threading.Thread(target=remove_the_actors_node, daemon=True)
    remover.start()
    (features,) = extract([Split("s", [(p, 0) for p in paths])], lambda: (runner, engine), recipe.extract)
    remover.join(timeout=10)
    assert removed and len(features.y) == 24 and not features.skipped
    assert {f.read_text() for f in RECORD.iterdir()} - set(removed)  # the spare node finished the job
    (local,) = extract([Split("s", [(p, 0) for p in paths])], lambda: (runner, None), recipe.extract)
    assert features.x.allclose(local.x, atol=1e-6, rtol=0)
