"""The built-in datasets: ``imagefolder`` (``root/<split>/<class>/<image>``, downloaded from ``url`` if
missing), ``folder`` (``root/<class>/<image>``, split into train and test, stratified and seeded) and
``csv`` (manifests with the columns ``path,label``, image paths relative to ``root`` or else the CSV
file's folder).

Each takes an optional ``group``: images of one object (crops, frames, photos of one animal) that every
split and fold keeps together. For the folder kinds it is a regular expression whose first capture
group, searched in a file name, is the image's group; for ``csv`` the name of the column holding it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from tlx import hookimpl
from tlx.data import Splits, download_and_unpack, scan_class_folder, scan_imagefolder, scan_manifests
from tlx.recipe import UserPath


def _group_pattern(text: str | None) -> str | None:
    """``text`` if it compiles as a regular expression with a capture group (the group id)."""
    if text is None:
        return None
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise PydanticCustomError(
            "group", "not a regular expression ({error}); fix it or quote it in the YAML", {"error": str(exc)}
        ) from None
    if not pattern.groups:
        raise PydanticCustomError(
            "group",
            "the regular expression has no capture group; wrap the part of the file name that names "
            "the group in parentheses, e.g. ^(.+)_\\d+\\.jpg$",
        )
    return text


#: a regular expression whose first capture group, searched in an image's file name, is its group
GroupPattern = Annotated[str | None, AfterValidator(_group_pattern)]


def _compiled(group: str | None) -> re.Pattern[str] | None:
    return re.compile(group) if group is not None else None


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: UserPath
    train: str = "train"
    test: str = "val"
    url: str | None = None
    group: GroupPattern = None


class FolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: UserPath
    #: share of each class held out for testing
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    group: GroupPattern = None


class ManifestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: UserPath
    #: a second manifest for testing; without it, test_fraction of each class is held out of manifest
    test_manifest: UserPath | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    #: the folder image paths are relative to and must lie in (default: each manifest's folder)
    root: UserPath | None = None
    #: the column holding each image's group
    group: str | None = None

    @model_validator(mode="after")
    def _one_way_to_split(self) -> ManifestOptions:
        # a value equal to its default changes nothing: a run folder's recipe.yaml writes every default
        stray = sorted(
            key
            for key in {"test_fraction", "split_seed"} & self.model_fields_set
            if getattr(self, key) != type(self).model_fields[key].default
        )
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
        "imagefolder",
        imagefolder,
        description="root/<split>/<class>/<image>; classes are the sorted folder names",
        options=ImageFolderOptions,
    )
    register(
        "folder",
        folder,
        description="root/<class>/<image>, split stratified by class (test_fraction, split_seed)",
        options=FolderOptions,
    )
    register(
        "csv",
        manifest,
        description="CSV manifest path,label (paths relative to the CSV); test_manifest or test_fraction",
        options=ManifestOptions,
    )


def imagefolder(options: ImageFolderOptions) -> Splits:
    if not options.root.exists() and options.url:
        download_and_unpack(options.url, options.root)
    return scan_imagefolder(options.root, options.train, options.test, _compiled(options.group))


def folder(options: FolderOptions) -> Splits:
    return scan_class_folder(
        options.root, options.test_fraction, options.split_seed, _compiled(options.group)
    )


def manifest(options: ManifestOptions) -> Splits:
    return scan_manifests(
        options.manifest,
        options.test_manifest,
        options.test_fraction,
        options.split_seed,
        options.group,
        options.root,
    )
