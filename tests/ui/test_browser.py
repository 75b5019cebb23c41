"""One real browser session: headless Debian Chromium driven by Playwright types a prompt and clicks Generate."""
import os
import shutil
from pathlib import Path

import pytest

from hyperreal import services

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
def test_generate_in_a_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    url, settings = app_url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                           "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside = []
            # The page must work offline: record and refuse anything that is not the app itself.
            page.route(lambda u: not u.startswith(url.rstrip("/")),
                       lambda route: (outside.append(route.request.url), route.abort()))
            # Not "networkidle": in CI the page never went 500 ms without traffic within 30 s; wait for the
            # prompt box itself instead.
            page.goto(url, wait_until="domcontentloaded", timeout=90_000)
            box = page.locator("#prompt textarea")
            box.wait_for(state="visible", timeout=60_000)
            box.fill("a yellow triangle on the right")
            page.locator("#generate-button").click()
            img = page.locator("#gallery img").first
            img.wait_for(state="visible", timeout=60_000)
            page.wait_for_timeout(500)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            src = img.get_attribute("src")
            assert src and ".png" in src
            # "Prompt in your language": an example in the bridge tab fills Generate's prompt and turns the bridge on
            example = services.bridge_examples("tiny")[0]
            page.get_by_role("tab", name="Encoder bridge").click()
            page.get_by_text(example, exact=True).first.click()
            page.get_by_role("tab", name="Generate").click()
            box.wait_for(state="visible", timeout=30_000)
            for _ in range(60):  # the example fills the box through the server (slow while the cores are busy)
                if box.input_value() == example:
                    break
                page.wait_for_timeout(250)
            assert box.input_value() == example
            page.locator("#generate-button").click()
            info = page.get_by_label("Parameters of the selected image")
            for _ in range(120):  # the new image's parameters name the bridge (as escaped JSON)
                if "tiny-bridge" in info.input_value() and example in info.input_value():
                    break
                page.wait_for_timeout(500)
            assert "tiny-bridge" in info.input_value() and info.input_value().startswith(example), info.input_value()
            # switching an adapter on moves Generate's guidance to the tiny base's for adapters (5 -> 2)
            guidance = page.locator("#guidance input[type=number]")
            assert float(guidance.input_value()) == 5.0
            page.get_by_role("tab", name="Adapters").click()
            path = page.locator("#adapter-path-0 input")
            path.fill("my_lora.safetensors")
            path.press("Enter")
            page.locator("#adapter-on-0 input").check()
            page.get_by_role("tab", name="Generate").click()
            for _ in range(60):
                if float(guidance.input_value()) == 2.0:
                    break
                page.wait_for_timeout(500)
            assert float(guidance.input_value()) == 2.0
            # picking the base again resets Generate to the base's defaults, and with the adapter still on that
            # is the base's guidance for adapters (2), not its own (5)
            picker = page.locator("#base-model input")
            picker.fill("tiny")
            picker.press("Enter")
            page.wait_for_timeout(3000)  # the switch and the step after it (a reset to 5 would show by then)
            assert float(guidance.input_value()) == 2.0
        finally:
            browser.close()
    assert not outside, f"the page asked for outside resources: {outside[:5]}"
    assert shot.stat().st_size > 10_000
    assert len(list(settings.outputs.glob("*.png"))) >= 1
    if os.environ.get("HYPERREAL_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "app.png")
