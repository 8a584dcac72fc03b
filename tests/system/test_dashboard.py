"""The dashboard at `/` in a real browser (Debian's Chromium, driven by Playwright; no browser
download), against the demo zoo trained here (its five bases, at ZOO_DEMO_SAMPLES=4000) with a path
of each method. Signed in through the link `zoo serve` printed (it works once), and with an API key
typed into the page. It composes a reprogram path through the form (no JSON typed; a bad value
answered at its field), watches its curves, sorts and filters the paths table, opens a path's page
(its confusion matrix is the API's), predicts an uploaded digit and a drawn one (top labels equal the
API's) and two paths side by side, and reads the Server page's charts. A console error on any view
fails the test; so does a serious accessibility violation (axe-core, vendored by .ci/run from npm),
a view wider than a phone's screen, or a nav link that the keyboard cannot follow. Each view's
screenshot is saved under docs/img/ (the README shows them)."""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

from bench.scale import Server
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.methods.reassemble.proxies import DEFAULT_PROXY, PROXIES

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
AXE = ROOT / ".ci" / "node" / "node_modules" / "axe-core" / "axe.min.js"
IMG = ROOT / "docs" / "img"
VIEWS = ("zoo", "datasets", "compose", "jobs", "paths", "predict", "server")
DEMO_SAMPLES = "4000"  # MNIST training images per demo base (the default, 12000, takes minutes here)


def _compose(server: Server, spec: dict) -> str:
    r = server.client.post("/v1/compositions", json=spec)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(server: Server, job_id: str, timeout: float = 600) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = server.client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert job["state"] == "succeeded", job
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def _show(page: Page, view: str) -> None:
    page.evaluate(f"location.hash = '#/{view}'")
    page.wait_for_selector(f"#{view}:not([hidden])")


