"""`merge-lab ui` in a real browser (Playwright driving Debian's chromium) on tiny demo checkpoints:
pick models, set a block ratio, analyze, merge, preview; assert on what the page shows; keep a screenshot
(tests/_cache/screenshots/merge-lab-ui-<gradio>.png).

The same flow runs against the tab served by gradio 3.41.2 and 4.40.0 (.venv-gradio3 / .venv-gradio4, the
front-ends of AUTOMATIC1111 and Forge) — there without the preview, which needs diffusers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors import safe_open

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "_cache" / "screenshots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    from merge_lab.demo.models import make_family

    folder = tmp_path_factory.mktemp("ui-models")
    make_family("sd1", folder, finetunes=2, prefix="demo-sd1")  # the demo's tiny size: previews can render it
    return folder


ROOT = Path(__file__).resolve().parents[2]
SERVERS = {"newest": ".venv", "gradio3": ".venv-gradio3", "gradio4": ".venv-gradio4"}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request, demo_models, tmp_path_factory):
    python = ROOT / SERVERS[request.param] / "bin" / "python"
    assert python.exists(), f"{python} is missing: `make setup-{request.param}` (make test does)"
    port = _free_port()
    log = tmp_path_factory.mktemp("ui-log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MERGE_LAB_CACHE": str(tmp_path_factory.mktemp("ui-cache"))}
    with open(log, "w") as out:
        python = sys.executable if request.param == "newest" else str(python)
        proc = subprocess.Popen([python, "-m", "merge_lab", "ui", "--models-dir", str(demo_models),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"merge-lab ui did not come up:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield request.param, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: `make setup-browser` installs it (make test does)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(60_000)
        page.goto(server[1])
        page.wait_for_selector("#merge_lab_models")
        yield server[0], page
        browser.close()


def textbox(page, name: str):
    return page.locator(f"#merge_lab_{name} textarea, #merge_lab_{name} input").first


def wait_for_value(locator, predicate, timeout=120.0) -> str:
    deadline = time.monotonic() + timeout
    value = locator.input_value()
    while not predicate(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; value is {value!r}")
        time.sleep(0.25)
        value = locator.input_value()
    return value


def choose(page, dropdown: str, option: str) -> None:
    """Open a gradio dropdown and click an option (the same markup in gradio 3.41, 4.40 and 6)."""
    page.locator(f"#merge_lab_{dropdown} input").first.click()
    page.locator(f'#merge_lab_{dropdown} li[data-testid="dropdown-option"][aria-label="{option}"]').click()


@pytest.mark.slow
def test_pick_models_set_a_block_analyze_merge_preview(page, demo_models):
    from playwright.sync_api import expect

    gradio, page = page
    for old in demo_models.glob("browser-merge*"):
        old.unlink()

    # pick two models from the folder
    for name in ("demo-sd1-ft1.safetensors", "demo-sd1-ft2.safetensors"):
        choose(page, "models", name)
    page.keyboard.press("Escape")
    expect(page.locator("#merge_lab_arch_info").first).to_contain_text("Stable Diffusion 1.x")

    # the global ratio α follows the method: its published default (ties 1, weighted_sum 0.5)
    alpha = page.locator("#merge_lab_alpha input[type=number]")
    assert float(alpha.input_value()) == 0.5
    choose(page, "method", "ties")
    wait_for_value(textbox(page, "status"), lambda v: v == "α set to 1 (ties default)")
    assert float(wait_for_value(alpha, lambda v: float(v or 0) == 1)) == 1
    choose(page, "method", "weighted_sum")
    wait_for_value(textbox(page, "status"), lambda v: v == "α set to 0.5 (weighted_sum default)")
    assert float(wait_for_value(alpha, lambda v: float(v or 0) == 0.5)) == 0.5

    # one block ratio: typed into IN04's number box, the MBW text follows
    page.locator("#merge_lab_blocks").get_by_text("Block ratios (MBW)").click()
    page.locator("#merge_lab_use_blocks input").check()
    number = page.locator("#merge_lab_block_IN04 input[type=number]")
    number.fill("1")
    number.press("Enter")
    mbw = wait_for_value(textbox(page, "mbw_text"), lambda v: v.split(",")[5:6] == ["1"])
    assert mbw.split(",")[:5] == ["0.5"] * 5

    # analyze: θ per block for the pair, a table and a heatmap
    page.locator("#merge_lab_analyze").click()
    table = page.locator("#merge_lab_theta_table table")
    expect(table).to_be_visible(timeout=120_000)
    assert table.locator("th", has_text="IN04").count() == 1
    assert "°" in table.inner_text()
    expect(page.locator("#merge_lab_heatmap img")).to_be_visible()

    # merge: the status says what was written, the file holds the block ratio
    textbox(page, "out_name").fill("browser-merge")
    page.locator("#merge_lab_merge").click()
    status = wait_for_value(textbox(page, "status"), lambda v: v.startswith(("saved", "error")))
    assert status.startswith("saved browser-merge.safetensors"), status
    with safe_open(demo_models / "browser-merge.safetensors", "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["ratios"]["IN04"] == 1.0 and recipe["ratios"]["IN05"] == 0.5
    assert json.loads(textbox(page, "recipe_json").input_value())["blocks"].split(",")[5] == "1"

    # the recipe comes back from the file's metadata
    page.locator("#merge_lab_refresh").click()
    wait_for_value(textbox(page, "status"), lambda v: "model(s) in the model folder" in v)
    choose(page, "recipe_source", "browser-merge.safetensors")
    page.locator("#merge_lab_load_recipe").click()
    wait_for_value(textbox(page, "status"), lambda v: v.startswith("recipe loaded from browser-merge"))

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if gradio != "newest":  # no diffusers next to the web UIs' old gradio
        page.screenshot(path=str(SCREENSHOTS / f"merge-lab-ui-{gradio}.png"), full_page=True)
        return

    # merge & preview: an image from the merged weights, its parameters name the recipe
    textbox(page, "steps").fill("2")
    textbox(page, "width").fill("64")
    textbox(page, "height").fill("64")
    page.locator("#merge_lab_preview").click()
    status = wait_for_value(textbox(page, "status"), lambda v: v.startswith(("preview of", "error", "preview unav")),
                            timeout=300)
    assert status.startswith("preview of"), status
    expect(page.locator("#merge_lab_preview_image img")).to_be_visible()
    info = textbox(page, "preview_info").input_value()
    assert "Steps: 2" in info and "Size: 64x64" in info and recipe["recipe_hash"][:10] in info

    page.screenshot(path=str(SCREENSHOTS / f"merge-lab-ui-{gradio}.png"), full_page=True)
