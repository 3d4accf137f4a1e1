"""The page of ``tlx serve`` in a real browser: headless Chromium (Debian's ``chromium``), by Playwright.

``.ci/run`` installs the browser, so this runs in CI rather than skipping."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .test_serve import ANT, CAT, TYPICAL_BEE, Server, run_dir, start, stop

CHROMIUM = "/usr/bin/chromium"
#: the viewports the page is checked at: a laptop's, and a phone's (an iPhone 12 to 15)
DESKTOP = {"width": 1100, "height": 900}
PHONE = {"width": 390, "height": 844}

__all__ = ["run_dir"]  # the module's trained run, a fixture


@pytest.fixture
def server(run_dir: Path) -> Iterator[Server]:
    server, _ = start(run_dir)
    yield server
    stop(server)


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser.new_page(viewport=DESKTOP)
        finally:
            browser.close()


def test_the_model_card_names_backbone_head_accuracy_recipe(
    page: Page, server: Server, run_dir: Path
) -> None:
    accuracy = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    page.goto(server.url)
    facts = page.locator("#facts")
    expect(facts).to_contain_text(f"{100 * accuracy:.1f}% on 6 test images")
    expect(facts).to_contain_text("tf_efficientnet_lite0.pypi")
    expect(facts).to_contain_text("linear (on frozen features, 40 training images)")
    expect(facts).to_contain_text("hymenoptera-lite0.yaml")
    expect(facts.locator(".chip")).to_have_text(["ants", "bees"])
    expect(facts).to_contain_text("95% of them")
    expect(page.locator("#run")).to_have_text(run_dir.name)
    expect(page.locator("#exposed")).to_be_hidden()  # bound to 127.0.0.1


def test_several_images_at_once_each_get_a_card(page: Page, server: Server, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all")
    page.goto(server.url)
    page.set_input_files("#file", [TYPICAL_BEE, ANT, CAT, notes])
    cards = page.locator("#cards .card")
    expect(cards).to_have_count(4)
    expect(page.locator(".card.pending")).to_have_count(0, timeout=120_000)

    bee = cards.filter(has_text=TYPICAL_BEE.name)
    expect(bee.locator(".answer")).to_have_text(re.compile(r"^bees\d+\.\d%$"))
    expect(bee.locator(".row")).to_have_count(2)
    expect(bee.locator(".latency")).to_have_text(re.compile(r"^answered in \d+ ms$"))
    assert bee.locator("img").evaluate("i => i.naturalWidth") > 0  # the thumbnail decodes

    cat = cards.filter(has_text=CAT.name)
    expect(cat).to_have_class(re.compile(r"\bunknown\b"))
    expect(cat.locator(".answer")).to_have_text(
        re.compile(r"^unknown — looks like none of: ants, bees\[(ants|bees) \d+\.\d%\]$")
    )

    bad = cards.filter(has_text=notes.name)
    expect(bad).to_have_class(re.compile(r"\bfailed\b"))
    expect(bad.locator(".answer")).to_have_text("not an image: notes.txt")
    expect(bad.locator(".reason")).to_have_text("not an image PIL can read (no format it knows)")
    expect(bad.locator("img")).to_have_count(0)  # no broken-image icon
    expect(bad).not_to_contain_text("object at 0x")


def test_an_example_click_classifies_it(page: Page, server: Server) -> None:
    page.goto(server.url)
    examples = page.locator("#strip button")
    expect(examples).to_have_count(4)
    widths = page.eval_on_selector_all("#strip img", "images => images.map(i => i.naturalWidth)")
    assert min(widths) > 0  # every example's thumbnail decodes
    name = examples.nth(2).get_attribute("title").split(" ")[0]  # "FILE (bees)"
    examples.nth(2).click()
    card = page.locator("#cards .card")
    expect(card).to_have_count(1)
    expect(card.locator(".name")).to_have_text(name)
    expect(card.locator(".latency")).to_be_visible(timeout=60_000)
    expect(card.locator(".row").first).to_contain_text(re.compile(r"(ants|bees)\d+\.\d%"))


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_page_fits_the_width_of_a_phone_and_a_desktop(
    page: Page, server: Server, tmp_path: Path, viewport: dict[str, int]
) -> None:
    page.set_viewport_size(viewport)
    page.goto(server.url)
    page.set_input_files("#file", [TYPICAL_BEE, CAT])
    page.locator("#strip button").first.click()
    expect(page.locator(".card.pending")).to_have_count(0, timeout=120_000)
    expect(page.locator("#cards .card")).to_have_count(3)
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]  # no sideways scroll
    page.screenshot(path=tmp_path / "serve.png", full_page=True)
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_the_api_page_lists_each_endpoint_with_curl(page: Page, server: Server) -> None:
    page.goto(server.url)
    page.click("text=API")
    sections = page.locator("#endpoints section")
    expect(sections).to_have_count(5)
    predict = sections.filter(has_text="/predict")
    expect(predict.locator("h2")).to_have_text("post/predict")
    expect(predict).to_contain_text("top_k (query, integer, default 5)")
    expect(predict.locator("pre")).to_have_text(
        f"curl -F file=@photo.jpg -F file=@another.jpg '{server.url}predict?top_k=3'"
    )
