"""Property: whatever YAML and --set strings come in, the loader gives a recipe or a one-line TlxError."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlx.errors import TlxError
from tlx.recipe import Recipe, load_recipe

SECTIONS = ["seed", "dataset", "backbone", "head", "train", "extract"]
KEYS = ["root", "kind", "name", "pretrained", "weights", "type", "epochs", "lr", "momentum", "batch_size",
        "workers", "on_bad_image", "hidden", "train", "test", "url"]  # fmt: skip

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)
sections = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=5)
recipe_like = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=6), sections | values, max_size=6)
documents = (recipe_like | values).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True)) | st.text(
    max_size=200
)
dotted = st.lists(st.sampled_from(SECTIONS + KEYS) | st.text(max_size=5), min_size=1, max_size=3).map(
    ".".join
)
overrides = st.lists(
    st.tuples(dotted, st.sampled_from(["=", ""]), st.text(max_size=12)).map("".join), max_size=4
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents, sets=overrides)
def test_loader_returns_a_recipe_or_its_own_error(text: str, sets: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            result = load_recipe(path, tuple(sets))
        except TlxError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(result, Recipe)
