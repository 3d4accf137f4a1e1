"""The feature cache: hits run no backbone, changed images are recomputed alone, crashes lose nothing,
damaged or vanished entries are recomputed, and `tlx cache clear` removes only what tlx wrote."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from tlx import plugins
from tlx.errors import TlxError
from tlx.extraction import store as cache
from tlx.recipe import load_recipe
from tlx.registry import Backbone
from tlx.run import run

from .conftest import make_imagefolder, write_recipe

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # fmt: skip


class Colours(nn.Module):
    """Mean colour per channel times a weight; counts the images it sees and can crash on purpose."""

    def __init__(self, scale: float, crash_after: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.seen = 0
        self.crash_after = crash_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crash_after is not None and self.seen >= self.crash_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-extraction
        self.seen += x.shape[0]
        return x.mean(dim=(2, 3)) * self.scale


class Factory:
    """A backbone plugin whose weights are one number in a file; counts how often it builds."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights
        self.built = 0
        self.crash_after: int | None = None
        self.module: Colours | None = None

    def __call__(self, name: str, *, pretrained: bool, weights: Path | None) -> Backbone:
        self.built += 1
        self.module = Colours(float(self.weights.read_text()), self.crash_after)
        return Backbone(self.module, 3, CONFIG, f"file {self.weights}")

    @property
    def seen(self) -> int:
        return self.module.seen if self.module else 0


@pytest.fixture
def colours(tmp_path: Path) -> Factory:
    weights = tmp_path / "colours.txt"
    weights.write_text("1.0")
    factory = Factory(weights)
    register = plugins.load().backbones.registrar("test-plugin")
    register("colours", factory, weight_files=lambda name, pretrained, weights: [factory.weights])
    return factory


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data", classes=2)  # 12 train + 6 test images


