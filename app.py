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
import json
import os
import sys
from pathlib import Path

# No usage reports to Gradio's servers (set GRADIO_ANALYTICS_ENABLED=True to send them): the editor works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "shapes-ip2p"
EXAMPLE = Path(__file__).resolve().parent / "examples" / "shapes.png"
FALLBACK_SIZE = 512  # px: the longer side uploads are brought to when the model folder does not say
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
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    return parser.parse_args(argv)


def load_pipeline(args):
    """The pipeline and its FoI settings (the model folder's ``foi_config.json``, else the paper's)."""
    import jax.numpy as jnp

    from ip2p_jax.foi import FoIConfig
    from ip2p_jax.pipeline import InstructPix2PixPipeline

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if Path(args.model).is_file():
        pipe = InstructPix2PixPipeline.from_single_file(
            args.model, config=args.model_config, allow_pickle=args.allow_pickle, dtype=dtype
        )
        return pipe, FoIConfig.for_model(args.model_config or args.model)
    return InstructPix2PixPipeline.from_pretrained(args.model, dtype=dtype), FoIConfig.for_model(args.model)


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


def parse_instructions(text: str) -> list:
    """The instruction box: one sub-instruction per non-empty line, ``text [| keyword [| alpha]]``."""
    from ip2p_jax.foi import SubInstruction

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
    return subs


def read_upload(path: str | None, max_size: int):
    """The uploaded file as an RGB picture whose longer side is at most ``max_size`` px."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise ValueError("upload a picture")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"the upload is not a picture this editor can read ({Path(path).name}): {error}") from None
    if max(image.size) > max_size:
        scale = max_size / max(image.size)
        image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.LANCZOS)
    return image


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


def make_editor(pipe, foi_config, max_size: int, brush=None):
    """The request handler: ``(upload, instructions, brush, steps, s_T, s_I, seed, strength) -> (edit, masks, IP2P
    edit)``; ``brush`` is the page's ``gr.ImageEditor`` (its raw value is read through it). Errors reach the page as
    ``gr.Error`` messages; the server keeps serving."""
    import dataclasses

    import gradio as gr

    from ip2p_jax.foi import composite_prompt
    from ip2p_jax.visualisation import mask_overlay

    def painted_layers(value) -> list:
        if not value or brush is None:
            return []
        from gradio.components.image_editor import EditorData

        return brush.preprocess(EditorData.model_validate(value))["layers"]

    def edit(upload, instructions, painted, steps, guidance_scale, image_guidance_scale, seed, strength):
        # The event skips Gradio's preprocessing (``preprocess=False``): the upload arrives as its file record,
        # and a file that is not a picture gets this editor's message rather than a failed component.
        try:
            image = read_upload(None if upload is None else upload["path"], max_size)
            subs = parse_instructions(instructions or "")
            masks = brush_masks(painted_layers(painted), image.size, len(subs))
            common = dict(
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                image_guidance_scale=float(image_guidance_scale),
                seed=int(seed),
                progress=False,
            )
            if len(subs) == 1 and subs[0].keyword is None and masks is None:
                result = pipe(image, subs[0].text, strength=float(strength), **common)
                return result.images[0], [], None
            foi = dataclasses.replace(foi_config, strength=float(strength))
            result = pipe(image, instructions=subs, foi=foi, masks=None if masks is None else [masks], **common)
            plain = pipe(image, composite_prompt(subs)[0], strength=float(strength), **common).images[0]
        except ValueError as error:  # bad uploads, instructions and settings: shown on the page
            raise gr.Error(str(error)) from None
        edited = result.images[0]
        base = image.resize(edited.size) if image.size != edited.size else image
        masks = [
            (mask_overlay(base, mask), sub.keyword or sub.text)
            for mask, sub in zip(result.masks[0]["image"], subs, strict=True)
        ]
        return edited, masks, plain

    return edit


def brush_background(upload, max_size: int):
    """The uploaded picture as the brush's canvas, at the size the edit will use (``None``: clear it; a file that is
    not a picture is left to the edit's message)."""
    try:
        return read_upload(None if upload is None else upload["path"], max_size)
    except ValueError:
        return None


def build_app(pipe, foi_config, max_size: int, model_name: str):
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
                masks = gr.Gallery(label="FoI masks", elem_id="masks", columns=4, height="auto")
                plain = gr.Image(
                    label="IP2P (instructions joined)",
                    type="pil",
                    format="png",
                    elem_id="plain",
                    interactive=False,
                    height=320,
                )
        edit = make_editor(pipe, foi_config, max_size, brush)
        inputs = [image, instructions, brush, steps, guidance, image_guidance, seed, strength]
        run.click(edit, inputs, [edited, masks, plain], api_name="edit", preprocess=False)
        image.change(lambda upload: brush_background(upload, max_size), image, brush, preprocess=False)
        if EXAMPLE.is_file():
            gr.Examples(
                [[str(EXAMPLE), "make the circle blue | circle\nremove the square | square"]], [image, instructions]
            )
    # One worker: requests share the pipeline and its compiled samplers, and wait their turn.
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def main(argv=None) -> int:
    args = parse_args(argv)
    from ip2p_jax.weights import CheckpointError

    try:
        pipe, foi_config = load_pipeline(args)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    max_size = args.max_size or native_size(args.model_config or args.model, pipe.vae_scale_factor)
    launch(build_app(pipe, foi_config, max_size, shown_name(args.model)), args.host, args.port, share=args.share)
    return 0


def launch(app, host: str, port: int, *, share: bool = False, block: bool = True) -> None:
    """Serves the page (``block=False`` returns once it is up, for tests)."""
    app.launch(server_name=host, server_port=port, share=share, css=CSS, prevent_thread_lock=not block, quiet=not block)


if __name__ == "__main__":
    sys.exit(main())
