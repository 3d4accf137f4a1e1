"""The README's quickstart works as written: every line of its shell blocks, then its Python blocks, run
in a fresh folder that holds ``my_photos`` (real ants and bees in ``train/`` and ``val/``), with this
venv's ``tlx`` first on the PATH. The install commands are in the README's *Install* section, before the
quickstart, and are not run here: the venv running the tests is that install.

``tlx serve`` runs until stopped, so that line is started, must print the address it serves, answer
there (the page and ``/health``), and is then stopped with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO
from .test_api import small_hymenoptera

#: a fenced block: its language and its text
BLOCK = re.compile(r"^```(?P<language>\w+)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)


def quickstart() -> list[tuple[str, str]]:
    """``(language, text)`` of each fenced block in the README's section ``## Quickstart...``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Quickstart")
    end = readme.find("\n## ", start + 1)
    return [(m["language"], m["body"]) for m in BLOCK.finditer(readme[start : end if end > 0 else None])]


def commands(shell: str) -> list[str]:
    """The commands of a shell block, one per line (a line ending in ``\\`` goes on), blank lines left out."""
    return [line for line in shell.replace("\\\n", " ").splitlines() if line.strip()]


def serve(command: str, cwd: Path, env: dict[str, str]) -> None:
    """Start ``command`` (a ``tlx serve``), check that it answers at the address it prints, and stop it."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()  # printed once it listens
        found = re.search(r"http://\S+/", line)
        if not found:  # it stopped without serving
            process.wait(timeout=30)
            pytest.fail(f"{command}: {line!r} {process.stderr.read()}")
        with urllib.request.urlopen(found.group() + "health", timeout=30) as answer:
            assert json.load(answer)["status"] == "ok"
        with urllib.request.urlopen(found.group(), timeout=30) as answer:
            assert "<html" in answer.read().decode().lower()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = quickstart()
    shell = [command for language, text in blocks if language == "sh" for command in commands(text)]
    python = [text for language, text in blocks if language == "python"]
    assert any(c.startswith("tlx run ") for c in shell) and python, "the README's quickstart is missing"
    work = tmp_path / "work"
    photos = small_hymenoptera(work / "my_photos", (12, 4))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "TLX_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for command in shell:
        if command.startswith("tlx serve "):
            serve(command, work, env)
            continue
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        if command.startswith("tlx predict "):  # one answer per photo, each a class of the run
            for image in sorted((photos / "val").rglob("*.jpg")):
                assert re.search(rf"{image.name}\s+(ants|bees|unknown)", result.stdout), result.stdout
    for code in python:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{code}\n{result.stderr[-2000:]}"
        assert "Prediction(label=" in result.stdout, result.stdout