def tlx_run(tmp_path: Path, data: Path, out: str, *overrides: str, cache_dir: Path | None = None) -> dict:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
        dataset: {{root: {data}}}
        backbone: {{name: colours}}
        extract: {{workers: 0, batch_size: 2, runtime: torch}}  # torch runs the module that counts
        train: {{epochs: 3}}
        """,
    )
    return run(load_recipe(recipe, overrides), "r.yaml", tmp_path / out, cache_dir)


def test_second_run_builds_no_backbone_and_gives_the_same_numbers(
    tmp_path: Path, data: Path, colours: Factory
) -> None:
    first = tlx_run(tmp_path, data, "a")
    assert (colours.built, colours.seen, first["features"]["computed"]) == (1, 18, 18)
    second = tlx_run(tmp_path, data, "b")
    assert colours.built == 1, "a warm run must not even build the backbone"
    assert second["features"] == {**first["features"], "cached": 18, "computed": 0, "runtime": None}
    assert second["history"] == first["history"]
    assert second["backbone"] == first["backbone"]


def test_another_head_seed_or_epochs_reuse_the_features(tmp_path: Path, data: Path, colours: Factory) -> None:
    tlx_run(tmp_path, data, "a")
    for n, overrides in enumerate([("seed=3",), ("train.epochs=5",), ("head.type=mlp", "head.hidden=[4]")]):
        metrics = tlx_run(tmp_path, data, f"b{n}", *overrides)
        assert metrics["features"]["cached"] == 18
    assert colours.built == 1


def test_changed_or_added_image_alone_is_recomputed(tmp_path: Path, data: Path, colours: Factory) -> None:
    tlx_run(tmp_path, data, "a")
    changed = data / "train" / "class0" / "0.jpg"
    Image.new("RGB", (48, 48), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    Image.new("RGB", (40, 40), (9, 9, 9)).save(data / "val" / "class1" / "new.jpg")
    metrics = tlx_run(tmp_path, data, "b")
    assert colours.built == 2 and colours.seen == 2
    assert metrics["features"] == {**metrics["features"], "cached": 17, "computed": 2}
    assert metrics["n_test"] == 7


def test_changed_weights_file_is_a_new_backbone(tmp_path: Path, data: Path, colours: Factory) -> None:
    a = tlx_run(tmp_path, data, "a")
    colours.weights.write_text("2.0")
    b = tlx_run(tmp_path, data, "b")
    assert (colours.built, colours.seen, b["features"]["computed"]) == (2, 18, 18)
    assert b["backbone"]["sha256"] != a["backbone"]["sha256"]
    colours.weights.write_text("1.0")  # back to the first weights: a new file state, same digest
    c = tlx_run(tmp_path, data, "c")
    assert (colours.built, c["features"]["cached"]) == (3, 18)
    assert c["backbone"]["sha256"] == a["backbone"]["sha256"]


def test_interrupted_extraction_keeps_finished_chunks(
    tmp_path: Path, data: Path, colours: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 4)  # a chunk every two batches of two
    colours.crash_after = 10  # five batches: two chunks written, the fifth batch's images pending
    with pytest.raises(KeyboardInterrupt):
        tlx_run(tmp_path, data, "a")
    namespaces, _ = cache.summary(cache.cache_dir())
    assert [(n.entries, n.chunks) for n in namespaces] == [(8, 2)]
    assert not list(namespaces[0].folder.glob(".*.tmp")), "no temporary file is left behind"

    colours.crash_after = None
    resumed = tlx_run(tmp_path, data, "b")
    assert colours.seen == 18 - 8 and resumed["features"]["cached"] == 8
    fresh = tlx_run(tmp_path, data, "c", cache_dir=tmp_path / "fresh-cache")
    assert fresh["features"]["computed"] == 18 and fresh["history"] == resumed["history"]


def test_crash_while_writing_a_chunk_leaves_no_partial_file(
    tmp_path: Path, data: Path, colours: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    real_save = safetensors.numpy.save_file

    def save_half_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        tlx_run(tmp_path, data, "a")
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    features = cache.cache_dir() / "features"
    assert not [p for p in features.rglob("*") if p.suffix in {".safetensors", ".tmp"}]
    assert tlx_run(tmp_path, data, "b")["features"]["computed"] == 18


def test_two_stores_sharing_a_folder_both_read_everything(tmp_path: Path) -> None:
    info = cache.BackboneInfo("0" * 64, 2, CONFIG, "test")
    identity = cache.namespace_identity({"name": "x"}, info, {})
    a, b = cache.FeatureStore(tmp_path, identity), cache.FeatureStore(tmp_path, identity)
    a.put(["k1", "k2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), {})
    b.put(["k2", "k3"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), {"k4": "broken file"})
    found, failed = cache.FeatureStore(tmp_path, identity).get(["k1", "k2", "k3", "k4", "k5"])
    assert {k: v.tolist() for k, v in found.items()} == {"k1": [1, 2], "k2": [3, 4], "k3": [5, 6]}
    assert failed == {"k4": "broken file"}
    other = cache.namespace_identity({"name": "y"}, info, {})
    assert cache.FeatureStore(tmp_path, other).missing(["k1"]) == ["k1"]


def test_unwritable_cache_warns_and_the_run_goes_on(
    tmp_path: Path, data: Path, colours: Factory, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    metrics = run(
        load_recipe(
            write_recipe(tmp_path / "r.yaml", f"dataset: {{root: {data}}}\nbackbone: {{name: colours}}\n")
        ),
        "r.yaml",
        tmp_path / "out",
        cache_dir=blocker / "cache",
    )
    assert metrics["features"]["computed"] == 18
    assert "tlx: warning: cache:" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path: Path, data: Path, colours: Factory, invoke) -> None:
    tlx_run(tmp_path, data, "a")
    info = invoke("cache", "info")
    assert info.exit_code == 0, info.output
    assert f"cache {cache.cache_dir()}:" in info.output and "18 entries" in info.output
    assert "colours" in info.output

    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("not tlx's")
    refused = invoke("cache", "clear", "--cache-dir", other)
    assert refused.exit_code == 2 and "is not a tlx cache" in refused.output
    assert (other / "keep.txt").exists(), "clear removes only what tlx stored"

    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0 and "cleared" in cleared.output
    assert not cache.cache_dir().exists(), "a cache holding only tlx's files is removed whole"
    assert "0 entries" in invoke("cache", "info").output
    assert tlx_run(tmp_path, data, "b")["features"]["computed"] == 18


def test_full_disk_while_writing_warns_and_leaves_no_partial_chunk(
    tmp_path: Path,
    data: Path,
    colours: Factory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import errno

    import safetensors.numpy

    real_save = safetensors.numpy.save_file

    def disk_full(tensors, path, metadata=None):
        if not str(path).startswith(str(cache.cache_dir())):
            return real_save(tensors, path, metadata=metadata)  # the run folder is on another disk
        Path(path).write_bytes(b"\0" * 10)  # what a filling disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    metrics = tlx_run(tmp_path, data, "a")
    assert metrics["features"]["computed"] == 18 and len(metrics["history"]) == 3
    assert "No space left on device" in capsys.readouterr().err
    features = cache.cache_dir() / "features"
    assert not [p for p in features.rglob("*") if p.suffix in {".safetensors", ".tmp"}]


# --- integrity: no wrong numbers from a damaged, stale or vanished cache --------------------------------

SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"


def chunks() -> list[Path]:
    return sorted((cache.cache_dir() / "features").rglob("*.safetensors"))


def test_clear_removes_only_what_tlx_wrote(tmp_path: Path, data: Path, colours: Factory, invoke) -> None:
    tlx_run(tmp_path, data, "a")
    root = cache.cache_dir()
    assert (root / "CACHEDIR.TAG").read_text().startswith(SIGNATURE + "\n"), "the cache is tagged"
    mine = [root / "notes.txt", root / "features" / "photo.jpg", chunks()[0].parent / "extra.bin"]
    for path in mine:
        path.write_text("the user's")
    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0, cleared.output
    assert all(path.read_text() == "the user's" for path in mine)
    assert not chunks() and not (root / "backbones").exists() and not (root / "CACHEDIR.TAG").exists()

    elsewhere = tmp_path / "pictures"
    (elsewhere / "features").mkdir(parents=True)
    (elsewhere / "features" / "holiday.jpg").write_text("a photo")
    refused = invoke("cache", "clear", "--cache-dir", elsewhere)
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert f"tlx: error: cache: {elsewhere} is not a tlx cache" in refused.output
    assert (elsewhere / "features" / "holiday.jpg").exists()


def test_a_folder_with_other_files_is_not_tagged_and_an_untagged_cache_is_still_cleared(
    tmp_path: Path, data: Path, colours: Factory, invoke
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "thesis.tex").write_text("months of work")
    tlx_run(tmp_path, data, "a", cache_dir=shared)
    assert not (shared / "CACHEDIR.TAG").exists(), "backup tools would skip thesis.tex"
    assert tlx_run(tmp_path, data, "b", cache_dir=shared)["features"]["cached"] == 18

    cleared = invoke("cache", "clear", "--cache-dir", shared)  # recognised by tlx's own files
    assert cleared.exit_code == 0 and "cleared" in cleared.output
    assert sorted(p.name for p in shared.iterdir()) == ["thesis.tex"]


def test_clear_reports_what_it_really_freed(
    tmp_path: Path, data: Path, colours: Factory, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    tlx_run(tmp_path, data, "a")
    before = chunks()
    real_unlink = os.unlink

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", read_only)
    refused = invoke("cache", "clear")
    assert refused.exit_code == 2 and "freed" not in refused.output
    assert "nothing was removed" in refused.output and "Permission denied" in refused.output
    assert chunks() == before

    def chunks_read_only(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            read_only(path)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", chunks_read_only)
    others = [p for p in cache.own_files(cache.cache_dir()) if p not in before]
    partly = invoke("cache", "clear")
    assert partly.exit_code == 0 and "1 files could not be removed" in partly.stderr
    assert f"cleared {len(others)} files" in partly.stdout
    assert chunks() == before and not any(p.exists() for p in others)


def test_flipped_bytes_in_a_chunk_are_recomputed_with_one_warning(
    tmp_path: Path, data: Path, colours: Factory, capsys: pytest.CaptureFixture
) -> None:
    first = tlx_run(tmp_path, data, "a")
    (chunk,) = chunks()
    raw = bytearray(chunk.read_bytes())
    raw[-7] ^= 0x40  # one bit of one feature
    chunk.write_bytes(bytes(raw))
    capsys.readouterr()

    second = tlx_run(tmp_path, data, "b")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: cache" in line]
    assert warnings == [
        f"tlx: warning: cache: deleted damaged chunk {chunk} (checksum mismatch); their images are recomputed"
    ]
    assert second["features"]["computed"] == 18 and second["history"] == first["history"]
    third = tlx_run(tmp_path, data, "c")
    assert "warning: cache" not in capsys.readouterr().err, "the damaged chunk is gone, not reported again"
    assert third["features"]["cached"] == 18


def test_a_cached_chunk_with_nan_is_not_served(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    info = cache.BackboneInfo("0" * 64, 2, CONFIG, "test")
    store = cache.FeatureStore(tmp_path, cache.namespace_identity({"name": "x"}, info, {}))
    store.put(["k1", "k2"], torch.tensor([[1.0, float("nan")], [3.0, 4.0]]), {"k3": "broken file"})
    fresh = cache.FeatureStore(tmp_path, store.identity)
    assert fresh.missing(["k1", "k2", "k3"]) == ["k1", "k2", "k3"]
    assert "(non-finite features)" in capsys.readouterr().err
    assert not list(store.folder.glob("*.safetensors"))


def test_a_chunk_without_checksum_is_not_trusted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    info = cache.BackboneInfo("0" * 64, 2, CONFIG, "test")
    store = cache.FeatureStore(tmp_path, cache.namespace_identity({"name": "x"}, info, {}))
    store.folder.mkdir(parents=True)
    meta = {"keys": '["k1"]', "failed": "{}"}
    save_file({"features": torch.ones(1, 2)}, str(store.folder / f"{'a' * 32}.safetensors"), metadata=meta)
    assert store.get(["k1"]) == ({}, {})
    assert "(no checksum)" in capsys.readouterr().err


def test_backbone_returning_nan_stops_the_run_naming_the_images(
    tmp_path: Path, data: Path, colours: Factory
) -> None:
    colours.weights.write_text("nan")
    with pytest.raises(TlxError, match=r"NaN or infinite features for .*0\.jpg and 1 more") as raised:
        tlx_run(tmp_path, data, "a")
    assert str(colours.weights) in str(raised.value), "the backbone is named by its weights"
    assert not chunks(), "nothing non-finite is cached"


def test_image_rewritten_with_the_same_size_and_mtime_is_recomputed(
    tmp_path: Path, data: Path, colours: Factory
) -> None:
    image = data / "train" / "class0" / "0.jpg"
    Image.new("RGB", (48, 48), (255, 0, 0)).save(image, format="BMP")  # same size whatever the colour
    tlx_run(tmp_path, data, "a")
    st = image.stat()
    Image.new("RGB", (48, 48), (0, 0, 255)).save(image, format="BMP")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = tlx_run(tmp_path, data, "b")
    assert second["features"]["computed"] == 1 and (colours.built, colours.seen) == (2, 1)


def test_chunk_removed_between_lookup_and_read_is_recomputed(
    tmp_path: Path, data: Path, colours: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    tlx_run(tmp_path, data, "a")
    real_index = cache.FeatureStore._load_index

    def index_then_clear(store: cache.FeatureStore) -> dict:
        index = real_index(store)
        for chunk in chunks():  # as a concurrent `tlx cache clear` would
            chunk.unlink()
        return index

    monkeypatch.setattr(cache.FeatureStore, "_load_index", index_then_clear)
    metrics = tlx_run(tmp_path, data, "b")
    assert metrics["features"]["computed"] == 18 and colours.built == 2


def test_cache_files_get_the_umask_mode(tmp_path: Path, data: Path, colours: Factory) -> None:
    mask = os.umask(0)
    os.umask(mask)
    tlx_run(tmp_path, data, "a")
    files = [p for p in cache.cache_dir().rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".TAG"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}  # 0o644 under umask 022
