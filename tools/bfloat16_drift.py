"""How far a model's FoI edit moves in bfloat16 from float32, one FoI switch at a time, with the masks fixed.

    python tools/bfloat16_drift.py --model models/shapes-ip2p

README's edit (two sub-instructions on ``examples/shapes.png``) with the model's FoI settings, then with modulation
off, in the composite mode and without decoupled guidance. Each variant runs in float32 and in bfloat16 compute with
the float32 run's masks given to both, so that no mask cell can flip at its threshold; printed: the mean absolute
difference of the two edits in levels of 255 (``tests/test_shipped_model.py`` bounds the model's settings by 3).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = [("make the circle blue", "circle"), ("remove the square", "square")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "shapes-ip2p"), help="an InstructPix2Pix folder")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20, as the test)")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from ip2p_jax.foi import FoIConfig
    from ip2p_jax.pipeline import InstructPix2PixPipeline

    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    settings = dict(num_inference_steps=args.steps, output_type="np", progress=False)
    model_settings = FoIConfig.for_model(args.model)
    variants = {
        "the model's settings": model_settings,
        "modulation off": dataclasses.replace(model_settings, modulation=False),
        "composite text branch": dataclasses.replace(model_settings, text_branches="composite"),
        "decoupled guidance off": dataclasses.replace(model_settings, decoupled_guidance=False),
    }
    pipes = [InstructPix2PixPipeline.from_pretrained(args.model, dtype=dtype) for dtype in (jnp.float32, jnp.bfloat16)]
    masks = pipes[0](image, instructions=INSTRUCTIONS, foi=model_settings, **settings).masks[0]["image"] > 0.5
    for name, config in variants.items():
        float32, bfloat16 = (
            pipe(image, instructions=INSTRUCTIONS, foi=config, masks=[masks], **settings) for pipe in pipes
        )
        print(f"{name}: {255 * float(np.abs(float32.images - bfloat16.images).mean()):.2f} levels", flush=True)


if __name__ == "__main__":
    main()
