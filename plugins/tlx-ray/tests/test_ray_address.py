"""The ray engine's cluster address: one where nothing answers is a one-line error at once, not minutes
of Ray's retries; its options are finite."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from tlx_ray import RayOptions  # noqa: E402

from tlx.cli import cli  # noqa: E402


def closed_port() -> int:
    """A local port where nothing listens: bound, then let go."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(tmp_path: Path, engine: dict[str, object]) -> Path:
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (24, 24), (200 if label == "a" else 0, 0, 0)).save(
                tmp_path / "data" / split / label / "0.png"
            )
    spec = {
        "dataset": {"root": str(tmp_path / "data")},
        "backbone": {"name": "slow"},
        "extract": {"engine": engine},
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("form", ["ray://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_an_address_where_no_cluster_answers_is_one_line_at_once(tmp_path: Path, form: str) -> None:
    address = form.format(port=closed_port())
    out = tmp_path / "out"
    path = recipe(tmp_path, {"kind": "ray", "address": address})
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tlx: error: extract.engine.address: no Ray cluster answers at {address} (")
    assert not ray.is_initialized() and not out.exists()


def test_ray_address_from_the_environment_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    result = CliRunner().invoke(
        cli, ["run", str(recipe(tmp_path, {"kind": "ray"})), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"tlx: error: $RAY_ADDRESS: no Ray cluster answers at {address}")
    )


@pytest.mark.parametrize("option", ["num_cpus", "num_gpus"])
def test_options_are_finite_numbers(option: str) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        RayOptions(**{option: float("inf")})