def _axe(page: Page, where: str) -> list[str]:
    """The serious and critical accessibility violations axe-core finds on the page as it is."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    found = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations")
    return [
        f"{where}: {v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


def _api_top(server: Server, path_id: str, png: bytes) -> str:
    r = server.client.post(f"/v1/paths/{path_id}/predict", files={"files": ("x.png", png, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]["label"]


def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    assert CHROMIUM.exists(), "the browser test drives Debian's chromium: `apt-get install chromium` (.ci/run does)"
    assert AXE.exists(), f"{AXE} is missing: .ci/run installs axe-core from npm into .ci/node"
    digit = tmp_path / "digit.png"
    mnist = BUILTINS["mnist"].make()
    Image.fromarray(mnist.test_x[0, 0]).save(digit)  # a held-out MNIST digit
    IMG.mkdir(parents=True, exist_ok=True)
    server = Server(tmp_path, "mixed", workers=1, ready_s=900, ZOO_DEMO_ZOO="true", ZOO_DEMO_SAMPLES=DEMO_SAMPLES)
    try:
        task = {"dataset": "mnist", "samples_per_label": 60}
        jobs = [
            _compose(server, {"method": "resample", "base": "resnet-mnist", "budget": {"width": 0.5}, "task": task}),
            _compose(
                server,
                {
                    "method": "clone",
                    "base": "resnet-mnist-0-4",
                    "task": {**task, "labels": [str(i) for i in range(10)]},
                    "train": {"epochs": 2, "steps": 20},
                },
            ),
            _compose(
                server,
                {
                    "method": "reassemble",
                    "models": ["resnet-mnist", "vgg-mnist", "mobilenet-mnist"],
                    "task": {"dataset": "mnist", "samples_per_label": 60},
                    "blocks": 2,
                    "train": {"epochs": 2},
                },
            ),
        ]
        made = {job["method"]: job["path_id"] for job in (_wait(server, j) for j in jobs)}
        link = re.search(r"http://\S+/#token=\S+", server.log.read_text(errors="replace")).group(0)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])

            typed = browser.new_page()  # no key yet: it asks; a key typed in works
            typed.goto(server.url + "/")
            typed.wait_for_selector("body[data-loaded=needs-key]", timeout=60_000)
            typed.fill("#api-key", server.key)
            typed.click("#key-button")
            typed.wait_for_selector("body[data-loaded=yes]", timeout=60_000)
            assert "resnet-mnist" in typed.inner_text("#models")
            typed.close()

            page = browser.new_page(viewport={"width": 1280, "height": 900})  # the link zoo serve printed
            errors: list[str] = []
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(link)
            page.wait_for_selector("body[data-loaded=yes]", timeout=60_000)
            assert "#token" not in page.url
            page.add_style_tag(content=".top { position: static }")  # no sticky header across the view's pictures
            again = browser.new_page()
            again.goto(link)
            again.wait_for_selector("body[data-loaded=needs-key]", timeout=60_000)
            assert "used or expired" in again.inner_text("#whoami")
            again.close()

            # zoo and datasets
            for base in ("resnet-mnist", "vgg-mnist", "mobilenet-mnist", "resnet-mnist-0-4", "resnet-mnist-5-9"):
                card = page.inner_text(f"#model-{base}")
                assert "held-out accuracy" in card and "parameters" in card, card
            assert page.locator("#models .taps").count() == 5
            page.locator("main").screenshot(path=IMG / "zoo.png")
            _show(page, "datasets")
            page.wait_for_selector("#dataset-letters .samples[data-loaded=yes]", timeout=30_000)
            letters = page.locator("#dataset-letters .sample figcaption").all_inner_texts()
            assert letters == server.client.get("/v1/datasets/letters/samples?n=16").json()["labels"]
            page.wait_for_function("[...document.querySelectorAll('.samples')].every(g => g.dataset.loaded === 'yes')")
            page.locator("main").screenshot(path=IMG / "datasets.png")

            # compose through the form: a value the server refuses is answered at its field
            _show(page, "compose")
            page.click("#method-reassemble")  # a named choice is a select, its default left out of the JSON
            assert page.eval_on_selector("#f-options-proxy", "e => [e.tagName, e.value]") == ["SELECT", DEFAULT_PROXY]
            assert '"proxy"' not in page.input_value("#spec")
            other = next(p for p in PROXIES if p != DEFAULT_PROXY)
            page.select_option("#f-options-proxy", other)
            assert f'"proxy": "{other}"' in page.input_value("#spec")
            page.click("#method-reprogram")
            page.select_option("#f-base", "resnet-mnist")
            page.select_option("#f-task-dataset", "letters")
            page.click("[data-path='task.labels'] [data-chips=none]")
            for letter in "ABCDE":
                page.click(f"[data-path='task.labels'] button.chip:text-is('{letter}')")
            page.fill("#f-task-samples_per_label", "0")
            assert not errors, errors
            page.click("#compose-button")
            page.wait_for_selector("[data-error-for='task.samples_per_label']:not(:empty)")
            assert [e for e in errors if "status of 422" not in e] == [], errors  # the browser logs the refusal itself
            errors.clear()
            assert "greater than or equal to 1" in page.inner_text("[data-error-for='task.samples_per_label']")
            assert page.get_attribute("#f-task-samples_per_label", "aria-invalid") == "true"
            page.fill("#f-task-samples_per_label", "80")
            page.fill("#f-train-epochs", "4")
            sent = page.input_value("#spec")
            assert '"labels": [\n      "A"' in sent and '"epochs": 4' in sent, sent
            page.click("#compose-button")
            page.wait_for_selector("#compose-job[data-state=succeeded]", timeout=300_000)
            path_id = re.search(r"path (p_[0-9a-f]{32})", page.inner_text("#compose-job-result")).group(1)
            assert int(page.get_attribute("#compose-job-loss .chart", "data-points")) >= 2
            assert "epoch" in page.inner_text("#compose-job-loss")
            assert page.locator("#compose-job-result table.metrics").count() == 1
            page.locator("main").screenshot(path=IMG / "compose.png")
            made["reprogram"] = path_id

            _show(page, "jobs")
            page.wait_for_selector("#jobs-table tr[data-job] >> nth=3")
            page.locator("#jobs-table tr[data-job]").first.click()
            page.wait_for_selector("#job-detail-result table.metrics")
            assert int(page.get_attribute("#job-detail-loss .chart", "data-points")) >= 2  # the curve the server kept
            page.locator("main").screenshot(path=IMG / "jobs.png")

            # paths: every method's, sorted both ways, filtered
            _show(page, "paths")
            for pid in made.values():
                page.wait_for_selector(f"#paths-table tr[data-path='{pid}']")
            assert int(page.get_attribute("#paths-scatter .chart", "data-points")) == 4
            page.click("#paths-table th[data-key=accuracy] button")
            desc = [
                float(v)
                for v in page.locator("#paths-table td[data-value]:nth-child(5)").evaluate_all(
                    "cells => cells.map(c => c.dataset.value)"
                )
            ]
            assert desc == sorted(desc, reverse=True) and len(desc) == 4
            page.click("#paths-table th[data-key=accuracy] button")
            asc = [
                float(v)
                for v in page.locator("#paths-table td[data-value]:nth-child(5)").evaluate_all(
                    "cells => cells.map(c => c.dataset.value)"
                )
            ]
            assert asc == sorted(asc) == sorted(desc)
            page.locator("main").screenshot(path=IMG / "paths.png")
            page.fill("#paths-filter", "resnet-mnist-0-4")
            assert page.locator("#paths-table tbody tr").count() == 1
            page.fill("#paths-filter", "")
            page.select_option("#paths-method", "reassemble")
            assert page.locator("#paths-table tbody tr").count() == 1
            page.select_option("#paths-method", label="all")

            # a path's page: the confusion matrix is the API's
            page.click(f"#paths-table a[href='#/paths/{made['clone']}']")
            page.wait_for_selector("#confusion table.confusion", timeout=60_000)
            dataset = page.input_value("#eval-dataset")
            ev = server.client.get(
                f"/v1/paths/{made['clone']}/evaluation", params={"dataset": dataset, "n": 500}
            ).json()
            assert float(page.get_attribute("#confusion table", "data-accuracy")) == ev["accuracy"]
            assert page.locator("#confusion tbody tr").count() == 10
            page.locator("main").screenshot(path=IMG / "path.png")

            # predict: an uploaded digit, a drawn one, two paths side by side
            _show(page, "predict")
            page.select_option("#predict-path", made["clone"])
            page.select_option("#predict-path-b", made["resample"])
            page.set_input_files("#predict-file", str(digit))
            page.wait_for_selector("#predict-bars[data-top]", timeout=30_000)
            assert page.get_attribute("#predict-bars", "data-top") == _api_top(
                server, made["clone"], digit.read_bytes()
            )
            page.wait_for_selector("#predict-bars-b[data-top]")
            assert page.get_attribute("#predict-bars-b", "data-top") == _api_top(
                server, made["resample"], digit.read_bytes()
            )
            box = page.locator("#draw").bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + 4, box["y"] + box["height"] * 0.8, steps=12)  # a 1
            page.mouse.up()
            page.evaluate("document.querySelector('#predict-bars').removeAttribute('data-top')")
            page.click("#draw-predict")
            page.wait_for_selector("#predict-bars[data-top]", timeout=30_000)
            drawn = page.evaluate("document.querySelector('#draw').toDataURL('image/png')")
            png = base64.b64decode(drawn.split(",", 1)[1])
            assert Image.open(io.BytesIO(png)).getbbox() is not None  # something was drawn
            assert page.get_attribute("#predict-bars", "data-top") == _api_top(server, made["clone"], png)
            page.locator("main").screenshot(path=IMG / "predict.png")

            # server: every chart has points (predicts meanwhile)
            _show(page, "server")
            end, points = time.monotonic() + 60, []
            while time.monotonic() < end:
                _api_top(server, made["reprogram"], digit.read_bytes())
                points = page.locator("#server-charts .chart").evaluate_all("cs => cs.map(c => +c.dataset.points)")
                if len(points) == 6 and min(points) >= 5:  # five intervals: lines, not dots
                    break
                time.sleep(0.5)
            assert len(points) == 6 and min(points) >= 5, points
            page.locator("main").screenshot(path=IMG / "server.png")

            # keyboard, accessibility, phone width
            page.focus("nav a[href='#/paths']")
            page.keyboard.press("Enter")
            page.wait_for_selector("#paths:not([hidden])")
            violations = []
            for view in (*VIEWS, f"paths/{made['clone']}"):
                page.evaluate(f"location.hash = '#/{view}'")
                page.wait_for_selector(f"#{'path' if '/' in view else view}:not([hidden])")
                page.wait_for_timeout(300)
                violations += _axe(page, view)
            assert not violations, "\n".join(violations)
            page.set_viewport_size({"width": 390, "height": 844})
            wide = []
            for view in VIEWS:
                _show(page, view)
                page.wait_for_timeout(200)
                if page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1"):
                    wide.append(view)
            assert not wide, f"wider than a phone: {wide}"
            assert not errors, errors

            with page.expect_download() as download:
                _show(page, "paths")
                page.click(f"#paths-table tr[data-path='{path_id}'] button.bundle")
            assert Path(download.value.path()).read_bytes() == server.client.get(f"/v1/paths/{path_id}/bundle").content
            browser.close()
    finally:
        server.close()
