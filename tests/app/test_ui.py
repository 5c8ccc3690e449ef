"""The page in a real browser: headless Chromium (the distribution's package) driven by Playwright, against
``python -m realign_pipeline.app`` started on a free loopback port.

One session drafts, realigns (both passes' progress bars show), tries a caption that is not in the prompt,
renames, deletes, paints a region, adds a box, changes the re-weighting, realigns again, downloads the layout file
and saves a screenshot; a second session starts empty and restores that file without touching the first.
``REALIGN_APP_SCREENSHOT`` names where the screenshot goes (``docs/app-screenshot.png`` for the README); by
default a temporary folder.
"""

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.app.app_process import start_app, stop_app

PROMPT = "a yellow triangle and a blue circle"


def chromium_path() -> str | None:
    """The system Chromium (Debian: ``apt-get install chromium``), or ``$REALIGN_CHROMIUM``."""
    candidates = [os.environ.get("REALIGN_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.fixture(scope="module")
def browser_path() -> str:
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]' (make test installs it)")
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (make test installs it)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (make test tries), or set REALIGN_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def app_url(browser_path, tmp_path_factory):
    process, url = start_app(tmp_path_factory.mktemp("app") / "app.log")
    try:
        yield url
    finally:
        stop_app(process)


def status_contains(page, text: str, timeout: float = 120_000) -> None:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=timeout
    )


def shown_image(page, element_id: str) -> np.ndarray:
    """The pixels of the image an output component shows, fetched from the page's own URL."""
    source = page.locator(f"#{element_id} img").first.get_attribute("src")
    response = page.request.get(source)
    assert response.ok, source
    return np.asarray(PIL.Image.open(io.BytesIO(response.body())).convert("RGB"), dtype=np.int16)


