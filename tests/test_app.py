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
    limits = app.limits_from_args(args, pipe)
    demo = app.build_app(pipe, foi_config, limits, args.model)
    app.launch(demo, "127.0.0.1", args.port, limits, block=False)
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
    named like one), by its name and never a path of the server; the last edit's results stay; the next edit
    still runs and says its size."""
    (tmp_path / "notes.txt").write_text("not a picture")
    page.locator("#picture input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
    page.wait_for_selector(".toast-body:has-text('Invalid file type')", timeout=30_000)

    before = page.locator("#edited img").first.get_attribute("src")  # the FoI edit of the test before
    (tmp_path / "fake.png").write_text("not a picture either")
    fill_and_edit(page, tmp_path / "fake.png", "make the circle blue")
    page.wait_for_selector("#status:has-text('Not edited')", timeout=WAIT_MS)
    status = page.locator("#status").inner_text()
    assert "the upload (fake.png) is not a picture this editor can read" in status and "/" not in status
    assert page.locator(".toast-body:has-text('not a picture this editor can read')").count() >= 1
    assert page.locator("#edited img").first.get_attribute("src") == before  # the results stay
    assert page.locator("#masks img").count() == 2 and page.locator("#plain img").count() == 1

    fill_and_edit(page, EXAMPLE, "make the circle blue")  # plain IP2P: one instruction, no keyword
    page.wait_for_function(
        "before => { const img = document.querySelector('#edited img'); return img && img.src !== before; }",
        arg=before,
        timeout=WAIT_MS,
    )
    assert shown_picture(page, "#edited").size == Image.open(EXAMPLE).size
    assert page.locator("#masks img").count() == 0
    page.wait_for_selector("#status:has-text('Edited at 64 x 64 px')", timeout=30_000)


def painted_layer(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> Image.Image:
    """A brush layer as the canvas exports it: transparent, with ``box`` (left, top, right, bottom) painted."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    if box is not None:
        layer.paste((255, 0, 0, 255), box)
    return layer


def test_brush_layers_are_the_masks_of_their_instructions_and_bad_brushes_are_clear_errors():
    import app

    size = (8, 6)
    layers = [painted_layer(size, (0, 0, 2, 3)), painted_layer(size, (5, 4, 8, 6)), painted_layer(size, None)]
    masks = app.brush_masks(layers, size, 2)
    assert masks.shape == (2, 6, 8) and masks.dtype == np.uint8
    assert masks[0].sum() == 6 and masks[0, :3, :2].all()
    assert masks[1].sum() == 6 and masks[1, 4:, 5:].all()
    # A canvas at another size is brought to the picture's: a pixel is inside when any of its area is painted.
    big = painted_layer((16, 12), (0, 0, 1, 1))
    assert app.brush_masks([big, big], size, 2)[0].sum() == 1
    assert app.brush_masks([painted_layer(size, None)], size, 2) is None  # nothing painted: FoI finds its masks
    assert app.brush_masks([], size, 1) is None
    with pytest.raises(ValueError, match="instruction\\(s\\) 2"):
        app.brush_masks(layers[:1], size, 2)
    with pytest.raises(ValueError, match="brush layer 2 is painted, but there are 1 instruction"):
        app.brush_masks(layers, size, 1)


