"""The ``imagefolder`` dataset: ``root/<split>/<class>/<image>``, downloaded from ``url`` if missing."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tlx import hookimpl
from tlx.data import Splits, UserPath, download_and_unpack, scan_imagefolder


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: UserPath
    train: str = "train"
    test: str = "val"
    url: str | None = None


@hookimpl
def register_datasets(register):
    register(
        "imagefolder",
        imagefolder,
        description="root/<split>/<class>/<image>; classes are the sorted folder names",
        options=ImageFolderOptions,
    )


def imagefolder(options: ImageFolderOptions) -> Splits:
    if not options.root.exists() and options.url:
        download_and_unpack(options.url, options.root)
    return scan_imagefolder(options.root, options.train, options.test)
