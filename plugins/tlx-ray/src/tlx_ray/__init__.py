"""tlx engine ``ray``: feature extraction and batch prediction spread over a Ray cluster with Ray Data.

Long-lived actors each build the backbone once through tlx's own plugins and take batches of image
paths as they free up; the driver writes the feature cache (``docs/engines.md``). Ray is imported
when an engine runs, so that loading tlx's plugins stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from tlx import hookimpl

if TYPE_CHECKING:
    from tlx import BackboneSpec
    from tlx_ray.engine import RayEngine


class RayOptions(BaseModel):
    """``extract.engine: {kind: ray, ...}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: the cluster (``ray://host:10001`` or ``host:6379``); None: ``$RAY_ADDRESS``, else a local Ray
    address: str | None = None
    #: a fixed pool of this many actors; else the pool grows from min_actors to max_actors
    actors: PositiveInt | None = None
    min_actors: PositiveInt = 1
    #: None: as many as the cluster's CPUs (or GPUs) hold, one CPU left for Ray's own tasks
    max_actors: PositiveInt | None = None
    #: CPUs per actor: its torch threads
    num_cpus: PositiveFloat = 1.0
    #: GPUs per actor (1: the backbone runs on the GPU)
    num_gpus: NonNegativeFloat = 0.0
    #: images per actor call; None: tlx's default for the actor's device (4 on a CPU, 64 on a GPU)
    batch_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _pool(self) -> RayOptions:
        if self.actors is not None and ("min_actors" in self.model_fields_set or self.max_actors):
            raise ValueError("give actors (a fixed pool) or min_actors/max_actors, not both")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below min_actors ({self.min_actors})")
        return self


def ray_engine(options: RayOptions, spec: BackboneSpec) -> RayEngine:
    from tlx_ray.engine import RayEngine

    return RayEngine(options, spec)


@hookimpl
def register_engines(register):
    register(
        "ray",
        ray_engine,
        description="a Ray cluster: actors on every node (address, actors, num_cpus, num_gpus)",
        options=RayOptions,
    )
