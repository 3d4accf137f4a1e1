"""The page of ``tlx serve`` in a real browser: headless Chromium (Debian's ``chromium``), by Playwright.

``.ci/run`` installs the browser, so this runs in CI rather than skipping."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from .test_serve import BEE, Server, run_dir, start, stop

CHROMIUM = "/usr/bin/chromium"

__all__ = ["run_dir"]  # the module's trained run, a fixture


@pytest.fixture
def server(run_dir: Path) -> Iterator[Server]:
    server, _ = start(run_dir)
    yield server
    stop(server)


def test_the_page_shows_a_bee_with_its_probability(server: Server, tmp_path: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(server.url)
            expect(page.locator("#meta")).to_contain_text("ants, bees")
            expect(page.locator("#exposed")).to_be_hidden()  # bound to 127.0.0.1
            page.set_input_files("#file", BEE)
            first = page.locator("#bars .row").first
            expect(first).to_contain_text("bees", timeout=60_000)
            expect(first).to_contain_text(re.compile(r"\d+\.\d%"))
            expect(page.locator("#preview")).to_be_visible()
            page.screenshot(path=tmp_path / "serve.png")
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 0
