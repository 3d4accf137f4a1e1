"""Unusual pixels through one decoder everywhere, and datasets that would give wrong numbers."""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlx.data import Split, load_image, scan_class_folder, scan_imagefolder, scan_manifests
from tlx.default_plugins.datasets import ImageFolderOptions
from tlx.errors import TlxError
from tlx.extraction.features import extract
from tlx.extraction.pipeline import ImageFiles
from tlx.recipe import ExtractConfig
from tlx.registry import Backbone

from .conftest import CONFIG, assert_user_error, in_torch, make_imagefolder, started, write_recipe
from .test_robustness import bomb_png

_RAMP = np.arange(48 * 64).reshape(48, 64)
#: 48 x 64 8-bit RGB pixels: every value 0-255 in the first channel, and no symmetry
RGB8 = np.stack([_RAMP % 256, _RAMP // 64 * 5, _RAMP * 7 % 256], axis=-1).astype(np.uint8)


def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG, grey (h, w) or RGB (h, w, 3), written chunk by chunk (Pillow cannot write 16-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(load_image(path))


@pytest.mark.parametrize("colour", ["grey", "rgb"])
def test_16_bit_png_decodes_as_its_8_bit_version(tmp_path: Path, colour: str) -> None:
    eight = RGB8 if colour == "rgb" else RGB8[..., 0]
    Image.fromarray(eight).save(tmp_path / "8.png")
    sixteen = png16(tmp_path / "16.png", eight.astype(np.uint16) * 257)
    assert np.array_equal(pixels_of(sixteen), pixels_of(tmp_path / "8.png"))
    # and a value between two 8-bit levels rounds to the nearer one
    png16(tmp_path / "mid.png", np.array([[128, 129 * 257 - 100, 65535]], dtype=np.uint16))
    assert pixels_of(tmp_path / "mid.png")[0, :, 0].tolist() == [0, 129, 255]


def test_16_bit_pgm_and_float_tiff_decode_as_their_8_bit_version(tmp_path: Path) -> None:
    grey = RGB8[..., 0]
    Image.fromarray(grey).save(tmp_path / "8.png")
    (tmp_path / "16.pgm").write_bytes(b"P5 64 48 65535\n" + (grey.astype(">u2") * 257).tobytes())
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "16.pgm").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"
    for name in ("16.pgm", "f.tif"):
        assert np.array_equal(pixels_of(tmp_path / name), pixels_of(tmp_path / "8.png")), name


def test_float_pixels_out_of_range_are_a_reason_not_a_guess(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32)).save(tmp_path / "f.tif")
    (_, _, reason) = ImageFiles([(tmp_path / "f.tif", 0)], torch.tensor)[0]
    assert reason.startswith("ValueError: F pixel values span 300..300, outside 0..1")


def test_16_bit_images_give_the_features_of_their_8_bit_version(tmp_path: Path) -> None:
    Image.fromarray(RGB8).save(tmp_path / "8.png")
    png16(tmp_path / "16.png", RGB8.astype(np.uint16) * 257)
    Image.fromarray(RGB8[..., 1]).save(tmp_path / "g8.png")
    png16(tmp_path / "g16.png", RGB8[..., 1].astype(np.uint16) * 257)
    names = ["8.png", "16.png", "g8.png", "g16.png"]
    split = Split("x", [(tmp_path / name, 0) for name in names])
    backbone = Backbone(torch.nn.Flatten(), 3 * 32 * 32, CONFIG, "pixels")
    (features,) = extract([split], started(in_torch(backbone)), ExtractConfig(workers=0))
    assert torch.equal(features.x[0], features.x[1]) and torch.equal(features.x[2], features.x[3])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.fromarray(RGB8)  # 64 wide, 48 high
    # a camera held upright stores the pixels turned a quarter left, with orientation 6 ("turn right")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    decoded = load_image(tmp_path / "tagged.jpg")
    assert decoded.size == (64, 48)
    with Image.open(tmp_path / "tagged.jpg") as raw:
        turned = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded), np.asarray(turned))


def test_decompression_bomb_warning_is_a_skip_reason(tmp_path: Path) -> None:
    bomb_png(tmp_path / "big.png", 10_000, 10_000)  # over Pillow's warning limit, under its error limit
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        image, _, reason = ImageFiles([(tmp_path / "big.png", 0)], torch.tensor)[0]
    assert image is None and not printed
    assert reason.startswith("DecompressionBombError: Image size (100000000 pixels) exceeds limit")


# --- datasets ------------------------------------------------------------------------------------


COUNTING = """
dataset: {dataset}
backbone: {{name: counting}}
extract: {{workers: 0, runtime: torch}}  # torch runs the module that counts
train: {{epochs: 2}}
"""


@pytest.fixture
def tlx_run(tmp_path: Path, invoke, counting_backbone):
    """``tlx run`` in-process with the counting backbone on a dataset given as a YAML flow mapping."""

    def call(dataset: str, out: Path | None = None):
        recipe = write_recipe(tmp_path / "r.yaml", COUNTING.format(dataset=dataset))
        out = out or tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        result = invoke("run", recipe, "--out", out)
        result.out = out
        return result

    return call


def test_an_empty_train_class_folder_is_refused(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2)
    (root / "train" / "class2").mkdir()
    (root / "train" / "class2" / "notes.txt").write_text("")
    with pytest.raises(TlxError, match=r"class folder .*train/class2 holds no images .*remove the folder"):
        scan_imagefolder(root, "train", "val")
    folder = root / "train"
    with pytest.raises(TlxError, match=r"class folder .*train/class2 holds no images"):
        scan_class_folder(folder, 0.2, 0)


