"""A run folder's files as tlx reads them back: each through one validated model.

``metrics.json``, ``provenance.json`` and the head's metadata hold what a run wrote: accuracies that
are finite numbers in [0, 1], durations, digests, class names. A file that cannot be read, is not
JSON, or holds anything else (NaN, ``true`` where a number belongs, a missing key) is a one-line
:class:`TlxError` naming the file and the key. ``provenance.json`` records the SHA-256 of the files a
run is loaded from, so a file edited after the run is refused too (:func:`check_digests`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Json, StrictStr

from tlx import notices
from tlx.errors import TlxError, describe
from tlx.files import sha256_of
from tlx.recipe import validate

RECIPE_FILE = "recipe.yaml"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
HEAD_FILE = "head.safetensors"
TUNED_BACKBONE_FILE = "backbone.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
PREDICTIONS_FILE = "predictions.csv"

#: what fixes a run file that is not as its run wrote it
RESTORE = "restore the file the run wrote, or train a new run"

Fraction = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Seconds = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]


class _RunFile(BaseModel):
    """The keys tlx reads, validated strictly; the other keys a run wrote are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Timings(_RunFile):
    extract: Seconds
    train: Seconds
    total: Seconds


class Selection(_RunFile):
    """The selection score on the training split (:func:`tlx.train.selection_score`)."""

    mean: Fraction
    std: Fraction
    scores: list[Fraction] = Field(min_length=1)
    selected_by: StrictStr
    seconds: Seconds


Count = Annotated[int, Field(strict=True, ge=0)]


class Listing(_RunFile):
    """A split as a run saw it (:meth:`tlx.data.Splits.listing`): its images and their digest."""

    images: Count
    sha256: Sha256


class DataListing(_RunFile):
    train: Listing
    test: Listing


class Metrics(_RunFile):
    """``metrics.json``: the scores and timings that ``tlx compare`` and ``tlx sweep`` read."""

    test_accuracy: Fraction
    feature_dim: Annotated[int, Field(strict=True, gt=0)]
    n_train: Count
    seconds: Timings
    #: only a sweep's runs have one
    selection: Selection | None = None
    #: the data the run was trained and tested on; None in runs written before tlx recorded it
    data: DataListing | None = None


class BackboneRecord(_RunFile):
    sha256: Sha256
    #: the plugin that provided it; None in runs written before tlx recorded it
    plugin: StrictStr | None = None


class Provenance(_RunFile):
    """``provenance.json``: the backbone weights' digest, and the digest of each file a run loads from."""

    backbone: BackboneRecord
    #: file name to SHA-256, as the run wrote them; None in runs written before tlx recorded them
    files: dict[str, Sha256] | None = None


def _distinct(names: list[str]) -> list[str]:
    if len(set(names)) < len(names) or not all(names):
        raise ValueError("class names must be distinct and not empty")
    return names


class HeadMetadata(_RunFile):
    """The metadata of ``head.safetensors``: its class names (JSON) and head type."""

    classes: Json[Annotated[list[StrictStr], Field(min_length=1), AfterValidator(_distinct)]]
    #: absent in heads written before tlx recorded it
    head: StrictStr | None = None


Model = TypeVar("Model", bound=BaseModel)


def read_json(path: Path) -> Any:
    """The JSON in run file ``path``; an unreadable file or one that is not JSON is a TlxError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        raise TlxError(f"{path}: cannot read it ({describe(exc)}); {RESTORE}") from None


def checked(model: type[Model], data: Any, path: Path) -> Model:
    """``data`` read from run file ``path`` as ``model``; the first wrong key is a TlxError naming it."""
    if not isinstance(data, dict):
        raise TlxError(f"{path}: holds a {type(data).__name__}, not a mapping of keys; {RESTORE}")
    try:
        return validate(model, data, source=str(path))
    except TlxError as exc:
        raise TlxError(f"{exc}; {RESTORE}") from None


def read_metrics(path: Path) -> Metrics:
    """A run's ``metrics.json``, validated."""
    return checked(Metrics, read_json(path), path)


def read_provenance(path: Path) -> Provenance:
    """A run's ``provenance.json``, validated."""
    return checked(Provenance, read_json(path), path)


def digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """The SHA-256 of each run file ``names`` in ``folder``, for ``provenance.json``."""
    return {name: sha256_of(folder / name) for name in names}


def check_digests(folder: Path, provenance: Provenance, names: Iterable[str]) -> None:
    """Refuse a run file of ``names`` whose bytes are not those the run recorded in ``provenance``.

    A run written before tlx recorded digests is not checked; a one-line warning says so.
    """
    recorded = provenance.files
    if recorded is None:
        notices.warn(
            f"{folder / PROVENANCE_FILE}: records no digests of the run's files (an older tlx wrote it), "
            "so an edited run file goes unnoticed; train a new run to have them checked"
        )
        return
    for name in names:
        path = folder / name
        if name not in recorded:
            raise TlxError(f"{folder / PROVENANCE_FILE}: files: records no digest of {name}; {RESTORE}")
        try:
            found = sha256_of(path)
        except OSError as exc:
            raise TlxError(f"{path}: cannot read it ({describe(exc)}); {RESTORE}") from None
        if found != recorded[name]:
            raise TlxError(
                f"{path}: edited since the run wrote it (SHA-256 {found[:16]}…, the run recorded "
                f"{recorded[name][:16]}…); {RESTORE}"
            )
