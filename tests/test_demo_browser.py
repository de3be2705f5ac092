"""``aim-llava demo`` used as a person would: the command started on the tiny checkpoint, driven
in a real headless Chromium (Debian's ``chromium``, which scripts/install.sh installs, through
Playwright pointed at that binary: nothing is downloaded). One app start, one page: an oversized
upload, an undecodable one and an unknown preset each give a message on the page and leave it
working; then a generated clip is asked about under two presets, both answers arrive, the
pictures, chart and figures are drawn, the layer slider redraws the pictures, and a screenshot
goes to outputs/demo_screenshot.png (the README's picture)."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import serve_process
from PIL import Image

from aim_llava.sample_media import write_sample_video

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# headless on a machine without a network: no background connections, no GPU, no sandbox (root)
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "outputs" / "demo_screenshot.png"
START_S = 600  # loading torch, Gradio and the model on a busy machine
ANSWER_S = 600
MAX_UPLOAD_MB = 0.05
MESSAGE = "#message [data-testid=markdown]"  # the message's text, without Gradio's progress timer

# CI requires the browser (it installs it); elsewhere a machine without it skips this test
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("AIM_LLAVA_REQUIRE_CHROMIUM"),
                                reason="needs Debian's chromium (scripts/install.sh installs it as root)")


@pytest.fixture(scope="module")
def demo_url(tiny_qwen_dir, tmp_path_factory):
    """The URL of ``aim-llava demo`` on the tiny checkpoint, started once for the module."""
    assert os.path.exists(CHROMIUM), "no Chromium: scripts/install.sh installs Debian's chromium (as root)"
    log = tmp_path_factory.mktemp("demo_log") / "demo.log"
    args = ["--model", tiny_qwen_dir, "--device", "cpu", "--frames", 4, "--max-new-tokens", 8,
            "--max-upload-mb", MAX_UPLOAD_MB]
    with serve_process(args, log, {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
                       entry=("aim_llava.cli", "demo"), ready="/", start_s=START_S) as (url, _):
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def ask(page) -> str:
    """Click Ask and wait for the request's last message (the page's text, not the one before)."""
    message = page.locator(MESSAGE)
    before = message.inner_text() if message.count() else ""
    page.locator("#ask").click()
    page.wait_for_function(
        """([selector, before]) => {
             const element = document.querySelector(selector), shown = element ? element.innerText : '';
             return !(before && shown.includes(before)) &&
                    ['Not answered', 'Done', 'failed'].some(t => shown.includes(t));
           }""", arg=[MESSAGE, before], timeout=ANSWER_S * 1000)
    return message.inner_text()


def upload(page, path: Path) -> None:
    """Put ``path`` in the upload box (clearing what it holds first)."""
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#upload input[type=file]").set_input_files(str(path), timeout=60_000)


def choose(page, element_id: str, value: str) -> None:
    box = page.locator(f"#{element_id} input")
    box.fill(value)
    box.press("Enter")


def rendered_images(page, element_id: str) -> int:
    return page.evaluate(f"[...document.querySelectorAll('#{element_id} img')].filter(i => i.naturalWidth > 0).length")


def test_demo_in_chromium(demo_url, tmp_path):
    clip = write_sample_video(tmp_path / "clip.mp4", num_frames=40, fps=10, height=96, width=160)
    undecodable = tmp_path / "broken.mp4"
    undecodable.write_bytes(np.random.default_rng(0).bytes(3000))
    oversized = tmp_path / "huge.mp4"
    oversized.write_bytes(np.random.default_rng(1).bytes(int(MAX_UPLOAD_MB * 2**20) * 2))
    started = time.monotonic()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(demo_url, timeout=START_S * 1000)
            page.wait_for_selector("#ask")
            assert "random weights" in page.locator("#notice").inner_text()

            upload(page, oversized)  # refused by the page as it arrives
            page.wait_for_selector(".toast-body:has-text('exceed the maximum allowed size')")

            upload(page, undecodable)
            assert "cannot decode broken.mp4" in ask(page)

            upload(page, clip)
            choose(page, "preset-b", "no_such_preset")
            assert "unknown config 'no_such_preset'" in ask(page)

            choose(page, "preset-b", "aim_default")
            assert ask(page) == "Done: baseline, aim_default."
            for panel in ("a", "b"):
                assert page.locator(f"#answer-{panel} textarea").input_value().strip() != ""
                assert rendered_images(page, f"picture-{panel}") == 1
                assert "visual tokens into the LLM" in page.locator(f"#figures-{panel}").inner_text()
            assert rendered_images(page, "chart") >= 1
            assert "of 197 visual tokens" in page.locator("#caption-b").inner_text()  # 4 frames x 49 + 1

            layer = page.locator("#layer input[type=number]")
            layer.fill("0")
            layer.press("Enter")
            page.wait_for_function("document.querySelector('#caption-b').innerText.includes('entering layer 0')")
            assert "197 of 197 visual tokens entering layer 0" in page.locator("#caption-b").inner_text()

            layer.fill("6")  # after the last layer: what pruning left
            layer.press("Enter")
            page.wait_for_function("document.querySelector('#caption-b').innerText.includes('after the last layer')")
            page.locator(".toast-body button").first.click()  # the oversized upload's message, read above
            page.wait_for_selector(".toast-body", state="detached")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    shot = Image.open(SCREENSHOT)
    shot.quantize(colors=128).save(SCREENSHOT, optimize=True)  # small enough to keep in the repository
    print(f"browser session: {time.monotonic() - started:.0f} s; screenshot {SCREENSHOT} ({shot.size})")