@pytest.mark.parametrize(
    ("dataset", "inside"),
    [
        ("{{root: {root}}}", "val/class0/run"),
        ("{{root: {root}}}", "train/run"),  # where a new class folder would be
        ("{{kind: folder, root: {root}/train}}", "train/run"),
    ],
)
def test_out_inside_the_dataset_is_refused(tlx_run, tmp_path: Path, dataset: str, inside: str) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2)
    out = root / inside
    result = tlx_run(dataset.format(root=root), out)
    assert_user_error(result, "--out", str(out), "inside the dataset folder")
    assert not out.exists()


def manifest(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """tmp/m/{0..5}.png, different images, beside the manifests in tmp/m/."""
    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 10, 200 - 30 * i)).save(folder / f"{i}.png")
    return folder


def test_an_image_listed_many_times_runs_through_the_backbone_once(
    tlx_run, pictures: Path, counting_backbone
) -> None:
    train = manifest(pictures / "train.csv", [f"{i % 2}.png,{'ab'[i % 2]}" for i in range(100)])
    test = manifest(pictures / "test.csv", ["2.png,a", "3.png,b"])
    result = tlx_run(f"{{kind: csv, manifest: {train}, test_manifest: {test}}}")
    assert result.exit_code == 0, result.output
    assert counting_backbone.seen == 4
    assert "split 'train' lists 98 image file(s) again" in result.stderr
    metrics = json.loads((result.out / "metrics.json").read_text())
    assert metrics["n_train"] == 100 and metrics["features"]["computed"] == 102


def test_the_same_file_in_train_and_test_is_refused(tlx_run, pictures: Path, tmp_path: Path) -> None:
    train = manifest(pictures / "train.csv", ["0.png,a", "1.png,b", "2.png,a"])
    test = manifest(pictures / "test.csv", ["3.png,b", "./0.png,a"])
    result = tlx_run(f"{{kind: csv, manifest: {train}, test_manifest: {test}}}")
    assert_user_error(result, "1 image file(s) are in both split 'train' and split 'test'", "0.png")
    # a link in an image folder is the file it links to
    root = make_imagefolder(tmp_path / "d", classes=2)
    (root / "val" / "class0" / "copy.jpg").symlink_to(root / "train" / "class0" / "1.jpg")
    assert_user_error(tlx_run(f"{{root: {root}}}"), "are in both split 'train' and split 'val'", "copy.jpg")


def test_identical_content_in_train_and_test_is_a_warning(tlx_run, tmp_path: Path) -> None:
    root = tmp_path / "d"
    for n, path in enumerate(
        f"{split}/{c}/{i}.png" for split in ("train", "val") for c in "ab" for i in range(3)
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (10 * n, 255 - 10 * n, 90)).save(root / path)
    for name in ("x.png", "y.png"):
        (root / "val" / "b" / name).write_bytes((root / "train" / "b" / "2.png").read_bytes())
    result = tlx_run(f"{{root: {root}}}")
    assert result.exit_code == 0, result.output
    assert (
        f"warning: 2 image(s) of split 'val' have the same content as an image of split 'train' "
        f"(first: {root / 'val' / 'b' / 'x.png'} and {root / 'train' / 'b' / '2.png'})"
    ) in result.stderr


def test_manifest_paths_out_of_its_folder_are_skipped(pictures: Path, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = ["0.png,a", "1.png,b", "2.png,a", "3.png,b", "../outside.png,a", f"{tmp_path / 'outside.png'},b"]
    splits = scan_manifests(manifest(pictures / "all.csv", rows), None, 0.5, 0)
    assert len(splits.train) + len(splits.test) == 4
    assert [(p.name, reason) for p, reason in splits.train.skipped] == [
        ("outside.png", "links outside the dataset root")
    ] * 2
    assert splits.roots == (pictures,)


def test_manifest_with_a_byte_order_mark_is_read(pictures: Path) -> None:
    path = pictures / "bom.csv"
    path.write_text("path,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n", encoding="utf-8-sig")
    assert scan_manifests(path, None, 0.5, 0).classes == ["a", "b"]


def test_manifest_with_an_unclosed_quote_names_the_line(pictures: Path) -> None:
    path = manifest(pictures / "q.csv", ["0.png,a", '"1.png,b', "2.png,a"])
    with pytest.raises(TlxError, match=r"dataset.manifest: .*q.csv line 3: a quoted field is never closed"):
        scan_manifests(path, None, 0.5, 0)


# --- downloads -----------------------------------------------------------------------------------


def test_an_empty_zip_is_one_line_and_leaves_no_folder(tlx_run, tmp_path: Path) -> None:
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    result = tlx_run(f"{{root: {tmp_path / 'data' / 'ds'}, url: '{(tmp_path / 'empty.zip').as_uri()}'}}")
    assert_user_error(result, "dataset.url", "empty.zip is empty")
    assert not (tmp_path / "data").exists()


def test_a_failed_download_leaves_no_folder(tlx_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = tlx_run(f"{{root: ~/data/ds, url: '{(tmp_path / 'absent.zip').as_uri()}'}}")
    assert_user_error(result, "dataset.url: cannot download")
    assert list(home.iterdir()) == [] and list(work.iterdir()) == []
    assert ImageFolderOptions(root="~/x").root == home / "x"
