"""The miniature lineage's CLIP (``models/shapes-clip``): a small CLIP trained contrastively on the endless stream
of captioned ShapesEdit scenes (every shape-colour combination). Its text tower is the frozen text encoder of the
lineage's text-to-image and InstructPix2Pix models; the whole CLIP is ShapesEdit's CLIP metric model.

The shipped one in three steps (docs/shapes.md): the random CLIP (``--config.steps=0`` writes it to
``WORKDIR/initial-model`` and stops), its vision tower trained on shape presence (a contrastive loss alone never
taught it shapes), then the CLIP from there (the ``from_vision`` variant):

    python train.py --config configs/shapes_clip.py --workdir runs/shapes-clip-new --config.steps=0
    python tools/vision_shape_probe.py --train --model runs/shapes-clip-new/initial-model --steps 1200 \
        --save runs/shapes-clip-vision
    python train.py --config configs/shapes_clip.py:from_vision --workdir runs/shapes-clip
    python export.py --workdir runs/shapes-clip --out models/shapes-clip
"""

import ml_collections

from ip2p_jax.data.shapes import WORDS
from ip2p_jax.training.config import training_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``""``: from a random CLIP; ``"from_vision"``: from ``runs/shapes-clip-vision``, the random CLIP whose vision
    tower ``tools/vision_shape_probe.py --save`` trained on shape presence, for 1,000 steps."""
    if variant not in ("", "from_vision"):
        raise ValueError(f"unknown variant {variant!r} of configs/shapes_clip.py ('' or 'from_vision')")
    config = training_config("clip")
    config.new_model = dict(
        clip=dict(
            text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
            vision=dict(
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=64,
                patch_size=8,
            ),
            projection_dim=64,
            words=list(WORDS),
        )
    )
    config.steps = 3000
    # Captions in the instructions' grammar (make / turn / into / remove), each with 4 hard negatives: the caption
    # with one word changed so that it no longer describes the picture, shapes first (ip2p_jax/data/hard_negatives.py).
    config.data = dict(
        name="shapes_captions",
        caption_style="instructions",
        hard_negatives=4,
        hard_negative_kinds=("shape", "colour", "background"),
        resolution=64,
        global_batch_size=128,
    )
    # Each picture also against the four shape words alone: the cross-entropy towards the shapes it holds
    # (training/clip.py:word_presence_loss). Without it two runs of 1,065 and 1,269 steps (docs/shapes.md) learnt
    # colours (93-95 % colour pick) but never shapes (shape pick at chance).
    config.objective = dict(presence_weight=1.0)
    config.optim.learning_rate = 5e-4
    config.optim.weight_decay = 0.1
    config.ema.decay = 0.999
    # held-out retrieval and shape / colour picks of the EMA weights every `every` steps (0: never)
    config.sample = dict(every=250, count=0)
    # held-out scenes for retrieval and the picks (training/evaluators.py)
    config.eval = dict(name="retrieval", count=100)
    if variant == "from_vision":
        config.model = "runs/shapes-clip-vision"
        config.steps = 1000
    config.lock()
    return config
