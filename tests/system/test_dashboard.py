"""The dashboard at `/` in a real browser (Debian's Chromium, driven by Playwright; no browser
download): sign in through the link `zoo serve` printed (it works once), then with an API key typed
into the page; compose a small reprogram path from the form and watch it finish, predict an uploaded
PNG and read the top label, download a bundle. Each view's screenshot is saved under docs/img/ (the
README shows them). The zoo here is one small ResNet with random weights, so the accuracies in the
pictures are chance."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from bench.common import dir_store
from bench.scale import Server
from tests.conftest import tiny_card, tiny_weights
from zoo_store.datasets.builtin import BUILTINS

CHROMIUM = Path("/usr/bin/chromium")
IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    assert CHROMIUM.exists(), "the browser test drives Debian's chromium: `apt-get install chromium` (.ci/run does)"
    dir_store(tmp_path).add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    image = tmp_path / "digit.png"
    Image.fromarray(BUILTINS["digits"].make().test_x[0, 0]).save(image)  # a held-out digit
    IMG.mkdir(parents=True, exist_ok=True)
    server = Server(tmp_path, "mixed", workers=1)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            link = re.search(r"http://\S+/#token=\S+", server.log.read_text(errors="replace")).group(0)
            signed = browser.new_page()  # the link zoo serve printed signs a browser in, once
            signed.goto(link)
            signed.wait_for_selector("body[data-loaded=yes]", timeout=60_000)
            assert "#token" not in signed.url and "resnet_s" in signed.inner_text("#models")
            again = browser.new_page()
            again.goto(link)
            again.wait_for_selector("body[data-loaded=needs-key]", timeout=60_000)
            assert "used or expired" in again.inner_text("#whoami")
            page = browser.new_page(viewport={"width": 1100, "height": 800})  # a key typed in works too
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-loaded=needs-key]", timeout=60_000)  # no key yet: it asks
            assert "needs an API key" in page.inner_text("#whoami")
            page.fill("#api-key", server.key)
            page.click("#key-button")
            page.wait_for_selector("body[data-loaded=yes]", timeout=60_000)
            assert "resnet_s" in page.inner_text("#models") and "digits" in page.inner_text("#datasets-table")
            page.wait_for_function(
                "[...document.querySelectorAll('#datasets-table img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.locator("#zoo").screenshot(path=IMG / "zoo.png")
            page.locator("#datasets").screenshot(path=IMG / "datasets.png")

            spec = {
                "method": "reprogram",
                "base": "res",
                "task": {"dataset": "digits", "samples_per_label": 20},
                "train": {"epochs": 2, "seed": 0},
            }
            page.select_option("#method", "reprogram")
            page.fill("#spec", json.dumps(spec))
            page.click("#compose-button")
            page.wait_for_selector("#job-state.state-succeeded", timeout=180_000)
            path_id = re.search(r"path (p_[0-9a-f]{32})", page.inner_text("#job-result")).group(1)
            page.locator("#compose").screenshot(path=IMG / "compose.png")
            assert path_id in page.inner_text("#paths-table") and path_id in page.inner_text("#jobs-table")
            page.locator("#paths").screenshot(path=IMG / "paths.png")

            page.select_option("#predict-path", path_id)
            page.set_input_files("#predict-file", str(image))
            page.wait_for_selector("#predict-bars[data-top]", timeout=30_000)
            top = page.get_attribute("#predict-bars", "data-top")
            with image.open("rb") as f:
                want = server.client.post(f"/v1/paths/{path_id}/predict", files={"files": f}).json()
            assert top == want["predictions"][0]["label"]
            page.locator("#predict").screenshot(path=IMG / "predict.png")

            with page.expect_download() as download:
                page.click(f"#paths-table tr:has-text('{path_id}') a.bundle")
            assert Path(download.value.path()).read_bytes() == server.client.get(f"/v1/paths/{path_id}/bundle").content
            browser.close()
    finally:
        server.close()