# Records every pipeline progress bar the page shows (gr.Progress tracking the pipeline's tqdm bars).
WATCH_PROGRESS = """() => {
    window.progressSeen = new Set();
    new MutationObserver(records => {
        for (const record of records) {
            for (const label of (record.target.textContent || "").match(/RealignDiff (coarse|fine) pass/g) || []) {
                window.progressSeen.add(label);
            }
        }
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def progress_seen(page) -> set[str]:
    return set(page.evaluate("[...window.progressSeen]"))


def pick_region(page, label: str) -> None:
    page.click("#region-pick input")
    page.get_by_role("option", name=label).click()


def set_number(page, element_id: str, value: str) -> None:
    field = page.locator(f"#{element_id} input[type=number]").first
    field.fill(value)
    field.press("Enter")


@pytest.mark.browser
def test_draft_edit_realign_download_and_restore_in_a_browser(browser_path, app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1400, "height": 1900}, accept_downloads=True).new_page()
        page.goto(app_url)
        page.wait_for_selector("#draft")
        assert page.input_value("#prompt textarea") == PROMPT
        set_number(page, "steps", "16")
        page.evaluate(WATCH_PROGRESS)

        # Draft: the coarse pass and the grounder's regions.
        page.click("#draft")
        status_contains(page, "2 region(s) proposed")
        table = page.inner_text("#regions-table")
        assert "a yellow triangle\tshapes-palette" in table and "a blue circle\tshapes-palette" in table
        assert page.locator("#regions-view img").count() >= 1
        assert "RealignDiff coarse pass" in progress_seen(page)

        # Realign the proposed layout: the judge speaks about both images.
        page.click("#realign")
        status_contains(page, "Realigned with 2 region(s)")
        proposed_final = shown_image(page, "final-result")
        assert "RealignDiff fine pass" in progress_seen(page)
        verdicts = page.inner_text("#verdicts")
        assert "coarse:" in verdicts and "final:" in verdicts

        # A caption whose words are not in the prompt: the pipeline's message, nothing else changes.
        page.fill("#rename-caption textarea", "a purple cat")
        page.click("#rename")
        status_contains(page, "its words ['purple', 'cat'] are not in the prompt")
        assert "Traceback" not in page.content()
        assert page.inner_text("#regions-table") == table
        assert np.array_equal(shown_image(page, "final-result"), proposed_final)

        # Rename region 1, delete region 2.
        page.fill("#rename-caption textarea", "the yellow triangle")
        page.click("#rename")
        status_contains(page, "Region 1 is now 'the yellow triangle'")
        pick_region(page, "2: a blue circle (shapes-palette)")
        page.click("#delete")
        status_contains(page, "Deleted region 2")
        assert "a blue circle" not in page.inner_text("#regions-table")

        # Paint a region with one mouse drag on the canvas, then replace it by a box.
        page.fill("#add-caption textarea", "a blue circle")
        page.click("#editor button[aria-label='Brush']")
        canvas = page.locator("#editor canvas").first.bounding_box()
        x, y = canvas["x"] + canvas["width"] / 2 - 80, canvas["y"] + canvas["height"] / 2 - 80
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(x + 6 * step, y + 4 * step, steps=2)
        page.mouse.up()
        page.click("#add-drawn")
        status_contains(page, "Added region 2 'a blue circle' (drawn)")
        assert "a blue circle\tdrawn" in page.inner_text("#regions-table")
        pick_region(page, "2: a blue circle (drawn)")
        page.click("#delete")
        status_contains(page, "Deleted region 2")
        for name, value in (("x0", "4"), ("y0", "4"), ("x1", "28"), ("y1", "28")):
            page.fill(f"#box-{name} input", value)
        page.click("#add-box")
        status_contains(page, "Added region 2 'a blue circle' (box)")

        # Stronger re-weighting, then the fine pass from the same noise with the edited layout.
        set_number(page, "modulation-fraction", "1")
        set_number(page, "cross-weight", "2")
        page.click("#realign")
        status_contains(page, "Realigned with 2 region(s)")
        page.wait_for_timeout(500)
        edited_final = shown_image(page, "final-result")
        changed = np.abs(edited_final - proposed_final).max(axis=-1)
        assert (changed > 60).mean() > 0.02, "the edited layout left the final image as it was"

        # The layout file holds the edits.
        with page.expect_download() as download_info:
            page.locator("#downloads a[download='layout.json']").click()
        layout_file = tmp_path / "layout.json"
        download_info.value.save_as(layout_file)
        record = json.loads(layout_file.read_text())
        assert record["prompt"] == PROMPT and record["num_inference_steps"] == 16
        assert [(r["caption"], r["source"]) for r in record["regions"]] == [
            ("the yellow triangle", "shapes-palette"),
            ("a blue circle", "box"),
        ]
        box = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(record["regions"][1]["mask_png"]))))
        expected = np.zeros((64, 64), dtype=bool)
        expected[4:28, 4:28] = True
        assert np.array_equal(box >= 128, expected)
        assert record["realign"]["modulation_fraction"] == 1.0 and record["realign"]["cross_attention_weight"] == 2.0

        screenshot = Path(os.environ.get("REALIGN_APP_SCREENSHOT", tmp_path / "app-screenshot.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        first_table = page.inner_text("#regions-table")

        # A second session starts with no layout, restores the file, and its edits stay its own.
        other = browser.new_context(viewport={"width": 1400, "height": 1900}).new_page()
        other.goto(app_url)
        other.wait_for_selector("#draft")
        assert "No layout yet" in other.inner_text("#regions-table")
        with other.expect_file_chooser() as chooser:
            other.click("#upload")
        chooser.value.set_files(str(layout_file))
        status_contains(other, "Restored a layout of 2 region(s)")
        assert other.inner_text("#regions-table") == first_table
        assert other.input_value("#steps input") == "16"
        other.click("#delete")  # region 1 of the second session only
        status_contains(other, "Deleted region 1")
        assert "the yellow triangle" not in other.inner_text("#regions-table")
        assert page.inner_text("#regions-table") == first_table
        browser.close()


def test_a_failing_handler_changes_nothing_but_the_status_line():
    gr = pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")
    from realign_pipeline.app.ui import _page_errors

    def bad_input(view):
        raise ValueError("`caption`: the words ['cat'] are not in the prompt")

    def broken(view):
        raise RuntimeError("boom")

    with pytest.warns(UserWarning):  # gr.Warning outside a request is a Python warning
        outputs = _page_errors(bad_input, 3, 1)(None)
    assert outputs[1] == "**Not changed:** `caption`: the words ['cat'] are not in the prompt"
    assert [type(o) for o in (outputs[0], outputs[2])] == [type(gr.skip())] * 2
    with pytest.warns(UserWarning):
        outputs = _page_errors(broken, 2, 0)(None)
    assert outputs[0] == "**Not changed:** RuntimeError: boom (the server log has the details)"
