"""The page at / in a real headless browser: Debian's chromium driven by the Python playwright package.

playwright is pointed at /usr/bin/chromium (installed by .ci/run); it never downloads a browser
of its own. Without chromium, or without playwright, the test is skipped and says why.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
from test_predict_cli import runs  # noqa: F401 - the fixture: tiny sentiment and ner runs on one BERT
from test_serve import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `apt-get install chromium` "
                                "(.ci/run installs it via .ci/chromium.sh)")


def test_typing_a_text_shows_every_heads_answer(runs, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra `playwright` is not installed")
    server = Server(["-m", "adl", "serve", "--run", str(runs["sentiment"]), "--run", str(runs["ner"]),
                     "--device", "cpu"])
    text = "john and mary saw a good movie in london"
    try:
        want = httpx.post(server.url + "/v1/predict", json={"texts": [text]}, timeout=60).json()["results"][0]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                page.goto(server.url + "/")
                page.wait_for_selector("section.card[data-head=ner]")
                page.fill("#text", text)
                page.click("#go")
                page.wait_for_selector("body[data-state=done]")
                assert page.inner_text("[data-head=sentiment] .label") == want["sentiment"]["label"]
                n = len(want["ner"]["entities"])
                shown = page.inner_text("[data-head=ner] .label")
                assert shown == (f"{n} entit{'y' if n == 1 else 'ies'}" if n else "no entities")
                marks = page.eval_on_selector_all("[data-head=ner] mark.entity", "ms => ms.map(m => m.dataset.type)")
                assert marks == [e["type"] for e in sorted(want["ner"]["entities"], key=lambda e: e["start"])]
                assert page.locator("[data-head=sentiment] .bar").count() == 3  # one bar per layer
                assert page.locator("[data-head=sentiment] .prob").count() == 2
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        assert server.stop() == 0
    assert (tmp_path / "page.png").stat().st_size > 1000
