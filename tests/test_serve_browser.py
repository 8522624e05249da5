"""The page at ``/`` in a real headless Chromium (Debian's, driven by Playwright): upload an
image, see the overlay drawn and as many table rows as the API returns at the slider's score,
move the slider without a new request, load nothing from elsewhere; on a laptop-sized and a
phone-sized window, each saved as a screenshot (runs/serve-page/ in the repository)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from detfit.serve.app import create_app
from detfit.serve.settings import ServeSettings
from servekit import free_port, tiny_models  # noqa: F401  (the fixture "tiny")

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "runs" / "serve-page"  # runs/ is ignored by git
CAT = (230, 159, 0)  # the first class's colour (detfit.predict.overlay.PALETTE[0])
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
)


@pytest.fixture(scope="module")
def url(tiny):
    """A real uvicorn server in a thread of this process, on a free local port."""
    import uvicorn

    app = create_app(ServeSettings(model=str(tiny["checkpoint"]), threads=1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def api_count(url: str, image: Path, threshold: float) -> int:
    r = httpx.post(
        f"{url}/v1/predict", params={"score_threshold": threshold}, content=image.read_bytes()
    )
    assert r.status_code == 200
    return len(r.json()["detections"])


def open_page(browser, url: str, viewport: dict, **context):
    """A page of ``url`` that records console errors, predict requests and any request that
    would leave this server (refused)."""
    page = browser.new_context(viewport=viewport, **context).new_page()
    seen = {"errors": [], "predicts": 0, "elsewhere": []}
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on(
        "request",
        lambda r: seen.__setitem__("predicts", seen["predicts"] + ("/v1/predict" in r.url)),
    )

    def only_here(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            seen["elsewhere"].append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.goto(url)
    # (a locator, not wait_for_function: the page's policy forbids evaluating strings)
    page.locator("#model", has_text="maskrcnn_mobilenet_v2_fpn").wait_for()
    return page, seen


def canvas_facts(page) -> dict:
    return page.eval_on_selector(
        "canvas.overlay",
        """(c, cat) => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let coloured = 0;
            for (let i = 0; i < d.length; i += 4)
                if (d[i] === cat[0] && d[i + 1] === cat[1] && d[i + 2] === cat[2]) coloured += 1;
            return {width: c.width, height: c.height, coloured, drawn: Number(c.dataset.drawn)};
        }""",
        list(CAT),
    )


def test_the_page_draws_the_overlay_and_lists_what_the_api_returns(url, tiny):
    from playwright.sync_api import sync_playwright

    photo = tiny["photo"]
    pixels = np.asarray(Image.open(photo).convert("RGB"))
    assert not (pixels == CAT).all(axis=2).any()  # the colour can only come from the overlay
    at_default, at_low = api_count(url, photo, 0.5), api_count(url, photo, 0.0)
    assert 0 < at_default < at_low
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            windows = {
                "laptop": dict(viewport={"width": 1280, "height": 800}),
                "phone": dict(
                    viewport={"width": 390, "height": 844}, is_mobile=True, device_scale_factor=2
                ),
            }
            for name, window in windows.items():
                page, seen = open_page(browser, url, **window)
                page.set_input_files("#files", str(photo))
                page.wait_for_selector("canvas.overlay[data-drawn]")
                facts = canvas_facts(page)
                assert (facts["height"], facts["width"]) == pixels.shape[:2]
                assert facts["coloured"] > 0 and facts["drawn"] == at_default
                assert page.locator("tbody tr").count() == at_default
                assert page.locator(".summary .count").text_content() == str(at_default)
                page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
                # the slider re-filters what came back, without asking the server again
                page.locator("#score").fill("0")
                assert page.locator("tbody tr").count() == at_low
                assert canvas_facts(page)["drawn"] == at_low
                assert page.locator("#score-value").text_content() == "0.00"
                assert seen["predicts"] == 1
                # nothing sticks out sideways on a phone (no horizontal scrolling)
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
                assert seen["errors"] == [] and seen["elsewhere"] == []
                page.context.close()
        finally:
            browser.close()
    for name in ("laptop", "phone"):
        with Image.open(SCREENSHOTS / f"{name}.png") as shot:
            assert shot.width == (1280 if name == "laptop" else 780)
