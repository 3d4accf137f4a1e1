"""Calibrated probabilities, "unknown" and prediction sets: the numbers (synthetic, where the truth is
known), every caller giving the same fields, and on real photos an ants/bees classifier calling cats
and dogs unknown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

import tlx
from tlx.calibration import Calibration, conformal_quantile, ece, fit_temperature, softmax
from tlx.run import run

from .conftest import HYMENOPTERA, assert_user_error, recipe_for
from .test_paths import serve_predict

CATSDOGS = HYMENOPTERA.parent / "catsdogs"


def sampled(n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``scale`` times too confident: labels drawn from the softmax of the unscaled logits."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 2, (n, 3))
    p = softmax(true)
    y = np.array([rng.choice(3, p=row) for row in p])
    return scale * true, y


def test_the_temperature_undoes_overconfidence_without_changing_the_argmax() -> None:
    logits, y = sampled(4000, 3.0, 0)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = softmax(logits), softmax(logits, t)
    assert (before.argmax(1) == after.argmax(1)).all()
    test, y_test = sampled(4000, 3.0, 1)
    assert ece(softmax(test, t), y_test) < 0.03 < ece(softmax(test), y_test)


def test_ece_of_a_classifier_right_as_often_as_it_says_is_near_zero() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    y = (rng.uniform(size=confidence.size) > confidence).astype(int)  # class 0 right with p = confidence
    assert ece(np.stack([confidence, 1 - confidence], axis=1), y) < 0.01
    always = np.tile([0.99, 0.01], (1000, 1))
    assert ece(always, np.repeat([0, 1], 500)) == pytest.approx(0.49)


def test_prediction_sets_cover_as_asked_on_new_images() -> None:
    logits, y = sampled(3000, 1.0, 2)
    train = np.random.default_rng(0).normal(size=(50, 4))
    fitted = Calibration.fit(logits, y, train)
    test, y_test = sampled(6000, 1.0, 3)
    for coverage in (0.8, 0.9, 0.95):
        sets = fitted.sets(fitted.probabilities(test), coverage)
        covered = np.mean([t in s for t, s in zip(y_test, sets)])
        assert coverage - 0.02 <= covered <= coverage + 0.03
    assert conformal_quantile(np.arange(5.0), 0.9) == np.inf  # too few scores for 0.9


def test_unknown_accepts_its_share_of_new_images_and_rejects_far_ones() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)
    near = lambda n: centre + 0.6 * rng.normal(size=(n, 64))  # noqa: E731
    fitted = Calibration.fit(np.zeros((400, 2)), np.zeros(400, dtype=int), near(400), accept=0.9)
    accepted = (fitted.ood_scores(near(2000)) <= fitted.threshold).mean()
    assert 0.85 <= accepted <= 0.95
    far = rng.normal(size=(200, 64))  # another direction entirely
    assert (fitted.ood_scores(far) > fitted.threshold).all()
    few = Calibration.fit(np.zeros((3, 2)), np.zeros(3, dtype=int), near(3))
    assert np.isfinite(few.threshold)  # too few images for the quantile: the largest score


@pytest.fixture
def calibrated(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> Path:
    out = tmp_path / "run"
    run(recipe_for(tmp_path, tiny_dataset, "train.epochs=3", "extract.runtime=torch"), "r", out)
    return out


def test_a_run_records_its_calibration_and_draws_the_diagram(calibrated: Path) -> None:
    metrics = json.loads((calibrated / "metrics.json").read_text())
    numbers = metrics["calibration"]
    assert numbers["temperature"] > 0 and 0 <= numbers["ece"] <= 1 and numbers["held_out"]
    assert sum(b["n"] for b in numbers["reliability"]) == metrics["n_test"]
    assert metrics["ood"]["accept"] == 0.95 and 0 <= metrics["ood"]["accepted_test_fraction"] <= 1
    assert (calibrated / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    rows = (calibrated / "predictions.csv").read_text().splitlines()[1:]
    written = np.array([[float(v) for v in row.split(",")[3:]] for row in rows])
    assert np.allclose(written.sum(1), 1, atol=1e-5)  # the calibrated probabilities, as predict answers


def test_every_caller_answers_the_same_calibrated_fields(
    calibrated: Path, tiny_dataset: Path, invoke
) -> None:
    images = sorted((tiny_dataset / "val").rglob("*.jpg"))
    printed = json.loads(invoke("predict", calibrated, *images, "--json", "--top-k", "2").stdout)
    api = tlx.load(calibrated).top_k([str(p) for p in images], 2)[0]
    served = serve_predict(calibrated, images)
    assert {"known", "ood_score"} <= set(printed[0])
    for p, a, s in zip(printed, api, served):
        for other in (a, s):
            assert other["known"] == p["known"] and other["label"] == p["label"]
            assert other["ood_score"] == pytest.approx(p["ood_score"], abs=1e-6)
            assert other["probability"] == pytest.approx(p["probability"], abs=1e-6)
    single = tlx.load(calibrated).predict([str(images[0])])[0]
    assert (single.known, single.ood_score) == (printed[0]["known"], pytest.approx(printed[0]["ood_score"]))


def test_no_reject_and_coverage(calibrated: Path, tiny_dataset: Path, invoke) -> None:
    images = sorted((tiny_dataset / "val").rglob("*.jpg"))
    plain = json.loads(invoke("predict", calibrated, *images, "--json", "--no-reject").stdout)
    assert all("known" not in p and "ood_score" not in p for p in plain)
    assert tlx.load(calibrated).predict([str(images[0])], reject=False)[0].known is None
    sets = json.loads(invoke("predict", calibrated, *images, "--json", "--coverage", "0.9").stdout)
    assert all(set(p["prediction_set"]) <= {"class0", "class1"} for p in sets)
    result = invoke("eval", calibrated, "--json", "--coverage", "0.9")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["sets"]
    assert measured["coverage"] == 0.9 and 0 <= measured["empirical"] <= 1
    assert 0 <= measured["mean_set_size"] <= 2
    bad = invoke("predict", calibrated, images[0], "--coverage", "1.5")
    assert bad.exit_code == 2 and "--coverage" in bad.output


def test_a_run_of_an_older_tlx_predicts_without_known_and_says_so(
    calibrated: Path, tiny_dataset: Path, invoke
) -> None:
    (calibrated / "calibration.safetensors").unlink()
    provenance = json.loads((calibrated / "provenance.json").read_text())
    del provenance["files"]["calibration.safetensors"]
    (calibrated / "provenance.json").write_text(json.dumps(provenance))
    result = invoke("predict", calibrated, tiny_dataset / "val", "--json")
    assert result.exit_code == 0, result.output
    assert all("known" not in p for p in json.loads(result.stdout))
    assert len(result.stderr.splitlines()) == 1 and "calibration.safetensors" in result.stderr
    coverage = invoke("predict", calibrated, tiny_dataset / "val", "--coverage", "0.9")
    assert_user_error(coverage, "--coverage", "no calibration", "train it again")


def test_a_damaged_calibration_is_a_one_line_error(calibrated: Path, tiny_dataset: Path, invoke) -> None:
    tensors = safetensors.torch.load_file(str(calibrated / "calibration.safetensors"))
    safetensors.torch.save_file(tensors, str(calibrated / "calibration.safetensors"))  # no metadata
    result = invoke("predict", calibrated, tiny_dataset / "val")
    assert_user_error(result, "calibration.safetensors")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_ants_bees_classifier_calls_cats_and_dogs_unknown(tmp_path: Path, invoke) -> None:
    """The lite0 recipe on real photos: its own test images known, photos of cats and dogs unknown."""
    recipe = "hymenoptera-lite0"  # bundled
    out = tmp_path / "run"
    overrides = [f"dataset.root={HYMENOPTERA}"]
    tlx.fit(recipe, overrides, out=out, cache_dir=tmp_path / "cache", quiet=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ood"]["accepted_test_fraction"] >= 0.95
    assert metrics["calibration"]["nll"] <= metrics["calibration"]["nll_uncalibrated"] + 0.01
    others = sorted((CATSDOGS / "val").rglob("*.jpg"))[::6]  # 60 of 359
    answers = tlx.load(out, cache_dir=tmp_path / "cache").predict([str(p) for p in others])
    assert np.mean([a.known is False for a in answers]) >= 0.9
    result = invoke("predict", out, others[0], "--cache-dir", tmp_path / "cache")
    assert "unknown (looks like none of: ants, bees)" in result.stdout
