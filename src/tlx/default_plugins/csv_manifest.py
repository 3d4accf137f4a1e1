"""The ``csv`` dataset: manifests with the columns ``path,label``, image paths relative to the CSV file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from tlx import hookimpl
from tlx.data import Splits, UserPath, scan_manifests


class ManifestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: UserPath
    #: a second manifest for testing; without it, test_fraction of each class is held out of manifest
    test_manifest: UserPath | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_way_to_split(self) -> ManifestOptions:
        stray = sorted({"test_fraction", "split_seed"} & self.model_fields_set)
        if self.test_manifest is not None and stray:
            raise PydanticCustomError(
                "split",
                "{keys} split manifest when there is no test_manifest; remove one or the other",
                {"keys": " and ".join(stray)},
            )
        return self


@hookimpl
def register_datasets(register):
    register(
        "csv",
        manifest,
        description="CSV manifest path,label (paths relative to the CSV); test_manifest or test_fraction",
        options=ManifestOptions,
    )


def manifest(options: ManifestOptions) -> Splits:
    return scan_manifests(options.manifest, options.test_manifest, options.test_fraction, options.split_seed)
