"""`diffusers-mar demo` in a real browser, doing what a person does: generate and watch the live image, download the
PNG, inpaint with a mask drawn with the mouse, type a bad label, cancel a long run, compare exact and fast.

Playwright for Python drives the system's chromium (`/usr/bin/chromium`, Debian's `chromium` package; Playwright
downloads no browser). Without Playwright or the browser these tests skip with the reason, except under `CI=true`,
where they fail: `.ci/run` installs chromium with apt-get. The server is the command itself, in a subprocess on a
free port with the shipped model. The screenshots go to docs/images/ (docs/demo.md shows them; `DEMO_SCREENSHOTS`
names another folder).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from diffusers_mar import DEFAULT_MODEL, MARPipeline
from diffusers_mar.demo.frames import OUTLINE, UNKNOWN_GREY, grid_layout
from tests.testing_utils import IN_CI, REPO_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("DEMO_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(os.environ.get("DEMO_SCREENSHOTS", REPO_ROOT / "docs" / "images"))
START_TIMEOUT = 180  # seconds for the server to start on a busy machine


def browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set DEMO_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing is not None:
        if IN_CI:
            pytest.fail(f"{missing}: the browser tests must not skip in CI (.ci/run installs chromium)", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root in a container, where chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(browser, tmp_path_factory):
    """The URL of `diffusers-mar demo` (the shipped model) started as a person starts it, on a free port."""
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "diffusers_mar.cli", "demo", "--port", str(free_port())]
    with open(log, "w") as output:
        # Ctrl-C's default action, as in a terminal: a suite started in the background (`cmd &` without job
        # control) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt in the demo.
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while "Ctrl-C stops it" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the demo did not start:\n{log.read_text()}", pytrace=False)
            time.sleep(0.2)
        lines = log.read_text().splitlines()
        url = next(line for line in lines if " on http://" in line).split(" on ")[-1]
        outputs = Path(
            next(line for line in lines if "uploads and outputs in " in line).split(" in ")[1].split(",")[0]
        )
        try:
            yield url
        finally:
            process.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                assert process.wait(60) == 0, log.read_text()
            finally:
                process.kill()
        assert outputs.is_dir() is False  # its folder went with it


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.requested_hosts = set()
    page.on("request", lambda request: page.requested_hosts.add(urlparse(request.url).hostname))
    page.goto(app)
    page.wait_for_selector("#generate")
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def fill(page, element_id: str, value: str) -> None:
    page.locator(f"#{element_id} input, #{element_id} textarea").first.fill(value)


def wait_for_text(page, element_id: str, text: str, timeout: float = 120) -> str:
    page.wait_for_function(
        "([id, text]) => (document.getElementById(id)?.innerText || '').includes(text)",
        arg=[element_id, text],
        timeout=timeout * 1000,
    )
    return page.locator(f"#{element_id}").inner_text()


def fetch_image(page, selector: str) -> np.ndarray:
    source = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB"))


def watch_live_image(page) -> None:
    """Record every `src` the live image takes, in the page (a person would see each)."""
    page.evaluate(
        """() => {
            window.liveSources = [];
            const record = () => {
                const image = document.querySelector('#live img');
                const last = window.liveSources[window.liveSources.length - 1];
                if (image && image.src && image.src !== last) window.liveSources.push(image.src);
            };
            new MutationObserver(record).observe(document.getElementById('live'),
                {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
        }"""
    )


def test_generate_shows_live_frames_then_the_grid_and_downloads_the_png(page, tmp_path):
    watch_live_image(page)
    page.locator("#generate").click()
    status = wait_for_text(page, "status", "img/s")
    assert status.startswith("40 image(s) in ")  # 10 labels x 4 images, the shipped model's 16 x 100 steps
    sources = page.evaluate("() => window.liveSources")
    assert len(sources) >= 3, sources  # changed at least twice before the final grid
    frames = [np.asarray(Image.open(io.BytesIO(page.request.get(s).body())).convert("RGB")) for s in sources]
    grey = [(frame == UNKNOWN_GREY).all(axis=-1).mean() for frame in frames]
    assert grey[0] > 0.5 and grey[-1] < 0.1  # first nothing known, at last everything
    assert any((frame == OUTLINE).all(axis=-1).any() for frame in frames[:-1])  # the next step's tokens outlined
    assert page.locator("#cli").inner_text().count("diffusers-mar generate --class-labels 0 1 2 3 4 5 6 7 8 9") == 1
    with page.expect_download() as download:
        page.locator("#download").click()
    path = tmp_path / "grid.png"
    download.value.save_as(path)
    png = Image.open(path)
    blank = [Image.new("L", (8, 8))] * 40
    layout = grid_layout(MARPipeline.from_pretrained(DEFAULT_MODEL), [str(label) for label in range(10)], 4)
    assert png.format == "PNG" and png.size == layout.grid(blank).size
    assert np.array_equal(np.asarray(png.convert("RGB")), frames[-1])  # the download is the grid shown
    assert page.requested_hosts == {"127.0.0.1"}  # nothing from outside: works offline
    screenshot(page, "demo_generate.png")
    Image.fromarray(frames[len(frames) // 2]).save(
        SCREENSHOTS / "demo_live_frame.png"
    )  # a frame as the browser got it


def test_inpaint_keeps_the_pixels_outside_the_drawn_mask(page):
    from sklearn.datasets import load_digits

    page.get_by_role("tab", name="Inpaint / edit").click()
    page.locator("#load-sample").click()  # digit 0 of scikit-learn's digits, shown 256x256
    page.wait_for_function("() => document.querySelector('#inpaint-label')?.innerText.includes('0')")
    for attempt in range(3):
        # The editor draws the image first; on a busy machine strokes made before that are lost, the demo then
        # answers "paint the part to regenerate" and the strokes are made again.
        time.sleep(1 + 2 * attempt)
        canvas = page.locator("#editor canvas").first.bounding_box()
        zoom = float(page.locator("#editor").get_by_text("%").first.inner_text().strip("%")) / 100
        x, y, half = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2, 128 * zoom
        # Strokes over the bottom token row (image rows 192-255; the brush's radius is 16 image pixels).
        page.mouse.move(x - half + 4, y + 0.8 * half)
        page.mouse.down()
        for row in (0.8, 0.9, 0.8):
            page.mouse.move(x - half + 4, y + row * half, steps=4)
            page.mouse.move(x + half - 4, y + row * half, steps=12)
        page.mouse.up()
        page.locator("#inpaint").click()
        page.wait_for_function(
            "() => (document.getElementById('inpaint-status')?.innerText || '').includes('Regenerated') || "
            "document.body.innerText.includes('paint the part to regenerate')",
            timeout=300_000,  # a busy 2-core machine (the slow suite runs two at once) can take minutes
        )
        if "Regenerated" in page.locator("#inpaint-status").inner_text():
            break
        page.get_by_text("paint the part to regenerate").first.wait_for(state="detached", timeout=30_000)
    status = wait_for_text(page, "inpaint-status", "Regenerated")
    assert status.startswith("Regenerated 4 of 16 tokens")  # the bottom token row
    kept, result = fetch_image(page, "#kept"), fetch_image(page, "#result")
    digit = np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    shown = np.kron(digit, np.ones((32, 32), dtype=np.uint8))
    assert np.array_equal(result[:192, :, 0], shown[:192])  # the unpainted token rows, pixel for pixel
    assert np.array_equal(kept[:192, :, 0], shown[:192]) and (kept[192:] == UNKNOWN_GREY).all()
    screenshot(page, "demo_inpaint.png")


def test_bad_input_shows_our_message_not_a_traceback(page):
    fill(page, "labels", "0 banana")
    page.locator("#generate").click()
    page.get_by_text("class labels: unknown class name 'banana'").first.wait_for(timeout=30000)
    fill(page, "labels", "0")
    fill(page, "num-inference-steps", "0")
    page.locator("#generate").click()
    page.get_by_text("num_inference_steps: must be an integer in [1, 16] for this model").first.wait_for()
    assert "Traceback" not in page.content()


def test_a_long_run_can_be_cancelled(page):
    fill(page, "per-label", "6")
    fill(page, "num-diffusion-steps", "1000")  # 60 images x 16 x 1000 steps: tens of seconds
    watch_live_image(page)
    page.locator("#generate").click()
    page.wait_for_function("() => window.liveSources.length >= 1", timeout=120000)
    page.locator("#stop").click()
    # The run ends itself after the pipeline's current step and says so (no Gradio 'Error' badge on the tab).
    status = wait_for_text(page, "status", "Cancelled after", timeout=60)
    assert re.fullmatch(r"Cancelled after \d+ step\(s\)\.", status), status
    assert int(status.split()[2]) < 16
    # The model is free at once: the pipeline stopped (a run still going would hold the model's lock).
    fill(page, "labels", "1")
    fill(page, "per-label", "1")
    fill(page, "num-diffusion-steps", "5")
    start = time.monotonic()
    page.locator("#generate").click()
    assert wait_for_text(page, "status", "img/s", timeout=60).startswith("1 image(s) in ")
    assert time.monotonic() - start < 20


def test_exact_against_fast_shows_both_with_their_times(page):
    page.get_by_role("tab", name="Exact against fast").click()
    page.locator("#compare").click()
    status = wait_for_text(page, "compare-status", "less time")
    assert status.startswith("The preset 'fast' took ")
    assert page.get_by_text("0.985").count() >= 1  # the quoted accuracy of the preset
    screenshot(page, "demo_compare.png")
