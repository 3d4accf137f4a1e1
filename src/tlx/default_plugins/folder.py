"""The ``folder`` dataset: ``root/<class>/<image>``, split into train and test, stratified and seeded."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tlx import hookimpl
from tlx.data import Splits, UserPath, scan_class_folder


class FolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: UserPath
    #: share of each class held out for testing
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


@hookimpl
def register_datasets(register):
    register(
        "folder",
        folder,
        description="root/<class>/<image>, split stratified by class (test_fraction, split_seed)",
        options=FolderOptions,
    )


def folder(options: FolderOptions) -> Splits:
    return scan_class_folder(options.root, options.test_fraction, options.split_seed)