def test_a_brush_edit_is_the_pipelines_edit_with_those_masks(served, tmp_path):
    """The handler reads the brush's raw value (file records, as the page sends them) through the component: the
    edit equals the pipeline's with the painted layers as ``masks=``, and the masks shown are the painted ones."""
    import dataclasses

    import gradio as gr

    import app

    _, pipe, foi_config = served
    picture = Image.open(EXAMPLE).convert("RGB")
    boxes = [(0, 0, 32, 32), (32, 32, 64, 64)]
    records = []
    for index, box in enumerate(boxes):
        path = tmp_path / f"layer{index}.png"
        painted_layer(picture.size, box).save(path)
        records.append({"path": str(path), "meta": {"_type": "gradio.FileData"}})
    value = {"background": None, "layers": records, "composite": None}
    brush = gr.ImageEditor(type="pil", image_mode="RGBA", render=False)
    edit = app.make_editor(pipe, foi_config, app.Limits(max(picture.size)), brush)
    edited, shown_masks, _, status = edit(
        {"path": str(EXAMPLE)}, FOI_INSTRUCTIONS, value, 2, 7.5, 1.5, 0, foi_config.strength
    )
    assert status == "Edited at 64 x 64 px."

    masks = app.brush_masks([painted_layer(picture.size, box) for box in boxes], picture.size, 2)
    expected = pipe(
        picture,
        instructions=app.parse_instructions(FOI_INSTRUCTIONS),
        foi=dataclasses.replace(foi_config, strength=foi_config.strength),
        masks=[masks],
        num_inference_steps=2,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        seed=0,
        progress=False,
    )
    np.testing.assert_array_equal(np.asarray(edited), np.asarray(expected.images[0]))
    factor = pipe.vae_scale_factor * foi_config.mask_downsample  # the painted boxes fill whole mask cells
    np.testing.assert_array_equal(expected.masks[0]["latent"], masks[:, ::factor, ::factor])
    assert len(shown_masks) == 2

    # A refused request leaves the results as they are (gr.skip()) and says why in the status line.
    refused = edit({"path": str(EXAMPLE)}, FOI_INSTRUCTIONS, {**value, "layers": records[:1]}, 2, 7.5, 1.5, 0, 0.8)
    assert refused[:3] == (gr.skip(),) * 3 and refused[3].startswith("**Not edited:** paint a region for instruction")


def test_uploads_and_requests_beyond_the_limits_are_clear_errors(tmp_path):
    """The checks of one request, without a server: sizes (scaled with both sizes named; too many pixels refused
    from the header, before decoding), the number and length of instructions, and the settings' types and ranges."""
    import app

    limits = app.Limits(max_size=64, max_pixels=10_000_000)
    Image.new("RGB", (3000, 1500), (200, 10, 10)).save(tmp_path / "big.png")
    image, original = app.read_upload({"path": str(tmp_path / "big.png")}, limits)
    assert original == (3000, 1500) and image.size == (64, 32)
    notice = app.edit_notice(original, image.size, (64, 32))
    assert notice == "The upload is 3000 x 1500 px; edited at 64 x 32 px (scaled to the model's size; --max-size)."
    # A PNG that declares 5000 x 5000 px in a few hundred bytes: refused from its header, never decoded.
    Image.new("1", (5000, 5000)).save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"the upload \(bomb.png\) is 5000 x 5000 px; this editor takes at most"):
        app.read_upload({"path": str(tmp_path / "bomb.png")}, app.Limits(64, max_pixels=1_000_000))
    (tmp_path / "fake.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError) as refused:
        app.read_upload({"path": str(tmp_path / "fake.png")}, limits)
    assert str(tmp_path) not in str(refused.value) and "(fake.png)" in str(refused.value)
    for bad in ("a path", 3, {"url": "x"}):
        with pytest.raises(ValueError, match="must be an uploaded file"):
            app.read_upload(bad, limits)
    with pytest.raises(ValueError, match="9 instructions; this editor takes at most 8"):
        app.parse_instructions("\n".join(["make it red"] * 9))
    with pytest.raises(ValueError, match="at most 2000"):
        app.parse_instructions("x" * 5000)
    with pytest.raises(ValueError, match="must be text"):
        app.parse_instructions(["make it red"])
    good = (20, 7.5, 1.5, 0, 0.8)
    assert app.edit_settings(*good)["num_inference_steps"] == 20
    for index, value, message in [
        (0, "20", "steps must be a number"),
        (0, 1000, r"steps must be a whole number in \[1, 100\]"),
        (0, 2.5, "whole number"),
        (1, float("nan"), "text guidance s_T must be a number"),
        (3, -1, "seed must be a whole number"),
        (3, None, "seed must be a number"),
        (4, 0, r"strength must be in \(0, 1\]"),
        (4, True, "strength must be a number"),
    ]:
        settings = list(good)
        settings[index] = value
        with pytest.raises(ValueError, match=message):
            app.edit_settings(*settings)
