"""The web editor (``app.py``) in a real headless browser: Debian's Chromium driven by Playwright, on the shipped
model, as a user reaches it."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
FOI_INSTRUCTIONS = "make the circle blue | circle\nremove the square | square"
WAIT_MS = 300_000  # the first edit of each kind compiles


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """``app.py``'s page on the shipped model (its defaults), served on a free local port."""
    import app

    args = app.parse_args(["--port", str(free_port())])
    pipe, foi_config = app.load_pipeline(args)
    demo = app.build_app(pipe, foi_config, app.native_size(args.model, pipe.vae_scale_factor), args.model)
    app.launch(demo, "127.0.0.1", args.port, block=False)
    yield f"http://127.0.0.1:{args.port}", pipe, foi_config
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "the browser tests need Debian's chromium (apt-get install chromium; .ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served[0])
        page.wait_for_selector("#edit")
        yield page
        browser.close()


def fill_and_edit(page, picture: Path, instructions: str, steps: int = 2) -> None:
    page.locator("#picture input[type=file]").set_input_files(str(picture))
    page.locator("#instructions textarea").fill(instructions)
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#edit").click()


def shown_picture(page, selector: str) -> Image.Image:
    """The picture an image component shows, as the browser fetched it."""
    source = page.locator(f"{selector} img").first.get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB")


def test_an_foi_edit_completes_and_shows_the_edit_masks_and_ip2p(page, served):
    """Two instructions with keywords: the page shows the FoI edit, one mask per keyword and the plain IP2P edit,
    and the edit is the pipeline's own picture, pixel for pixel."""
    _, pipe, foi_config = served
    fill_and_edit(page, EXAMPLE, FOI_INSTRUCTIONS)
    page.wait_for_selector("#plain img", timeout=WAIT_MS)
    page.wait_for_selector("#edited img", timeout=WAIT_MS)
    assert page.locator("#masks img").count() == 2
    import dataclasses

    import app

    subs = app.parse_instructions(FOI_INSTRUCTIONS)
    foi = dataclasses.replace(foi_config, strength=foi_config.strength)
    expected = pipe(
        Image.open(EXAMPLE).convert("RGB"),
        instructions=subs,
        foi=foi,
        num_inference_steps=2,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        seed=0,
        progress=False,
    ).images[0]
    np.testing.assert_array_equal(np.asarray(shown_picture(page, "#edited")), np.asarray(expected))


def test_a_bad_upload_shows_an_error_and_the_app_keeps_serving(page, tmp_path):
    """A file that is not a picture is refused on the page (by the upload's type, or by our reader when it is
    named like one); the next edit still runs."""
    (tmp_path / "notes.txt").write_text("not a picture")
    page.locator("#picture input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
    page.wait_for_selector(".toast-body:has-text('Invalid file type')", timeout=30_000)

    (tmp_path / "fake.png").write_text("not a picture either")
    fill_and_edit(page, tmp_path / "fake.png", "make the circle blue")
    page.wait_for_selector(".toast-body:has-text('not a picture this editor can read')", timeout=WAIT_MS)

    before = page.locator("#edited img").first.get_attribute("src")
    fill_and_edit(page, EXAMPLE, "make the circle blue")  # plain IP2P: one instruction, no keyword
    page.wait_for_function(
        "before => { const img = document.querySelector('#edited img'); return img && img.src !== before; }",
        arg=before,
        timeout=WAIT_MS,
    )
    assert shown_picture(page, "#edited").size == Image.open(EXAMPLE).size
    assert page.locator("#masks img").count() == 0
