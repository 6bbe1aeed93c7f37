"""A web editor: InstructPix2Pix and Focus on Your Instruction in the browser (Gradio).

    python app.py                                   # the shipped ShapesEdit model, http://127.0.0.1:7860
    python app.py --model timbrooks/instruct-pix2pix --share

Upload a picture and write an instruction. Several instructions, one per line, edit at once with FoI; a line
``instruction | keyword`` names the region word FoI localises (``| keyword | alpha`` also its attention boost). Or
paint the regions yourself: the brush shows the uploaded picture, and layer ``k`` is instruction ``k``'s region (used
as FoI's masks in place of the ones it finds; clear every layer to go back to them). The edit, FoI's masks over the
input and the plain IP2P edit (the instructions joined, same steps and seed) are shown side by side. Requests wait in
one queue and run one at a time on one pipeline, whose compiled samplers they share: the first edit of a picture size
and settings compiles (seconds to a minute), the next ones run at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

# No usage reports to Gradio's servers (set GRADIO_ANALYTICS_ENABLED=True to send them): the editor works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "shapes-ip2p"
EXAMPLE = Path(__file__).resolve().parent / "examples" / "shapes.png"
FALLBACK_SIZE = 512  # px: the longer side uploads are brought to when the model folder does not say
# What one request may ask for (each a flag); beyond, a clear message and no edit.
MAX_UPLOAD_MB = 20  # bytes of an upload, refused by Gradio before it is stored
MAX_PIXELS = 40_000_000  # an upload's width x height, read from its header: a decompression bomb is never decoded
MAX_INSTRUCTIONS = 8  # sub-instructions of one edit (each costs a text branch or a mask)
MAX_INSTRUCTION_CHARS = 2000  # the instruction box (CLIP reads 77 tokens per instruction anyway)
MAX_STEPS = 100
QUEUE_SIZE = 32  # requests waiting; one more is answered "busy" at once
# Small pictures (the shipped model's are 64 px) are shown enlarged with their pixels kept sharp.
CSS = (
    "#picture img, #edited img, #plain img {width: 100%; height: 100%; object-fit: contain} "
    "#picture img, #edited img, #plain img, #masks img {image-rendering: pixelated}"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="diffusers folder, hub repo id or single-file checkpoint (default: the shipped ShapesEdit model)",
    )
    parser.add_argument("--model-config", default=None, help="for a single file: its diffusers config folder or repo")
    parser.add_argument("--allow-pickle", action="store_true", help="read a .ckpt single file (trusted files only)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="uploads are scaled so their longer side is at most this many px (default: the model's native size)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    limits = parser.add_argument_group("Limits of one request (beyond them, a message on the page and no edit)")
    limits.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help=f"(default: {MAX_UPLOAD_MB})")
    limits.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"an upload's width x height, checked before it is decoded (default: {MAX_PIXELS})",
    )
    limits.add_argument(
        "--max-instructions", type=int, default=MAX_INSTRUCTIONS, help=f"per edit (default: {MAX_INSTRUCTIONS})"
    )
    limits.add_argument(
        "--queue-size",
        type=int,
        default=QUEUE_SIZE,
        help=f"requests that may wait; beyond, a 'busy' answer (default: {QUEUE_SIZE})",
    )
    return parser.parse_args(argv)


def load_pipeline(args):
    """The pipeline and its FoI settings (``pipe.foi_config``: the model folder's ``foi_config.json``, else the
    paper's)."""
    import jax.numpy as jnp

    from ip2p_jax.pipeline import InstructPix2PixPipeline

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if Path(args.model).is_file():
        pipe = InstructPix2PixPipeline.from_single_file(
            args.model, config=args.model_config, allow_pickle=args.allow_pickle, dtype=dtype
        )
    else:
        pipe = InstructPix2PixPipeline.from_pretrained(args.model, dtype=dtype)
    return pipe, pipe.foi_config


def shown_name(model: str) -> str:
    """The model as the page names it: a path inside this repository relative to it."""
    try:
        return str(Path(model).resolve().relative_to(DEFAULT_MODEL.parents[1]))
    except ValueError:
        return model


def native_size(model: str, vae_scale_factor: int) -> int:
    """The picture size a local model folder was trained at (its UNet's ``sample_size`` latents), else 512."""
    config = Path(model) / "unet" / "config.json"
    if config.is_file():
        sample_size = json.loads(config.read_text()).get("sample_size")
        if isinstance(sample_size, int):
            return sample_size * vae_scale_factor
    return FALLBACK_SIZE


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for: the longer side uploads are scaled to (``max_size`` px), an upload's bytes
    and pixels, the sub-instructions of one edit, and the requests that may wait."""

    max_size: int
    max_upload_mb: float = MAX_UPLOAD_MB
    max_pixels: int = MAX_PIXELS
    max_instructions: int = MAX_INSTRUCTIONS
    queue_size: int = QUEUE_SIZE


def parse_instructions(text, max_instructions: int = MAX_INSTRUCTIONS) -> list:
    """The instruction box: one sub-instruction per non-empty line, ``text [| keyword [| alpha]]``; at most
    ``max_instructions`` lines and ``MAX_INSTRUCTION_CHARS`` characters."""
    from ip2p_jax.foi import SubInstruction

    if text is not None and not isinstance(text, str):
        raise ValueError(f"the instructions must be text, got {type(text).__name__}")
    text = text or ""
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"the instructions are {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
    subs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"line {number}: write 'instruction', 'instruction | keyword' or add '| alpha'")
        keyword = parts[1] if len(parts) > 1 and parts[1] else None
        try:
            alpha = float(parts[2]) if len(parts) > 2 else 1.0
        except ValueError:
            raise ValueError(f"line {number}: alpha must be a number, got {parts[2]!r}") from None
        subs.append(SubInstruction(parts[0], keyword, alpha))
    if not subs:
        raise ValueError("write an instruction")
    if len(subs) > max_instructions:
        raise ValueError(f"{len(subs)} instructions; this editor takes at most {max_instructions} per edit")
    return subs


def edit_settings(steps, guidance_scale, image_guidance_scale, seed, strength) -> dict:
    """The sliders' and boxes' values as the pipeline's arguments, each checked (a request through the API can
    send anything): ``ValueError`` naming the setting."""

    def number(name: str, value, low: float, high: float, integer: bool = False):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not low <= value <= high or (integer and value != int(value)):
            kind = "a whole number" if integer else "a number"
            raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")
        return int(value) if integer else float(value)

    if isinstance(strength, int | float) and not isinstance(strength, bool) and strength <= 0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    return dict(
        num_inference_steps=number("steps", steps, 1, MAX_STEPS, integer=True),
        guidance_scale=number("text guidance s_T", guidance_scale, 0, 100),
        image_guidance_scale=number("image guidance s_I", image_guidance_scale, 0, 100),
        seed=number("seed", seed, 0, 2**32 - 1, integer=True),
        strength=number("strength", strength, 0, 1),
    )


def read_upload(upload, limits: Limits):
    """The uploaded file (Gradio's file record) as an RGB picture whose longer side is at most ``limits.max_size``
    px, and the size it had ``(W, H)``. The pixel count is read from the file's header and checked before the
    picture is decoded. Messages name the upload by its file name, never a path of the server."""
    from PIL import Image, UnidentifiedImageError

    if upload is None:
        raise ValueError("upload a picture")
    if not isinstance(upload, dict) or not isinstance(upload.get("path"), str):
        raise ValueError("the picture must be an uploaded file")
    path = upload["path"]
    name = Path(path).name
    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise ValueError(
                    f"the upload ({name}) is {width} x {height} px; this editor takes at most "
                    f"{limits.max_pixels:,} pixels"
                )
            image = opened.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"the upload ({name}) declares more pixels than this editor decodes") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError(
            f"the upload ({name}) is not a picture this editor can read (PNG, JPEG, WebP, GIF, BMP, TIFF)"
        ) from None
    original = image.size
    if max(image.size) > limits.max_size:
        scale = limits.max_size / max(image.size)
        new_size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        image = image.resize(new_size, Image.LANCZOS)
    return image, original


def brush_masks(layers: list, size: tuple[int, int], count: int):
    """The brush's layers as FoI's masks: ``(count, H, W)`` uint8 at the picture's ``size`` ``(W, H)``, layer ``k``'s
    painted pixels (alpha > 0; a pixel is inside when any of its area is painted) instruction ``k``'s region. ``None``
    when nothing is painted: FoI finds its own masks."""
    import numpy as np
    from PIL import Image

    painted = [np.asarray(layer.convert("RGBA").getchannel("A").resize(size, Image.BOX)) > 0 for layer in layers]
    used = [k for k, mask in enumerate(painted) if mask.any()]
    if not used:
        return None
    if used[-1] >= count:
        raise ValueError(
            f"brush layer {used[-1] + 1} is painted, but there are {count} instruction(s): layer k is instruction k"
        )
    missing = [k + 1 for k in range(count) if k not in used]
    if missing:
        raise ValueError(
            f"paint a region for instruction(s) {', '.join(map(str, missing))} (brush layer k is instruction k), or "
            "clear every layer to let FoI find the masks"
        )
    return np.stack(painted[:count]).astype(np.uint8)


def make_editor(pipe, foi_config, limits: Limits, brush=None):
    """The request handler: ``(upload, instructions, brush, steps, s_T, s_I, seed, strength) -> (edit, masks, IP2P
    edit, status)``; ``brush`` is the page's ``gr.ImageEditor`` (its raw value is read through it). A request the
    editor refuses (a bad upload, instruction or setting, a limit passed) leaves the last edit's results on the
    page, says why in the status line and a notice, and is one line in the server's log; the server keeps
    serving."""
    import gradio as gr

    def painted_layers(value) -> list:
        if not value or brush is None:
            return []
        from gradio.components.image_editor import EditorData

        return brush.preprocess(EditorData.model_validate(value))["layers"]

    def edit(upload, instructions, painted, steps, guidance_scale, image_guidance_scale, seed, strength):
        # The event skips Gradio's preprocessing (``preprocess=False``): the upload arrives as its file record,
        # and a file that is not a picture gets this editor's message rather than a failed component.
        try:
            settings = edit_settings(steps, guidance_scale, image_guidance_scale, seed, strength)
            image, original_size = read_upload(upload, limits)
            subs = parse_instructions(instructions, limits.max_instructions)
            masks = brush_masks(painted_layers(painted), image.size, len(subs))
            edited, shown_masks, plain = run_edit(pipe, foi_config, image, subs, masks, settings)
        except (ValueError, TypeError) as error:  # also a malformed brush value (pydantic's errors are ValueErrors)
            message = str(error).splitlines()[0]
            print(f"app.py: edit refused: {message}", file=sys.stderr)
            gr.Warning(message)
            return gr.skip(), gr.skip(), gr.skip(), f"**Not edited:** {message}"
        return edited, shown_masks, plain, edit_notice(original_size, image.size, edited.size)

    return edit


def run_edit(pipe, foi_config, image, subs: list, masks, settings: dict):
    """One edit: plain IP2P for one instruction with no keyword and no painted region, else FoI (with the IP2P edit
    of the instructions joined beside it). Returns ``(edit, [(mask over the picture, caption)], IP2P edit)``."""
    from ip2p_jax.foi import composite_prompt
    from ip2p_jax.visualisation import mask_overlay

    settings = dict(settings)
    strength = settings.pop("strength")
    if len(subs) == 1 and subs[0].keyword is None and masks is None:
        return pipe(image, subs[0].text, strength=strength, progress=False, **settings).images[0], [], None
    foi = dataclasses.replace(foi_config, strength=strength)
    given = None if masks is None else [masks]
    result = pipe(image, instructions=subs, foi=foi, masks=given, progress=False, **settings)
    plain = pipe(image, composite_prompt(subs)[0], strength=strength, progress=False, **settings).images[0]
    edited = result.images[0]
    base = image.resize(edited.size) if image.size != edited.size else image
    shown = [
        (mask_overlay(base, mask), sub.keyword or sub.text)
        for mask, sub in zip(result.masks[0]["image"], subs, strict=True)
    ]
    return edited, shown, plain


def edit_notice(original: tuple[int, int], scaled: tuple[int, int], edited: tuple[int, int]) -> str:
    """The status line after an edit: the sizes when the picture was scaled to the model's size or its sides cut
    to whole latent cells."""
    if original == edited:
        return f"Edited at {edited[0]} x {edited[1]} px."
    why = " (scaled to the model's size; --max-size)" if original != scaled else ""
    return f"The upload is {original[0]} x {original[1]} px; edited at {edited[0]} x {edited[1]} px{why}."


def brush_background(upload, limits: Limits):
    """The uploaded picture as the brush's canvas, at the size the edit will use (``None``: clear it; a file that is
    not a picture is left to the edit's message)."""
    try:
        return read_upload(upload, limits)[0]
    except ValueError:
        return None


def build_app(pipe, foi_config, limits: Limits, model_name: str):
    """The page: inputs on the left, the edit, FoI's masks and the IP2P edit on the right."""
    try:
        import gradio as gr
    except ImportError as error:
        raise SystemExit("app.py needs Gradio: pip install -e '.[app]'") from error

    with gr.Blocks(title="ip2p_jax editor") as app:
        gr.Markdown(
            f"## Instruction-based editing\nModel: `{model_name}`. One instruction per line; with several, or with "
            "`instruction | keyword`, Focus on Your Instruction edits each in its own region."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="picture", type="filepath", elem_id="picture", height=320)
                instructions = gr.Textbox(
                    label="instructions",
                    lines=3,
                    placeholder="make the circle blue | circle\nremove the square | square",
                    elem_id="instructions",
                )
                brush = gr.ImageEditor(
                    label="your own regions (optional): brush layer k is instruction k",
                    type="pil",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    elem_id="brush",
                    height=320,
                )
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps", elem_id="steps")
                    strength = gr.Slider(
                        0.05, 1.0, value=foi_config.strength, step=0.05, label="strength (1: start from noise)"
                    )
                with gr.Row():
                    guidance = gr.Number(value=7.5, label="text guidance s_T")
                    image_guidance = gr.Number(value=1.5, label="image guidance s_I")
                    seed = gr.Number(value=0, precision=0, label="seed")
                run = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                edited = gr.Image(
                    label="edit", type="pil", format="png", elem_id="edited", interactive=False, height=320
                )
                status = gr.Markdown(elem_id="status")
                masks = gr.Gallery(label="FoI masks", elem_id="masks", columns=4, height="auto")
                plain = gr.Image(
                    label="IP2P (instructions joined)",
                    type="pil",
                    format="png",
                    elem_id="plain",
                    interactive=False,
                    height=320,
                )
        edit = make_editor(pipe, foi_config, limits, brush)
        inputs = [image, instructions, brush, steps, guidance, image_guidance, seed, strength]
        run.click(edit, inputs, [edited, masks, plain, status], api_name="edit", preprocess=False)
        image.change(lambda upload: brush_background(upload, limits), image, brush, preprocess=False)
        if EXAMPLE.is_file():
            gr.Examples(
                [[str(EXAMPLE), "make the circle blue | circle\nremove the square | square"]], [image, instructions]
            )
    # One worker: requests share the pipeline and its compiled samplers, and wait their turn.
    app.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return app


def main(argv=None) -> int:
    args = parse_args(argv)
    from ip2p_jax.weights import CheckpointError

    try:
        pipe, foi_config = load_pipeline(args)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    limits = limits_from_args(args, pipe)
    app = build_app(pipe, foi_config, limits, shown_name(args.model))
    launch(app, args.host, args.port, limits, share=args.share)
    return 0


def limits_from_args(args, pipe) -> Limits:
    """The flags' limits; the longer side of uploads: ``--max-size``, else the model's native size."""
    max_size = args.max_size or native_size(args.model_config or args.model, pipe.vae_scale_factor)
    return Limits(max_size, args.max_upload_mb, args.max_pixels, args.max_instructions, args.queue_size)


def launch(app, host: str, port: int, limits: Limits, *, share: bool = False, block: bool = True) -> None:
    """Serves the page (``block=False`` returns once it is up, for tests), refusing uploads over
    ``limits.max_upload_mb``."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        css=CSS,
        prevent_thread_lock=True,
        quiet=True,  # Gradio's own lines would point to share=True; ours name the flag
        max_file_size=f"{int(limits.max_upload_mb * 1024)}kb",
    )
    if block:
        public = f" and {app.share_url}" if share else " (--share also serves through a public link)"
        print(f"serving on {app.local_url}{public}; Ctrl-C stops", file=sys.stderr)
        app.block_thread()


if __name__ == "__main__":
    sys.exit(main())
